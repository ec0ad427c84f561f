"""README "SIP, capacity and scaling" says what the code does: its numbers, the metrics
`/metrics` emits under the names it gives, the log line it quotes, and what the front
answers (operators size, alert and set stop grace periods by them)."""

from __future__ import annotations

import logging
import re

import pytest

from clinic_voice import (
    cli,
    clinic_line,
    http_workers,
    main_link,
    redis_durability,
    redis_server,
    shared_secret,
)
from clinic_voice.metrics import Metrics
from clinic_voice.wiring import new_sip_pool, show_sip_pool
from sip_config.clock import FakeClock
from sip_config.settings import (
    MAX_PREVIOUS_SECRETS,
    SIP_CALLS_PER_WORKER,
    HostPort,
    Settings,
    SettingsError,
)
from tests.conftest import sip_settings
from tests.readme_text import README, folded
from verification import dispatcher, webhooks
from verification.rules import DeliveryKind
from voice.ivr import hold_limit, session
from voice.ivr.store import COMPACT_ASKED
from voice.sip import (
    flash_dialog,
    flash_uac,
    front,
    message,
    methods,
    pjsua,
    pool,
    redirect_source,
    transaction,
)
from voice.sip.outcome import SipStatus
from voice.sip.pool import SipPool

DEFAULTS = Settings.from_env({})
# How long a verification call waits for a slot, in the pool as serve builds it.
QUEUE_S = new_sip_pool(sip_settings(1), Metrics(), FakeClock())._queue_timeout_s


def sip_section() -> str:
    """The section, its line breaks and indents folded to single spaces."""
    return folded("SIP, capacity and scaling")


