"""Builds the service: one aiohttp app owning Redis, the dispatcher, webhooks and (when
configured) the SIP pool and the clinic line, each as a ``cleanup_ctx`` so start and stop run
in order and nothing is left behind.
"""

from __future__ import annotations

import asyncio
import fcntl
import logging
import os
import secrets
import signal
import stat
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import phonenumbers
from aiohttp import web
from redis.exceptions import RedisError

from clinic_voice import redis_durability, shared_secret
from clinic_voice.disk_space import show_free_space
from clinic_voice.http import (
    METRICS,
    NoRouteUnderV1,
    build_middlewares,
    edge_routes,
    problem,
    problem_net,
)
from clinic_voice.http_workers import HttpWorkers
from clinic_voice.main_link import MainLink, MainLinkError
from clinic_voice.metrics import Metrics
from clinic_voice.openapi import served_document
from clinic_voice.redis_server import (
    AOF_ASKED_POLL_S,
    AOF_COMPACT_S,
    EmbeddedRedis,
    compact_aof_every,
    first_compaction_in,
)
from sip_config.clock import Clock, SystemClock
from sip_config.private_file import write_private
from sip_config.settings import (
    API_KEY_RULE,
    MIN_SECRET_CHARS,
    Settings,
    SettingsError,
    is_api_key,
)
from sip_config.tasks import cancel_and_wait, watch
from sip_config.worker_exit import WorkerExit
from verification import limits, rules
from verification.api import VerificationApi
from verification.callbacks import reachable
from verification.channels.base import ChannelAdapter
from verification.channels.sms_http import HttpSmsChannel
from verification.dispatcher import Dispatcher
from verification.http_client import HttpClient
from verification.model import Channel, Policy, Verification
from verification.redis_mux import RedisMux
from verification.request import MAX_BODY
from verification.rules import DeliveryKind
from verification.store import VerificationStore
from verification.webhooks import WebhookSender
from voice.ivr import voicemail_callers
from voice.ivr.api import CallsApi
from voice.ivr.erasure import CallErasure
from voice.ivr.journal import FOLDER as JOURNAL_FOLDER
from voice.ivr.journal import CallJournal, RecordsOnDisk
from voice.ivr.store import COMPACT_ASKED, CallStore
from voice.ivr.voicemail import Voicemails
from voice.ivr.voicemail_callers import CallerCounts
from voice.media.tts import PromptRenderer
from voice.sip.flash_uac import FlashUac
from voice.sip.pool import SipPool

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class WorkerRole:
    """This process is HTTP worker ``index`` of a ``serve`` reachable at ``control``."""

    index: int
    control: Path


