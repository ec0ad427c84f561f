"""``make asterisk`` (tests/e2e/rig.py ``up``) keeps the service on 127.0.0.1, but takes the
ports of CLINIC_HTTP_ADDR and CLINIC_SIP_ADDR when they are set: with 8080 taken by something
else, a tester had no way to start the rig's service but to stop that."""

from __future__ import annotations

import pytest

from tests.e2e import rig


def test_the_rig_service_takes_the_ports_of_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("CLINIC_HTTP_ADDR", "0.0.0.0:18080")
    monkeypatch.setenv("CLINIC_SIP_ADDR", "127.0.0.1:15060")
    service = rig._local_service(5160)
    assert service.http_addr == "127.0.0.1:18080"
    assert service.env["CLINIC_HTTP_ADDR"] == "127.0.0.1:18080"
    assert service.env["CLINIC_SIP_ADDR"] == "127.0.0.1:15060"
    assert service.env["CLINIC_SIP_REGISTRAR"] == "sip:127.0.0.1:5160"


def test_unset_ports_are_the_readme_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CLINIC_HTTP_ADDR", raising=False)
    monkeypatch.delenv("CLINIC_SIP_ADDR", raising=False)
    service = rig._local_service(5160)
    assert service.env["CLINIC_HTTP_ADDR"] == "127.0.0.1:8080"
    assert service.env["CLINIC_SIP_ADDR"] == "127.0.0.1:5060"


@pytest.mark.parametrize("value", ["8080", "127.0.0.1:", "127.0.0.1:http", "127.0.0.1:70000"])
def test_a_port_that_is_no_port_is_refused_by_name(
    monkeypatch: pytest.MonkeyPatch, value: str
) -> None:
    monkeypatch.setenv("CLINIC_HTTP_ADDR", value)
    with pytest.raises(rig.RigError, match="CLINIC_HTTP_ADDR"):
        rig._local_service(5160)


def test_the_stop_does_not_read_the_ports(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("CLINIC_HTTP_ADDR", "no port")
    monkeypatch.setattr(rig, "VAR", rig.REPO / "var-none-here")
    monkeypatch.setenv("ASTERISK_ROOTFS", str(rig.REPO / "no-rootfs-here"))
    assert rig.cmd_down(5160) == 0
    assert "nothing was running" in capsys.readouterr().out
