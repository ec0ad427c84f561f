"""A voice-code verification answered by a real pjsua2 softphone, and proof of what it heard.

The softphone (``tests/peers/softphone.py``, its own process) answers the service's call,
presses 1 (RFC 4733) when asked, and records the call. The code exists only in that audio, so
the test makes the service draw a code it knows (``verification.codes.new_code`` is replaced
for this test: the service's call path is unchanged), then shows that the recording matches the
service's own rendering of that code (the digits of ``spoken_code.compose``'s file) better, by a
margin, than the renderings of every code one digit away; then checks the code over the API.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer

from clinic_voice.app import RUNTIME, build_app
from sip_config.settings import Settings
from tests.integration.conftest import API_KEY, SECRET, Api
from tests.integration.test_sip_pool import sipp_uas
from tests.integration.test_verify_sip_flash import (
    CLINIC,
    MOBILE,
    Rig,
    assert_not_logged,
    create,
    event_types,
    make_rig,
    sip_service,
    wait_until_settled,
    wire_request,
)
from tests.peers.spoken_code_refs import code_digits
from verification import codes, dispatcher
from verification.channels import voice_call
from verification.wording import DEFAULT, Wording, wording
from voice.media import spoken_code
from voice.media.audio_match import rank
from voice.media.pcm import read_wav, resample, samples_to_bytes
from voice.media.private_folder import PrivateFolder
from voice.media.tts import PromptRenderer

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
CODE = "583920"
# The code read twice after the question takes about 20 s; the call is up well within this.
CALL_DEADLINE_S = 40.0
# The best one-digit-off rendering must be this much farther from the recording than the
# right one. Measured here: mean frame distance 0.95 for the right code, 1.41 for the best
# wrong one (ratio 1.49).
MARGIN = 1.25


@pytest.fixture
def rig(request: pytest.FixtureRequest) -> Rig:
    return make_rig(request)


def distance(score: float) -> float:
    """audio_match's score is ``1 / (1 + d)``: back to ``d``, the mean distance per frame."""
    return 1.0 / score - 1.0


async def code_part(
    renderer: PromptRenderer, code: str, scratch: Path, words: Wording = DEFAULT
) -> bytes:
    """The digits of the service's own spoken-code file for ``code``, in the language of
    ``words``."""
    return await code_digits(renderer, words.head_text(CLINIC), code, scratch, words.language)


def one_digit_off(code: str) -> list[str]:
    """For each position, the code with that digit changed (to the next digit)."""
    return [code[:i] + str((int(d) + 1) % 10) + code[i + 1 :] for i, d in enumerate(code)]


@dataclass
class Softphone:
    """A running ``tests/peers/softphone.py`` and the JSON events it printed."""

    proc: asyncio.subprocess.Process
    port: int = 0
    events: list[dict[str, Any]] = field(default_factory=list)

    async def next_event(self, deadline_s: float) -> dict[str, Any]:
        """The next JSON event (pjlib's start-up banner on stdout is skipped)."""
        assert self.proc.stdout is not None
        loop = asyncio.get_running_loop()
        end = loop.time() + deadline_s
        while True:
            try:
                async with asyncio.timeout(max(0.0, end - loop.time())):
                    line = await self.proc.stdout.readline()
            except TimeoutError:
                pytest.fail(f"the softphone said nothing for {deadline_s} s; so far: {self.events}")
            if not line:
                status = await self.proc.wait()
                pytest.fail(f"the softphone exited ({status}); said: {self.events}")
            if line.startswith(b"{"):
                event: dict[str, Any] = json.loads(line)
                self.events.append(event)
                return event

    async def until(self, kind: str, deadline_s: float) -> dict[str, Any]:
        loop = asyncio.get_running_loop()
        end = loop.time() + deadline_s
        while True:
            event = await self.next_event(max(0.01, end - loop.time()))
            if event["event"] == kind:
                return event

    def said(self, kind: str) -> list[dict[str, Any]]:
        return [e for e in self.events if e["event"] == kind]


