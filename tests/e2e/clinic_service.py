"""The clinic-voice service behind the rig's Asterisk, for the e2e modules that run it.

Each module starts its own (a module-scoped fixture around :func:`running_service`): two at
once would both register to the ``clinic`` AOR, and the clinic line would hunt over both.
"""

from __future__ import annotations

import contextlib
import json
import secrets
import socket
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import workers_exited_non_zero
from tests.e2e.conftest import failed
from tests.e2e.rig import AsteriskRig, RigError, ServiceProcess, service_env
from tests.peers.pbx_service import PINNED_CODE_ENV
from tests.peers.pbx_softphone import Softphone, call_state


class Api:
    """A tiny client for the verification API (bearer key, JSON in and out)."""

    def __init__(
        self, base: str, key: str, pinned_code_file: Path, process: ServiceProcess
    ) -> None:
        self.base = base
        self.key = key
        self.calls_key = key + "-calls"
        self.pinned_code_file = pinned_code_file
        self.process = process

    def pin_next_code(self, code: str) -> None:
        """The service's next code will be ``code`` (see ``tests/peers/pbx_service.py``)."""
        self.pinned_code_file.write_text(code)

    def get(self, path: str) -> tuple[int, dict[str, Any]]:
        # Call records answer only the call records' key (CLINIC_CALLS_API_KEYS).
        key = self.calls_key if path.startswith("/v1/calls") else self.key
        req = urllib.request.Request(  # noqa: S310 - http://127.0.0.1 only
            self.base + path, headers={"Authorization": f"Bearer {key}"}
        )
        return self._send(req)

    def post(self, path: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        req = urllib.request.Request(  # noqa: S310 - http://127.0.0.1 only
            self.base + path,
            data=json.dumps(body).encode(),
            method="POST",
            headers={"Authorization": f"Bearer {self.key}", "Content-Type": "application/json"},
        )
        return self._send(req)

    def wait_call_record(
        self, match: Callable[[dict[str, Any]], bool], timeout_s: float
    ) -> dict[str, Any]:
        """The newest clinic-line call record that ``match``es, once the service stored it."""
        deadline = time.monotonic() + timeout_s
        seen: list[dict[str, Any]] = []
        while time.monotonic() < deadline:
            status, page = self.get("/v1/calls?limit=10")
            assert status == 200, page
            seen = page["calls"]
            for call in seen:
                if match(call):
                    return call
            threading.Event().wait(0.25)
        raise AssertionError(f"no matching call record within {timeout_s} s; newest: {seen[:3]}")

    @staticmethod
    def _send(req: urllib.request.Request) -> tuple[int, dict[str, Any]]:
        try:
            with urllib.request.urlopen(req, timeout=10) as resp:  # noqa: S310
                return int(resp.status), json.loads(resp.read())
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read() or b"{}")


def free_tcp_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def contacts(asterisk: AsteriskRig) -> int:
    """How many service workers Asterisk has registered (contacts of the ``clinic`` AOR)."""
    return asterisk.cli("pjsip show aor clinic").count("Contact:  clinic/")


def wait_contacts(asterisk: AsteriskRig, n: int, timeout_s: float) -> None:
    """Wait until at least ``n`` service workers are registered, else fail saying so."""
    deadline = time.monotonic() + timeout_s
    while contacts(asterisk) < n:
        if time.monotonic() > deadline:
            raise AssertionError(
                f"{n} service workers not registered in {timeout_s} s: "
                f"{asterisk.cli('pjsip show aor clinic')}"
            )
        threading.Event().wait(0.25)


def wait_contacts_gone(asterisk: AsteriskRig, timeout_s: float) -> None:
    """Wait until Asterisk holds no contact of a service's workers (after its stop).

    A contact left behind looks reachable until qualify finds it dead (qualify_frequency
    10 s, qualify_timeout 3 s in pjsip.conf): the clinic line hunts into it first, a call
    waits Dial's 20 s there, and the next module's service would inherit that. So a stop
    must take them out (the workers' un-REGISTER, with the credentials Asterisk asks for)."""
    deadline = time.monotonic() + timeout_s
    while contacts(asterisk):
        if time.monotonic() > deadline:
            raise AssertionError(
                f"the stopped service's workers are still registered after {timeout_s} s: "
                f"{asterisk.cli('pjsip show aor clinic')}"
            )
        threading.Event().wait(0.1)


