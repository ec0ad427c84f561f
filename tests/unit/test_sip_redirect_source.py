"""The front's cap on 302s not followed per source address (pure: a fake clock, the real
:meth:`SipPool.pick_inbound` and the pool as the front's reservations, workers set up by
hand as in test_sip_pick_inbound.py).

The audit's proof (a forged INVITE flood): 16 INVITEs from one address that never follow
their 302, and one copy of each a second, held all 16 slots of 4 workers for as long as
they went on, and a patient got 486 Busy Here. Now that address holds
``redirect_source.MAX_UNFOLLOWED`` slots at most, the rest get 503, and patients from
elsewhere are redirected; a PBX or trunk whose callers all share one address follows each
302, and all of them get through (a burst past the cap within one round trip gets 503, and
its retry a 302). Every expectation is derived from the cap, not from its value.
"""

from __future__ import annotations

import logging
import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sip_config.clock import FakeClock
from sip_config.settings import SIP_CALLS_PER_WORKER, HostPort
from tests.conftest import sip_settings
from voice.sip import message, redirect_source, transaction
from voice.sip import pool as pool_module
from voice.sip.front import RedirectFront
from voice.sip.outcome import SipStatus
from voice.sip.pool import SipPool
from voice.sip.protocol import IncomingCall

FLOOD = "198.51.100.7"
PATIENT = "203.0.113.9"
PBX = "192.0.2.10"
CAP = redirect_source.MAX_UNFOLLOWED
# Workers enough for one source's cap and a few slots more (the cap, not the line, refuses).
ROOMY = CAP // SIP_CALLS_PER_WORKER + 2


def _line(workers: int, clock: FakeClock) -> tuple[SipPool, RedirectFront]:
    pool = SipPool(sip_settings(workers), clock=clock)
    for i, w in enumerate(pool._workers):  # as if each had started and reported 4 free slots
        w.up, w.free_slots, w.port = True, 4, 6000 + i
    front = RedirectFront(
        HostPort("127.0.0.1", 0), pool.pick_inbound, clock=clock, reservations=pool
    )
    return pool, front


def _invite(call_id: str, branch: str = "1", via: str = FLOOD, cseq: int = 1) -> bytes:
    """An INVITE to the front; each copy is the same transaction (17.2.3), another branch
    and CSeq a new one. The Via is what the sender wrote (a forger writes anything): the cap
    goes by where the datagram came from."""
    return (
        "INVITE sip:6000@clinic SIP/2.0\r\n"
        f"Via: SIP/2.0/UDP {via}:5060;branch=z9hG4bK{branch}\r\n"
        f"From: <sip:x@{via}>;tag=a\r\nTo: <sip:6000@clinic>\r\nCall-ID: {call_id}\r\n"
        f"CSeq: {cseq} INVITE\r\nMax-Forwards: 70\r\nContent-Length: 0\r\n\r\n"
    ).encode()


def _answer(out: bytes | None) -> message.SipMessage:
    assert out is not None, "no answer"
    return message.parse(out)


def _named(answer: message.SipMessage) -> HostPort:
    """The worker a 302 names."""
    assert answer.status == SipStatus.MOVED_TEMPORARILY, (answer.status, answer.reason)
    host, _, port = (answer.get("Contact") or "").strip("<>").partition("@")[2].partition(":")
    return HostPort(host, int(port))


def _reserved(pool: SipPool) -> set[str]:
    """The Call-IDs the workers hold a slot for (not lapsed)."""
    now = pool._clock.monotonic()
    for w in pool._workers:
        w.expire_reservations(now)
    return {c for w in pool._workers for c in w.reserved}


def _follows(pool: SipPool, call_id: str, worker: HostPort) -> None:
    """The caller's INVITE reaches the worker its 302 named, as that worker tells the pool:
    the call with its INVITE's Call-ID and the free slots left, this call counted."""
    (w,) = [w for w in pool._workers if w.port == worker.port]
    free = w.free_slots - 1
    pool._dispatch(w, IncomingCall(f"in-{call_id}", "", "6000", free, (), call_id))