@contextlib.asynccontextmanager
async def softphone(*args: str) -> AsyncIterator[Softphone]:
    """Start the softphone on a free port; yields once it reported ``ready``."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "tests.peers.softphone",
        *args,
        cwd=REPO,
        stdout=asyncio.subprocess.PIPE,
    )
    phone = Softphone(proc)
    try:
        ready = await phone.until("ready", 10.0)
        phone.port = int(ready["port"])
        yield phone
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


@pytest.mark.parametrize("locale", ["en-GB", "nl-NL"])
async def test_softphone_hears_the_spoken_code_after_pressing_1(  # noqa: PLR0917 (fixtures)
    locale: str,
    rig: Rig,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    capfd: pytest.CaptureFixture[str],
) -> None:
    caplog.set_level(logging.DEBUG)

    def known_code(length: int) -> str:
        assert length == len(CODE), f"the test expects {len(CODE)}-digit codes, not {length}"
        return CODE

    monkeypatch.setattr(codes, "new_code", known_code)
    recording = tmp_path / "call.wav"
    async with (
        softphone(
            "--answer",
            "--dtmf",
            "1@1.0",  # during the question: a barge-in, as a hurried user would
            "--record",
            str(recording),
            "--timeout",
            str(CALL_DEADLINE_S),
        ) as phone,
        sip_service(rig, phone.port) as svc,
    ):
        vid = await create(svc.api, phone=MOBILE, method="voice", fallback=[], locale=locale)
        incoming = await phone.until("incoming", 10.0)
        # The number the service dialled, as the route template made it.
        assert f"sip:{MOBILE}@" in incoming["to"], incoming
        await phone.until("dtmf_sent", 10.0)
        await phone.until("ended", CALL_DEADLINE_S)
        try:
            async with asyncio.timeout(5.0):
                status = await phone.proc.wait()
        except TimeoutError:
            pytest.fail("the softphone did not exit after the call ended")
        assert status == 0, f"softphone exit {status}: {phone.events}"
        v = await wait_until_settled(svc.api, vid, {"delivered", "undeliverable"})
        kinds = event_types(v)
        assert kinds[-2:] == ["answered", "delivered"], v
        assert kinds[:2] == ["requested", "dispatched"], v
        assert v["events"][-1]["detail"] == "code read twice", v
        # The composed file saying the code is private to the call: gone once it ended.
        left = await private_files(svc.app[RUNTIME].renderer)
        assert not left, f"spoken-code files left behind: {left}"

        # What the phone heard, against the service's own renderings.
        heard = read_wav(recording)
        assert heard.duration_s > 5.0, f"only {heard.duration_s:.1f} s recorded"
        samples = (
            heard.samples if heard.rate_hz == 8000 else resample(heard.samples, heard.rate_hz, 8000)
        )
        renderer = PromptRenderer(rig.prompt_cache)
        words = wording(locale)
        if words is DEFAULT:
            # The digits: the code against each code one digit off, with a clear margin.
            references = {
                candidate: await code_part(renderer, candidate, tmp_path / "refs")
                for candidate in [CODE, *one_digit_off(CODE)]
            }
            match = await asyncio.to_thread(rank, samples_to_bytes(samples), references, 8000)
            assert match.key == CODE, f"the recording sounds like {match.key}, not the code"
            nearest, wrong = distance(match.score), distance(match.runner_up)
            assert wrong > MARGIN * nearest, (
                f"right {match.score:.3f} vs best wrong {match.runner_up:.3f}: no clear margin"
            )
        else:
            # The language: the code said in it, against the code said in English. (Digits one
            # off are not told apart reliably in espeak's Dutch, "vijf" and "zes" are too
            # close for this matcher; the digits are composed the same way in every language,
            # and the English case checks them.)
            references = {
                words.language: await code_part(renderer, CODE, tmp_path / "refs", words),
                "en": await code_part(renderer, CODE, tmp_path / "refs"),
            }
            match = await asyncio.to_thread(rank, samples_to_bytes(samples), references, 8000)
            assert match.key == words.language, f"the code was said in {match.key}"
            nearest, wrong = distance(match.score), distance(match.runner_up)
            assert wrong > 2 * nearest, f"{match.score:.3f} against English {match.runner_up:.3f}"

        approved = await svc.api.check(vid, CODE)
        assert approved.json == {"id": vid, "status": "approved", "attempts_left": 5}, approved.text
    assert_not_logged(CODE, caplog, capfd)


# -- a verification that ends while its call still rings -------------------------------------


@contextlib.asynccontextmanager
async def api_only_service(rig: Rig) -> AsyncIterator[Api]:
    """Another service process on the same Redis, without SIP (it only answers the API)."""
    settings = Settings.from_env(
        {
            "CLINIC_API_KEYS": API_KEY,
            "CLINIC_SECRET": SECRET,
            "CLINIC_NAME": CLINIC,
            "CLINIC_LOG_LEVEL": "DEBUG",
            "CLINIC_REDIS_URL": rig.redis.url,
            "CLINIC_DATA_DIR": str(rig.data_dir()),
        }
    )
    client: TestClient[Any, Any] = TestClient(TestServer(build_app(settings), host="127.0.0.1"))
    await client.start_server()
    try:
        yield Api(client, rig.collector)
    finally:
        await client.close()


@pytest.mark.parametrize(
    ("where", "budget_s"),
    [
        # The check's write stops the call in the process that places it.
        ("this process", 2.0),
        # Another process on the same Redis: serve's watch of its long sends sees it.
        ("another process", dispatcher.WATCH_S + 2.0),
    ],
)
async def test_approval_hangs_up_the_voice_call_that_still_rings(
    rig: Rig,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    where: str,
    budget_s: float,
) -> None:
    """The black-box repro: approved while the voice call rang, the phone rang on for ~50 s
    and "undeliverable" came after "approved". Now the call is cancelled at once and the
    verification's last event stays "approved"."""
    monkeypatch.setattr(codes, "new_code", lambda length: CODE[:length])
    async with (
        sipp_uas("sipp_uas_ring.xml", tmp_path) as uas,  # 180, then waits for CANCEL
        sip_service(rig, uas.port) as svc,
        api_only_service(rig) as other,
    ):
        vid = await create(svc.api, phone=MOBILE, method="voice", fallback=[])
        await wait_until_settled(svc.api, vid, {"ringing"})
        checker = svc.api if where == "this process" else other
        loop = asyncio.get_running_loop()
        approved_at = loop.time()
        answer = await checker.check(vid, CODE)
        assert answer.json["status"] == "approved", answer.text
        await wire_request(uas, "CANCEL", deadline_s=budget_s)
        took = loop.time() - approved_at
        assert took <= budget_s, f"the call was cancelled {took:.1f} s after the approval"
        assert await uas.finish() == 0, "the ring scenario (CANCEL, 487, ACK) did not complete"
        await asyncio.sleep(0.5)  # a report of the ended call would be written by now
        v = await svc.api.get(vid)
        kinds = event_types(v)
        assert kinds[-1] == "approved" and "undeliverable" not in kinds, kinds
        assert v["status"] == "approved"
        left = await private_files(svc.app[RUNTIME].renderer)
        assert not left, f"spoken-code files left behind: {left}"


