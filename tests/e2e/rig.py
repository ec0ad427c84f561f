"""The local Asterisk 22 rig: a cached Debian sid chroot, no Docker needed.

Asterisk 22 is not in Debian 12 (it needs glibc 2.38), so the rig runs Debian sid's package in
a chroot that shares the host's network. ``python -m tests.e2e.rig rootfs|up|down|status``;
tests use :class:`AsteriskRig` through the session fixture in ``conftest.py``.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import fcntl
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[2]
CONFIG_DIR = REPO / "sip_config" / "asterisk"
DEFAULT_ROOTFS = Path("/var/cache/clinic-voice/asterisk-sid")
DEFAULT_PORT = 5160
APT_SOURCES = Path("/etc/apt/sources.list.d/debian.sources")
FALLBACK_MIRROR = "http://deb.debian.org/debian"
# Written last into a finished rootfs: a directory without it is never taken as built. It
# names the packages the rootfs was built with (see rootfs_ready).
DONE_MARKER = "etc/clinic-voice-rootfs.done"
# The sounds package is what Playback(hello-world) and [transfer-failed] need; the music on
# hold (musiconhold.conf) adds 1.8 MB to the download. docker/Dockerfile.asterisk installs
# the same list (tests/unit/test_docker_compose.py).
PACKAGES = ("asterisk", "asterisk-core-sounds-en", "asterisk-moh-opsound-gsm")


class RigError(RuntimeError):
    """The rig could not do what was asked; the message says what to look at."""


def rootfs_path() -> Path:
    """Where the chroot lives: ``$ASTERISK_ROOTFS`` or the cache default."""
    return Path(os.environ.get("ASTERISK_ROOTFS") or DEFAULT_ROOTFS)


def debian_mirror(sources: Path = APT_SOURCES) -> str:
    """The first non-security Debian mirror in this machine's deb822 apt sources."""
    try:
        text = sources.read_text()
    except OSError:
        return FALLBACK_MIRROR
    for m in re.finditer(r"^URIs:\s*(\S+)", text, re.MULTILINE):
        uri = m.group(1)
        if "security" not in uri:
            return uri
    return FALLBACK_MIRROR


def marker_packages(text: str) -> set[str]:
    """The packages a done marker says its rootfs holds (none for a marker without the line)."""
    m = re.search(r"^packages:(.*)$", text, re.MULTILINE)
    return set(m.group(1).split()) if m else set()


def rootfs_ready(root: Path) -> bool:
    """True when ``root`` is a completely built rootfs with every package of PACKAGES.

    A rootfs built before a package joined the list (its marker does not name it) is not
    ready: it is built again, so a cached chroot cannot lack what the configs now load.
    """
    try:
        marker = (root / DONE_MARKER).read_text()
    except OSError:
        return False
    return set(PACKAGES) <= marker_packages(marker) and (root / "usr/sbin/asterisk").is_file()


def mounts_under(path: Path) -> list[Path]:
    """Mount points at or below ``path``, deepest first (the order to unmount them)."""
    prefix = str(path.resolve())
    found: list[Path] = []
    with open("/proc/self/mounts") as f:
        for line in f:
            # /proc/mounts escapes blanks in paths as octal (\040)
            target = line.split()[1].encode().decode("unicode_escape")
            if target == prefix or target.startswith(prefix + "/"):
                found.append(Path(target))
    return sorted(found, key=lambda p: len(p.parts), reverse=True)


def unmount_all(path: Path) -> None:
    """Unmount everything below ``path``; raise if something stays mounted."""
    for target in mounts_under(path):
        subprocess.run(["umount", str(target)], check=False, capture_output=True)
    for target in mounts_under(path):
        # still busy (a process holds it): detach it so the tree can be freed later
        subprocess.run(["umount", "-l", str(target)], check=False, capture_output=True)
    left = mounts_under(path)
    if left:
        raise RigError(f"still mounted, refusing to continue: {', '.join(map(str, left))}")


def remove_tree(path: Path) -> None:
    """``rm -rf`` that never descends into a mount (a bound /dev would be the host's)."""
    if not path.exists():
        return
    unmount_all(path)
    shutil.rmtree(path)