@contextlib.contextmanager
def running_service(
    asterisk: AsteriskRig, data: Path, *, workers: int, env: dict[str, str] | None = None
) -> Iterator[Api]:
    """The service registered to the rig's Asterisk with its own ports and data dir ``data``,
    ``workers`` SIP workers and the extra ``CLINIC_*`` settings in ``env``; stopped at the
    end, and a failure when it did not stop cleanly (or had died)."""
    http = f"127.0.0.1:{free_tcp_port()}"
    key = secrets.token_urlsafe(24)
    full = service_env(asterisk.port, http_addr=http, sip_addr="127.0.0.1:0", data_dir=data)
    full.update(
        CLINIC_API_KEYS=key,
        CLINIC_CALLS_API_KEYS=key + "-calls",
        CLINIC_SIP_WORKERS=str(workers),
        CLINIC_LOG_LEVEL="DEBUG",
    )
    full.update(env or {})
    pinned = data / "pinned-code"
    full[PINNED_CODE_ENV] = str(pinned)
    proc = ServiceProcess(
        full,
        data / "service.pid",
        data / "service.log",
        argv=[sys.executable, "-m", "tests.peers.pbx_service"],
    )
    proc.start(timeout_s=60)
    try:
        wait_contacts(asterisk, workers, 30)
        yield Api(f"http://{http}", key, pinned, proc)
    finally:
        try:
            stopped = proc.stop()  # exit 0: every SIP and HTTP worker stopped as asked
        except RigError as exc:
            # A SIP worker's exit that made it so is named in its log: say which.
            exits = workers_exited_non_zero(proc.logfile.read_text(errors="replace"))
            pytest.fail("; ".join([*exits, str(exc)]))
        if not stopped:
            pytest.fail(f"the service died during the tests; {proc.logfile}:\n{proc.log_tail(40)}")
        wait_contacts_gone(asterisk, timeout_s=3)


@contextlib.contextmanager
def service_log_on_failure(request: pytest.FixtureRequest, service: Api) -> Iterator[None]:
    """When the test fails, show what the service logged meanwhile (prompt renders left out);
    after it, drop a pinned code the service did not use."""
    log = service.process.logfile
    offset = log.stat().st_size if log.exists() else 0
    yield
    # A test that failed before the service drew its pinned code must not leave it behind.
    service.pinned_code_file.unlink(missing_ok=True)
    if failed(request):
        with open(log, "rb") as f:
            f.seek(offset)
            lines = f.read().decode(errors="replace").splitlines()
        print(f"--- the service ({log}) during the test ---")
        print("\n".join([line for line in lines if "rendering a prompt" not in line][-60:]))


def short_clinic_call(
    service: Api, caller: Softphone, asterisk: AsteriskRig, **call: Any
) -> dict[str, Any]:
    """``caller`` dials the clinic line (700, with the softphone's ``call`` options ``call``),
    hangs up as soon as the bot's audio is up, and gets the call's record once the service
    stored it (the calls of a module come one at a time)."""
    status, before = service.get("/v1/calls?limit=100")
    assert status == 200, before
    known = {c["id"] for c in before["calls"]}
    caller.send("call", uri=f"sip:700@127.0.0.1:{asterisk.port}", **call)
    caller.expect("call_state", where=call_state("CONFIRMED", 200), timeout_s=15)
    caller.expect("media_active", timeout_s=5)
    caller.send("hangup")
    caller.expect("call_state", where=call_state("DISCONNECTED"), timeout_s=10)
    return service.wait_call_record(lambda c: c["id"] not in known, timeout_s=20)
