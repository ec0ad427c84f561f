"""docker/: the compose file is valid and agrees with the Asterisk configs it mounts."""

from __future__ import annotations

import http.server
import json
import os
import re
import shutil
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import yaml

from tests.readme_text import README

REPO = Path(__file__).resolve().parents[2]
COMPOSE = REPO / "docker" / "docker-compose.yml"
PBX = REPO / "sip_config" / "asterisk"
PJSIP = PBX / "pjsip.conf"


PASSWORD = "test0password0only"


def _compose() -> dict[str, Any]:
    """The compose file as docker-compose reads it with ``CLINIC_REDIS_PASSWORD`` set."""
    text = re.sub(r"\$\{CLINIC_REDIS_PASSWORD:\?[^}]*\}", PASSWORD, COMPOSE.read_text())
    data = yaml.safe_load(text)
    assert isinstance(data, dict)
    return data


def _config(tmp: Path, **env: str) -> subprocess.CompletedProcess[str]:
    exe = shutil.which("docker-compose")
    assert exe is not None, (
        "docker-compose is missing: make install-test (Debian package docker-compose)"
    )
    clean = {k: v for k, v in os.environ.items() if k != "CLINIC_REDIS_PASSWORD"}
    # An empty env file: a user's own docker/.env must not answer for the test.
    empty = tmp / "empty.env"
    empty.write_text("")
    return subprocess.run(
        [exe, "-f", str(COMPOSE), "--env-file", str(empty), "config"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env=clean | env,
    )


def test_compose_file_is_valid(tmp_path: Path) -> None:
    proc = _config(tmp_path, CLINIC_REDIS_PASSWORD=PASSWORD)
    assert proc.returncode == 0, proc.stderr


def test_redis_needs_a_password_and_the_service_has_it(tmp_path: Path) -> None:
    refused = _config(tmp_path)
    assert refused.returncode != 0 and "CLINIC_REDIS_PASSWORD" in refused.stderr
    services = _compose()["services"]
    command = services["redis"]["command"]
    assert command[command.index("--requirepass") + 1] == PASSWORD
    url = services["service"]["environment"]["CLINIC_REDIS_URL"]
    assert url == f"redis://:{PASSWORD}@127.0.0.1:6379/0"


def test_compose_runs_asterisk_redis_and_the_service() -> None:
    services = _compose()["services"]
    assert set(services) == {"asterisk", "redis", "service"}
    mounts = services["asterisk"]["volumes"]
    assert "../sip_config/asterisk:/etc/clinic-asterisk:ro" in mounts


def test_service_credentials_match_the_clinic_endpoint() -> None:
    env = _compose()["services"]["service"]["environment"]
    pjsip = PJSIP.read_text()
    auth = re.search(
        r"^\[clinic\]\(phone-auth\)\s*\nusername=(\S+)\s*\npassword=(\S+)", pjsip, re.M
    )
    assert auth is not None, "the clinic auth section moved: update this test"
    assert (env["CLINIC_SIP_USER"], env["CLINIC_SIP_PASSWORD"]) == (auth.group(1), auth.group(2))
    assert env["CLINIC_SIP_REGISTRAR"] == "sip:127.0.0.1:5160"
    assert "bind=127.0.0.1:5160" in pjsip


def test_service_settings_are_accepted() -> None:
    from sip_config.settings import Settings

    env = {k: str(v) for k, v in _compose()["services"]["service"]["environment"].items()}
    settings = Settings.from_env(env)
    assert settings.sip.flashcall_prefix == "+447400"


def test_the_stop_grace_period_outlasts_every_deadline_of_the_stop() -> None:
    """As the systemd unit's TimeoutStopSec= (test_systemd_unit.py): the sum of every stop
    deadline of the code, as if none overlapped, with the unit's margin. Cut short, Docker's
    SIGKILL ends calls with no BYE and the drain's records unsaved."""
    from sip_config.settings import Settings
    from tests.unit.test_systemd_unit import stop_seconds

    service = _compose()["services"]["service"]
    settings = Settings.from_env({k: str(v) for k, v in service["environment"].items()})
    needed = stop_seconds(settings.ivr.call_drain_s)
    grace = re.fullmatch(r"([0-9]+)s", str(service["stop_grace_period"]))
    assert grace is not None, service["stop_grace_period"]
    assert int(grace.group(1)) >= needed + 10, f"the stop's deadlines add up to {needed:g} s"
    text = " ".join(README.read_text(encoding="utf-8").split())
    assert f"`docker/docker-compose.yml` allows {grace.group(1)} s" in text
    # The file's own comment says the sum too: it went stale when a deadline grew.
    drain_s = settings.ivr.call_drain_s
    said = " ".join(ln.strip().lstrip("#") for ln in COMPOSE.read_text().splitlines())
    assert f"CLINIC_CALL_DRAIN_S + {needed - drain_s:g} s, {needed:g} s with the default" in (
        " ".join(said.split())
    ), "docker-compose.yml's comment on stop_grace_period gives a stale sum"


def test_docker_stop_signals_serve_alone() -> None:
    """SIGTERM reaches serve itself (no shell between: exec-form CMD), through Docker's init,
    which passes it to serve alone and reaps orphans; serve stops its children in order."""
    service = _compose()["services"]["service"]
    assert service["init"] is True
    assert service.get("stop_signal", "SIGTERM") == "SIGTERM"
    dockerfile = (REPO / "docker" / "Dockerfile").read_text()
    assert "STOPSIGNAL" not in dockerfile
    assert 'CMD ["clinic-voice", "serve"]' in dockerfile
    assert "ENTRYPOINT" not in dockerfile


def test_no_container_dumps_core() -> None:
    """The service's processes forbid core dumps themselves (sip_config/core_dumps.py), once
    Python has started; the compose file sets the limit from each container's first process,
    on Redis (phone numbers) and Asterisk (calls' audio) too."""
    services = _compose()["services"]
    assert {name: s.get("ulimits") for name, s in services.items()} == {
        name: {"core": 0} for name in services
    }
    text = " ".join(README.read_text(encoding="utf-8").split())
    assert "the compose file (`ulimits: core: 0`, on Redis and Asterisk too)" in text


def test_vosk_model_is_pinned_by_checksum() -> None:
    dockerfile = (REPO / "docker" / "Dockerfile").read_text()
    assert "ARG VOSK_MODEL=vosk-model-small-en-us-0.15" in dockerfile
    assert re.search(r"ARG VOSK_MODEL_SHA256=[0-9a-f]{64}\n", dockerfile)
    assert "sha256sum -c -" in dockerfile


def test_the_images_healthcheck_runs_on_its_python() -> None:
    # It nested quotes in an f-string, Python 3.12 syntax: on the image's 3.11 a SyntaxError,
    # and the container was always unhealthy. This runs the command's code against a real
    # listener answering /readyz, on this 3.11.
    dockerfile = (REPO / "docker" / "Dockerfile").read_text()
    assert "FROM python:3.11" in dockerfile
    cmd = re.search(r"HEALTHCHECK[^\n]*\\\n\s*CMD (\[.*\])", dockerfile)
    assert cmd is not None, "no exec-form HEALTHCHECK"
    argv = json.loads(cmd.group(1))
    assert argv[:2] == ["python", "-c"]

    class Ready(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200 if self.path == "/readyz" else 404)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Ready)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        env = {**os.environ, "CLINIC_HTTP_ADDR": f"0.0.0.0:{server.server_address[1]}"}
        done = subprocess.run([sys.executable, *argv[1:]], env=env, timeout=20, check=False)
    finally:
        server.shutdown()
        server.server_close()
    assert done.returncode == 0