@dataclass
class Runtime:
    """What the app owns while it runs (filled by the cleanup contexts)."""

    settings: Settings
    clock: Clock
    metrics: Metrics
    secret: bytes = b""
    # CLINIC_PREVIOUS_SECRETS: what was hashed or sealed under them still checks and opens
    previous_secrets: tuple[bytes, ...] = ()
    api_keys: tuple[str, ...] = ()
    store: VerificationStore | None = None
    dispatcher: Dispatcher | None = None
    http_client: HttpClient | None = None  # outbound POSTs: SMS gateway, the global webhook
    # a verification's callback_url: public addresses and CLINIC_CALLBACK_NETWORKS only
    callback_client: HttpClient | None = None
    sip_pool: SipPool | None = None
    flash_uac: FlashUac | None = None  # flash calls over UDP (the pool places them otherwise)
    call_store: CallStore | None = None
    voicemails: Voicemails | None = None
    # each number's voicemail messages of the last 24 hours, shared by every serve on Redis
    voicemail_callers: CallerCounts | None = None
    call_erasure: CallErasure | None = None
    # The call records waiting on disk, counted by this process's journals (serve's clinic
    # line keeps it current; an HTTP worker learns serve's count: MainLink.calls_on_disk).
    records_on_disk: RecordsOnDisk = field(default_factory=RecordsOnDisk)
    renderer: PromptRenderer | None = None
    redis_url: str = ""  # the Redis in use (the embedded one's socket when embedded)
    http_workers: HttpWorkers | None = None  # serve: the extra HTTP processes
    main_link: MainLink | None = None  # an HTTP worker: its control connection to serve
    extra_ready: dict[str, Callable[[], bool]] = field(default_factory=dict)  # name -> check
    # Work still going on after start that does not stop the service from serving (shown by
    # /readyz, e.g. "prompts" while the static prompts render): benches wait for it.
    warming: set[str] = field(default_factory=set)
    stopping: bool = False  # the stop began: /readyz fails while requests in flight finish
    # Run at the stop's first moment, before the grace for requests in flight (the clinic
    # line refuses new calls and lets those in progress go on: clinic_voice/clinic_line.py).
    stop_hooks: list[Callable[[], None]] = field(default_factory=list)
    # Run at a second SIGTERM or SIGINT (see hurry).
    hurry_hooks: list[Callable[[], None]] = field(default_factory=list)
    # What failed for good while running (see fail): /readyz fails, serve stops and exits 1.
    failed: str = ""
    # A configuration fault found while running (see misconfigure): /readyz fails, serve
    # stops and exits 2, as a start with that fault does.
    misconfigured: str = ""
    # serve's SIP and HTTP workers that did not stop as asked at the stop (a defect: serve
    # exits 1, unless misconfigured makes it 2), filled as each kind is stopped.
    worker_exits: list[WorkerExit] = field(default_factory=list)
    # How the service stops itself (fail, misconfigure): serve and an HTTP worker set it
    # (cli._StopSignals.stop_on_own). None (an app run in-process): this process is sent a
    # SIGTERM.
    stop_on_own: Callable[[], None] | None = None

    def fail(self, what: str) -> None:
        """A task the service cannot do without died of a defect (its watch logged the
        traceback: sip_config/tasks.py): /readyz fails from now on, and the service stops as
        SIGTERM would, exiting 1, for its service manager to start it afresh. Kept running,
        it was half-alive: an embedded Redis no longer restarted, timers no longer moved,
        webhooks no longer sent, all while /readyz said ready."""
        if self.failed:
            return
        under_way = self._under_way()
        self.failed = what
        self._stop(f"{what} failed", under_way)

    def misconfigure(self, reason: str) -> None:
        """A configuration fault found while running (another CLINIC_SECRET claims this
        Redis: clinic_voice/shared_secret.py; an HTTP worker exited 2, a configuration error
        of its own: clinic_voice/http_workers.py): the service stops as SIGTERM would and exits
        2, the exit of a start with that fault; starting it afresh with the same settings
        only gets that refusal. ``reason`` is logged CRITICAL and shown by /readyz."""
        if self.misconfigured:
            return
        under_way = self._under_way()
        self.misconfigured = reason
        self._stop(reason, under_way)

    def _under_way(self) -> bool:
        return self.stopping or bool(self.failed) or bool(self.misconfigured)

    def _stop(self, why: str, under_way: bool) -> None:
        if under_way:
            # The stop is under way already (the exit code says why all the same).
            log.critical("during the stop: %s", why)
            return
        log.critical("stopping: %s", why)
        # Never as a signal: serve counts its signals, and a second one cuts the clinic
        # line's call drain short (see hurry). A stop of the service's own making (at start,
        # or during a drain) then made the operator's first SIGTERM a second one.
        if self.stop_on_own is not None:
            self.stop_on_own()
        else:
            _sigterm_once_handled()

    def hurry(self) -> None:
        """The stop was asked for again (serve: a second SIGTERM or SIGINT): what it waits
        for by choice is cut short. The clinic line's drain is the one such wait (its hook
        also holds when the drain has yet to begin); a part already past its wait is left as
        it is (the closing notice still gets its time: only SIGKILL cuts that)."""
        for hook in self.hurry_hooks:
            hook()

    def need_store(self) -> VerificationStore:
        assert self.store is not None, "store used before start"
        return self.store

    def need_call_store(self) -> CallStore:
        assert self.call_store is not None, "call store used before start"
        return self.call_store

    def need_voicemails(self) -> Voicemails:
        assert self.voicemails is not None, "voicemail used before start"
        return self.voicemails

    def need_call_erasure(self) -> CallErasure:
        assert self.call_erasure is not None, "call erasure used before start"
        return self.call_erasure

    def calls_on_disk(self) -> int | None:
        """How many call records wait on disk (not in ``GET /v1/calls``): serve's count, also
        in an HTTP worker; None while not counted (no clinic line)."""
        if self.main_link is not None:
            return self.main_link.calls_on_disk()
        now = self.records_on_disk.now()
        return None if now is None else now.total

    def need_dispatcher(self) -> Dispatcher:
        assert self.dispatcher is not None, "dispatcher used before start"
        return self.dispatcher