@contextlib.contextmanager
def file_lock(path: Path, timeout_s: float, what: str) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``path``; fail with a message after ``timeout_s``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise RigError(
                        f"{what}: {path} stayed locked for {timeout_s:.0f} s "
                        "(another rig run is busy)"
                    ) from None
                threading.Event().wait(0.5)
        yield
    finally:
        os.close(fd)


def build_rootfs(root: Path | None = None, mirror: str | None = None) -> Path:
    """Build the sid chroot with Asterisk once; later calls return at once.

    Built into a temporary sibling directory and renamed when complete, under a lock, so a
    failed or concurrent build never leaves a half-built tree that looks done.
    """
    root = root or rootfs_path()
    if rootfs_ready(root):
        return root
    if os.geteuid() != 0:
        raise RigError("building the Asterisk chroot needs root (debootstrap, chroot)")
    if shutil.which("debootstrap") is None:
        raise RigError("debootstrap is missing: apt-get install debootstrap (make install-test)")
    root.parent.mkdir(parents=True, exist_ok=True)
    with file_lock(root.parent / f".{root.name}.build.lock", 900, "rootfs build"):
        if rootfs_ready(root):
            return root
        # Leftovers of a build that died: unmount first, then delete.
        for stale in root.parent.glob(f".{root.name}.tmp-*"):
            log.warning("removing a half-built rootfs %s", stale)
            remove_tree(stale)
        if root.exists():
            running = chrooted_pids(root)
            if running:
                # Removing it would unmount /proc and /dev under a running Asterisk.
                raise RigError(
                    f"{root} must be built again (incomplete, or without "
                    f"{', '.join(PACKAGES)}) but Asterisk runs in it (pids "
                    f"{', '.join(map(str, running))}): stop it (make asterisk-stop, or let "
                    "the tests using it end), then run this again"
                )
            log.warning("%s is incomplete or lacks packages: rebuilding it", root)
            remove_tree(root)
        tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.tmp-", dir=root.parent))
        tmp.chmod(0o755)  # mkdtemp makes 0700; a root directory is 0755
        mirror = mirror or debian_mirror()
        cmd = [
            "debootstrap",
            "--variant=minbase",
            f"--include={','.join(PACKAGES)}",
            "sid",
            str(tmp),
            mirror,
        ]
        print(f"building the Asterisk chroot (about a minute): {' '.join(cmd)}", flush=True)
        started = time.monotonic()
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if proc.returncode != 0 or not (tmp / "usr/sbin/asterisk").is_file():
                tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-25:])
                raise RigError(f"debootstrap failed ({proc.returncode}):\n{tail}")
            # Keep Debian's stock configs: each instance starts from them (see _instance_etc).
            shutil.copytree(tmp / "etc/asterisk", tmp / "etc/asterisk.debian")
            (tmp / DONE_MARKER).write_text(f"built from {mirror}\npackages: {' '.join(PACKAGES)}\n")
            unmount_all(tmp)
            tmp.rename(root)
        except BaseException:
            remove_tree(tmp)
            raise
        print(f"chroot ready in {time.monotonic() - started:.0f} s: {root}", flush=True)
    return root


def host_path(root: Path, inner: str) -> Path:
    """The host path of ``inner`` as the chroot sees it (its symlinks are absolute to it).

    ``ROOT/var/run`` is a link to ``/run``: followed from the host it would land in the
    host's own ``/run``. This resolves each link inside ``root`` instead.
    """
    parts = [p for p in inner.split("/") if p]
    resolved: list[str] = []
    hops = 0
    while parts:
        part = parts.pop(0)
        if part == "..":
            if resolved:
                resolved.pop()
            continue
        candidate = root.joinpath(*resolved, part)
        if candidate.is_symlink():
            hops += 1
            if hops > 40:
                raise RigError(f"too many symlinks resolving {inner} in {root}")
            target = os.readlink(candidate)
            if target.startswith("/"):
                resolved = []
            parts = [p for p in target.split("/") if p] + parts
            continue
        resolved.append(part)
    return root.joinpath(*resolved)


def port_is_free(port: int, host: str = "127.0.0.1") -> bool:
    """True when both UDP and TCP ``host:port`` can be bound right now."""
    for kind in (socket.SOCK_DGRAM, socket.SOCK_STREAM):
        with socket.socket(socket.AF_INET, kind) as s:
            if kind == socket.SOCK_STREAM:
                # as Asterisk binds: TIME_WAIT leftovers of old SIP/TCP connections are fine
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind((host, port))
            except OSError:
                return False
    return True


