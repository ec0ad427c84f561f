"""The e2e rig's stop of the service it started (tests/e2e/rig.py ``ServiceProcess.stop``)
checks the service's exit: an HTTP worker that does not stop as asked shows nowhere else but
in an ERROR line of its log, and in serve's exit 1. A small HTTP server stands in for serve."""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

import pytest

from tests.e2e import rig

# Answers /readyz 200 till SIGTERM, then exits with the status it is given.
_SERVE = """
import http.server, os, signal, sys
code, port = int(sys.argv[1]), int(sys.argv[2])
signal.signal(signal.SIGTERM, lambda *_: os._exit(code))
class Ready(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200)
        self.end_headers()
    def log_message(self, *args):
        pass
http.server.HTTPServer(("127.0.0.1", port), Ready).serve_forever()
"""


def _service(tmp_path: Path, exits_with: int) -> rig.ServiceProcess:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = int(s.getsockname()[1])
    service = rig.ServiceProcess(
        {**os.environ, "CLINIC_HTTP_ADDR": f"127.0.0.1:{port}"},
        tmp_path / "service.pid",
        tmp_path / "service.log",
        argv=[sys.executable, "-c", _SERVE, str(exits_with), str(port)],
    )
    service.start(timeout_s=20)
    return service


def test_a_service_that_stops_as_asked_is_stopped(tmp_path: Path) -> None:
    assert _service(tmp_path, 0).stop()


def test_a_service_that_exits_1_at_its_stop_fails_the_stop(tmp_path: Path) -> None:
    # Its exit was lost: the rig reaped it with os.waitpid, and Popen read the ECHILD of its
    # own wait as exit 0.
    with pytest.raises(rig.RigError, match="the service exited with 1 at its stop, not 0"):
        _service(tmp_path, 1).stop()


def test_a_test_that_expects_another_exit_says_so(tmp_path: Path) -> None:
    assert _service(tmp_path, 1).stop(exit_code=1)
    assert _service(tmp_path, 1).stop(exit_code=None)