RUNTIME = web.AppKey("runtime", Runtime)


def policy_from(settings: Settings) -> Policy:
    v = settings.verification
    return Policy(
        ttl_s=v.code_ttl_s,
        max_checks=v.max_checks,
        max_sends=v.max_sends,
        step_timeout_s={
            Channel.FLASHCALL: v.step_timeout_flashcall_s,
            Channel.SMS: v.step_timeout_sms_s,
            Channel.VOICE: v.step_timeout_voice_s,
        },
    )


def _private_file(path: Path, make: Callable[[], str], fault: Callable[[str], str]) -> str:
    """Read a secret file, creating it (mode 0600) on first start. ``fault`` says what is
    wrong with a value found there ("" when nothing): the files are the operator's to write
    (README: "Changing the secret", "Changing the API keys"), and a value that the variable
    would refuse is refused here too (SettingsError: exit 2), not taken as it is."""
    if path.exists():
        value = path.read_text().strip()
        if value and (wrong := fault(value)):
            raise SettingsError(f"{path.resolve()}: {wrong}")
        if value:
            mode = path.stat().st_mode
            if mode & (stat.S_IRGRP | stat.S_IROTH):
                # The operator's file, left as it is: only they know who should read it.
                log.warning(
                    "%s is readable by other users (mode %03o): chmod 600 it",
                    path.resolve(),
                    stat.S_IMODE(mode),
                )
            return value
    value = make()
    # A secret lost to a power cut would be made anew, and Redis (its fingerprint) would
    # refuse the next start: written durably.
    write_private(path, value + "\n")
    return value


def _key_file_fault(value: str, what: str) -> str:
    """What is wrong with a key an operator wrote into a generated key file: one key, by
    CLINIC_API_KEYS's rule. Taken as it was, "abc" was a 3-character key and "old,new" one
    key with a comma in it, which no client sends."""
    if is_api_key(value):
        return ""
    variable = "CLINIC_CALLS_API_KEYS" if what.startswith("call records") else "CLINIC_API_KEYS"
    return f"not one {what} ({API_KEY_RULE}): write one key there, or give several in {variable}"


def _secret_file_fault(value: str) -> str:
    if len(value) >= MIN_SECRET_CHARS:
        return ""
    return (
        f"a secret needs at least {MIN_SECRET_CHARS} characters, as CLINIC_SECRET does: write "
        "a new one there and list this one in CLINIC_PREVIOUS_SECRETS, so that what it sealed "
        'still opens (README: "Changing the secret")'
    )


class DataDirInUse(RuntimeError):
    """Another ``serve`` holds the data dir's lock."""


def lock_data_dir(data_dir: Path) -> int:
    """Take ``data_dir/serve.lock`` for this process's lifetime; returns the locked fd.

    Two ``serve`` on one data dir would take each other's embedded Redis for an orphan and
    shut it down, unlink each other's sockets and run two redis-servers on one append-only
    file. An exclusive ``flock`` ends with its process, however it ends, so a lock file left
    by a ``kill -9`` blocks nothing; only a live holder does. The fd is close-on-exec: no
    child keeps the lock after ``serve`` is gone (the HTTP workers need none).
    """
    data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    path = data_dir / "serve.lock"
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise DataDirInUse(
            f"data dir {data_dir.resolve()} is in use by another clinic-voice serve "
            f"(pid {holder}; lock {path.resolve()}): give each serve its own CLINIC_DATA_DIR"
        ) from None
    except BaseException:
        os.close(fd)
        raise
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)  # for the message above, nothing else
    return fd


@dataclass(frozen=True, slots=True)
class Credentials:
    """The keys a request may bear and the service's secret, configured or generated."""

    api_keys: tuple[str, ...]  # the verification API
    calls_api_keys: tuple[str, ...]  # /v1/calls: call records and voicemail
    secret: bytes
    previous_secrets: tuple[bytes, ...] = ()  # CLINIC_PREVIOUS_SECRETS


