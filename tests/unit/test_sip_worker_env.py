"""What a SIP worker process inherits from serve: no secret but its SIP password."""

from __future__ import annotations

from voice.sip.pool import worker_env


def test_a_sip_worker_gets_no_service_secret_nor_api_key() -> None:
    serve_env = {
        "PATH": "/usr/bin",
        "CLINIC_SECRET": "s" * 40,
        "CLINIC_API_KEYS": "k" * 20,
        "CLINIC_CALLS_API_KEYS": "c" * 20,
        "CLINIC_SMS_HTTP_TOKEN": "token",
        "CLINIC_REDIS_URL": "redis://:pw@127.0.0.1:6379",
        "CLINIC_SIP_PASSWORD": "old",
    }
    env = worker_env(serve_env, "sip-pass")
    assert env["PATH"] == "/usr/bin"
    assert env["CLINIC_SIP_PASSWORD"] == "sip-pass"
    assert [k for k in env if k.startswith("CLINIC_")] == ["CLINIC_SIP_PASSWORD"]
    assert "MALLOC_TRIM_THRESHOLD_" in env
