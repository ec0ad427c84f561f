"""What every bench script shares: arguments, free ports, child processes, wrk, and output.

Every bench script takes ``--quick`` (the whole run under a minute), prints a human table and
ends with exactly one JSON line holding its figures, so ``make bench`` output can be collected
with ``tail -n 1``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO

REPO = Path(__file__).resolve().parent.parent
VENV_BIN = REPO / ".venv" / "bin"


class BenchError(RuntimeError):
    """A bench could not run (a tool is missing, a server did not come up, ...)."""


def parser(description: str) -> argparse.ArgumentParser:
    """An argument parser with the options every bench script has."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--quick", action="store_true", help="a short run (under a minute)")
    return p


# Runs of ports (SIP workers) are looked for below the kernel's ephemeral range (32768 up on
# Debian), where a bench's thousands of client connections in TIME_WAIT never sit: after one
# flash-call step they had left no 321 consecutive free ports in it. Also below the bench
# Asterisk's RTP range (20000-31999).
_RUN_PORTS = (10000, 20000)


def free_port(count: int = 1) -> int:
    """The first of ``count`` consecutive ports free for TCP and UDP on 127.0.0.1."""
    if count > 1:
        low, high = _RUN_PORTS
        for _ in range(200):
            first = low + secrets.randbelow(high - low - count)
            if all(_port_free(first + i) for i in range(count)):
                return first
    for _ in range(200):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            probe.bind(("127.0.0.1", 0))
            base: int = probe.getsockname()[1]
        if base + count > 65535:
            continue
        if all(_port_free(base + i) for i in range(count)):
            return base
    raise BenchError(f"no {count} consecutive free ports on 127.0.0.1")


def _port_free(port: int) -> bool:
    for kind in (socket.SOCK_STREAM, socket.SOCK_DGRAM):
        with socket.socket(socket.AF_INET, kind) as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                return False
    return True


def pause(seconds: float) -> None:
    """Wait without ``time.sleep`` (house rule); the benches' orchestration is not asyncio."""
    threading.Event().wait(seconds)


def wait_http(url: str, deadline_s: float, proc: Child | None = None, status: int = 200) -> None:
    """Poll ``url`` until it answers ``status``; fail with ``proc``'s last output otherwise."""
    end = time.monotonic() + deadline_s
    last = "no answer"
    while time.monotonic() < end:
        if proc is not None and proc.returncode is not None:
            raise BenchError(
                f"{proc.name} exited with {proc.returncode} before {url} answered; "
                f"last output:\n{proc.tail()}"
            )
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:  # noqa: S310 (our own URL)
                if resp.status == status:
                    return
                last = f"HTTP {resp.status}"
        except urllib.error.HTTPError as exc:
            if exc.code == status:
                return
            last = f"HTTP {exc.code}"
        except (urllib.error.URLError, OSError) as exc:
            last = repr(exc)
        pause(0.1)
    tail = f"; last output:\n{proc.tail()}" if proc is not None else ""
    raise BenchError(f"{url} did not answer {status} within {deadline_s:.0f} s ({last}){tail}")


def wait_warm(url: str, deadline_s: float, proc: Child | None = None) -> None:
    """Wait until ``/readyz`` at ``url`` lists nothing under ``warming`` (e.g. prompts still
    rendering in the background), so a measurement does not share the CPU with start-up work."""
    end = time.monotonic() + deadline_s
    last: object = "no answer"
    while time.monotonic() < end:
        if proc is not None and proc.returncode is not None:
            raise BenchError(f"{proc.name} exited with {proc.returncode}:\n{proc.tail()}")
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:  # noqa: S310 (our own URL)
                last = json.loads(resp.read()).get("warming")
                if not last:
                    return
        except (urllib.error.URLError, OSError, ValueError) as exc:
            last = exc  # not ready again, or restarting: poll on until the deadline
        pause(0.2)
    raise BenchError(f"{url} still warming after {deadline_s:.0f} s ({last!r})")


class Child:
    """A child process whose output goes to a log file; stopped by SIGTERM, then SIGKILL."""

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        log_path: Path,
        env: Mapping[str, str] | None = None,
        cwd: Path = REPO,
    ) -> None:
        self.name = name
        self.log_path = log_path
        self._log: IO[bytes] = log_path.open("wb")
        self._proc = subprocess.Popen(
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=dict(env) if env is not None else None,
            cwd=cwd,
        )

    @property
    def pid(self) -> int:
        """The child's pid."""
        return self._proc.pid

    @property
    def returncode(self) -> int | None:
        """None while running."""
        return self._proc.poll()

    def tail(self, lines: int = 25) -> str:
        """The last lines the child wrote."""
        self._log.flush()
        text = self.log_path.read_text(errors="replace")
        return "\n".join(text.splitlines()[-lines:]) or "(no output)"

    def stop(self, deadline_s: float = 15.0) -> int:
        """SIGTERM, wait up to ``deadline_s``, then SIGKILL. Returns the exit code."""
        if self._proc.poll() is None:
            self._proc.send_signal(signal.SIGTERM)
            try:
                self._proc.wait(timeout=deadline_s)
            except subprocess.TimeoutExpired:
                print(f"warning: {self.name} ignored SIGTERM for {deadline_s:.0f} s; killing it")
                self._proc.kill()
                self._proc.wait(timeout=deadline_s)
        self._log.close()
        return self._proc.returncode