def prepare_data_dir(settings: Settings) -> Credentials:
    """Create the data dir and the generated API keys and secret when not configured."""
    settings.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)

    def keys(configured: tuple[str, ...], name: str, what: str) -> tuple[str, ...]:
        if configured:
            return configured
        key_file = settings.data_dir / name
        generated = _private_file(
            key_file, lambda: secrets.token_urlsafe(32), lambda v: _key_file_fault(v, what)
        )
        log.info("%s: see %s", what, key_file.resolve())
        return (generated,)

    api_keys = keys(settings.api_keys, "api-key", "API key")
    calls_keys = keys(settings.calls_api_keys, "calls-api-key", "call records API key")
    if set(api_keys) & set(calls_keys):  # a generated file copied over the other, say
        raise SettingsError("the API key and the call records API key must differ")
    secret = settings.secret or _private_file(
        settings.data_dir / "secret", lambda: secrets.token_urlsafe(48), _secret_file_fault
    )
    previous = _previous_secrets(settings, secret)
    return Credentials(api_keys, calls_keys, secret.encode(), previous)


def current_secrets(settings: Settings) -> tuple[bytes, tuple[bytes, ...]]:
    """The secret and ``CLINIC_PREVIOUS_SECRETS`` as ``serve`` has them, without making one:
    raises :class:`SettingsError` when ``CLINIC_SECRET`` is unset and the generated file is
    not there (``clinic-voice secret reseal``: a new secret would open nothing)."""
    secret = settings.secret
    if not secret:
        path = settings.data_dir / "secret"
        try:
            secret = path.read_text().strip()
        except FileNotFoundError:
            secret = ""
        if not secret:
            raise SettingsError(
                f"CLINIC_SECRET is unset and {path.resolve()} holds none: no secret to seal with"
            )
        if wrong := _secret_file_fault(secret):
            raise SettingsError(f"{path.resolve()}: {wrong}")
    return secret.encode(), _previous_secrets(settings, secret)


def _previous_secrets(settings: Settings, secret: str) -> tuple[bytes, ...]:
    if secret in settings.previous_secrets:
        # The new secret was not set (the generated one is the old one, say): nothing would
        # change, and the operator would believe it had.
        where = "CLINIC_SECRET" if settings.secret else str(settings.data_dir / "secret")
        raise SettingsError(
            f"CLINIC_PREVIOUS_SECRETS lists the current secret ({where}): set the new one "
            "there, and list only the ones it replaced"
        )
    return tuple(p.encode() for p in settings.previous_secrets)


def _sigterm_once_handled() -> None:
    # How an app run in-process (by a test, say) stops on its own (Runtime._stop). Without a
    # handler (such an app may have none) a SIGTERM would kill the process outright, its
    # children and cleanup with it: wait for one.
    if signal.getsignal(signal.SIGTERM) in (signal.SIG_DFL, None):
        asyncio.get_running_loop().call_later(0.2, _sigterm_once_handled)
    else:
        os.kill(os.getpid(), signal.SIGTERM)


class _DeliveryMetrics:
    def __init__(self, metrics: Metrics) -> None:
        self._m = metrics

    def count(self, channel: Channel, kind: DeliveryKind) -> None:
        self._m.deliveries.inc(channel=channel.value, outcome=kind.value)


def check_settings(settings: Settings) -> None:
    """Checks that need more than the standard library (settings.py stays stdlib-only)."""
    unknown = sorted(settings.verification.allowed_countries - phonenumbers.SUPPORTED_REGIONS)
    if unknown:
        raise SettingsError(
            "CLINIC_ALLOWED_COUNTRIES: not regions phonenumbers knows: "
            f"{', '.join(unknown)} (the United Kingdom is GB)"
        )


