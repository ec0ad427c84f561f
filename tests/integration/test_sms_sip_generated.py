"""SMS codes over SIP MESSAGE (RFC 3428, ``CLINIC_SMS_GATEWAY=sip``) from the real service and
its real pjsua2 worker processes, to a sipp far end (``tests/peers/sipp_uas_message_drawn.xml``)
that answers each MESSAGE as its Request-URI says: 2xx, 3xx, 4xx, 5xx and 6xx (503, 480, 486
and 500 also with ``Retry-After``), a 401 or 407 digest challenge then 202, a challenge it
answers again, no answer, 100 Trying then nothing, 200 after pjsip's own 32 s (a late
success), 100 then 200 after 5 s, two 200s, and a 200 with a wrong Call-ID, CSeq number or
CSeq method followed by the right answer. The sends of one run go at once, on one service.

Every verification is held to the README (the channels table, "SMS over SIP"):

- its events: ``delivered`` (``MESSAGE answered N``; a 202 ``MESSAGE accepted (202): delivery
  not confirmed``) iff the MESSAGE got a 2xx, else
  ``undeliverable`` (``MESSAGE answered N``, or ``no final answer to the MESSAGE (408)`` after
  32 to 35 s), then at once ``fallback`` to the next channel (a flash call, which sipp refuses)
  or ``failed`` when there is none; nothing after a late or a repeated answer;
- the same events as webhooks;
- its MESSAGE: one send (two with a challenge, the second with valid digest credentials and
  the same text), ``text/plain;charset=UTF-8``, from the clinic's sender id, its text the
  README's sentence in the verification's language, naming ``CLINIC_NAME``, holding the code
  (which approves) and nothing else;
- no code in any log line (the service's or the workers'), no worker restarted, every call
  slot free after, and a new send delivered at once.

Matching a response to its MESSAGE is RFC 3261 section 17.1.3: the top Via's branch and the
CSeq *method*. A wrong Call-ID or CSeq number with the right branch is still this MESSAGE's
answer (pjsip takes it, as the RFC says); a wrong method is not.

``CLINIC_TEST_SEED=<n>`` replays a run (the draws: language, fallback, order).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import random
import re
from collections import Counter
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from pathlib import Path
from typing import Any

import pytest

from tests.integration.test_sip_pool import Sipp, Wire, sipp_uas
from tests.integration.test_verify_sip_flash import CLINIC, Rig, SipService, make_rig, sip_service
from tests.peers.webhook_receiver import WebhookReceiver

pytestmark = pytest.mark.integration

PASSWORD = "s3cret"  # the scenario's digest credentials: user clinic
PHONE_PREFIX = "+447712"  # then AA (the act), SSS (a status), N: a valid UK mobile number
STEP_TIMEOUT_SMS_S = 120  # over 35 s (serve demands it) and the run: the step never times out
TIMER_F_S = 32.0  # pjsip's own wait for a final answer (64 x T1)
MESSAGE_WAIT_S = 35.0  # sip_config.settings.SIP_MESSAGE_WAIT_S, as the README says it
QUICK_S = 3.0  # an answered MESSAGE's outcome, on a shared 2-core machine
DEADLINE_S = MESSAGE_WAIT_S + 15.0
HEALTH_WORDS = ("triage", "symptom", "urgent", "nurse", "appointment", "pain", "diagnos")
SMS_TEXT = {  # README: "{code} is your verification code for <clinic>. Do not share it."
    "en": r"([0-9]{6}) is your verification code for {clinic}\. Do not share it\.",
    "nl": r"([0-9]{6}) is uw verificatiecode voor {clinic}\. Deel deze code met niemand\.",
}


class Act(StrEnum):
    """What the far end does with a MESSAGE (the AA digits of its Request-URI's user)."""

    FINAL = "10"
    RETRY_AFTER = "11"
    CHALLENGE = "20"
    CHALLENGE_AGAIN = "21"
    NO_ANSWER = "30"
    TRYING = "31"
    LATE = "32"
    SLOW = "33"
    TWICE = "40"
    WRONG_CALL_ID = "50"
    WRONG_CSEQ = "51"
    WRONG_METHOD = "52"


# The statuses the scenario has a send for (sipp reads a status when it loads the file).
FINAL = (200, 202, 301, 302, 403, 404, 480, 486, 488, 500, 503, 603)
RETRY_AFTER = (480, 486, 500, 503)
ACCEPTED = "MESSAGE accepted (202): delivery not confirmed"  # README, the events table


@dataclass(frozen=True, slots=True)
class Case:
    act: Act
    status: int  # the status the act answers with (200 where it has no choice)
    serial: int
    locale: str
    fallback: bool

    @property
    def phone(self) -> str:
        return f"{PHONE_PREFIX}{self.act}{self.status:03d}{self.serial}"

    def expected(self) -> tuple[str, str, int]:
        """The README's outcome event (type, detail) and the MESSAGEs the send takes."""
        unanswered = ("undeliverable", "no final answer to the MESSAGE (408)", 1)
        match self.act:
            case Act.NO_ANSWER | Act.TRYING | Act.LATE:
                return unanswered
            case Act.CHALLENGE:
                return ("delivered", ACCEPTED, 2)
            case Act.CHALLENGE_AGAIN:
                return ("undeliverable", f"MESSAGE answered {self.status}", 2)
            case Act.WRONG_METHOD:  # not this MESSAGE's answer: the right one (480) counts
                return ("undeliverable", "MESSAGE answered 480", 1)
            case _ if self.status == 202:  # a relay took it: not a phone's word (README)
                return ("delivered", ACCEPTED, 1)
            case _:
                kind = "delivered" if 200 <= self.status < 300 else "undeliverable"
                return (kind, f"MESSAGE answered {self.status}", 1)


def draw_cases(rnd: random.Random, serial: int) -> list[Case]:
    """Every act once or more (every status the scenario has), language and fallback drawn."""
    plan: list[tuple[Act, int]] = [(Act.FINAL, s) for s in FINAL]
    plan += [(Act.RETRY_AFTER, s) for s in RETRY_AFTER]
    plan += [(a, s) for a in (Act.CHALLENGE, Act.CHALLENGE_AGAIN) for s in (401, 407)]
    plan += [
        (a, 200)
        for a in (
            Act.NO_ANSWER,
            Act.TRYING,
            Act.LATE,
            Act.SLOW,
            Act.TWICE,
            Act.WRONG_CALL_ID,
            Act.WRONG_CSEQ,
            Act.WRONG_METHOD,
        )
    ]
    rnd.shuffle(plan)
    return [
        Case(act, status, serial, rnd.choice(["en", "nl-NL"]), rnd.random() < 0.5)
        for act, status in plan
    ]


def at(event: dict[str, Any]) -> float:
    return datetime.fromisoformat(event["at"].replace("Z", "+00:00")).timestamp()


def messages_for(uas: Sipp, phone: str) -> list[Wire]:
    """The MESSAGEs sipp got for ``phone``, one per Call-ID (UDP retransmissions dropped)."""
    seen: dict[str, Wire] = {}
    for w in uas.received("MESSAGE"):
        if w.msg.uri.startswith(f"sip:{phone}@"):
            seen.setdefault(w.msg.get("Call-ID") or "", w)
    return sorted(seen.values(), key=lambda w: w.at)


def text_of(wire: Wire) -> str:
    """The MESSAGE's text: its Content-Length of bytes (sipp's trace adds a line end)."""
    length = int(wire.msg.get("Content-Length") or 0)
    return wire.msg.body[:length].decode()


def digest_ok(header: str, uri: str) -> bool:
    """Whether ``header`` is a valid RFC 2617 qop=auth MD5 answer for MESSAGE to ``uri``."""
    p = dict(re.findall(r'(\w+)="?([^",]*)"?', header))

    def md5(s: str) -> str:
        return hashlib.md5(s.encode()).hexdigest()  # noqa: S324 - the digest's own hash

    ha1 = md5(f"clinic:{p.get('realm')}:{PASSWORD}")
    ha2 = md5(f"MESSAGE:{uri}")
    want = md5(f"{ha1}:{p.get('nonce')}:{p.get('nc')}:{p.get('cnonce')}:auth:{ha2}")
    return p.get("username") == "clinic" and p.get("uri") == uri and p.get("response") == want


async def settle(svc: SipService, vid: str) -> dict[str, Any]:
    """Poll until the verification is failed (undeliverable, and the fallback failed too) or
    has its SMS delivered."""
    loop = asyncio.get_running_loop()
    end = loop.time() + DEADLINE_S
    while True:
        v = await svc.api.get(vid)
        kinds = [e["type"] for e in v["events"]]
        if v["status"] != "pending" or "delivered" in kinds:
            return v
        if loop.time() > end:
            pytest.fail(f"{vid}: not settled within {DEADLINE_S} s: {kinds}")
        await asyncio.sleep(0.25)


@pytest.fixture
def rig(request: pytest.FixtureRequest) -> Rig:
    return make_rig(request)


@pytest.fixture
def seed() -> int:
    value = int(os.environ.get("CLINIC_TEST_SEED") or random.randrange(2**32))
    print(f"CLINIC_TEST_SEED={value}")
    return value


async def test_generated_message_answers_are_held_to_the_readme(  # noqa: PLR0917 (fixtures)
    rig: Rig,
    tmp_path: Path,
    seed: int,
    webhook_receiver: WebhookReceiver,
    caplog: pytest.LogCaptureFixture,
    capfd: pytest.CaptureFixture[str],
) -> None:
    caplog.set_level(logging.DEBUG)
    cases = draw_cases(random.Random(seed), serial=1)
    env = {
        "CLINIC_SIP_USER": "clinic",
        "CLINIC_SIP_PASSWORD": PASSWORD,
        "CLINIC_STEP_TIMEOUT_SMS_S": str(STEP_TIMEOUT_SMS_S),
        "CLINIC_WEBHOOK_URL": webhook_receiver.url(),
        "CLINIC_CALLBACK_NETWORKS": "127.0.0.0/8",
    }
    faults: list[str] = []
    outcomes: dict[Case, tuple[str, dict[str, Any]]] = {}
    async with (
        sipp_uas("sipp_uas_message_drawn.xml", tmp_path, calls=500, timeout_s=180) as uas,
        sip_service(rig, uas.port, env) as svc,
    ):
        pids = sorted(svc.pool.worker_pids())

        async def one(case: Case) -> None:
            answer = await svc.api.create(
                phone=case.phone,
                method="sms",
                fallback=["flashcall"] if case.fallback else [],
                locale=case.locale,
            )
            assert answer.status == 201, answer.text
            vid = str(answer.json["id"])
            outcomes[case] = (vid, await settle(svc, vid))

        await asyncio.gather(*(one(c) for c in cases))
        # The late 200 comes 34 s after its MESSAGE: wait for it, then read everything again.
        late = next(c for c in cases if c.act is Act.LATE)
        loop = asyncio.get_running_loop()
        end = loop.time() + 10
        while not any(
            not w.received and w.msg.status == 200 and late.phone in (w.msg.get("To") or "")
            for w in uas.wire()
        ):
            assert loop.time() < end, "sipp sent no late 200"
            await asyncio.sleep(0.2)
        await asyncio.sleep(1.0)  # a report of it would be written by now

        codes: set[str] = set()
        for case, (vid, _) in outcomes.items():
            v = await svc.api.get(vid)
            story = f"{vid} {case}"
            kind, detail, sends = case.expected()
            events = v["events"]
            kinds = [e["type"] for e in events]
            outcome = [(e["type"], e["detail"]) for e in events if e["channel"] == "sms"]
            if outcome[2:] != [(kind, detail)] or kinds[:2] != ["requested", "dispatched"]:
                faults.append(f"{story}: events {[(e['type'], e['detail']) for e in events]}")
                continue
            took = at(events[2]) - at(events[1])
            if case.act in (Act.NO_ANSWER, Act.TRYING, Act.LATE):
                if not TIMER_F_S - 1 <= took <= MESSAGE_WAIT_S + 1:
                    faults.append(f"{story}: no answer given up after {took:.1f} s")
            elif case.act is Act.SLOW:
                if not 5.0 <= took <= 5.0 + QUICK_S:
                    faults.append(f"{story}: a 200 after 5 s delivered after {took:.1f} s")
            elif took > QUICK_S:
                faults.append(f"{story}: outcome after {took:.1f} s")
            # The MESSAGE(s) on the wire.
            wires = messages_for(uas, case.phone)
            if len(wires) != sends:
                faults.append(f"{story}: {len(wires)} MESSAGEs, expected {sends}")
                continue
            texts = {text_of(w) for w in wires}
            text = text_of(wires[0])
            pattern = SMS_TEXT[case.locale.split("-")[0]].replace("{clinic}", re.escape(CLINIC))
            m = re.fullmatch(pattern, text)
            if len(texts) != 1 or m is None or any(h in text.lower() for h in HEALTH_WORDS):
                faults.append(f"{story}: MESSAGE text(s) {len(texts)} not the README's")
                continue
            code = m.group(1)
            codes.add(code)
            for w in wires:
                if w.msg.get("Content-Type") != "text/plain;charset=UTF-8":
                    faults.append(f"{story}: Content-Type {w.msg.get('Content-Type')}")
                if not (w.msg.get("From") or "").startswith("<sip:clinic@"):
                    faults.append(f"{story}: From {w.msg.get('From')}")
            if sends == 2:
                header = "Proxy-Authorization" if case.status == 407 else "Authorization"
                cred = wires[1].msg.get(header) or ""
                if not digest_ok(cred, wires[1].msg.uri):
                    faults.append(f"{story}: the challenge's answer {header}: {cred!r}")
                if wires[0].msg.get(header) is not None:
                    faults.append(f"{story}: credentials before any challenge")
            # What follows the outcome: the plan's next channel at once, or its end.
            plan_used_up: list[tuple[str, str | None]] = [("fallback", None), ("failed", None)]
            rest = [(e["type"], e["channel"]) for e in events[3:]]
            if kind == "delivered":
                check = await svc.api.check(vid, code)
                if check.json.get("status") != "approved":
                    faults.append(f"{story}: the MESSAGE's code does not approve: {check.text}")
                want_rest: list[tuple[str, str | None]] = [("approved", "sms")]
                v = await svc.api.get(vid)
                rest = [(e["type"], e["channel"]) for e in v["events"][3:]]
            elif case.fallback:
                want_rest = [
                    ("fallback", "flashcall"),
                    ("dispatched", "flashcall"),
                    ("undeliverable", "flashcall"),
                    *plan_used_up,
                ]
                moved = at(events[3]) - at(events[2]) if len(events) > 3 else -1.0
                if not 0 <= moved <= 1.0:
                    faults.append(f"{story}: fallback {moved:.2f} s after undeliverable")
                if not any(
                    w.msg.uri.startswith(f"sip:{case.phone}@") for w in uas.received("INVITE")
                ):
                    faults.append(f"{story}: no flash call after the fallback")
            else:
                want_rest = plan_used_up
            if rest != want_rest:
                faults.append(f"{story}: after the outcome {rest}, expected {want_rest}")
            outcomes[case] = (vid, v)

        # The webhooks: each verification's events, once each.
        def hooked(received: list[Any]) -> bool:
            return len(received) >= sum(len(v["events"]) for _, v in outcomes.values())

        hooks = await webhook_receiver.wait_until("every event", hooked, deadline_s=15)
        by_vid: dict[str, Counter[tuple[str, str, str]]] = {}
        for h in hooks:
            body = h.json()
            e = body["event"]
            key = (e["type"], e["channel"], e.get("detail", ""))
            by_vid.setdefault(body["verification_id"], Counter())[key] += 1
        for case, (vid, v) in outcomes.items():
            want = Counter((e["type"], e["channel"], e.get("detail", "")) for e in v["events"])
            if by_vid.get(vid) != want:
                faults.append(f"{vid} {case}: webhooks {by_vid.get(vid)}, events {want}")

        # No worker died, and every slot is free again; a new send goes at once.
        stats = svc.pool.stats()
        if sorted(svc.pool.worker_pids()) != pids or stats["restarts"] != 0:
            faults.append(f"a SIP worker was restarted: {stats}")
        if stats["calls_in_flight"] != 0 or stats["free_slots"] != stats["workers"] * 4:
            faults.append(f"slots not all free after the sends: {stats}")
        after = Case(Act.FINAL, 200, 9, "en", False)
        vid = str((await svc.api.create(phone=after.phone, method="sms", fallback=[])).json["id"])
        v = await svc.api.wait_for_event(vid, "delivered", deadline_s=QUICK_S)
    workers_err = capfd.readouterr().err
    for code in codes:
        if code in caplog.text or code in workers_err:
            faults.append("a code appears in a log line")
            break
    print(f"seed {seed}: {len(cases)} sends: {Counter(c.act.name for c in cases)}")
    assert len(outcomes) == len(cases)
    assert not faults, f"seed {seed}:\n  " + "\n  ".join(faults)