def pick_port(preferred: int | None = DEFAULT_PORT) -> int:
    """``preferred`` when it is free over UDP and TCP, else (or when None) another free port."""
    if preferred is not None and port_is_free(preferred):
        return preferred
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        if port_is_free(port):
            return port
    raise RigError("no free UDP+TCP port on 127.0.0.1")


def render_config(text: str, port: int) -> str:
    """A repository config with the rig's SIP port in place of 5160."""
    return re.sub(r"(?<=:)5160\b", str(port), text)


def chrooted_pids(root: Path) -> list[int]:
    """Processes whose root directory is ``root`` (any Asterisk of this rootfs)."""
    target = str(root.resolve())
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if os.readlink(entry / "root") == target:
                pids.append(int(entry.name))
        except OSError:
            continue  # gone meanwhile, or not ours to read
    return pids


def pid_alive(pid: int) -> bool:
    """True when ``pid`` exists and is not a zombie."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


class AsteriskRig:
    """One Asterisk 22 in the chroot at ``rootfs``, listening on ``127.0.0.1:port``.

    Each port is its own instance (config, run, db, spool and log directories named after
    it), so the rig of ``make asterisk`` and the e2e tests can run side by side from one
    rootfs. ``/proc`` and ``/dev`` are mounted while any instance runs and unmounted by the
    last one to stop.
    """

    def __init__(self, rootfs: Path, port: int = DEFAULT_PORT, ready_timeout_s: float = 30):
        self.root = rootfs
        self.port = port
        self.ready_timeout_s = ready_timeout_s
        self.name = f"asterisk-{port}"
        self.proc: subprocess.Popen[bytes] | None = None
        self._atexit = False

    # -- paths (inside the chroot unless named host_*) --------------------------------
    @property
    def etc(self) -> str:
        return f"/etc/{self.name}"

    @property
    def conf(self) -> str:
        return f"{self.etc}/asterisk.conf"

    @property
    def host_log(self) -> Path:
        """Asterisk's console output (what it printed while starting and running)."""
        return host_path(self.root, f"/var/log/{self.name}/console.log")

    @property
    def host_pidfile(self) -> Path:
        return host_path(self.root, f"/run/{self.name}/asterisk.pid")

    @property
    def uri(self) -> str:
        return f"sip:127.0.0.1:{self.port}"

    # -- lifecycle ---------------------------------------------------------------------
    def start(self) -> None:
        """Mount, install the configs and start Asterisk; return when it serves SIP."""
        if not rootfs_ready(self.root):
            raise RigError(
                f"no up-to-date Asterisk rootfs at {self.root} (not built, or built without "
                f"{', '.join(PACKAGES)}): run python -m tests.e2e.rig rootfs"
            )
        if self.running_pid() is not None:
            raise RigError(f"{self.name} already runs (pid {self.running_pid()}): stop it first")
        if not port_is_free(self.port):
            raise RigError(
                f"127.0.0.1:{self.port} is taken (UDP or TCP): stop what holds it, or choose "
                "another port: python -m tests.e2e.rig up --port N (and register to N)"
            )
        if not self._atexit:
            atexit.register(self.stop)
            self._atexit = True
        with self._lock():
            self._mount()
            self._name_resolution()
        try:
            self._install_configs()
            self._spawn()
            self._wait_ready()
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        """Stop Asterisk (gently, then by force) and unmount if no other instance runs."""
        pid = self.proc.pid if self.proc is not None else self.running_pid()
        if pid is not None and pid_alive(pid):
            self._cli_raw("core stop now", timeout_s=10)
            if not self._wait_exit(pid, 10):
                log.warning("%s did not stop in 10 s: killing pid %s", self.name, pid)
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                self._wait_exit(pid, 5)
        if self.proc is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=1)
            self.proc = None
        with contextlib.suppress(FileNotFoundError):
            self.host_pidfile.unlink()
        with self._lock():
            if not any(pid_alive(p) for p in chrooted_pids(self.root)):
                unmount_all(self.root)

    def remove_instance(self) -> None:
        """Delete this instance's config, db, spool, run and cache directories (not its log).

        For throw-away instances on random ports (the tests), so the rootfs does not collect
        one set of directories per run. Refused while the instance runs.
        """
        if self.running_pid() is not None:
            raise RigError(f"{self.name} still runs: stop it before removing it")
        for inner in (
            self.etc,
            f"/var/lib/{self.name}",
            f"/var/spool/{self.name}",
            f"/run/{self.name}",
            f"/var/cache/{self.name}",
        ):
            path = host_path(self.root, inner)
            if path.is_dir() and not mounts_under(path):
                shutil.rmtree(path)

    def log_size(self) -> int:
        """The console log's current length (to show only what a test added to it)."""
        try:
            return self.host_log.stat().st_size
        except OSError:
            return 0

    def log_since(self, offset: int, lines: int = 40) -> str:
        """The last ``lines`` lines written to the console log after ``offset``."""
        try:
            with open(self.host_log, "rb") as f:
                f.seek(offset)
                text = f.read().decode(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    def restart(self, *, clear_registrations: bool = False) -> None:
        """Stop and start again (the service sees Asterisk go away and come back).

        Registrations survive a restart (Asterisk keeps contacts in astdb); with
        ``clear_registrations`` they are dropped, so only fresh REGISTERs bring them back.
        """
        pid = self.proc.pid if self.proc is not None else self.running_pid()
        if pid is not None:
            self._cli_raw("core stop now", timeout_s=10)
            if not self._wait_exit(pid, 15):
                os.kill(pid, signal.SIGKILL)
                self._wait_exit(pid, 5)
        if self.proc is not None:
            self.proc.wait(timeout=5)
            self.proc = None
        if clear_registrations:
            host_path(self.root, f"/var/lib/{self.name}/astdb.sqlite3").unlink(missing_ok=True)
        deadline = time.monotonic() + 10
        while not port_is_free(self.port):
            if time.monotonic() > deadline:
                raise RigError(f"127.0.0.1:{self.port} still taken after Asterisk stopped")
            threading.Event().wait(0.1)
        with self._lock():
            self._mount()
        self._spawn()
        self._wait_ready()

    def running_pid(self) -> int | None:
        """The pid of this instance's Asterisk, or None when it does not run."""
        if self.proc is not None and self.proc.poll() is None:
            return self.proc.pid
        try:
            pid = int(self.host_pidfile.read_text().strip())
        except (OSError, ValueError):
            return None
        return pid if pid_alive(pid) and pid in chrooted_pids(self.root) else None

    def wait_for_bridge(self, channels: int = 2, timeout_s: float = 5) -> None:
        """Wait until some bridge holds ``channels`` channels (``bridge show all``).

        A channel Dial() has just answered is bridged a moment after its ACK; a REFER in
        that moment is refused (400: a channel in no bridge cannot be transferred)."""
        deadline = time.monotonic() + timeout_s
        while True:
            table = self.cli("bridge show all")
            # Bridge-ID  Name  Chans  Type  Technology  Duration: Chans is 4th from the end.
            counts = [row.split()[-4] for row in table.splitlines()[1:] if row.strip()]
            if str(channels) in counts:
                return
            if time.monotonic() > deadline:
                raise RigError(f"no bridge of {channels} channels in {timeout_s} s: {table!r}")
            threading.Event().wait(0.05)

    def cli(self, command: str, timeout_s: float = 15) -> str:
        """Run an Asterisk CLI command (``asterisk -rx``) and return what it printed."""
        proc = self._cli_raw(command, timeout_s)
        if proc is None or proc.returncode != 0:
            detail = "timed out" if proc is None else proc.stdout + proc.stderr
            raise RigError(f"asterisk -rx {command!r} failed: {detail}")
        return proc.stdout

    # -- inside ----------------------------------------------------------------------------
    def _lock(self) -> contextlib.AbstractContextManager[None]:
        return file_lock(self.root.parent / f".{self.root.name}.mount.lock", 60, "mounts")

    def _mount(self) -> None:
        mounted = set(mounts_under(self.root))
        if self.root / "proc" not in mounted:
            subprocess.run(["mount", "-t", "proc", "proc", str(self.root / "proc")], check=True)
        if self.root / "dev" not in mounted:
            subprocess.run(["mount", "--bind", "/dev", str(self.root / "dev")], check=True)

    def _name_resolution(self) -> None:
        """Local answers for the names Asterisk looks up at start and per call.

        debootstrap leaves no /etc/hosts and the build host's resolver, which answers nothing
        here: each lookup of the host name then waited 5 s and held up the calls behind it
        (16 calls/s instead of ~140, measured by bench/asterisk_compare.py). Resolving the
        host name locally, and a resolver on loopback that refuses at once, remove the stall.
        """
        hostname = socket.gethostname()
        (self.root / "etc/hosts").write_text(
            f"127.0.0.1\tlocalhost {hostname}\n::1\tlocalhost ip6-localhost\n"
        )
        resolv = self.root / "etc/resolv.conf"
        if resolv.is_symlink():
            resolv.unlink()
        resolv.write_text("# clinic-voice rig: no DNS inside the chroot\nnameserver 127.0.0.1\n")

    def _install_configs(self) -> None:
        host_etc = host_path(self.root, self.etc)
        if host_etc.exists():
            shutil.rmtree(host_etc)
        # Only the repository's configs (as the Docker image mounts them): Debian's demo
        # dialplans and sample users would add extensions nobody reviewed.
        host_etc.mkdir(parents=True)
        # Every start begins without remembered registrations (contacts live in astdb):
        # a phone or worker from an earlier run must not look reachable.
        host_path(self.root, f"/var/lib/{self.name}/astdb.sqlite3").unlink(missing_ok=True)
        for conf in sorted(CONFIG_DIR.glob("*.conf")):
            (host_etc / conf.name).write_text(render_config(conf.read_text(), self.port))
        stock = (self.root / "etc/asterisk.debian/asterisk.conf").read_text()
        moddir = re.search(r"^astmoddir\s*=>\s*(\S+)", stock, re.MULTILINE)
        per_instance = {
            "astetcdir": self.etc,
            "astdbdir": f"/var/lib/{self.name}",
            "astspooldir": f"/var/spool/{self.name}",
            "astrundir": f"/run/{self.name}",
            "astlogdir": f"/var/log/{self.name}",
            "astcachedir": f"/var/cache/{self.name}",
        }
        shared = {
            "astmoddir": moddir.group(1)
            if moddir
            else "/usr/lib/x86_64-linux-gnu/asterisk/modules",
            "astvarlibdir": "/var/lib/asterisk",
            "astkeydir": "/var/lib/asterisk",
            "astdatadir": "/usr/share/asterisk",
            "astagidir": "/usr/share/asterisk/agi-bin",
            "astsbindir": "/usr/sbin",
        }
        lines = ["; written by tests/e2e/rig.py: one Asterisk instance per port", "[directories]"]
        lines += [f"{k} => {v}" for k, v in {**per_instance, **shared}.items()]
        lines += ["", "[options]", "documentation_language = en_US", ""]
        (host_etc / "asterisk.conf").write_text("\n".join(lines))
        for path in per_instance.values():
            if path != self.etc:
                host_path(self.root, path).mkdir(parents=True, exist_ok=True)
        # spool subdirectories Asterisk expects to exist
        for sub in ("outgoing", "tmp", "voicemail"):
            (host_path(self.root, per_instance["astspooldir"]) / sub).mkdir(exist_ok=True)

    def _spawn(self) -> None:
        self.host_log.parent.mkdir(parents=True, exist_ok=True)
        with open(self.host_log, "ab") as out:
            # -f: stay in the foreground so the pid is Asterisk's; no -U: as root in the
            # chroot (-U root makes astdb fail to open, measured).
            self.proc = subprocess.Popen(
                ["chroot", str(self.root), "/usr/sbin/asterisk", "-C", self.conf, "-f", "-q"],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.ready_timeout_s
        last = ""
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise RigError(
                    f"Asterisk exited with {self.proc.returncode} while starting; "
                    f"see {self.host_log}:\n{self._log_tail()}"
                )
            proc = self._cli_raw("core waitfullybooted", timeout_s=5)
            if proc is not None and proc.returncode == 0:
                endpoints = self._cli_raw("pjsip show endpoints", timeout_s=5)
                last = endpoints.stdout if endpoints is not None else ""
                if endpoints is not None and "6001" in last and not port_is_free(self.port):
                    return
            threading.Event().wait(0.2)
        raise RigError(
            f"Asterisk on 127.0.0.1:{self.port} not ready in {self.ready_timeout_s:.0f} s "
            f"(endpoints: {last.strip()[:300]!r}); see {self.host_log}:\n{self._log_tail()}"
        )

    def _wait_exit(self, pid: int, timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.pid == pid:
                if self.proc.poll() is not None:
                    return True
            elif not pid_alive(pid):
                return True
            threading.Event().wait(0.1)
        return False

    def _cli_raw(self, command: str, timeout_s: float) -> subprocess.CompletedProcess[str] | None:
        try:
            return subprocess.run(
                ["chroot", str(self.root), "/usr/sbin/asterisk", "-C", self.conf, "-rx", command],
                capture_output=True,
                text=True,
                timeout=timeout_s,
                check=False,
            )
        except subprocess.TimeoutExpired:
            return None

    def _log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.host_log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"


# -- the service, registered to the rig's Asterisk -------------------------------------------
SIP_USER = "clinic"
SIP_PASSWORD = "clinic-local-secret"  # LOCAL-TEST credential, as in pjsip.conf
# Flash-call caller-IDs are this prefix plus the code: +447400 and 6 digits is a valid UK
# mobile number (+4474001 and 6 digits would be one digit too long for phonenumbers).
FLASHCALL_PREFIX = "+447400"
CLINIC_LINE = "+14155550700"


def service_available() -> bool:
    """True when the service's HTTP app and SIP pool import (they are being written)."""
    proc = subprocess.run(
        [sys.executable, "-c", "import clinic_voice.app, clinic_voice.cli, voice.sip.pool"],
        cwd=REPO,
        capture_output=True,
        check=False,
    )
    return proc.returncode == 0


def service_env(
    pbx_port: int,
    *,
    http_addr: str = "127.0.0.1:8080",
    sip_addr: str = "127.0.0.1:5060",
    data_dir: Path | None = None,
    base: dict[str, str] | None = None,
) -> dict[str, str]:
    """The environment that registers the service to the rig's Asterisk on ``pbx_port``."""
    from sip_config.settings import VARIABLES

    known = {v.name for v in VARIABLES}
    # The service refuses unknown CLINIC_* names (a user may have set any).
    env = {
        k: v
        for k, v in (os.environ if base is None else base).items()
        if not k.startswith("CLINIC_") or k in known
    }
    pbx = f"127.0.0.1:{pbx_port}"
    env.update(
        CLINIC_HTTP_ADDR=http_addr,
        CLINIC_SIP_ADDR=sip_addr,
        CLINIC_SIP_REGISTRAR=f"sip:{pbx}",
        CLINIC_SIP_USER=SIP_USER,
        CLINIC_SIP_PASSWORD=SIP_PASSWORD,
        # As docker-compose.yml: Asterisk's default realm (pjsip.conf names none), so every
        # e2e test also shows that the password goes to Asterisk's challenges.
        CLINIC_SIP_REALM="asterisk",
        CLINIC_SIP_ROUTE=f"sip:{{e164}}@{pbx}",
        CLINIC_FLASHCALL_PREFIX=FLASHCALL_PREFIX,
        CLINIC_VOICE_OTP_FROM=CLINIC_LINE,
        CLINIC_SMS_GATEWAY="sip",
        CLINIC_NURSE_URI=f"sip:6100@{pbx}",
        CLINIC_STAFF_URI=f"sip:6200@{pbx}",
    )
    if data_dir is not None:
        env["CLINIC_DATA_DIR"] = str(data_dir)
    return env


class ServiceProcess:
    """``clinic-voice serve`` in the background, with a pid file and a log file."""

    def __init__(
        self,
        env: dict[str, str],
        pidfile: Path,
        logfile: Path,
        *,
        argv: list[str] | None = None,
    ) -> None:
        self.env = env
        self.argv = argv  # another launcher than ``clinic-voice serve`` (a test seam)
        self.pidfile = pidfile
        self.logfile = logfile
        self.http_addr = env.get("CLINIC_HTTP_ADDR", "127.0.0.1:8080")
        # Kept so the child is reaped here (no zombie, no "still running" warning).
        self.proc: subprocess.Popen[bytes] | None = None

    def running_pid(self) -> int | None:
        """The pid from the pid file when that process still lives."""
        try:
            pid = int(self.pidfile.read_text().strip())
        except (OSError, ValueError):
            return None
        return pid if pid_alive(pid) else None

    def start(self, timeout_s: float = 60) -> None:
        """Start the service and wait for ``/readyz``; on failure stop it and raise."""
        exe = Path(sys.executable).with_name("clinic-voice")
        argv = self.argv or (
            [str(exe), "serve"]
            if exe.exists()
            else [sys.executable, "-m", "clinic_voice.cli", "serve"]
        )
        host, _, port = self.http_addr.rpartition(":")
        if not port_is_free(int(port), host):
            # Another service (make run?) would answer /readyz for this one, which then
            # exits at once: refuse instead of reporting a service that is not there.
            raise RigError(
                f"{self.http_addr} is taken: another service runs there (make run?); stop it first"
            )
        self.logfile.parent.mkdir(parents=True, exist_ok=True)
        with open(self.logfile, "ab") as out:
            self.proc = proc = subprocess.Popen(
                argv,
                cwd=REPO,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.pidfile.write_text(f"{proc.pid}\n")
        deadline = time.monotonic() + timeout_s
        url = f"http://{self.http_addr}/readyz"
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                self.pidfile.unlink(missing_ok=True)
                raise RigError(
                    f"the service exited with {proc.returncode}; "
                    f"see {self.logfile}:\n{self.log_tail()}"
                )
            if http_ok(url) and proc.poll() is None:
                return
            threading.Event().wait(0.25)
        self.stop(exit_code=None)  # what it did not do is the error, not how it stopped
        raise RigError(
            f"{url} not ready in {timeout_s:.0f} s; see {self.logfile}:\n{self.log_tail()}"
        )

    def stop(self, timeout_s: float = 15, *, exit_code: int | None = 0) -> bool:
        """SIGTERM (then SIGKILL); True when a running service was stopped. When this object
        started it (its exit is known here, not to ``make asterisk-stop``), raise RigError
        unless it exited ``exit_code``: 0, every worker stopped as asked (one that did not
        makes serve exit 1, and only an HTTP worker's ERROR line says it); None: any."""
        pid = self.running_pid()
        self.pidfile.unlink(missing_ok=True)
        if pid is None:
            return False
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGTERM)  # its own session: workers go too
        proc = self.proc

        def gone() -> bool:
            # Ours is reaped by Popen, which keeps its exit (an os.waitpid here left Popen's
            # wait an ECHILD, which it reads as exit 0); another's: no longer alive.
            return proc.poll() is not None if proc is not None else not pid_alive(pid)

        deadline = time.monotonic() + timeout_s
        while not gone() and time.monotonic() < deadline:
            threading.Event().wait(0.1)
        if not gone():
            log.warning("the service did not stop in %.0f s: killing it", timeout_s)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)
        if proc is not None:
            code = proc.wait(timeout=5)
            self.proc = None
            if exit_code is not None and code != exit_code:
                raise RigError(
                    f"the service exited with {code} at its stop, not {exit_code}; "
                    f"see {self.logfile}:\n{self.log_tail(60)}"
                )
        return True

    def log_tail(self, lines: int = 30) -> str:
        """The end of the service's log."""
        try:
            return "\n".join(self.logfile.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"


def http_ok(url: str, timeout_s: float = 2) -> bool:
    """True when ``GET url`` answers 200."""
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as resp:  # noqa: S310 - http://127.0.0.1 only
            return int(resp.status) == 200
    except (OSError, ValueError):
        return False


# -- command line ---------------------------------------------------------------------------
VAR = REPO / "var"


def local_addr(name: str, default: str) -> str:
    """127.0.0.1 and the port of ``$name`` when it is set, else ``default``.

    ``make asterisk`` keeps the service on loopback (Asterisk's configs point there), but a
    port already taken (8080 is a common one) must not leave a tester without a way round.
    """
    value = os.environ.get(name, "")
    if not value:
        return default
    _, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise RigError(f"{name}={value!r} is not HOST:PORT (make asterisk keeps the port only)")
    return f"127.0.0.1:{int(port)}"


def _local_service(port: int) -> ServiceProcess:
    env = service_env(
        port,
        http_addr=local_addr("CLINIC_HTTP_ADDR", "127.0.0.1:8080"),
        sip_addr=local_addr("CLINIC_SIP_ADDR", "127.0.0.1:5060"),
    )
    return ServiceProcess(env, VAR / "clinic-voice.pid", VAR / "clinic-voice.log")


def cmd_up(port: int) -> int:
    """``make asterisk``: Asterisk, then the service registered to it, then what to dial."""
    rig = AsteriskRig(build_rootfs(), port)
    pid = rig.running_pid()
    if pid is not None:
        print(f"Asterisk already runs on 127.0.0.1:{port} (pid {pid})")
    else:
        rig.start()
        atexit.unregister(rig.stop)  # it outlives this command; make asterisk-stop ends it
        print(f"Asterisk 22 runs on 127.0.0.1:{port} (log: {rig.host_log})")
    service = _local_service(port)
    status = 0
    if service.running_pid() is not None:
        print(f"the service already runs (pid {service.running_pid()})")
    elif not service_available():
        print(
            "the service is NOT started: clinic_voice.app or voice.sip.pool does not import yet.\n"
            "Asterisk alone is up: softphones can register and call each other."
        )
    else:
        try:
            service.start()
            print(f"the service runs: http://{service.http_addr} (log: {service.logfile})")
        except RigError as exc:
            print(f"error: the service did not start: {exc}", file=sys.stderr)
            print(
                "Asterisk stays up; make asterisk-stop stops it. Another port for the "
                "service: CLINIC_HTTP_ADDR=127.0.0.1:PORT make asterisk (CLINIC_SIP_ADDR "
                "likewise).",
                file=sys.stderr,
            )
            status = 1
    print(
        f"""
Register a softphone to 127.0.0.1:{port} (UDP), user 6001 password clinic-6001
(also 6002, 6003; nurse 6100, staff 6200; passwords clinic-<ext>). Then:
  dial 700 (or {CLINIC_LINE})  the clinic line (the bot)
  dial 6002                    another softphone
  a verification to +14155556001 rings or messages 6001: POST http://{service.http_addr}/v1/verifications
  with the API key in var/api-key
Stop everything with: make asterisk-stop"""
    )
    return status


def cmd_down(port: int) -> int:
    """``make asterisk-stop``: stop the service and Asterisk, unmount; fine when idle."""
    stopped = []
    # A stop with a tester still on a call drains it (CLINIC_CALL_DRAIN_S, 20 s), tells the
    # caller the line closes and waits for the last transfers: up to about 45 s. Killed at
    # 15 s, the tester was cut off without the closing notice.
    # Found by its pid file alone: a CLINIC_HTTP_ADDR set wrong since the start must not keep
    # the service from stopping.
    service = ServiceProcess({}, VAR / "clinic-voice.pid", VAR / "clinic-voice.log")
    if service.stop(timeout_s=60):
        stopped.append("the service")
    rig = AsteriskRig(rootfs_path(), port)
    if rig.running_pid() is not None:
        stopped.append("Asterisk")
    if rig.root.exists():
        rig.stop()  # also unmounts what a crashed run left mounted
    print(f"stopped {' and '.join(stopped)}" if stopped else "nothing was running")
    return 0


def cmd_status(port: int) -> int:
    """Print what runs; exit 0 when Asterisk runs."""
    root = rootfs_path()
    state = "not built"
    if rootfs_ready(root):
        state = "ready"
    elif (root / DONE_MARKER).is_file():
        state = "out of date (built without a package it now needs)"
    print(f"rootfs {root}: {state}")
    rig = AsteriskRig(root, port)
    pid = rig.running_pid()
    if pid is None:
        print(f"Asterisk on 127.0.0.1:{port}: not running")
    else:
        print(f"Asterisk on 127.0.0.1:{port}: pid {pid}")
        print(rig.cli("pjsip show contacts").strip())
    service = _local_service(port)
    spid = service.running_pid()
    ready = spid is not None and http_ok(f"http://{service.http_addr}/readyz")
    print(f"service: {'pid ' + str(spid) if spid else 'not running'}{' (ready)' if ready else ''}")
    return 0 if pid is not None else 1


def main(argv: list[str] | None = None) -> int:
    """``python -m tests.e2e.rig rootfs|up|down|status [--port N]``."""
    parser = argparse.ArgumentParser(prog="python -m tests.e2e.rig", description=__doc__)
    parser.add_argument("command", choices=["rootfs", "up", "down", "status"])
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help="Asterisk's SIP port")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        if args.command == "rootfs":
            print(build_rootfs())
            return 0
        if args.command == "up":
            return cmd_up(args.port)
        if args.command == "down":
            return cmd_down(args.port)
        return cmd_status(args.port)
    except RigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
