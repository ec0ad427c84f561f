"""A model of the verification API, checked over real HTTP (a Hypothesis state machine).

One real service (``start_service``: real redis-server, the SMS gateway peer, as
test_api_fuzz.py) takes sequences of valid requests: creates (SMS, various ``fallback`` lists
and ``code_length``, with and without an ``Idempotency-Key``, replays and conflicting replays,
with either API key), checks with the right code (read from the SMS the gateway got), a wrong
one, letters, ``/fallback``, ``DELETE`` and ``GET``, on verifications in every state. A simple
reference model says what each answer must be. After every step, each verification's ``GET``
is compared with the model, and:

- status, ``attempts_left``, ``channel`` and ``channels`` are the model's; attempts never rise;
- events only grow (each read starts with the last), in time order; one approval at most,
  and only on an approved verification;
- an approved, failed or canceled verification never changes again (not even its events);
- no answer (body or header) holds a code, and each SMS goes to its verification's phone
  with its code and no other's;
- every problem has the slug the model expects; every answer validates against
  ``/openapi.json`` (``Api.request``, the tier's collector).

The per-number send limit is low (``SENDS_PER_NUMBER``) and one rule creates again and again
for a number of its own, until the 429 with ``Retry-After``; other limits are far above a run.

The machine runs in a thread of its own; each step hands its requests to the test's event
loop, where the service and the gateway run (``asyncio.run_coroutine_threadsafe``), so the loop
is never blocked. The default run is deterministic (``derandomize``), about 20 s on two cores;
``CLINIC_FUZZ_EXAMPLES=N`` runs N random examples (as test_api_fuzz.py), e.g.::

    CLINIC_FUZZ_EXAMPLES=300 PYTHONPATH=$PWD .venv/bin/python -m pytest -o timeout=0 \\
        tests/integration/test_api_model.py
"""

from __future__ import annotations

import asyncio
import itertools
import os
import re
from collections import Counter
from collections.abc import Coroutine, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, ClassVar, TypeVar

import pytest
from hypothesis import HealthCheck, Phase, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from tests.integration.conftest import (
    API_KEY,
    DEADLINE_S,
    OTHER_KEY,
    Answer,
    Api,
    StartService,
)
from tests.peers.sms_gateway import SmsGateway
from verification.errors import PROBLEM_BASE

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("no_blocking")]

T = TypeVar("T")

_DEEP = os.environ.get("CLINIC_FUZZ_EXAMPLES")
PROFILE = settings(
    max_examples=int(_DEEP) if _DEEP else 30,
    stateful_step_count=25,
    derandomize=not _DEEP,
    deadline=None,
    database=None,
    print_blob=True,
    # Not the explain phase: it traces every line the loop runs too (the service runs in the
    # steps), which slows steps past no_blocking's 100 ms and buries the failure.
    phases=[Phase.explicit, Phase.reuse, Phase.generate, Phase.target, Phase.shrink],
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)

CREATE = "/v1/verifications"
MAX_CHECKS = 3  # few, so that runs reach "failed" often
SENDS_PER_NUMBER = 3
ENV = {
    "CLINIC_MAX_CHECKS": str(MAX_CHECKS),
    "CLINIC_LIMIT_NUMBER_VERIFICATIONS": "1000000/600",
    "CLINIC_LIMIT_NUMBER_SENDS": f"{SENDS_PER_NUMBER}/600",
    "CLINIC_LIMIT_PREFIX_SENDS": "1000000/3600",
    "CLINIC_LIMIT_KEY_REQUESTS": "1000000/60",
    "CLINIC_LIMIT_IP_REQUESTS": "1000000/60",
    "CLINIC_LIMIT_AUTH_FAILURES": "1000000/60",
}
KEYS = (API_KEY, OTHER_KEY)
FEW = 4  # new verifications are made while an example has fewer: the steps then act on them
FINAL = frozenset({"approved", "failed", "canceled"})  # expiry (600 s) is not reached here

# A fresh mobile number for every number the machine uses (Redis keeps its send counts
# across examples): +316 and 8 digits.
_NUMBERS = itertools.count(20_000_000)
_IDEMPOTENCY = itertools.count(1)


# What the steps met (rule, answer), over the whole run: the test fails when a run no longer
# reaches the states it is there to check.
REACHED: Counter[tuple[str, int | str]] = Counter()


def _number() -> str:
    return f"+316{next(_NUMBERS)}"


