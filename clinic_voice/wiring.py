"""Which telephony parts run, from the settings: the SIP pool, the SIP channels, the clinic line.

The composition point between :mod:`clinic_voice.app` (HTTP, Redis, dispatcher) and the
telephony packages. ``clinic-voice serve`` always runs the SIP pool (the clinic line answers
calls); the verification channels over SIP exist when ``CLINIC_SIP_ROUTE`` is set, the flash
call when ``CLINIC_FLASHCALL_PREFIX`` is set too, SMS over SIP when ``CLINIC_SMS_GATEWAY=sip``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path

from aiohttp import web

from clinic_voice.app import RUNTIME, Runtime
from clinic_voice.clinic_line import CLOSE_NOTICE_S, ClinicLine
from clinic_voice.metrics import Metrics
from sip_config.clock import Clock, SystemClock
from sip_config.settings import Settings, SipSettings
from verification.channels.base import ChannelAdapter
from verification.channels.flash_call import FlashCallChannel
from verification.channels.sip_route import can_send, over_udp
from verification.channels.sms_sip import SipSmsChannel
from verification.channels.voice_call import VoiceCallChannel, longest_call_s
from verification.codes import MAX_LENGTH
from verification.model import Channel
from verification.wording import DEFAULT
from voice.ivr.flow import FlowSet
from voice.media import spoken_code
from voice.media.pcm import read_wav
from voice.media.private_folder import PrivateFolder
from voice.media.tts import PromptRenderer
from voice.sip.caller_identity import too_broad
from voice.sip.flash_uac import FlashUac
from voice.sip.front import RedirectFront
from voice.sip.pool import CallsCloser, SipPool

log = logging.getLogger(__name__)

# Older than any call still playing one (answer 45 s, two keypress questions, play 60 s).
# serve.lock (app.lock_data_dir) keeps a second serve off this data dir, not off its private
# folder on tmpfs: that is named by the data dir's path, which two containers sharing one
# /dev/shm (a Kubernetes pod's, --ipc=host) give to two data dirs mounted at the same path,
# each with a lock of its own. The margin keeps the other one's codes playing.
STALE_CODE_FILE_S = 300.0

Context = Callable[[web.Application], AsyncIterator[None]]
Factory = Callable[[Runtime], ChannelAdapter | None]


def voice_step_too_short(settings: Settings, rendered: Sequence[Path]) -> str:
    """Why CLINIC_STEP_TIMEOUT_VOICE_S cannot hold the longest voice call, measured on the
    English prompts as rendered (``rendered``: the keypress question, the code's head, the
    digits 0 to 9), or "". The settings' floor (VOICE_CALL_S) is an estimate at the default
    speech rate: a slower CLINIC_TTS_WORDS_PER_MINUTE, a long CLINIC_NAME and an 8-digit
    code need more. Blocking (reads the files)."""
    question_s, head_s, *digit_s = (read_wav(p).duration_s for p in rendered)
    longest = longest_call_s(
        question_s,
        spoken_code.reading_s(head_s, digit_s, MAX_LENGTH),
        settings.sip.voice_otp_keypress,
    )
    step_s = settings.verification.step_timeout_voice_s
    if step_s >= longest:
        return ""
    return (
        f"CLINIC_STEP_TIMEOUT_VOICE_S is {step_s} s, and a voice call can take "
        f"{longest:.0f} s (ringing, the question twice, a code of {MAX_LENGTH} digits read "
        f"twice at {settings.tts_words_per_minute} words a minute): the step would move on "
        f"while the code is read, and call again; set it to {math.ceil(longest) + 5} or more"
    )


def extra_contexts(settings: Settings, flowset: FlowSet) -> list[Context]:
    """Cleanup contexts started after Redis and before the dispatcher; the clinic line runs
    ``flowset``, the flows :func:`~clinic_voice.clinic_line.check_clinic_line` checked."""

    async def prompts_ctx(app: web.Application) -> AsyncIterator[None]:
        rt = app[RUNTIME]
        # Fixed prompts are cached in prompts/; a call's own texts go to a private folder (on
        # tmpfs when there is one, else private/), never cached.
        private = PrivateFolder(settings.data_dir)
        rt.renderer = PromptRenderer(
            settings.data_dir / "prompts",
            private,
            words_per_minute=settings.tts_words_per_minute,
        )
        # A process killed during a voice call leaves its code's file behind: remove it.
        stale = await asyncio.to_thread(
            spoken_code.remove_stale, private, STALE_CODE_FILE_S, time.time()
        )
        if stale:
            log.warning("removed %d voice file(s) with a code, left by an earlier run", stale)
        once = await asyncio.to_thread(rt.renderer.remove_leftovers)
        if once:
            log.warning("removed %d prompt file(s) of a caller, left by an earlier run", once)
        # Static prompts now, so the first caller does not wait for a render.
        rendered = await rt.renderer.prerender(
            [
                # English, the default; another language's are rendered on first use.
                DEFAULT.keypress_text(settings.clinic_name),
                DEFAULT.head_text(settings.clinic_name),
            ]
            + [str(d) for d in range(10)]
        )
        try:
            short = await asyncio.to_thread(voice_step_too_short, settings, rendered)
        except (OSError, ValueError) as exc:  # a word of warning never stops the start
            short = f"the voice-call step could not be measured against the prompts: {exc}"
        if short:
            log.warning("%s", short)
        yield
        # After the clinic line and the channels (started later, stopped first).
        await asyncio.to_thread(private.close)

    async def sip_ctx(app: web.Application) -> AsyncIterator[None]:
        rt = app[RUNTIME]
        line = ClinicLine.load(settings, rt, flowset)
        pool = new_sip_pool(
            settings.sip,
            rt.metrics,
            SystemClock(),
            log_level=settings.log_level,
            # A worker sent SIGTERM by someone else: its calls get the stop's drain and notice.
            close_calls=line.close_calls_of,
            close_s=settings.ivr.call_drain_s + CLOSE_NOTICE_S,
        )
        pool.on_incoming(line.handle)
        front = RedirectFront(
            settings.sip.addr,
            pool.pick_inbound,
            clock=SystemClock(),
            reservations=pool,
            retry_after=pool.retry_after_s,
        )
        async with contextlib.AsyncExitStack() as stack:
            # Stopped in reverse order, also when a later start fails.
            await line.start()
            stack.push_async_callback(line.stop)
            # After the pool's stop (the stack unwinds in reverse), also the one its start
            # makes when it fails or a stop cuts it short: how its workers ended.
            stack.callback(lambda: rt.worker_exits.extend(pool.exits_at_stop))
            await pool.start()
            stack.push_async_callback(pool.stop)
            # /metrics shows the pool as it is at each scrape: every scrape is rendered here,
            # in serve, whichever process it reached (clinic_voice/http_workers.py).
            stack.callback(watch_sip_pool(rt.metrics, pool))
            await front.start()
            stack.push_async_callback(front.stop)
            sip = settings.sip
            if sip.route and sip.flashcall_prefix and over_udp(sip.route):
                uac = FlashUac(sip, SystemClock())
                await uac.start()
                stack.push_async_callback(uac.stop)
                rt.flash_uac = uac
                rt.extra_ready["flash_calls"] = lambda: uac.ready
            rt.sip_pool = pool
            rt.extra_ready["sip_workers"] = pool.serving  # one worker restarting: still ready

            def begin_close() -> None:
                pool.refuse_new_calls()
                line.begin_close(settings.ivr.call_drain_s)

            rt.stop_hooks.append(begin_close)
            rt.hurry_hooks.append(line.end_drain)
            if broad := too_broad(sip.trusted_peers):
                log.warning(
                    "CLINIC_SIP_TRUSTED_PEERS trusts %s: any sender there may assert any "
                    "caller's number (P-Asserted-Identity, caller_verified); name the PBX or "
                    "trunk's own addresses",
                    ", ".join(str(n) for n in broad),
                )
            log.info(
                "SIP: front %s redirects to %d workers at %s",
                settings.sip.addr,
                settings.sip.workers,
                ", ".join(str(a) for a in pool.worker_addresses()),
            )
            yield
            begin_close()  # begun at the stop's first moment already, unless start-up failed
            await line.closed()

    return [prompts_ctx, sip_ctx]


def new_sip_pool(
    settings: SipSettings,
    metrics: Metrics,
    clock: Clock,
    *,
    log_level: str = "WARNING",
    close_calls: CallsCloser | None = None,
    close_s: float = 0.0,
) -> SipPool:
    """serve's SIP pool, its events counted in ``metrics``: callers refused with 486
    (``clinic_calls_total{outcome="refused_busy"}``), worker restarts, and outbound calls
    not placed to keep slots for callers (both from 0, so a rate has a start).
    ``close_calls`` and ``close_s``: how the calls of a worker sent SIGTERM by someone else
    are closed, and in how long at most (:class:`SipPool`)."""
    metrics.sip_worker_restarts.inc(0)
    metrics.sip_kept_for_callers.inc(0)
    return SipPool(
        settings,
        clock=clock,
        log_level=log_level,
        # A caller turned away (every slot taken) is a clinic-line call too.
        on_busy=lambda: metrics.calls.inc(outcome="refused_busy"),
        on_restart=metrics.sip_worker_restarts.inc,
        on_kept_for_callers=metrics.sip_kept_for_callers.inc,
        close_calls=close_calls,
        close_s=close_s,
    )


def show_sip_pool(metrics: Metrics, pool: SipPool) -> None:
    """Set the SIP gauges of ``metrics`` to ``pool``'s workers and slots now."""
    now = pool.occupancy()
    for state, count in now.workers.items():
        metrics.sip_workers.set(count, state=state.value)
    metrics.sip_slots.set(now.in_use, state="in_use")
    metrics.sip_slots.set(now.reserved, state="reserved")
    metrics.sip_slots.set(now.free, state="free")
    metrics.sip_slots_kept_for_callers.set(now.kept_for_callers)


