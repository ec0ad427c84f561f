"""No core dumps from the service's processes.

A core dump is the crashed process's memory on disk, in the clear: a SIP worker's holds its
calls' audio, the callers' numbers and the SIP messages of a transfer (X-Clinic-Summary);
``serve``'s the spoken text vosk recognised, triage answers, verification codes and
``CLINIC_SECRET``. pjsip may abort (pjsua's teardown has), and a host's default may keep
the core (``ulimit -c unlimited``, systemd-coredump, apport). Both
the soft and the hard limit go to 0, so nothing the process runs (redis-server, setpriv,
the workers) can raise it again. The kernel applies the limit to a core file only: to a
piped ``core_pattern`` it hands the dump whatever the limit (core(5)), and the helper decides.
systemd-coredump (Debian 12's, when installed) honours it (``%c``: "Resource limits disable
core dumping"); apport does for an executable no package owns, but for a packaged one (the
distribution's ``/usr/bin/python3``) it writes its ``/var/crash`` report, core included, at
any limit: the README says to turn apport off on such a host. ``prctl(PR_SET_DUMPABLE, 0)``
would not help there (apport sets ``fs.suid_dumpable=2``, so the kernel still pipes the dump)
and would cost operators py-spy, gdb and ``/proc/<pid>`` of the service's own processes.
The crash itself still shows: faulthandler's stacks on stderr and the exit status (-11, -6).
"""

from __future__ import annotations

import resource


def forbid_core_dumps() -> None:
    """Set RLIMIT_CORE to 0 (soft and hard) for this process and all it starts after."""
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