# -- a callee who hears the code once, answers on hold, or presses the wrong keys -------------


async def private_files(renderer: PromptRenderer | None) -> list[Path]:
    """The files in every folder a call's private audio may go to (tmpfs first)."""
    assert renderer is not None, "no prompt renderer in the service"

    def listing() -> list[Path]:
        return sorted(p for f in renderer.private.chain() if f.is_dir() for p in f.iterdir())

    return await asyncio.to_thread(listing)


def report(v: dict[str, Any]) -> tuple[str, str]:
    """The voice call's outcome: its last delivered or undeliverable event (a voice-only plan
    then fails)."""
    last = [e for e in v["events"] if e["type"] in {"delivered", "undeliverable"}][-1]
    return last["type"], last["detail"]


async def one_reading_s(rig: Rig, tmp_path: Path) -> float:
    """Seconds of one reading of the code (the head and the digits), from the service's file."""
    renderer = PromptRenderer(rig.prompt_cache)
    words = wording("en")
    out = PrivateFolder(tmp_path, None, temp_root=tmp_path)
    path = await spoken_code.compose(
        renderer, words.head_text(CLINIC), CODE, out, voice=words.language
    )
    try:
        return read_wav(path).duration_s  # its pause, the reading, its short tail
    finally:
        path.unlink()