# (what the README says, verbatim but for line breaks; the value in the code; the number it
# states). A changed constant fails here until the README says the new number.
NUMBERS = [
    ("one hold lasts at most 5 minutes", hold_limit.HOLD_MAX_S, 5 * 60),
    ("a call's holds at most 10 minutes together", hold_limit.HOLD_TOTAL_S, 10 * 60),
    ("the hold after a call's tenth ends it at once", hold_limit.HOLDS_MAX, 10),
    ("The pjsua2 wheel allows 4 calls per process", pjsua.MAX_CALLS, 4),
    ("allows 4 calls per process", SIP_CALLS_PER_WORKER, 4),
    ("has not heard from for 1 s", pool.PING_EVERY_S, 1),
    ("kills one that has answered nothing for 30 s", pool.WORKER_SILENT_S, 30),
    ("a worker that has answered nothing for 3 s", pool.QUIET_AFTER_S, 3),
    ("not reported within 30 s of its start", pool._START_TIMEOUT_S, 30),
    ("keeps an answered call for 32 s after its end", flash_dialog.TIMER_D_S, 32),
    ("within 64*T1 = 32 s of the first", flash_dialog.TIMER_B_S, 32),
    ("16 forks at most", flash_dialog.MAX_FORKS, 16),
    ("raise it to 4194304", flash_uac.RECEIVE_BUFFER, 4194304),
    ("4 MiB receive buffer", flash_uac.RECEIVE_BUFFER, 4 << 20),
    ("Each 302 holds its worker's slot for 2 s", pool._REDIRECT_RESERVE_S, 2),
    ("that 302 (32 s after the first) and 2 s more", transaction.TIMER_H_S, 32),
    ("(34 s from the 302 that took it", pool._REDIRECT_HOLD_MAX_S, 34),
    ("holds at most 4 slots for 302s it has not followed", redirect_source.MAX_UNFOLLOWED, 4),
    ("and 4 new callers of one trunk within one round trip", redirect_source.MAX_UNFOLLOWED, 4),
    (
        "takes at most 4 of the 16 slots of the default settings",
        (redirect_source.MAX_UNFOLLOWED, DEFAULTS.sip.workers * SIP_CALLS_PER_WORKER),
        (4, 16),
    ),
    (
        "(`CLINIC_SIP_WORKERS` 4, 4 calls each)",
        (DEFAULTS.sip.workers, SIP_CALLS_PER_WORKER),
        (4, 4),
    ),
    ("16 forged INVITEs from one address", DEFAULTS.sip.workers * SIP_CALLS_PER_WORKER, 16),
    ("as do 4 within one round trip; a fifth one then", redirect_source.MAX_UNFOLLOWED, 4),
    ("a fifth one then (five callers", redirect_source.MAX_UNFOLLOWED + 1, 5),
    ("as soon as one of the four arrived", redirect_source.MAX_UNFOLLOWED, 4),
    ("an IPv6 address by its /64", redirect_source._IPV6_SOURCE_PREFIX, 64),
    ("with `Retry-After: 2` (the time a 302 not followed", redirect_source.RETRY_AFTER_S, 2),
    ("with `Retry-After: 2` (the time a 302 not followed", pool._REDIRECT_RESERVE_S, 2),
    ("at most one line a minute, with their count", redirect_source._LOG_EVERY_S, 60),
    ("a flood from many addresses, 4 slots each", redirect_source.MAX_UNFOLLOWED, 4),
    ("fills that address's 4 slots with a few", redirect_source.MAX_UNFOLLOWED, 4),
    ("(a new one each 2 s,", pool._REDIRECT_RESERVE_S, 2),
    ("fewer forged INVITEs than the 16", DEFAULTS.sip.workers * SIP_CALLS_PER_WORKER, 16),
    (
        "(4 addresses for the default 16 slots)",
        (
            -(-DEFAULTS.sip.workers * SIP_CALLS_PER_WORKER // redirect_source.MAX_UNFOLLOWED),
            DEFAULTS.sip.workers * SIP_CALLS_PER_WORKER,
        ),
        (4, 16),
    ),
    ("does not take its answer) for 30 s", front.TCP_IDLE_S, 30),
    ("would take it over 64 KiB with `513 Message Too Large`", front._MAX_MESSAGE, 64 << 10),
    ("most 1024 connections open", front.MAX_TCP_CONNECTIONS, 1024),
    ("16 from one address", front.MAX_TCP_PER_ADDRESS, 16),
    ("for 32 s (Timer J; at most 32768 such answers", transaction.TIMER_J_S, 32),
    ("at most 32768 such answers", transaction.MAX_REMEMBERED, 32768),
    ("for 32 s (Timer H) the front answers each copy", transaction.TIMER_H_S, 32),
    ("at more than 32768 INVITEs in that time", transaction.MAX_REMEMBERED, 32768),
    ("(`CLINIC_SIP_WORKERS`; 4 of the default 16)", DEFAULTS.sip.caller_slots, 4),
    ("4 of the default 16", DEFAULTS.sip.workers * SIP_CALLS_PER_WORKER, 16),
    ("finds no slot it may take within 2 s", QUEUE_S, 2),
    ("(the count since the previous such line, at most one a minute", pool._BUSY_LOG_S, 60),
    ("a worker that has not answered in 0.5 s", http_workers.SNAPSHOT_DEADLINE_S, 0.5),
    ("its state, every half second", http_workers.STATE_EVERY_S, 0.5),
    ("within the last 2 s", main_link.STATE_STALE_S, 2),
    ("a running worker sends one every second", main_link.METRICS_EVERY_S, 1),
    ("(a timer for 30 s", dispatcher.LEASE_S, 30),
    ("a webhook job for 60 s or more", webhooks.LEASE_S, 60),
    ("their lease (60 s) ends", webhooks.LEASE_S, 60),
    ("While it runs it looks again every 2 s", shared_secret.HOLD_S, 2),
    ("give those in flight 5 s side by side", cli.SHUTDOWN_GRACE_S, 5),
    ("`CLINIC_CALL_DRAIN_S` (20 s)", DEFAULTS.ivr.call_drain_s, 20),
    ("After at most 20 s more the SIP workers hang up", clinic_line.CLOSE_NOTICE_S, 20),
    ("answered), within 5 s", pool.WORKER_STOP_S, 5),
    ("Those 5 s include up to 2 s for the far ends' answers", pool.WORKER_STOP_S, 5),
    ("Those 5 s include up to 2 s for the far ends' answers", pjsua.STOP_ANSWERS_S, 2),
    ("was still starting at the stop, not up within 5 s", pool.WORKER_STOP_S, 5),
    ("get up to 5 s to be saved (2 s for Redis)", pool.CALLS_WIND_UP_S, 5),
    ("get up to 5 s to be saved (2 s for Redis)", session.STOP_SAVE_S, 2),
    ("after 1 s more the stop goes on without it", pool.TASKS_LEFT_S, 1),
    (
        "`CLINIC_CALL_DRAIN_S` + 20 s + 5 s + 6 s",
        (
            clinic_line.CLOSE_NOTICE_S,
            pool.WORKER_STOP_S,
            pool.CALLS_WIND_UP_S + pool.TASKS_LEFT_S,
        ),
        (20, 5, 6),
    ),
    ("50 ids to a line", dispatcher.IDS_PER_LINE, 50),
    ("Redis 7.0 or later", redis_durability.MIN_VERSION, (7, 0)),
    ("rewrite it once a day (`BGREWRITEAOF`)", redis_server.AOF_COMPACT_S, 86400),
    ("sets `cv:aof-compact-asked`", COMPACT_ASKED, "cv:aof-compact-asked"),
    ("which `serve` looks for every 5 minutes", redis_server.AOF_ASKED_POLL_S, 300),
    ("if older ones are still within their time; at most 16", MAX_PREVIOUS_SECRETS, 16),
    ("`CLINIC_CODE_TTL_S`, 10 minutes by default", DEFAULTS.verification.code_ttl_s, 600),
    ("Deleting the Redis key `cv:secret-fingerprint`", shared_secret.KEY, "cv:secret-fingerprint"),
    (
        "(`run/http-workers.sock`, mode 0600",
        http_workers.control_path(README.parent).relative_to(README.parent).as_posix(),
        "run/http-workers.sock",
    ),
]


@pytest.mark.parametrize(("said", "value", "number"), NUMBERS, ids=[n[0] for n in NUMBERS])
def test_the_numbers_the_readme_states_are_the_codes(
    said: str, value: object, number: object
) -> None:
    assert said in sip_section(), f"the README no longer says {said!r}"
    assert value == number, f"the README says {said!r}; the code has {value!r}"


def _full_pool(workers: int, clock: FakeClock, metrics: Metrics) -> SipPool:
    """serve's pool (its events counted in ``metrics``), as if each worker had started and
    reported its 4 free slots."""
    p = new_sip_pool(sip_settings(workers, caller_slots=workers), metrics, clock)
    for i, w in enumerate(p._workers):
        w.up, w.free_slots, w.port = True, SIP_CALLS_PER_WORKER, 6000 + i
    return p


def test_every_metric_the_section_names_is_emitted_with_its_labels() -> None:
    """Each `clinic_*` name in the section, and each label value it alerts on, is in what
    `/metrics` renders for serve's pool (a caller refused and a delivery reported)."""
    metrics, clock = Metrics(), FakeClock()
    p = _full_pool(2, clock, metrics)
    while p.pick_inbound(f"c{clock.monotonic()}@peer") != SipStatus.BUSY_HERE:
        clock.advance(0.001)
    show_sip_pool(metrics, p)
    metrics.deliveries.inc(channel="voice", outcome=DeliveryKind.UNDELIVERABLE.value)
    text = metrics.render()
    emitted = set(re.findall(r"^# TYPE (\w+) ", text, re.MULTILINE))
    named = set(re.findall(r"`(clinic_\w+)", sip_section()))
    assert named, "the section names no metric"
    assert not named - emitted, f"named but not emitted: {sorted(named - emitted)}"
    section = sip_section()
    for sample in (
        'clinic_calls_total{outcome="refused_busy"}',
        'clinic_deliveries_total{outcome="undeliverable"}',
        'clinic_sip_slots{state="free"}',
        'clinic_sip_workers{state="up"}',
    ):
        assert sample in section, sample
        name, label = sample[:-1].split("{")
        assert re.search(rf"^{name}{{[^}}]*{label}[,}}]", text, re.MULTILINE), sample
    for state in ("in_use", "reserved", "free"):
        assert f"`{state}`" in section
        assert f'clinic_sip_slots{{state="{state}"}}' in text
    assert f"clinic_sip_slots_kept_for_callers {2}" in text


def test_the_busy_warning_is_the_line_the_readme_quotes(caplog: pytest.LogCaptureFixture) -> None:
    """Every slot taken: one WARNING beginning as the README says, naming both settings and
    no caller; the next callers within the minute are counted into the next line."""
    section = sip_section()
    assert "WARNING beginning `SIP: every call slot is taken`" in section
    assert "which names `CLINIC_SIP_WORKERS` and `CLINIC_SIP_CALLER_SLOTS`" in section
    metrics, clock = Metrics(), FakeClock()
    p = _full_pool(1, clock, metrics)
    caplog.set_level(logging.INFO, logger=pool.__name__)
    callers = [f"+4420794600{n:02d}@peer" for n in range(8)]
    picks = [p.pick_inbound(c) for c in callers]
    assert picks.count(SipStatus.BUSY_HERE) == 4, picks
    clock.advance(pool._BUSY_LOG_S)  # the redirected callers arrived: their slots are calls
    p._workers[0].free_slots = 0
    assert p.pick_inbound("late@peer") == SipStatus.BUSY_HERE
    lines = [r for r in caplog.records if "every call slot" in r.getMessage()]
    assert [r.levelno for r in lines] == [logging.WARNING, logging.WARNING]
    assert all(r.getMessage().startswith("SIP: every call slot is taken") for r in lines)
    assert all(
        "CLINIC_SIP_WORKERS" in r.getMessage() and "CLINIC_SIP_CALLER_SLOTS" in r.getMessage()
        for r in lines
    )
    assert "4 inbound call(s) refused" in lines[1].getMessage()  # 3 unlogged and the late one
    assert not any("+44" in r.getMessage() for r in caplog.records)
    assert metrics.calls.value(outcome="refused_busy") == 5


def test_the_unfollowed_302s_warning_is_the_line_the_readme_quotes(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A source at its cap of 302s not followed: the WARNING begins as the README quotes it
    and names the source; the refusals within the minute go into the next line."""
    quoted = "SIP front: N INVITE(s) refused with 503 since the previous line of this kind"
    assert f"(`{quoted}`)" in sip_section()
    caplog.set_level(logging.INFO, logger=redirect_source.__name__)
    clock = FakeClock()
    seen = redirect_source.UnfollowedRedirects(lambda call_id, worker: True, clock)
    for n in range(redirect_source.MAX_UNFOLLOWED):
        seen.redirected("198.51.100.7", f"c{n}", HostPort("127.0.0.1", 5062))
    assert not seen.admits("198.51.100.7", "x") and not seen.admits("198.51.100.7", "y")
    clock.advance(redirect_source._LOG_EVERY_S)
    assert not seen.admits("198.51.100.7", "z")
    lines = [r for r in caplog.records if r.name == redirect_source.__name__]
    assert [r.levelno for r in lines] == [logging.WARNING, logging.WARNING]
    said = [r.getMessage() for r in lines]
    assert said[0].startswith(quoted.replace("N", "1", 1)), said
    assert said[1].startswith(quoted.replace("N", "2", 1)), said
    assert all("198.51.100.7" in line for line in said), said


def test_the_no_slot_details_are_the_readmes() -> None:
    """The two details of a verification call that found no slot, as the README words them
    (the channel puts `no SIP capacity: ` before each)."""
    section = sip_section()
    metrics, clock = Metrics(), FakeClock()
    p = _full_pool(3, clock, metrics)
    for w in p._workers:  # every slot taken
        w.free_slots = 0
    full = str(p._no_slot("x"))
    assert "`no SIP capacity: all N SIP workers are full`" in section
    assert full == "all 3 SIP workers are full"
    for w in p._workers:  # free slots, but only the callers' (3 of them)
        w.free_slots = 1
    kept = str(p._no_slot("y"))
    assert f"`no SIP capacity: {kept}`" in section
    assert metrics.sip_kept_for_callers.value() == 1


def _request(method: str, *, call_id: bool = True) -> message.SipMessage:
    lines = [
        f"{method} sip:clinic@127.0.0.1:5060 SIP/2.0",
        "Via: SIP/2.0/UDP 127.0.0.1:5099;branch=z9hG4bK-readme",
        "From: <sip:a@127.0.0.1>;tag=1",
        "To: <sip:clinic@127.0.0.1>",
        *(["Call-ID: readme@peer"] if call_id else []),
        f"CSeq: 1 {method}",
        "Content-Length: 0",
    ]
    return message.parse(("\r\n".join(lines) + "\r\n\r\n").encode())


@pytest.mark.parametrize(
    ("said", "method", "target", "status", "reason"),
    [
        ("OPTIONS gets `200`", "OPTIONS", None, 200, "OK"),
        ("BYE `481`", "BYE", None, 481, "Call/Transaction Does Not Exist"),
        ("else `481 Call/Transaction Does Not Exist`", "CANCEL", None, 481, ""),
        ("(`400 Missing Call-ID`", "INVITE-no-call-id", None, 400, "Missing Call-ID"),
        ("`486 Busy Here` when every worker is full", "INVITE", None, 486, "Busy Here"),
        ("a new call gets `503 Service Unavailable`", "INVITE", 503, 503, "Service Unavailable"),
        ("answers each INVITE with `302`", "INVITE", HostPort("127.0.0.1", 5061), 302, ""),
    ],
)
def test_what_the_front_answers_is_what_the_readme_says(
    said: str, method: str, target: HostPort | int | None, status: int, reason: str
) -> None:
    assert said in sip_section()
    request = (
        _request("INVITE", call_id=False) if method == "INVITE-no-call-id" else _request(method)
    )
    answer = front.respond(request, target, tcp=False)
    assert answer is not None
    first = answer.split(b"\r\n", 1)[0].decode()
    assert first.startswith(f"SIP/2.0 {status} {reason}"), first


def test_the_options_answers_offer_what_the_readme_says() -> None:
    """A worker's ``Accept`` is :data:`methods.WORKER_ACCEPT`, as the README's table names it;
    the front's answer to OPTIONS has the ``Allow`` and ``Accept`` the README quotes and, as a
    worker's, no ``Allow-Events`` (it takes no SUBSCRIBE)."""
    text = " ".join(README.read_text().split())
    assert f"`Accept: {', '.join(methods.WORKER_ACCEPT)}` and no `Allow-Events`" in text
    quoted = "The front's answer to OPTIONS (`Allow: INVITE, ACK, CANCEL, OPTIONS`, `Accept:"
    assert f"{quoted} application/sdp`)" in text
    answer = front.respond(_request("OPTIONS"), None, tcp=False)
    assert answer is not None
    parsed = message.parse(answer)
    assert parsed.status == 200, answer
    assert parsed.get("Allow") == "INVITE, ACK, CANCEL, OPTIONS", answer
    assert parsed.get("Accept") == "application/sdp", answer
    assert parsed.get("Allow-Events") is None, answer


def test_a_sip_message_to_the_front_gets_the_refusal_the_readme_names() -> None:
    """The service takes no inbound MESSAGE: a 200 would tell the sender it was delivered.
    RFC 3261 8.2.1: 405 with an Allow header listing the methods the front does take."""
    said = "a MESSAGE gets `405 Method Not Allowed` with `Allow: INVITE, ACK, CANCEL, OPTIONS`"
    assert said in sip_section()
    answer = front.respond(_request("MESSAGE"), None, tcp=False)
    assert answer is not None
    reply = message.parse(answer)
    assert (reply.status, reply.reason) == (405, "Method Not Allowed"), reply
    assert f"`Allow: {reply.get('Allow')}`" in said, reply


def test_a_message_too_large_gets_the_status_the_readme_names() -> None:
    said = "`513 Message Too Large`"
    assert said in sip_section()
    raw = (  # the head of an INVITE whose body would take it past 64 KiB
        b"INVITE sip:clinic@127.0.0.1:5060 SIP/2.0\r\n"
        b"Via: SIP/2.0/TCP 127.0.0.1:5099;branch=z9hG4bK-big\r\n"
        b"From: <sip:a@127.0.0.1>;tag=1\r\nTo: <sip:clinic@127.0.0.1>\r\n"
        b"Call-ID: big@peer\r\nCSeq: 1 INVITE\r\nContent-Length: 70000\r\n\r\n"
    )
    answer = front._too_large(raw)
    assert answer is not None
    assert answer.split(b"\r\n", 1)[0].decode() == f"SIP/2.0 {said.strip('`')}"


def test_caller_slots_past_the_workers_slots_are_refused_at_start() -> None:
    """The README: `0` is first come, first served; more than the slots is refused at start."""
    assert "more than the workers' slots is refused at start" in sip_section()
    assert Settings.from_env({"CLINIC_SIP_CALLER_SLOTS": "0"}).sip.caller_slots == 0
    assert Settings.from_env({"CLINIC_SIP_CALLER_SLOTS": "16"}).sip.caller_slots == 16
    with pytest.raises(SettingsError, match="more than the 16 call slots"):
        Settings.from_env({"CLINIC_SIP_CALLER_SLOTS": "17"})


def test_the_limits_a_new_secret_starts_afresh_are_the_readmes_windows() -> None:
    """Every limit's counter is named with the secret: a change restarts each, losing at most
    one of its windows, which the README gives for the defaults."""
    said = (
        "with the defaults a minute for the requests per API key or address and the wrong "
        "keys, 10 minutes per phone number, an hour per number prefix"
    )
    assert said in sip_section()
    v = DEFAULTS.verification
    assert (
        v.limit_key_requests.window_s,
        v.limit_ip_requests.window_s,
        v.limit_auth_failures.window_s,
    ) == (60, 60, 60)
    assert (v.limit_number_verifications.window_s, v.limit_number_sends.window_s) == (600, 600)
    assert v.limit_prefix_sends.window_s == 3600


def test_a_workers_answers_out_of_a_call_are_the_ones_the_readme_tables() -> None:
    """The README's table of a worker port's answers: each row answered by "ours" names the
    status :func:`methods.worker_unhandled_status` gives each method it lists (the real
    workers are held to the same rule by tests/integration/test_sip_worker_methods.py)."""
    text = README.read_text()
    start = text.index("| request out of a call, to a worker's port | answer | by |")
    rows = []
    for line in text[start:].splitlines()[2:]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip("|").split("|")])
    ours = [(what, answer) for what, answer, by in rows if by.startswith("ours")]
    assert len(ours) == 3, rows
    seen = set()
    for what, answer in ours:
        named = re.findall(r"`([A-Z]+)`|\b([A-Z]{3,})\b", what)
        names = {a or b for a, b in named}
        assert names, what
        for method in names:
            status = methods.worker_unhandled_status(method)
            assert status is not None, method
            assert answer.startswith(f"`{int(status)} {status.phrase}`"), (method, answer)
            seen.add(method)
    assert seen >= methods.WORKER_IN_CALL_ONLY
    (ack,) = [answer for what, answer, _ in rows if what == "ACK"]
    assert ack.startswith("nothing") and methods.worker_unhandled_status("ACK") is None
