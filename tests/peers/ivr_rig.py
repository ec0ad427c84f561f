"""The test side of the clinic-line tests: the whole service in-process, phones as processes.

- :func:`running_clinic_line` starts the real app (``build_app`` with the SIP pool, the
  redirect front and the clinic line from :func:`clinic_voice.wiring.extra_contexts`) on
  127.0.0.1 with a real ``redis-server``, and yields a :class:`ClinicLine` with the API client
  and the SIP URIs to call. The nurse and staff URIs point at free ports where a test starts
  an answering :class:`Phone` when it expects a transfer.
- :class:`Phone` runs ``tests/peers/ivr_phone.py`` in its own process (pjsua2 allows one
  Endpoint per process) and reads its JSON lines; every wait has a deadline and says what it
  waited for.

pjsua2 is never imported here.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from clinic_voice.app import RUNTIME, build_app
from clinic_voice.clinic_line import check_clinic_line
from clinic_voice.wiring import channel_factories, extra_contexts
from sip_config.settings import Settings
from tests.conftest import RedisServer, free_port
from tests.integration.conftest import BASE_ENV, CALLS_KEY, Answer, Api, OpenApiCollector
from voice.ivr.flow import FlowParams, load_flows
from voice.media.pcm import Pcm, resample, samples_to_bytes
from voice.sip.pool import SipPool

ROOT = Path(__file__).resolve().parents[2]
NURSE_USER = "6100"
STAFF_USER = "6200"
SIP_WORKERS = 2
Event = dict[str, Any]


@dataclass
class ClinicLine:
    """A running service taking calls."""

    api: Api
    settings: Settings
    sip_host: str
    sip_port: int
    nurse_port: int
    staff_port: int
    redis: RedisServer
    app: web.Application

    @property
    def pool(self) -> SipPool:
        """The service's SIP workers."""
        pool = self.app[RUNTIME].sip_pool
        assert pool is not None, "no SIP pool"
        return pool

    async def settled(self, deadline_s: float = 10.0) -> None:
        """Wait until no call holds a slot of the pool (a worker reports a call's end after
        its BYE)."""
        loop = asyncio.get_running_loop()
        end = loop.time() + deadline_s
        while (occ := self.pool.occupancy()).in_use or occ.reserved:
            if loop.time() > end:
                pytest.fail(f"a call slot is still taken {deadline_s} s after the calls: {occ}")
            await asyncio.sleep(0.1)

    def uri(self, user: str) -> str:
        """The URI a caller dials to reach the clinic line as ``user`` (a route)."""
        return f"sip:{user}@{self.sip_host}:{self.sip_port}"

    async def get(self, path: str, *, key: str = CALLS_KEY, **query: str) -> Answer:
        """``GET path?query`` with ``key`` (the call records key), validated against
        ``/openapi.json``.

        The collector matches documented paths without their query string, so it is given
        the path alone (its ``Api.request`` would hand it the query too).
        """
        client = self.api.client
        headers = {"Authorization": f"Bearer {key}"}
        async with client.get(path, params=query, headers=headers) as resp:
            body = await resp.read()
            answer = Answer(resp.status, resp.headers, body, resp.content_type)
        errors = self.api.collector.check(
            "GET", path, answer.status, answer.content_type, body, headers=answer.headers
        )
        assert not errors, "response does not match /openapi.json:\n  " + "\n  ".join(errors)
        return answer

    async def calls(self, **query: str) -> Answer:
        """``GET /v1/calls`` with ``query``."""
        return await self.get("/v1/calls", **query)

    async def call_ids(self) -> set[str]:
        """Ids of every stored call (walks the pages)."""
        ids: set[str] = set()
        cursor: str | None = None
        for _ in range(100):
            page = await self.calls(limit="100", **({"cursor": cursor} if cursor else {}))
            assert page.status == 200, page.text
            ids |= {c["id"] for c in page.json["calls"]}
            cursor = page.json["next"]
            if cursor is None:
                return ids
        raise AssertionError("more than 100 pages of calls")

    async def new_record(self, before: set[str], deadline_s: float = 15.0) -> dict[str, Any]:
        """The one call record stored since ``before`` (ids), fetched by ``GET /v1/calls/{id}``.

        The record is written when the session ends (after the caller's BYE or ours), so
        this polls ``/v1/calls`` until the new id shows.
        """
        loop = asyncio.get_running_loop()
        end = loop.time() + deadline_s
        while True:
            new = await self.call_ids() - before
            if new:
                assert len(new) == 1, f"expected one new call record, got {sorted(new)}"
                (call_id,) = new
                got = await self.get(f"/v1/calls/{call_id}")
                assert got.status == 200, got.text
                record: dict[str, Any] = got.json
                return record
            if loop.time() > end:
                pytest.fail(f"no new call record in GET /v1/calls within {deadline_s} s")
            await asyncio.sleep(0.1)


def steps(record: Mapping[str, Any], kind: str) -> list[tuple[str, str]]:
    """(node, value) of a call record's path steps whose input is ``kind``."""
    return [(p["node"], p["value"]) for p in record["path"] if p["input"] == kind]