def python_child(name: str, module_args: Sequence[str], log_path: Path) -> Child:
    """Run ``python -m <module_args>`` from the repo with the project's venv."""
    python = VENV_BIN / "python"
    return Child(
        name, [str(python if python.exists() else sys.executable), "-m", *module_args], log_path
    )


# -- wrk ----------------------------------------------------------------------------------------

# Appended to every generated wrk script: counts non-2xx answers per thread and prints the
# figures as one JSON line from done(). wrk itself only counts status > 399 as an error.
WRK_REPORT_LUA = r"""
local __threads = {}
non2xx = 0
function setup(thread)
  thread:set("tid", #__threads)
  table.insert(__threads, thread)
end
function response(status, headers, body)
  if status < 200 or status > 299 then
    non2xx = non2xx + 1
  end
end
function done(summary, latency, requests)
  local bad = 0
  for _, t in ipairs(__threads) do bad = bad + (t:get("non2xx") or 0) end
  local e = summary.errors
  io.write(string.format(
    'WRK_JSON {"requests": %d, "duration_us": %d, "non2xx": %d, "connect_errors": %d, ' ..
    '"read_errors": %d, "write_errors": %d, "timeouts": %d, "p50_us": %d, "p90_us": %d, ' ..
    '"p99_us": %d, "max_us": %d}\n',
    summary.requests, summary.duration, bad, e.connect, e.read, e.write, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max))
end
"""


@dataclass(frozen=True, slots=True)
class WrkResult:
    """The figures of one wrk run."""

    requests: int
    duration_s: float
    non2xx: int
    socket_errors: int
    p50_ms: float
    p90_ms: float
    p99_ms: float
    max_ms: float

    @property
    def rps(self) -> float:
        """Requests per second (all answers, good or bad)."""
        return self.requests / self.duration_s if self.duration_s > 0 else 0.0

    @property
    def good_rps(self) -> float:
        """2xx answers per second."""
        good = self.requests - self.non2xx
        return good / self.duration_s if self.duration_s > 0 else 0.0

    @property
    def errors(self) -> int:
        """Non-2xx answers plus socket errors."""
        return self.non2xx + self.socket_errors


def wrk_path() -> str:
    """The wrk binary, or a clear error naming the Debian package."""
    path = shutil.which("wrk")
    if path is None:
        raise BenchError("wrk is not installed: apt-get install wrk")
    return path


def run_wrk(
    url: str,
    script: Path,
    *,
    connections: int,
    threads: int,
    duration_s: int,
    script_args: Sequence[str] = (),
    timeout_s: int = 5,
) -> WrkResult:
    """Run wrk with ``script`` (which must end with :data:`WRK_REPORT_LUA`) and parse its JSON."""
    argv = [
        wrk_path(),
        f"-t{threads}",
        f"-c{connections}",
        f"-d{duration_s}s",
        f"--timeout={timeout_s}s",
        "-s",
        str(script),
        url,
    ]
    if script_args:
        argv += ["--", *script_args]
    try:
        done = subprocess.run(
            argv, capture_output=True, text=True, timeout=duration_s + timeout_s + 30, check=False
        )
    except subprocess.TimeoutExpired as exc:
        raise BenchError(f"wrk against {url} did not finish") from exc
    for line in done.stdout.splitlines():
        if line.startswith("WRK_JSON "):
            raw = json.loads(line.removeprefix("WRK_JSON "))
            return WrkResult(
                requests=raw["requests"],
                duration_s=raw["duration_us"] / 1e6,
                non2xx=raw["non2xx"],
                socket_errors=raw["connect_errors"]
                + raw["read_errors"]
                + raw["write_errors"]
                + raw["timeouts"],
                p50_ms=raw["p50_us"] / 1000,
                p90_ms=raw["p90_us"] / 1000,
                p99_ms=raw["p99_us"] / 1000,
                max_ms=raw["max_us"] / 1000,
            )
    raise BenchError(
        f"wrk against {url} printed no figures (exit {done.returncode}):\n"
        f"{done.stdout[-2000:]}\n{done.stderr[-2000:]}"
    )