def watch_sip_pool(metrics: Metrics, pool: SipPool) -> Callable[[], None]:
    """Show ``pool`` in each render of ``metrics`` (:func:`show_sip_pool`) until the function
    returned is called: the pool is stopping, and its gauges go (no sample that would read
    as the state of a pool that is gone)."""
    return metrics.on_render(
        lambda: show_sip_pool(metrics, pool),
        metrics.sip_workers,
        metrics.sip_slots,
        metrics.sip_slots_kept_for_callers,
    )


def channel_factories(settings: Settings) -> dict[Channel, Factory]:
    """Delivery channels over SIP (the HTTP SMS gateway is built by the app itself)."""
    sip = settings.sip
    if not sip.route:
        return {}

    def flash(rt: Runtime) -> ChannelAdapter | None:
        if not sip.flashcall_prefix:
            return None
        uac = rt.flash_uac
        if uac is not None:
            return FlashCallChannel(sip, uac, lambda: uac.ready)
        pool = rt.sip_pool
        if pool is None:
            return None
        return FlashCallChannel(sip, pool, lambda: can_send(pool))

    def voice(rt: Runtime) -> ChannelAdapter | None:
        if rt.sip_pool is None or rt.renderer is None:
            return None
        return VoiceCallChannel(sip, rt.sip_pool, rt.renderer, rt.renderer.private)

    factories: dict[Channel, Factory] = {Channel.FLASHCALL: flash, Channel.VOICE: voice}
    if settings.sms.gateway == "sip":

        def sms(rt: Runtime) -> ChannelAdapter | None:
            return SipSmsChannel(sip, rt.sip_pool) if rt.sip_pool is not None else None

        factories[Channel.SMS] = sms
    return factories