# What a create sends besides the phone, and the problem it gets with SMS the only channel
# (None: 201). test services offer SMS only (test_api_fuzz.py: flash and voice need SIP).
PLANS: list[tuple[dict[str, Any], str | None]] = [
    ({}, None),
    ({"method": "sms"}, None),
    ({"fallback": []}, None),
    ({"method": "sms", "fallback": []}, None),
    ({"fallback": ["voice"]}, "channel-unavailable"),
    ({"method": "sms", "fallback": ["flashcall"]}, "channel-unavailable"),
    ({"fallback": ["sms"]}, "invalid-request"),  # names every configured channel
    ({"method": "sms", "fallback": ["sms"]}, "invalid-request"),  # a channel twice
]


@dataclass
class Model:
    """What one verification is, by the model."""

    vid: str
    phone: str
    code: str
    code_length: int
    status: str = "pending"
    attempts_left: int = MAX_CHECKS
    seen: dict[str, Any] = field(default_factory=dict)  # the last answer with its body
    final_body: dict[str, Any] | None = None  # the body once final: never to change
    probed: bool = False  # every request that could change it was tried once final


@dataclass(frozen=True, slots=True)
class IdemUse:
    """A create made with an ``Idempotency-Key``: the key, by which API key, what body."""

    key: str
    api_key: str
    body: dict[str, Any]
    vid: str


def _walk_strings(value: Any, key: str = "") -> Iterator[tuple[str, str]]:
    if isinstance(value, dict):
        for k, v in value.items():
            yield from _walk_strings(v, k)
    elif isinstance(value, list):
        for v in value:
            yield from _walk_strings(v, key)
    elif isinstance(value, str):
        yield key, value