def lua_string(value: str) -> str:
    """``value`` as a Lua string literal."""
    return json.dumps(value)  # JSON string escapes are valid Lua for the ASCII we produce


# -- output -----------------------------------------------------------------------------------


def print_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    """A plain aligned table for humans."""
    cells = [[str(h) for h in headers], *[[_cell(v) for v in row] for row in rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    for n, row in enumerate(cells):
        print(
            "  ".join(
                c.rjust(w) if i else c.ljust(w)
                for i, (c, w) in enumerate(zip(row, widths, strict=True))
            )
        )
        if n == 0:
            print("  ".join("-" * w for w in widths))


def _cell(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.2f}" if value < 100 else f"{value:.0f}"
    return str(value)


def emit_json(figures: Mapping[str, object]) -> None:
    """Print the one JSON line a bench ends with (always the last line of its output)."""
    sys.stdout.flush()
    print(json.dumps(dict(figures), sort_keys=False), flush=True)


def finish(
    name: str, quick: bool, measure: Callable[[], dict[str, object]], *, strict: bool = False
) -> int:
    """Run ``measure`` and end as every bench script ends; returns the exit status.

    Its figures go out as the one JSON line (status 0, or 1 with ``strict`` when they say a
    goal was missed); a :class:`BenchError` goes to stderr and out as a JSON line with its
    first line under ``error`` (status 1).
    """
    try:
        figures = measure()
    except BenchError as exc:
        print(f"bench failed: {exc}", file=sys.stderr)
        emit_json({"bench": name, "quick": quick, "error": str(exc).splitlines()[0]})
        return 1
    figures.setdefault("quick", quick)
    emit_json(figures)
    return 1 if strict and not figures.get("goals_met", False) else 0


def environ(**overrides: str) -> dict[str, str]:
    """The current environment without any ``CLINIC_*`` variables, plus ``overrides``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CLINIC_")}
    env.update(overrides)
    return env


# -- wire capture -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class UdpPacket:
    """One captured IPv4 UDP datagram: kernel capture time (epoch seconds) and payload."""

    at: float
    src: tuple[str, int]
    dst: tuple[str, int]
    payload: bytes


class Capture:
    """``dumpcap`` on the loopback interface with a BPF filter, written as classic pcap.

    The timestamps are the kernel's, taken as each packet crosses ``lo``: wire times, not
    the times a process got round to reading its socket. Needs root (or the capture
    capabilities) and the Debian package ``tshark`` (which brings ``dumpcap``).
    """

    def __init__(self, bpf: str, path: Path, log_dir: Path) -> None:
        exe = shutil.which("dumpcap")
        if exe is None:
            raise BenchError("dumpcap is not installed: apt-get install tshark")
        self.path = path
        # dumpcap reports "Capturing on" a little before packets really reach the file (the
        # first ~100 ms were missing here): probe datagrams to a port nobody listens on show
        # when the capture is live. They stay in the file; readers filter by port anyway.
        probe_port = free_port()
        self._child = Child(
            "dumpcap",
            [
                exe,
                "-i",
                "lo",
                "-f",
                f"({bpf}) or (udp dst port {probe_port})",
                "-P",
                "-B",
                "64",
                "-w",
                str(path),
            ],
            log_dir / f"{path.stem}-dumpcap.log",
        )
        end = time.monotonic() + 10
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            while not (path.exists() and path.stat().st_size > 24):
                if self._child.returncode is not None or time.monotonic() > end:
                    self._child.stop()
                    raise BenchError(f"dumpcap did not start capturing:\n{self._child.tail()}")
                probe.sendto(b"capture probe", ("127.0.0.1", probe_port))
                pause(0.05)

    def stop(self) -> list[UdpPacket]:
        """Stop capturing (lets the kernel's buffer drain first) and read the packets back."""
        pause(0.2)
        self._child.stop()
        tail = self._child.log_path.read_text(errors="replace")
        # "Packets received/dropped on interface 'Loopback: lo': 308/0 (...)"
        for line in tail.splitlines():
            m = re.search(r"received/dropped on interface .*: (\d+)/(\d+)", line)
            if m and int(m.group(2)) > 0:
                print(f"warning: dumpcap dropped {m.group(2)} of {m.group(1)} packets")
        return read_pcap(self.path)


def read_pcap(path: Path) -> list[UdpPacket]:
    """The IPv4 UDP datagrams of a classic pcap file (Ethernet, Linux cooked or raw IP)."""
    data = path.read_bytes()
    if len(data) < 24:
        raise BenchError(f"{path} is not a pcap file (too short)")
    magic = int.from_bytes(data[:4], "little")
    if magic == 0xA1B2C3D4:
        order, ts_div = "little", 1e6
    elif magic == 0xA1B23C4D:
        order, ts_div = "little", 1e9
    elif int.from_bytes(data[:4], "big") == 0xA1B2C3D4:
        order, ts_div = "big", 1e6
    else:
        raise BenchError(f"{path} is not a classic pcap file (pcapng?)")
    link = int.from_bytes(data[20:24], order)  # type: ignore[arg-type]
    link_len = {1: 14, 113: 16, 276: 20, 101: 0, 228: 0}.get(link)
    if link_len is None:
        raise BenchError(f"{path}: link type {link} not understood")
    out: list[UdpPacket] = []
    pos = 24
    while pos + 16 <= len(data):
        sec = int.from_bytes(data[pos : pos + 4], order)  # type: ignore[arg-type]
        frac = int.from_bytes(data[pos + 4 : pos + 8], order)  # type: ignore[arg-type]
        incl = int.from_bytes(data[pos + 8 : pos + 12], order)  # type: ignore[arg-type]
        frame = data[pos + 16 : pos + 16 + incl]
        pos += 16 + incl
        ip = frame[link_len:]
        if len(ip) < 28 or ip[0] >> 4 != 4 or ip[9] != 17:
            continue
        ihl = (ip[0] & 0x0F) * 4
        udp = ip[ihl:]
        if len(udp) < 8:
            continue
        src = (socket.inet_ntoa(ip[12:16]), int.from_bytes(udp[0:2], "big"))
        dst = (socket.inet_ntoa(ip[16:20]), int.from_bytes(udp[2:4], "big"))
        out.append(UdpPacket(sec + frac / ts_div, src, dst, bytes(udp[8:])))
    return out


# -- figures ------------------------------------------------------------------------------------


def percentile(values: Sequence[float], pct: float) -> float:
    """The ``pct`` percentile (nearest rank) of ``values``; NaN when there are none."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = max(1, -(-len(ordered) * pct // 100))  # ceil without floats drifting
    return ordered[min(len(ordered), int(rank)) - 1]


def rss_kib(pid: int) -> int:
    """Resident set size of a process in KiB (0 if it is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        return 0
    return 0


def child_pids(parent: int, cmdline_has: str) -> list[int]:
    """Pids of the direct children of ``parent`` whose command line contains ``cmdline_has``."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        # The parent pid is the 2nd field after the parenthesised command name.
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        if ppid == parent and cmdline_has in cmd:
            found.append(int(entry.name))
    return sorted(found)


# sipp's options for its other sockets, besides its SIP port (-p), as tests/conftest.py's:
# its media ports (from 6000) and control socket (UDP, from 8888) are left to sipp, which
# moves up while one is taken, whereas a port given with -mp or -cp gets one try and a taken
# one ends the run (sipp 3.6.1: exit 254, "Unable to bind ..."). -ci keeps the control
# socket, which takes commands ("q" quits), on loopback: by default it listens on every
# address of the host.
SIPP_OTHER_SOCKETS = ("-ci", "127.0.0.1")


def sipp_path() -> str:
    """The sipp binary, or a clear error naming the Debian package."""
    path = shutil.which("sipp")
    if path is None:
        raise BenchError("sipp is not installed: apt-get install sip-tester")
    return path


def cpu_seconds(pids: Sequence[int], *, reaped_children: bool = False) -> float:
    """User plus system CPU seconds the processes ``pids`` have used so far (all threads).

    Read from ``/proc/<pid>/stat`` (fields 14 and 15, in clock ticks); a process that is
    gone counts 0, so take the difference of two readings of live processes. With
    ``reaped_children``, the CPU of their children that have ended and been waited for
    instead (fields 16 and 17): for Redis, its AOF rewrites, which run in a forked child.
    """
    tick = os.sysconf("SC_CLK_TCK")
    first = 13 if reaped_children else 11  # 0-based, counted from the state field
    total = 0
    for pid in pids:
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            continue
        # Fields after the parenthesised command name: state is field 3, utime 14, stime 15.
        fields = stat.rsplit(")", 1)[1].split()
        total += int(fields[first]) + int(fields[first + 1])
    return total / tick


def runqueue_wait_seconds(pids: Sequence[int]) -> float | None:
    """Seconds the threads of ``pids`` have spent runnable but waiting for a CPU so far.

    The second field of ``/proc/<pid>/task/<tid>/schedstat`` (nanoseconds); None when this
    kernel does not keep it. Threads that have ended count 0: take differences.
    """
    total = 0
    seen = False
    for pid in pids:
        try:
            tasks = list(Path(f"/proc/{pid}/task").iterdir())
        except OSError:
            continue
        for task in tasks:
            try:
                text = (task / "schedstat").read_text()
            except OSError:  # the thread ended between the listing and the read
                continue
            total += int(text.split()[1])  # a file of another form is an error, not a zero
            seen = True
    return total / 1e9 if seen else None