def _image_packages() -> set[str]:
    """What docker/Dockerfile.asterisk's ``apt-get install`` installs."""
    dockerfile = (REPO / "docker" / "Dockerfile.asterisk").read_text().replace("\\\n", " ")
    m = re.search(r"apt-get install -y --no-install-recommends ([^&]+)&&", dockerfile)
    assert m is not None, "the install line of Dockerfile.asterisk moved: update this test"
    return set(m.group(1).split())


def test_the_asterisk_image_installs_what_the_rig_does() -> None:
    """The e2e tests run the rig's chroot; users run the image: both must hold the same
    packages, or a config that works in the tests (music on hold) is silent in Docker."""
    from tests.e2e.rig import PACKAGES

    assert _image_packages() == set(PACKAGES)


def _conf_sections(text: str) -> dict[str, dict[str, str]]:
    sections: dict[str, dict[str, str]] = {}
    current: dict[str, str] = {}
    for raw in text.splitlines():
        line = raw.split(";", 1)[0].strip()
        if m := re.fullmatch(r"\[([^\]]+)\](?:\(.*\))?", line):  # [6001](phone): 6001
            current = sections.setdefault(m.group(1), {})
        elif "=" in line and not line.startswith("load"):
            key, _, value = line.partition("=")
            current[key.strip()] = value.strip()
    return sections


def test_music_on_hold_is_loaded_and_found_where_its_package_puts_it() -> None:
    """A caller the nurse or the staff desk holds hears music: res_musiconhold is loaded,
    the default class plays the GSM files of asterisk-moh-opsound-gsm from
    /usr/share/asterisk/moh (the package's folder; not under /var/lib/asterisk, which the
    compose file covers with a volume), and GSM can be read and turned into G.711."""
    from tests.e2e.rig import PACKAGES

    loaded = set(re.findall(r"^load => (\S+)$", (PBX / "modules.conf").read_text(), re.M))
    assert {"res_musiconhold.so", "format_gsm.so", "codec_gsm.so"} <= loaded
    default = _conf_sections((PBX / "musiconhold.conf").read_text())["default"]
    assert default == {"mode": "files", "directory": "/usr/share/asterisk/moh"}
    assert "asterisk-moh-opsound-gsm" in PACKAGES
    mounts = [v.split(":")[1] for v in _compose()["services"]["asterisk"]["volumes"]]
    assert not [m for m in mounts if default["directory"].startswith(m.rstrip("/") + "/")]
    # The bot's endpoint passes holds on (no music to the bot); the phones' do not.
    passing = {
        k: v["moh_passthrough"]
        for k, v in _conf_sections(PJSIP.read_text()).items()
        if "moh_passthrough" in v
    }
    assert passing == {"clinic": "yes"}