class ApiMachine(RuleBasedStateMachine):
    """Sequences of valid requests against one service; the model in ``self.v``."""

    # set by the test on a subclass
    api: ClassVar[Api]
    gateway: ClassVar[SmsGateway]
    loop: ClassVar[asyncio.AbstractEventLoop]

    verifications = Bundle("verifications")
    idempotent = Bundle("idempotent")
    failed = Bundle("failed")  # kept apart: drawn as often as the others, it would crowd them

    def __init__(self) -> None:
        super().__init__()
        self.v: dict[str, Model] = {}
        self.sends: dict[str, int] = {}  # per number: SMS the service sent in this example
        self.sms_before = len(self.gateway.received)  # the gateway is shared by the examples
        self.codes: set[str] = set()
        self.limited_phone = _number()
        self.idem: dict[tuple[str, str], tuple[dict[str, Any], str]] = {}  # -> body, id

    # -- plumbing --------------------------------------------------------------------------

    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        return self.loop.run_until_complete(asyncio.wait_for(coro, DEADLINE_S * 2))

    def send(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        key: str = API_KEY,
        headers: dict[str, str] | None = None,
    ) -> Answer:
        answer = self._run(self.api.request(method, path, json_body=body, headers=headers, key=key))
        self._no_code_in(answer, f"{method} {path}")
        if answer.status >= 400:
            problem = answer.json
            assert problem["type"].startswith(PROBLEM_BASE), problem
            assert answer.headers.get("Cache-Control") == "no-store", answer.headers
        return answer

    def _no_code_in(self, answer: Answer, what: str) -> None:
        """No answer holds a code: not in a JSON string (ids and times aside, which are
        checked whole), not in a header."""
        if not self.codes:
            return
        found = re.compile(r"(?<![0-9])(" + "|".join(map(re.escape, self.codes)) + r")(?![0-9])")
        texts: list[tuple[str, str]] = list(answer.headers.items())
        if answer.body:
            texts += [
                (k, s)
                for k, s in _walk_strings(answer.json)
                if k not in ("id", "at", "created_at", "expires_at")
            ]
        for name, text in texts:
            if name in ("Location", "Date", "Content-Length"):
                continue  # the id, the time, a size: digits that are no code's business
            assert not found.search(text), f"{what}: a code in {name}: {answer.text[:300]}"

    def _sms(self) -> tuple[str, str]:
        """The SMS the last create sent: (to, code)."""
        n = self.sms_before + sum(self.sends.values())
        received = self._run(self.gateway.wait_for(n, DEADLINE_S))
        sms = received[n - 1]
        found = re.findall(r"(?<![0-9])[0-9]{4,8}(?![0-9])", sms.text)
        assert len(found) == 1, "one code in an SMS"
        return sms.to, found[0]

    def _same_as_model(self, m: Model, got: dict[str, Any]) -> None:
        assert got["id"] == m.vid
        assert got["phone"] == m.phone, (got["phone"], m.phone)
        assert got["status"] == m.status, (m.vid, got["status"], m.status, got["events"])
        assert got["attempts_left"] == m.attempts_left, (got, m)
        assert got["channel"] == "sms" and got["channels"] == ["sms"], got
        events = got["events"]
        times = [datetime.fromisoformat(e["at"].replace("Z", "+00:00")) for e in events]
        assert times == sorted(times), f"events out of time order: {events}"
        if m.seen:
            before = m.seen["events"]
            assert events[: len(before)] == before, f"events changed: {before} -> {events}"
            assert got["attempts_left"] <= m.seen["attempts_left"]
        approvals = sum(1 for e in events if e["type"] == "approved")
        assert approvals == (1 if m.status == "approved" else 0), events
        if m.final_body is not None:
            assert got == m.final_body, f"a {m.status} verification changed"
        elif m.status in FINAL:
            m.final_body = got
        m.seen = got

    # -- creates ---------------------------------------------------------------------------

    def _create(
        self, body: dict[str, Any], key: str, idem: str | None, problem: str | None
    ) -> Answer:
        headers = {"Idempotency-Key": idem} if idem else None
        answer = self.send("POST", CREATE, body, key=key, headers=headers)
        phone = body["phone"]
        if problem is not None:
            answer.problem(422, problem)
            REACHED["create", problem] += 1
            return answer
        made = self.idem.get((key, idem)) if idem else None
        if made is not None:
            if made[0] != body:
                answer.problem(422, "idempotency-key-reused")
                REACHED["create", "idempotency-key-reused"] += 1
                return answer
            assert answer.status == 201, answer.text
            assert answer.headers.get("Idempotent-Replayed") == "true"
            self._same_as_model(self.v[made[1]], answer.json)
            REACHED["create", f"replay of {self.v[made[1]].status}"] += 1
            return answer
        if self.sends.get(phone, 0) >= SENDS_PER_NUMBER:
            refused = answer.problem(429, "rate-limited")
            assert int(answer.headers["Retry-After"]) == refused["retry_after"] >= 1
            REACHED["create", "rate-limited"] += 1
            return answer
        assert answer.status == 201, answer.text
        assert answer.headers.get("Idempotent-Replayed") is None
        got = answer.json
        assert answer.headers["Location"] == f"{CREATE}/{got['id']}"
        assert got["id"] not in self.v, "a create without a key made an old verification"
        self.sends[phone] = self.sends.get(phone, 0) + 1
        to, code = self._sms()
        assert to == phone, (to, phone)
        assert len(code) == body.get("code_length", 6)
        m = Model(got["id"], phone, code, len(code))
        self.v[m.vid] = m
        self._same_as_model(m, got)
        self.codes.add(code)
        if idem:
            self.idem[(key, idem)] = (body, m.vid)
        REACHED["create", "idempotent" if idem else "plain"] += 1
        return answer

    @precondition(lambda self: len(self.v) < FEW)
    @rule(
        target=verifications,
        plan=st.sampled_from([p for p in PLANS if p[1] is None]),
        code_length=st.one_of(st.none(), st.integers(min_value=4, max_value=8)),
        key=st.sampled_from(KEYS),
    )
    def create(self, plan: tuple[dict[str, Any], None], code_length: int | None, key: str) -> str:
        body = {"phone": _number(), **plan[0]}
        if code_length is not None:
            body["code_length"] = code_length
        return str(self._create(body, key, None, None).json["id"])

    @initialize(target=failed)
    def a_failed_one(self) -> str:
        """Each example starts with a verification its wrong codes failed (see
        :meth:`on_the_failed_one`): the draws alone reached "failed" a few times a run, and a
        run of the whole suite once met none (the coverage check at the end)."""
        vid = str(self.create(({}, None), None, API_KEY))
        self.check_wrong_code(vid, 1, MAX_CHECKS)
        assert self.v[vid].status == "failed"
        return vid

    @rule(
        vid=failed,
        step=st.sampled_from(["right code", "wrong code", "malformed code", "fallback", "cancel"]),
    )
    def on_the_failed_one(self, vid: str, step: str) -> None:
        """A step of the others on the example's failed verification."""
        if step == "right code":
            self.check_right_code(vid)
        elif step == "wrong code":
            self.check_wrong_code(vid, 3, 1)
        elif step == "malformed code":
            self.check_malformed_code(vid, "12ab")
        elif step == "fallback":
            self.fallback(vid)
        else:
            self.cancel(vid)

    @precondition(lambda self: len(self.v) < FEW)
    @rule(target=idempotent, key=st.sampled_from(KEYS), code_length=st.sampled_from([4, 6, 8]))
    def create_idempotent(self, key: str, code_length: int) -> IdemUse:
        idem = f"model-{next(_IDEMPOTENCY)}"
        body = {"phone": _number(), "code_length": code_length}
        answer = self._create(body, key, idem, None)
        return IdemUse(idem, key, body, str(answer.json["id"]))

    @rule(
        use=idempotent,
        how=st.sampled_from(
            [
                "replay",
                "other order",
                "other code_length",
                "other phone",
                "other locale",
                "other API key",
            ]
        ),
    )
    def create_again(self, use: IdemUse, how: str) -> None:
        """An ``Idempotency-Key`` used again: with the same body (its fields in another order
        too: the same JSON), the same verification as it is now, and no new SMS; with another
        body, 422 and nothing made or sent; by the other API key (keys are each API key's
        own), a verification of its own."""
        body = dict(use.body)
        key = use.api_key
        if how == "other order":
            body = dict(reversed(list(body.items())))
        elif how == "other code_length":
            body["code_length"] = 5
        elif how == "other phone":
            body["phone"] = _number()
        elif how == "other locale":
            body["locale"] = "nl-NL"
        elif how == "other API key":
            key = OTHER_KEY if use.api_key == API_KEY else API_KEY
        self._create(body, key, use.key, None)

    @rule(plan=st.sampled_from([*(p for p in PLANS if p[1] is not None), ({}, "one number")]))
    def create_refused(self, plan: tuple[dict[str, Any], str]) -> None:
        """A plan SMS alone cannot serve (422); or one more create for the example's own
        number, until the per-number send limit answers 429 with Retry-After and makes
        nothing."""
        if plan[1] == "one number":
            self._create({"phone": self.limited_phone, "code_length": 4}, API_KEY, None, None)
        else:
            self._create({"phone": _number(), **plan[0]}, API_KEY, None, plan[1])

    def _check(self, m: Model, code: str) -> Answer:
        answer = self.send("POST", f"{CREATE}/{m.vid}/check", {"code": code})
        return answer

    @rule(vid=verifications)
    def check_right_code(self, vid: str) -> None:
        m = self.v[vid]
        REACHED["right code", m.status] += 1
        answer = self._check(m, m.code)
        if m.status == "pending":
            m.status = "approved"
        elif m.status in ("approved", "canceled"):
            refused = answer.problem(409, "not-pending")
            assert refused["verification_status"] == m.status
            return
        assert answer.status == 200, answer.text
        assert answer.json == {"id": vid, "status": m.status, "attempts_left": m.attempts_left}

    @rule(
        vid=verifications,
        n=st.integers(min_value=1, max_value=9),
        times=st.integers(min_value=1, max_value=MAX_CHECKS),
    )
    def check_wrong_code(self, vid: str, n: int, times: int) -> None:
        """``times`` wrong codes in a row (each differs from the code in every digit)."""
        m = self.v[vid]
        wrong = "".join(str((int(d) + n) % 10) for d in m.code)
        for _ in range(times):
            REACHED["wrong code", m.status] += 1
            answer = self._check(m, wrong)
            if m.status in ("approved", "canceled"):
                refused = answer.problem(409, "not-pending")
                assert refused["verification_status"] == m.status
                continue
            if m.status == "pending":
                m.attempts_left -= 1
                if m.attempts_left == 0:
                    m.status = "failed"
            assert answer.status == 200, answer.text
            want = {"id": vid, "status": m.status, "attempts_left": m.attempts_left}
            assert answer.json == want, (answer.json, want)

    @rule(
        vid=verifications,
        code=st.sampled_from(
            ["12ab", "abcdef", "\uff11\uff12\uff13\uff14\uff15\uff16", "12 34", "", "1234567890"]
        ),
    )
    def check_malformed_code(self, vid: str, code: str) -> None:
        """Letters, other digits, another length: 422 in any state, and no attempt spent."""
        m = self.v[vid]
        REACHED["malformed code", m.status] += 1
        answer = self._check(m, code)
        assert answer.problem(422, "invalid-request").get("field") in ("code", None)

    @rule(vid=verifications)
    def fallback(self, vid: str) -> None:
        """SMS is the only channel of every plan here: none is left."""
        m = self.v[vid]
        REACHED["fallback", m.status] += 1
        answer = self.send("POST", f"{CREATE}/{vid}/fallback")
        if m.status == "pending":
            answer.problem(409, "no-channel-left")
        else:
            refused = answer.problem(409, "not-pending")
            assert refused["verification_status"] == m.status

    @rule(vid=verifications)
    def cancel(self, vid: str) -> None:
        m = self.v[vid]
        REACHED["cancel", m.status] += 1
        answer = self.send("DELETE", f"{CREATE}/{vid}")
        if m.status != "pending":
            refused = answer.problem(409, "not-pending")
            assert refused["verification_status"] == m.status
            return
        assert answer.status == 200, answer.text
        m.status = "canceled"
        self._same_as_model(m, answer.json)

    @rule(vid=st.one_of(verifications, st.just("N" * 32)), key=st.sampled_from(KEYS))
    def get(self, vid: str, key: str) -> None:
        """Either API key reads any verification (the key is not its owner); an id never
        made is 404."""
        answer = self.send("GET", f"{CREATE}/{vid}", key=key)
        if vid not in self.v:
            answer.problem(404, "not-found")
            return
        assert answer.status == 200, answer.text
        self._same_as_model(self.v[vid], answer.json)

    # -- after every step --------------------------------------------------------------------

    @invariant()
    def every_verification_is_as_the_model_says(self) -> None:
        for m in self.v.values():
            answer = self.send("GET", f"{CREATE}/{m.vid}")
            assert answer.status == 200, answer.text
            self._same_as_model(m, answer.json)
            if m.status in FINAL and not m.probed:
                # Once final, each request that could change it, in every final state (the
                # rules may not pick each of them there in a short run); then read again.
                m.probed = True
                self.check_right_code(m.vid)
                self.check_wrong_code(m.vid, 1, 1)
                self.check_malformed_code(m.vid, "12ab")
                self.fallback(m.vid)
                self.cancel(m.vid)
                self._same_as_model(m, self.send("GET", f"{CREATE}/{m.vid}").json)

    @invariant()
    def each_sms_holds_its_code_only(self) -> None:
        sent = self.gateway.received[self.sms_before :]
        assert len(sent) == sum(self.sends.values()), "an SMS too many, or one missing"
        by_phone: dict[str, set[str]] = {}
        for m in self.v.values():
            by_phone.setdefault(m.phone, set()).add(m.code)
        for sms in sent:
            codes = set(re.findall(r"(?<![0-9])[0-9]{4,8}(?![0-9])", sms.text))
            assert len(codes) == 1 and codes <= by_phone.get(sms.to, set()), "a code astray"