def pcm_8k(pcm: Pcm) -> bytes:
    """``pcm`` as 8 kHz PCM16 bytes, for :func:`voice.media.audio_match.rank`."""
    samples = pcm.samples if pcm.rate_hz == 8000 else resample(pcm.samples, pcm.rate_hz, 8000)
    return samples_to_bytes(samples)


PROMPTS_WARM_S = 240.0  # ~170 prompts on two busy cores with an empty cache took ~40 s


async def warm_prompts(app: web.Application) -> None:
    """Wait until every static prompt of every flow is in the service's prompt cache.

    The service renders them in the background and renders a missing one on demand, so a
    call made while the cache fills waits behind that queue for its prompt (25 s was seen).
    Asking the service's own renderer for the same texts joins the renders in flight.
    """
    rt = app[RUNTIME]
    assert rt.renderer is not None, "no prompt renderer after start"
    settings = rt.settings
    speech = settings.ivr.vosk_model is not None
    params = FlowParams.from_settings(settings, speech_enabled=speech)
    try:
        async with asyncio.timeout(PROMPTS_WARM_S):
            for flow in load_flows(settings.ivr.flows_dir).flows.values():
                texts = sorted(flow.static_prompts(params))
                await rt.renderer.prerender(texts, voice=flow.language)
    except TimeoutError:
        pytest.fail(f"the static prompts were not rendered within {PROMPTS_WARM_S} s")


def _link_prompts(data_dir: Path, cache: Path) -> None:
    cache.mkdir(parents=True, exist_ok=True)
    data_dir.mkdir(mode=0o700)
    (data_dir / "prompts").symlink_to(cache, target_is_directory=True)


@contextlib.asynccontextmanager
async def running_clinic_line(
    tmp: Path,
    collector: OpenApiCollector,
    env: Mapping[str, str] | None = None,
    *,
    prompt_cache: Path | None = None,
) -> AsyncIterator[ClinicLine]:
    """The service with its SIP front on a free run of ports; everything stopped after.

    ``prompt_cache``: a folder shared by several services of the session (the data dir's
    ``prompts`` becomes a link to it), so each prompt is rendered once per test session.
    Returns once the static prompts are cached (see :func:`warm_prompts`).
    """
    if prompt_cache is not None:
        _link_prompts(tmp / "data", prompt_cache)
    redis_dir = tmp / "redis"
    redis_dir.mkdir()
    redis = RedisServer(redis_dir)
    await asyncio.to_thread(redis.start)
    client: TestClient[Any, Any] | None = None
    try:
        sip_port = free_port(count=SIP_WORKERS + 2)  # the front, workers, flash-call agent
        nurse_port, staff_port = free_port(), free_port()
        settings = Settings.from_env(
            {
                **BASE_ENV,
                "CLINIC_REDIS_URL": redis.url,
                "CLINIC_DATA_DIR": str(tmp / "data"),
                "CLINIC_SIP_ADDR": f"127.0.0.1:{sip_port}",
                "CLINIC_SIP_WORKERS": str(SIP_WORKERS),
                "CLINIC_NURSE_URI": f"sip:{NURSE_USER}@127.0.0.1:{nurse_port}",
                "CLINIC_STAFF_URI": f"sip:{STAFF_USER}@127.0.0.1:{staff_port}",
                "CLINIC_FLOWS_DIR": str(ROOT / "ivr_flows"),
                # Every test phone calls from one number: a module's messages would reach
                # the limit per number.
                "CLINIC_VOICEMAIL_PER_CALLER_DAY": "0",
                **(env or {}),
            }
        )
        app = build_app(
            settings,
            extra_contexts=extra_contexts(settings, check_clinic_line(settings)),
            channel_factories=channel_factories(settings),
        )
        client = TestClient(TestServer(app, host="127.0.0.1"))
        await client.start_server()
        async with client.get("/openapi.json") as resp:
            assert resp.status == 200, await resp.text()
            collector.load(await resp.json())
        pool = app[RUNTIME].sip_pool
        assert pool is not None and pool.ready(), "the SIP pool is not up after start"
        await warm_prompts(app)
        yield ClinicLine(
            api=Api(client, collector),
            settings=settings,
            sip_host="127.0.0.1",
            sip_port=sip_port,
            nurse_port=nurse_port,
            staff_port=staff_port,
            redis=redis,
            app=app,
        )
    finally:
        if client is not None:
            await client.close()
        await asyncio.to_thread(redis.stop)


LineFixture = Callable[[pytest.TempPathFactory, OpenApiCollector, Path], AsyncIterator[ClinicLine]]


