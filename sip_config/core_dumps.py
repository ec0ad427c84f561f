"""No core dumps from the service's processes.

A core dump is the crashed process's memory on disk, in the clear: a SIP worker's holds its
calls' audio, the callers' numbers and the SIP messages of a transfer (X-Clinic-Summary);
``serve``'s the spoken text vosk recognised, triage answers, verification codes and
``CLINIC_SECRET``. pjsip may abort (pjsua's teardown has), and a host's default may keep
the core (``ulimit -c unlimited``, systemd-coredump, apport). Both
the soft and the hard limit go to 0, so nothing the process runs (redis-server, setpriv,
the workers) can raise it again; systemd-coredump and apport honour the limit for a piped
``core_pattern`` too. The crash itself still shows: faulthandler's stacks on stderr and the
exit status (-11, -6).
"""

from __future__ import annotations

import resource


def forbid_core_dumps() -> None:
    """Set RLIMIT_CORE to 0 (soft and hard) for this process and all it starts after."""
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