async def test_a_callee_who_hangs_up_during_the_repeat_has_heard_the_code(
    rig: Rig, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Common: the code heard once, the phone put down during its repeat. It was delivered:
    # "undeliverable" failed a voice-only verification the patient could complete.
    monkeypatch.setattr(codes, "new_code", lambda length: CODE[:length])
    # 1 pressed at 1.0 s; the phone put down 0.5 s after the last digit (the repeat's pause)
    hang_up_at = 1.0 + 0.3 + await one_reading_s(rig, tmp_path) + 0.5
    async with (
        softphone(
            "--answer", "--dtmf", "1@1.0", "--duration", f"{hang_up_at:.2f}", "--timeout", "40"
        ) as phone,
        sip_service(rig, phone.port) as svc,
    ):
        vid = await create(svc.api, phone=MOBILE, method="voice", fallback=[])
        await phone.until("ended", CALL_DEADLINE_S)
        v = await wait_until_settled(svc.api, vid, {"delivered", "failed"})
        assert report(v) == ("delivered", "code read once, then the call ended: completed (200)")
        assert v["status"] == "pending"
        answer = await svc.api.check(vid, CODE)
        assert answer.json["status"] == "approved", answer.text


@pytest.mark.parametrize("keypress", ["1", "0"], ids=["asks for 1", "reads at once"])
async def test_a_call_answered_with_no_audio_is_hung_up_as_undeliverable(
    rig: Rig, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, keypress: str
) -> None:
    # Answered on hold (a=inactive): no prompt ever plays. The call stayed up in silence until
    # the verification expired (1 pressed first) or was reported "code read twice" (not).
    monkeypatch.setattr(voice_call, "PLAY_TIMEOUT_S", 3.0)
    async with (
        sipp_uas("sipp_uas_answer_inactive.xml", tmp_path) as uas,
        sip_service(rig, uas.port, {"CLINIC_VOICE_OTP_KEYPRESS": keypress}) as svc,
    ):
        vid = await create(svc.api, phone=MOBILE, method="voice", fallback=[])
        v = await wait_until_settled(svc.api, vid, {"delivered", "failed"})
        assert report(v) == (
            "undeliverable",
            "answered, but nothing could be played in 3 s (on hold?)",
        )
        await wire_request(uas, "BYE", deadline_s=5.0)
        assert await uas.finish() == 0


async def test_wrong_keys_do_not_hold_the_call_open(rig: Rig, tmp_path: Path) -> None:
    # A callee pressing 2 over and over was kept on the line: each key restarted nothing but
    # stopped the wait from counting. The question is asked twice, then the call ends.
    keys = ",".join(f"2@{0.7 * i:.1f}" for i in range(1, 80))
    async with (
        softphone("--answer", "--dtmf", keys, "--timeout", "70") as phone,
        sip_service(rig, phone.port) as svc,
    ):
        vid = await create(svc.api, phone=MOBILE, method="voice", fallback=[])
        await phone.until("confirmed", 20.0)
        loop = asyncio.get_running_loop()
        answered = loop.time()
        await phone.until("ended", 50.0)
        took = loop.time() - answered
        # Two questions of about 5 s, each followed by 8 s: well under 40 s.
        assert took < 40.0, f"the call ended {took:.0f} s after the answer"
        v = await wait_until_settled(svc.api, vid, {"delivered", "failed"})
        assert report(v) == ("undeliverable", "answered, but 1 was not pressed (voicemail?)")


async def test_a_fallback_hangs_up_the_voice_call_it_moves_on_from(
    rig: Rig, tmp_path: Path
) -> None:
    # voice, then flashcall: "I did not get it" while the voice call rang left it ringing
    # beside the flash call, two calls at once to one phone.
    async with (
        sipp_uas("sipp_uas_ring.xml", tmp_path, calls=2) as uas,
        sip_service(rig, uas.port) as svc,
    ):
        vid = await create(svc.api, phone=MOBILE, method="voice", fallback=["flashcall"])
        await wait_until_settled(svc.api, vid, {"ringing"})
        (voice_invite,) = uas.received("INVITE")
        moved = await svc.api.request("POST", f"/v1/verifications/{vid}/fallback")
        assert moved.status == 200 and moved.json["channel"] == "flashcall", moved.text
        loop = asyncio.get_running_loop()
        asked = loop.time()
        call_id = voice_invite.msg.get("Call-ID")
        while not [c for c in uas.received("CANCEL") if c.msg.get("Call-ID") == call_id]:
            assert loop.time() - asked < 3.0, "the voice call still rings 3 s after the fallback"
            await asyncio.sleep(0.05)
        v = await svc.api.get(vid)
        assert v["status"] == "pending" and v["channel"] == "flashcall", v
        assert "undeliverable" not in event_types(v)[event_types(v).index("fallback") :], v