def clinic_line_fixture(
    env: Mapping[str, str] | None = None, *, main_menu: str | None = None
) -> LineFixture:
    """A module's ``line`` fixture (``line = clinic_line_fixture(...)``): one service for all
    the module's tests, started by :func:`running_clinic_line` with ``env`` on the session's
    prompt cache. ``main_menu``: the YAML of the only flow the service runs (``main_menu``),
    instead of the shipped ones."""

    @pytest_asyncio.fixture(scope="module", loop_scope="module")
    async def line(
        tmp_path_factory: pytest.TempPathFactory,
        openapi_responses: OpenApiCollector,
        ivr_prompt_cache: Path,
    ) -> AsyncIterator[ClinicLine]:
        line_env = dict(env or {})
        if main_menu is not None:
            flows = tmp_path_factory.mktemp("flows")
            (flows / "main_menu.yaml").write_text(main_menu, encoding="utf-8")
            line_env["CLINIC_FLOWS_DIR"] = str(flows)
        async with running_clinic_line(
            tmp_path_factory.mktemp("clinic"),
            openapi_responses,
            line_env,
            prompt_cache=ivr_prompt_cache,
        ) as svc:
            yield svc

    return line


class Phone:
    """One ``ivr_phone`` process and the events it printed so far."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.events: list[Event] = []
        self._changed = asyncio.Event()
        self._proc: asyncio.subprocess.Process | None = None
        self._reader: asyncio.Task[None] | None = None
        self._stderr = b""

    @classmethod
    async def start(cls, name: str, *args: str, ready_s: float = 10.0) -> Phone:
        """Start the phone with ``args`` and wait until it listens."""
        phone = cls(name)
        phone._proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "tests.peers.ivr_phone",
            *args,
            cwd=ROOT,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        phone._reader = asyncio.create_task(phone._read())
        await phone.wait_for("ready", ready_s)
        return phone

    @property
    def port(self) -> int:
        return int(next(e["port"] for e in self.events if e["event"] == "ready"))

    async def _read(self) -> None:
        proc = self._proc
        assert proc is not None and proc.stdout is not None and proc.stderr is not None
        err = asyncio.create_task(proc.stderr.read())
        async for line in proc.stdout:
            if line.startswith(b"{"):
                self.events.append(json.loads(line))
                self._changed.set()
        self._stderr = await err
        self._changed.set()

    def find(self, event: str, **match: Any) -> Event | None:
        """The first event named ``event`` whose fields include ``match``."""
        for e in self.events:
            if e["event"] == event and all(e.get(k) == v for k, v in match.items()):
                return e
        return None

    async def wait_for(self, event: str, deadline_s: float, **match: Any) -> Event:
        """Wait for an event; fail the test with the events seen so far on the deadline."""
        loop = asyncio.get_running_loop()
        end = loop.time() + deadline_s
        while True:
            found = self.find(event, **match)
            if found is not None:
                return found
            if self._reader is not None and self._reader.done():
                pytest.fail(f"{self.name} exited before {event} {match}: {self.report()}")
            self._changed.clear()
            left = end - loop.time()
            if left <= 0:
                pytest.fail(
                    f"{self.name}: no {event} {match} within {deadline_s} s: {self.report()}"
                )
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(left):
                    await self._changed.wait()

    async def finish(self, deadline_s: float) -> list[Event]:
        """Wait for the process to exit 0 (every leg ended); returns its events."""
        proc = self._proc
        assert proc is not None and self._reader is not None
        try:
            async with asyncio.timeout(deadline_s):
                await self._reader
                await proc.wait()
        except TimeoutError:
            pytest.fail(f"{self.name} did not finish within {deadline_s} s: {self.report()}")
        assert proc.returncode == 0, f"{self.name} exited {proc.returncode}: {self.report()}"
        return self.events

    async def stop(self) -> None:
        """Kill the process if it still runs (cleanup after a failed test)."""
        proc = self._proc
        if proc is not None and proc.returncode is None:
            proc.kill()
            await proc.wait()
        if self._reader is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader

    def report(self) -> str:
        tail = self._stderr.decode(errors="replace")[-800:]
        return f"events={self.events} stderr={tail!r}"


@contextlib.asynccontextmanager
async def phones() -> AsyncIterator[list[Phone]]:
    """Collects the phones a test starts and kills any left running at the end."""
    started: list[Phone] = []
    try:
        yield started
    finally:
        for phone in started:
            await phone.stop()


async def put_through_to_nurse(
    line: ClinicLine, *caller_args: str, incoming_s: float = 60.0, finish_s: float = 60.0
) -> tuple[Phone, Event]:
    """One call the clinic line puts through to the nurse: the nurse's phone answers (for a
    second) at ``line.nurse_port``, and a caller starts with ``caller_args`` (its ``--call``
    and what it does). Waits ``incoming_s`` for the nurse's INVITE and ``finish_s`` for the
    caller's end; the caller's phone and the INVITE the nurse got, once both are done."""
    async with phones() as started:
        nurse = await Phone.start(
            "nurse", "--port", str(line.nurse_port), "--answer", "--duration", "1"
        )
        started.append(nurse)
        caller = await Phone.start("caller", *caller_args)
        started.append(caller)
        incoming = await nurse.wait_for("incoming", incoming_s)
        await caller.finish(finish_s)
        await nurse.finish(10)
    return caller, incoming