def build_app(
    settings: Settings,
    *,
    clock: Clock | None = None,
    extra_contexts: list[Callable[[web.Application], AsyncIterator[None]]] | None = None,
    channel_factories: dict[Channel, Callable[[Runtime], ChannelAdapter | None]] | None = None,
    worker: WorkerRole | None = None,
) -> web.Application:
    """The whole service as an aiohttp application (``worker``: one of its HTTP workers)."""
    clock = clock or SystemClock()
    metrics = Metrics()
    rt = Runtime(settings=settings, clock=clock, metrics=metrics)
    if worker is not None:
        if not settings.redis_url:
            raise SettingsError("an HTTP worker needs CLINIC_REDIS_URL (serve passes it on)")
        rt.main_link = MainLink(worker.control, worker.index, metrics)
    check_settings(settings)
    credentials = prepare_data_dir(settings)
    rt.api_keys, rt.secret = credentials.api_keys, credentials.secret
    rt.previous_secrets = credentials.previous_secrets
    policy = policy_from(settings)

    def on_change(old: Verification | None, new: Verification) -> None:
        # Every write of this process's store, whoever made it (API, channel reports,
        # timers): each change of state is counted once, by the process that made it.
        entered = rules.state_change(old, new)
        if entered is not None:
            status, channel = entered
            metrics.verifications.inc(
                status=status.value, channel=channel.value if channel else "none"
            )
        if rt.dispatcher is not None:
            rt.dispatcher.changed(old, new)  # a final state stops the sends still under way

    app = web.Application(
        client_max_size=MAX_BODY,
        middlewares=build_middlewares(
            metrics=metrics,
            api_keys=rt.api_keys,
            calls_api_keys=credentials.calls_api_keys,
            store_getter=rt.need_store,
            settings=settings.verification,
            trusted_proxies=settings.trusted_proxies,
            clock=clock,
        ),
    )
    app.on_response_prepare.append(problem_net)
    app[RUNTIME] = rt
    app[METRICS] = metrics  # for the answers the middlewares never see (http.COUNTED)

    async def begin_stop(app: web.Application) -> None:
        # aiohttp's on_shutdown: the listener is closed, the grace for requests in flight
        # is about to begin. The HTTP workers begin theirs now too (see HttpWorkers.stop).
        rt.stopping = True
        if rt.http_workers is not None:
            rt.http_workers.begin_stop()
        for hook in rt.stop_hooks:
            hook()

    app.on_shutdown.append(begin_stop)

    async def redis_ctx(app: web.Application) -> AsyncIterator[None]:
        embedded: EmbeddedRedis | None = None
        url = settings.redis_url
        if not url:
            # Restarts are counted from 0 (a rate has a start); with CLINIC_REDIS_URL there is
            # no sample: that Redis is the operator's to watch, not this service's to restart.
            metrics.redis_restarts.inc(0)
            embedded = EmbeddedRedis(
                settings.data_dir,
                appendfsync=settings.redis_appendfsync,
                on_restart=metrics.redis_restarts.inc,
            )
            url = await embedded.start(on_failure=rt.fail)
            log.info("embedded Redis started (unix socket in %s)", settings.data_dir)
            risk = redis_durability.assess("yes", settings.redis_appendfsync)
            if risk is not None:
                log.warning("embedded Redis (CLINIC_REDIS_APPENDFSYNC): %s", risk)
        rt.redis_url = url
        # Every Redis command of this process rides one multiplexed connection (see
        # verification/redis_mux.py): the verification API's hot path and the call records.
        mux = RedisMux(url, timeout_s=2.0)
        rt.call_store = CallStore(
            mux,
            rt.secret,
            settings.ivr.call_retention_days,
            previous_secrets=rt.previous_secrets,
            clock=rt.clock,
        )
        rt.voicemails = Voicemails(settings.data_dir / "voicemail", rt.call_store)
        rt.voicemail_callers = CallerCounts(mux, voicemail_callers.digest_key(rt.secret), rt.clock)
        # Its own view of the journal's folders (the clinic line replays them): an HTTP
        # worker erases too, and shares the data dir.
        journal = CallJournal(
            settings.data_dir / JOURNAL_FOLDER, rt.call_store, on_disk=rt.records_on_disk
        )
        rt.call_erasure = CallErasure(rt.call_store, journal, rt.voicemails, rt.clock)
        rt.store = VerificationStore(
            mux,
            global_webhook=bool(settings.verification.webhook_url),
            on_change=on_change,
            # The current secret's only: a change of secret starts the limits' counters afresh
            # (README, "Changing the secret"); counting under two names would double the cost.
            limit_key=limits.digest_key(rt.secret),
        )
        # A Redis the operator gave: say in the log if it could lose acknowledged writes
        # (serve only; its HTTP workers use the same Redis).
        durability = (
            asyncio.create_task(redis_durability.report(mux.execute), name="redis-durability")
            if embedded is None and worker is None
            else None
        )
        compacting = (
            asyncio.create_task(
                compact_aof_every(
                    mux.execute,
                    AOF_COMPACT_S,
                    first_s=first_compaction_in(
                        embedded.last_compacted(), rt.clock.now(), AOF_COMPACT_S
                    ),
                    asked=(COMPACT_ASKED, AOF_ASKED_POLL_S),
                ),
                name="redis-aof-compaction",
            )
            if embedded is not None
            else None
        )
        if compacting is not None:
            watch(compacting, log, "the append-only file's compaction", rt.fail)
        claiming: asyncio.Task[None] | None = None
        try:
            if worker is None:  # a worker has serve's secret: serve claims it
                previous = rt.previous_secrets
                try:
                    # mismatch: no start; a previous secret's fingerprint: rotated
                    await shared_secret.claim(mux.execute, rt.secret, previous)
                    claimed = True
                except (RedisError, OSError, TimeoutError):
                    claimed = False
                claiming = asyncio.create_task(
                    shared_secret.hold(
                        mux.execute,
                        rt.secret,
                        rt.misconfigure,
                        claimed=claimed,
                        previous=previous,
                    ),
                    name="secret-claim",
                )
                watch(claiming, log, "the CLINIC_SECRET claim", rt.fail)
            yield
        finally:
            for task in (durability, claiming, compacting):
                if task is not None:
                    task.cancel()
                    await asyncio.gather(task, return_exceptions=True)
            await mux.aclose()
            if embedded is not None:
                await embedded.stop()

    async def disk_space_ctx(app: web.Application) -> AsyncIterator[None]:
        # serve's alone: it renders every scrape's gauges, whichever process answers it.
        reading = asyncio.create_task(
            show_free_space(metrics.data_dir_free_bytes, settings.data_dir),
            name="data-dir-free-space",
        )
        watch(reading, log, "the data dir's free space reading", rt.fail)
        try:
            yield
        finally:
            await cancel_and_wait(reading)
            metrics.data_dir_free_bytes.clear()

    async def http_client_ctx(app: web.Application) -> AsyncIterator[None]:
        rt.http_client = HttpClient()
        networks = settings.verification.callback_networks
        rt.callback_client = HttpClient(address_filter=lambda address: reachable(address, networks))
        try:
            yield
        finally:
            await rt.http_client.close()
            await rt.callback_client.close()

    async def dispatcher_ctx(app: web.Application) -> AsyncIterator[None]:
        assert rt.http_client is not None and rt.callback_client is not None
        channels: dict[Channel, ChannelAdapter] = {}
        if settings.sms.gateway == "http" and settings.sms.http_url:
            channels[Channel.SMS] = HttpSmsChannel(settings.sms, rt.http_client)
        for channel, factory in (channel_factories or {}).items():
            adapter = factory(rt)
            if adapter is not None:
                channels[channel] = adapter
        if not channels:
            log.warning("no delivery channel configured: verifications will be refused")
        rt.dispatcher = Dispatcher(
            store=rt.need_store(),
            channels=channels,
            settings=settings.verification,
            policy=policy,
            secret=rt.secret,
            clinic_name=settings.clinic_name,
            clock=clock,
            deliveries=_DeliveryMetrics(metrics),
            forwarder=rt.main_link,
        )
        sender = WebhookSender(
            store=rt.need_store(),
            client=rt.http_client,
            callback_client=rt.callback_client,
            settings=settings.verification,
            secret=settings.verification.webhook_secret.encode() or rt.secret,
            secret_is_service_secret=not settings.verification.webhook_secret,
            clock=clock,
            on_outcome=lambda outcome: metrics.webhooks.inc(outcome=outcome),
        )
        rt.dispatcher.start(on_failure=rt.fail)
        sender.start(on_failure=rt.fail)
        try:
            yield
        finally:
            await sender.stop()
            await rt.dispatcher.stop()

    async def main_link_ctx(app: web.Application) -> AsyncIterator[None]:
        link = rt.main_link
        assert link is not None
        await link.start(rt.fail)  # before the dispatcher: it asks which channels serve has
        rt.extra_ready["serve"] = link.main_ready
        try:
            yield
        finally:
            await link.stop()

    async def http_workers_ctx(app: web.Application) -> AsyncIterator[None]:
        dispatcher = rt.need_dispatcher()
        serve_checks = dict(rt.extra_ready)  # not http_workers itself: a worker needs not wait
        workers = HttpWorkers(
            count=settings.http_workers,
            data_dir=settings.data_dir,
            # The workers use this process's Redis; its fsync setting is this process's to make.
            env={
                **{k: v for k, v in os.environ.items() if k != "CLINIC_REDIS_APPENDFSYNC"},
                "CLINIC_REDIS_URL": rt.redis_url,
            },
            dispatcher=dispatcher,
            checks=lambda: {name: check() for name, check in serve_checks.items()},
            warming=lambda: sorted(rt.warming),
            metrics=metrics,
            misconfigure=rt.misconfigure,
            calls_on_disk=rt.calls_on_disk,
        )
        await workers.start()
        rt.http_workers = workers
        rt.extra_ready["http_workers"] = workers.ready
        try:
            yield
        finally:
            rt.http_workers = None
            try:
                await workers.stop()
            finally:
                rt.worker_exits.extend(workers.exits_at_stop)

    app.cleanup_ctx.append(redis_ctx)
    if worker is None:
        app.cleanup_ctx.append(disk_space_ctx)
    app.cleanup_ctx.append(http_client_ctx)
    if rt.main_link is not None:
        app.cleanup_ctx.append(main_link_ctx)
    for ctx in extra_contexts or []:
        app.cleanup_ctx.append(ctx)
    app.cleanup_ctx.append(dispatcher_ctx)
    if worker is None and settings.http_workers > 1:
        app.cleanup_ctx.append(http_workers_ctx)

    api = VerificationApi(
        settings=settings,
        policy=policy,
        store=rt.need_store,
        dispatcher=rt.need_dispatcher,
        secret=lambda: rt.secret,
        clock=clock,
        previous_secrets=rt.previous_secrets,
    )
    routes = [
        *api.routes(),
        *CallsApi(
            rt.need_call_store, rt.need_voicemails, rt.need_call_erasure, rt.calls_on_disk
        ).routes(),
        web.get("/healthz", _healthz),
        web.get("/readyz", _readyz),
        web.get("/metrics", _metrics),
        web.get("/openapi.json", _openapi),
    ]
    app.add_routes(edge_routes(routes))
    app.router.register_resource(NoRouteUnderV1(app.router))  # last: after every route
    return app