def test_a_flood_from_one_address_holds_its_cap_of_slots_and_patients_get_through(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The audit's scenario: 16 forged INVITEs from one address, then one copy of each a
    second for 33 s. The address gets its cap of slots (302) and 503 with Retry-After for the rest
    (not 486: nobody is busy); a patient calling from another address meanwhile is always
    redirected, and nobody counts as refused for want of a slot."""
    caplog.set_level(logging.WARNING)
    clock = FakeClock()
    pool, front = _line(4, clock)
    assert CAP < 16, "the test needs slots past one address's cap"
    first = [_answer(front._answer_udp(_invite(f"evil{n}", f"e{n}"), FLOOD)) for n in range(16)]
    assert [a.status for a in first] == [302] * CAP + [503] * (16 - CAP)
    assert {a.get("Retry-After") for a in first[CAP:]} == {str(redirect_source.RETRY_AFTER_S)}
    for t in range(1, 34):
        clock.advance(1.0)
        for n in range(16):
            again = _answer(front._answer_udp(_invite(f"evil{n}", f"e{n}"), FLOOD))
            if t < transaction.TIMER_H_S:  # then forgotten: a new transaction, at the cap
                assert again.status == first[n].status, "a copy gets its first answer"
            assert again.status in (302, 503), again
        held = [c for w in pool._workers for c in w.reserved if c.startswith("evil")]
        assert len(held) <= CAP, held
        if t in (1, 11, 21, 33):
            patient = _answer(front._answer_udp(_invite(f"patient{t}", f"p{t}", PATIENT), PATIENT))
            _follows(pool, f"patient{t}", _named(patient))
            assert pool.occupancy().reserved <= CAP
    assert pool.stats()["refused_busy"] == 0, "a flood's refusals are no patients turned away"
    said = [r.getMessage() for r in caplog.records if r.name == "voice.sip.redirect_source"]
    assert len(said) == 1 and FLOOD in said[0] and "503" in said[0], said


def test_a_pbx_whose_callers_follow_their_302s_gets_every_slot() -> None:
    """Behind a PBX or a trunk every caller comes from its one address. Each follows its
    302 at once, so its slot leaves the count: 16 callers in a row, and then 16 whose 302s
    are followed one INVITE late, or cap - 1 INVITEs late (the cap's worth not followed at
    any moment), all get through; only a caller past the last slot gets 486, as from any
    address."""
    for late in (0, 1, CAP - 1):
        clock = FakeClock()
        pool, front = _line(4, clock)
        on_the_way: list[tuple[str, HostPort]] = []
        for n in range(16):
            call_id = f"pbx{n}"
            on_the_way.append(
                (call_id, _named(_answer(front._answer_udp(_invite(call_id, str(n), PBX), PBX))))
            )
            while len(on_the_way) > late:
                _follows(pool, *on_the_way.pop(0))
            clock.advance(0.01)
        for call_id, worker in on_the_way:
            _follows(pool, call_id, worker)
        assert pool.occupancy().in_use == 16 and pool.stats()["free_slots"] == 0
        busy = _answer(front._answer_udp(_invite("pbx16", "16", PBX), PBX))
        assert busy.status == SipStatus.BUSY_HERE, "the line is full: 486, as before"


def test_a_slot_followed_cancelled_or_lapsed_leaves_the_count() -> None:
    """The count is of slots still held: a source at its cap is redirected again as soon
    as one of its callers arrives, cancels, or its slot lapses (2 s)."""
    clock = FakeClock()
    pool, front = _line(ROOMY, clock)
    moved = [
        _named(_answer(front._answer_udp(_invite(f"c{n}", f"c{n}"), FLOOD))) for n in range(CAP)
    ]
    assert _answer(front._answer_udp(_invite("x1", "x1"), FLOOD)).status == 503
    _follows(pool, "c0", moved[0])
    assert _answer(front._answer_udp(_invite("d", "d"), FLOOD)).status == 302, "c0 arrived"
    assert _answer(front._answer_udp(_invite("x2", "x2"), FLOOD)).status == 503
    cancel = _invite("c1", "c1").replace(b"INVITE", b"CANCEL")
    assert _answer(front._answer_udp(cancel, FLOOD)).status == 200
    assert _answer(front._answer_udp(_invite("e", "e"), FLOOD)).status == 302, "c1 cancelled"
    assert _answer(front._answer_udp(_invite("f", "f"), FLOOD)).status == 503
    clock.advance(2.01)
    assert _answer(front._answer_udp(_invite("g", "g"), FLOOD)).status == 302, "they lapsed"


def test_a_trunks_burst_past_the_cap_gets_503_and_its_retry_gets_in() -> None:
    """Callers behind one trunk share its address. The cap and one more ringing in the same
    second, each 302 followed after a 50 ms round trip: all get through. The cap and one
    more within one round trip: the last gets 503 with Retry-After (not 486, nobody counted
    busy), and its retry (a new transaction: another branch and CSeq, the same Call-ID) gets
    a 302 as soon as one before it arrived, or, nobody arriving, after the Retry-After."""
    rtt = 0.05
    clock = FakeClock()
    pool, front = _line(ROOMY, clock)
    for n in range(CAP + 1):  # spread over the second
        moved = _named(_answer(front._answer_udp(_invite(f"s{n}", f"s{n}", PBX), PBX)))
        clock.advance(rtt)
        _follows(pool, f"s{n}", moved)
        clock.advance(1.0 / (CAP + 1) - rtt)

    for someone_arrives in (True, False):
        clock = FakeClock()
        pool, front = _line(ROOMY, clock)
        burst = [
            _answer(front._answer_udp(_invite(f"b{n}", f"b{n}", PBX), PBX)) for n in range(CAP + 1)
        ]
        assert [a.status for a in burst] == [302] * CAP + [503]
        assert burst[-1].get("Retry-After") == str(redirect_source.RETRY_AFTER_S)
        assert pool.stats()["refused_busy"] == 0
        last = f"b{CAP}"
        if someone_arrives:
            clock.advance(rtt)
            _follows(pool, "b0", _named(burst[0]))
        else:
            clock.advance(redirect_source.RETRY_AFTER_S)
        retry = _answer(front._answer_udp(_invite(last, f"{last}-again", PBX, cseq=2), PBX))
        _follows(pool, last, _named(retry))
        assert pool.occupancy().in_use == (2 if someone_arrives else 1)


def test_copies_and_new_transactions_of_a_call_count_once() -> None:
    """Copies of a redirected INVITE (its 302 lost: the same branch) and a new transaction
    of its Call-ID (another branch) go to the slot it holds and are counted once: a source
    one below its cap, each of whose calls was sent three times and then anew, still gets
    one more 302; at its cap, a new transaction of a Call-ID it holds still gets that
    302, to the same worker, and only a new Call-ID gets 503."""
    clock = FakeClock()
    pool, front = _line(ROOMY, clock)
    first = {}
    for n in range(CAP - 1):
        first[n] = _named(_answer(front._answer_udp(_invite(f"k{n}", f"k{n}"), FLOOD)))
        for _ in range(3):
            clock.advance(0.1)
            again = _answer(front._answer_udp(_invite(f"k{n}", f"k{n}"), FLOOD))
            assert _named(again) == first[n], "a copy gets its 302 again"
        anew = _answer(front._answer_udp(_invite(f"k{n}", f"k{n}-2", cseq=2), FLOOD))
        assert _named(anew) == first[n], "a new transaction goes to the slot it holds"
    assert pool.occupancy().reserved == CAP - 1
    last = _answer(front._answer_udp(_invite("k-last", "k-last"), FLOOD))
    assert last.status == 302, "copies did not count"
    anew = _answer(front._answer_udp(_invite("k0", "k0-3", cseq=3), FLOOD))
    assert _named(anew) == first[0], "at its cap, the slot a Call-ID holds is still its"
    assert _answer(front._answer_udp(_invite("k-more", "k-more"), FLOOD)).status == 503
    assert pool.occupancy().reserved == CAP


def test_a_cancel_frees_the_slot_only_from_where_its_302_went() -> None:
    """A CANCEL of a redirected INVITE (the caller hung up, its 302 lost) frees the slot and
    takes it out of its source's count, but only from that source: one from another address
    (a forger who saw or guessed the Call-ID and branch) gets its 200 and frees nothing,
    and the caller's own CANCEL after it (a copy of that transaction) still frees it."""
    clock = FakeClock()
    pool, front = _line(ROOMY, clock)
    for n in range(CAP):
        _answer(front._answer_udp(_invite(f"p{n}", f"p{n}", PATIENT), PATIENT))
    assert _answer(front._answer_udp(_invite("p-more", "p-more", PATIENT), PATIENT)).status == 503
    cancel = _invite("p0", "p0", PATIENT).replace(b"INVITE", b"CANCEL")
    assert _answer(front._answer_udp(cancel, FLOOD)).status == 200
    assert "p0" in _reserved(pool), "a CANCEL from elsewhere freed the caller's slot"
    assert _answer(front._answer_udp(cancel, PATIENT)).status == 200
    assert "p0" not in _reserved(pool), "the caller's CANCEL did not free its slot"
    assert _answer(front._answer_udp(_invite("p-next", "p-next", PATIENT), PATIENT)).status == 302


def test_only_copies_from_the_address_that_got_the_302_keep_its_slot() -> None:
    """A copy of a redirected INVITE keeps its slot held while the 302 may be repeated
    (its 302 was lost); a copy from another address (a forger who saw or guessed the
    Call-ID and branch) gets the same 302 but holds the slot no longer."""
    clock = FakeClock()
    pool, front = _line(1, clock)
    first = front._answer_udp(_invite("a", "a", PATIENT), PATIENT)
    _answer(front._answer_udp(_invite("b", "b", PATIENT), "198.51.100.8"))
    for _ in range(4):
        clock.advance(0.5)
        assert front._answer_udp(_invite("a", "a", PATIENT), FLOOD) == first
        front._answer_udp(_invite("b", "b", PATIENT), "198.51.100.8")
    clock.advance(0.01)
    assert set(pool._workers[0].reserved) == {"b"}, "a's slot lapsed 2 s after its 302"


def test_the_cap_goes_by_the_datagrams_address_ipv6_by_its_64() -> None:
    """Two hosts of one IPv6 /64 are one source (one host commonly has a /64 to itself);
    the Via, which the sender writes, counts for nothing."""
    clock = FakeClock()
    _, front = _line(4, clock)
    net = [f"2001:db8:1:2:{n:x}::{n + 1:x}" for n in range(CAP + 1)]  # CAP + 1 hosts, one /64
    got = [
        _answer(front._answer_udp(_invite(f"v6-{n}", str(n), f"192.0.2.{n}"), host)).status
        for n, host in enumerate(net)
    ]
    assert got == [302] * CAP + [503]
    other = _answer(front._answer_udp(_invite("v6-x", "x"), "2001:db8:1:3::1"))
    assert other.status == 302, "another /64 is another source"


@pytest.mark.parametrize(
    ("host", "source"),
    [
        ("198.51.100.7", "198.51.100.7"),
        ("2001:db8:1:2:3:4:5:6", "2001:db8:1:2::/64"),
        ("2001:DB8:1:2::1", "2001:db8:1:2::/64"),
        ("::ffff:198.51.100.7", "198.51.100.7"),
        ("fe80::1%eth0", "fe80::/64"),
        ("?", "?"),
    ],
)
def test_source_of(host: str, source: str) -> None:
    assert redirect_source.source_of(host) == source


def test_a_refused_invite_copy_gets_its_503_again_and_picks_nothing() -> None:
    """17.2.1: a copy of the refused INVITE gets that 503, To tag included, even once its
    source is below the cap again; no slot is picked for it."""
    clock = FakeClock()
    pool, front = _line(ROOMY, clock)
    for n in range(CAP):
        front._answer_udp(_invite(f"c{n}", f"c{n}"), FLOOD)
    refused = front._answer_udp(_invite("c", "c"), FLOOD)
    assert _answer(refused).status == 503
    clock.advance(2.01)  # its 302s lapsed: the source is below its cap
    assert front._answer_udp(_invite("c", "c"), FLOOD) == refused
    assert pool.occupancy().reserved == 0, "the copy took no slot"


def test_unfollowed_302s_are_forgotten_once_their_slots_are_not_held() -> None:
    """A flood from many (spoofed) addresses leaves no memory behind: a source's 302s are
    forgotten once their slots lapsed, at the next 302 to anyone."""
    clock = FakeClock()
    _, front = _line(4, clock)
    for n in range(16):
        front._answer_udp(_invite(f"s{n}", str(n)), f"198.51.100.{n}")
    assert front._unfollowed is not None and len(front._unfollowed) == 16
    clock.advance(2.01)
    front._answer_udp(_invite("next", "next"), PATIENT)
    assert len(front._unfollowed) == 1


def test_the_retry_after_is_the_time_a_302_not_followed_holds_its_slot() -> None:
    """The pure module cannot import the pool (asyncio): its number is checked here."""
    reserve_s = math.ceil(pool_module._REDIRECT_RESERVE_S)
    assert reserve_s == redirect_source.RETRY_AFTER_S


_SOURCES = (FLOOD, PATIENT, PBX)
_steps = st.one_of(
    st.tuples(st.just("invite"), st.sampled_from(_SOURCES), st.just(0)),
    st.tuples(st.just("copy"), st.sampled_from(_SOURCES), st.integers(0, 30)),
    st.tuples(st.just("retry"), st.sampled_from(_SOURCES), st.integers(0, 30)),
    st.tuples(st.just("follow"), st.just(""), st.integers(0, 30)),
    st.tuples(st.just("cancel"), st.sampled_from(_SOURCES), st.integers(0, 30)),
    st.tuples(st.just("wait"), st.just(""), st.integers(1, 40)),
)


@given(st.lists(_steps, max_size=60))
def test_no_source_holds_more_than_its_cap_of_slots_not_followed(
    steps: list[tuple[str, str, int]],
) -> None:
    """Any mix of new INVITEs from three addresses, copies of earlier ones and new
    transactions of earlier Call-IDs (from any of them), callers who follow their 302,
    CANCELs and time passing: no address ever holds more than MAX_UNFOLLOWED slots for
    302s it got, and a new INVITE from an address under that cap is redirected while a
    slot is free, one at the cap gets 503, never 486."""
    clock = FakeClock()
    pool, front = _line(2, clock)
    sent: list[tuple[str, str]] = []  # (Call-ID, the address its INVITE came from first)
    got_302: dict[str, tuple[str, HostPort]] = {}  # Call-ID: (the address, the worker)
    retries = 0

    def held_by(source: str) -> int:
        now = clock.monotonic()
        for w in pool._workers:
            w.expire_reservations(now)
        held = {c for w in pool._workers for c in w.reserved}
        return sum(1 for c, (s, _) in got_302.items() if s == source and c in held)

    for op, source, pick in steps:
        if op == "invite":
            call_id = f"c{len(sent)}"
            before = held_by(source)
            free = pool._free_slots()
            answer = _answer(front._answer_udp(_invite(call_id, call_id), source))
            sent.append((call_id, source))
            if before >= CAP:
                assert answer.status == SipStatus.SERVICE_UNAVAILABLE, answer.status
            elif free:
                got_302[call_id] = (source, _named(answer))
            else:
                assert answer.status == SipStatus.BUSY_HERE, answer.status
        elif op == "copy" and sent:
            call_id, _ = sent[pick % len(sent)]
            front._answer_udp(_invite(call_id, call_id), source)
        elif op == "retry" and sent:
            # A new transaction of an earlier Call-ID: the slot it holds still, if it does
            # (and its first address keeps it), else a new one for this address.
            call_id, _ = sent[pick % len(sent)]
            got = got_302.get(call_id)
            held = got is not None and pool.holds_inbound(call_id, got[1])
            admitted = (got is not None and got[0] == source) or held_by(source) < CAP
            retries += 1
            raw = _invite(call_id, f"{call_id}-r{retries}", cseq=1 + retries)
            answer = _answer(front._answer_udp(raw, source))
            if held and admitted:
                assert got is not None and _named(answer) == got[1], answer.status
            elif held:
                assert answer.status == SipStatus.SERVICE_UNAVAILABLE, answer.status
            elif answer.status == SipStatus.MOVED_TEMPORARILY:
                got_302[call_id] = (source, _named(answer))
        elif op == "cancel" and sent:
            call_id, _ = sent[pick % len(sent)]
            front._answer_udp(_invite(call_id, call_id).replace(b"INVITE", b"CANCEL"), source)
        elif op == "follow" and got_302:
            call_id = list(got_302)[pick % len(got_302)]
            if pool.holds_inbound(call_id, got_302[call_id][1]):
                _follows(pool, call_id, got_302[call_id][1])
        elif op == "wait":
            clock.advance(pick / 10)
        for address in _SOURCES:
            assert held_by(address) <= CAP, (address, steps)