@pytest.fixture
async def service(
    start_service: StartService, sms_gateway: SmsGateway
) -> tuple[Api, asyncio.AbstractEventLoop]:
    """One service for every example, and the loop it runs on."""
    return await start_service(ENV), asyncio.get_running_loop()


def test_the_api_answers_as_its_model_says(
    service: tuple[Api, asyncio.AbstractEventLoop], sms_gateway: SmsGateway
) -> None:
    # A plain test: each step runs the loop until its requests are answered (as
    # run_machine_on_redis does), so the service runs during the steps and no thread shares
    # the loop's process time with Hypothesis.
    api, loop = service
    bound = type(
        "BoundApiMachine", (ApiMachine,), {"api": api, "gateway": sms_gateway, "loop": loop}
    )
    REACHED.clear()
    run_state_machine_as_test(bound, settings=PROFILE)
    if _DEEP:
        return
    reached = set(REACHED)
    # Every create outcome; every step on a failed verification (each example has one); every
    # status met by some step; and each step in three statuses at least. Not every pair of
    # step and status: which pairs a run meets depends on the draws, which differ in a run of
    # the whole suite from a run of this file.
    steps = ("right code", "wrong code", "fallback", "cancel")
    wanted = {
        ("create", outcome)
        for outcome in (
            "plain",
            "idempotent",
            "replay of pending",
            "idempotency-key-reused",
            "rate-limited",
            "channel-unavailable",
            "invalid-request",
        )
    } | {(step, "failed") for step in steps}
    missing: list[tuple[str, str]] = sorted(wanted - reached)
    for status in ("pending", "approved", "failed", "canceled"):
        if not any((step, status) in reached for step in steps):
            missing.append(("any step", status))
    for step in steps:
        if len({status for (kind, status) in reached if kind == step}) < 3:
            missing.append((step, "three statuses"))
    assert not missing, f"not reached: {missing}; reached {REACHED}"