async def _healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def _readyz(request: web.Request) -> web.Response:
    rt = request.app[RUNTIME]
    if rt.misconfigured:  # stopping on its own: see Runtime.misconfigure
        return problem(503, "not-ready", "Not ready", f"misconfigured: {rt.misconfigured}")
    if rt.failed:  # stopping on its own: see Runtime.fail
        return problem(503, "not-ready", "Not ready", f"failed: {rt.failed}")
    if rt.stopping:  # a balancer must send nothing more here
        return problem(503, "not-ready", "Not ready", "stopping")
    checks: dict[str, bool] = {
        "redis": rt.store is not None and await rt.store.writable(),
        "channels": rt.dispatcher is not None and rt.dispatcher.ready(),
    }
    for name, extra in rt.extra_ready.items():
        checks[name] = extra()
    warming = set(rt.warming)
    if rt.main_link is not None:  # an HTTP worker: serve's start-up work counts too
        warming.update(rt.main_link.warming())
    if all(checks.values()):
        return web.json_response({"status": "ready", "checks": checks, "warming": sorted(warming)})
    failing = ", ".join(k for k, ok in checks.items() if not ok)
    resp = problem(503, "not-ready", "Not ready", f"waiting for: {failing}", checks=checks)
    return resp


async def _metrics(request: web.Request) -> web.Response:
    rt = request.app[RUNTIME]
    if rt.http_workers is not None:
        text = await rt.http_workers.render_metrics()
    elif rt.main_link is not None:
        try:
            text = await rt.main_link.render_metrics()
        except MainLinkError as exc:
            return problem(503, "not-ready", "Not ready", f"metrics: {exc}")
    else:
        text = rt.metrics.render()
    return web.Response(
        text=text,
        # Prometheus's text exposition format names its version in the media type
        headers={
            "Content-Type": "text/plain; version=0.0.4; charset=utf-8",
            "X-Content-Type-Options": "nosniff",
        },
    )


async def _openapi(request: web.Request) -> web.Response:
    doc = served_document()  # built at the first request of the process, then kept
    headers = {"ETag": doc.etag}
    # If-None-Match compares weakly (RFC 9110 13.1.2): a W/ tag of ours matches too.
    asked = request.if_none_match or ()
    if any(tag.value == "*" or f'"{tag.value}"' == doc.etag for tag in asked):
        return web.Response(status=304, headers=headers)
    return web.Response(body=doc.body, content_type="application/json", headers=headers)


def describe(app: web.Application) -> dict[str, Any]:
    """Facts for the start-up banner."""
    rt = app[RUNTIME]
    return {"http": str(rt.settings.http_addr), "data_dir": str(rt.settings.data_dir.resolve())}
