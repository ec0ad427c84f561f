"""``clinic-voice serve`` for the e2e tests, with one seam: the next code can be pinned.

A voice-code call speaks its code and nothing else knows it, so the test that checks what
the phone heard must know which code to listen for. The integration tier pins it by
replacing :func:`verification.codes.new_code` in its own process; the e2e service runs as
a separate process, so this launcher makes the same replacement there and then runs the
real ``clinic-voice serve``. While the file named by ``$E2E_PINNED_CODE_FILE`` exists, the
next code drawn is read from it and the file removed (one code per write); otherwise codes
are random as always. Everything else (HTTP, Redis, dispatcher, SIP workers) is unchanged.

Run ``python -m tests.peers.pbx_service`` with the service's ``CLINIC_*`` environment.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

PINNED_CODE_ENV = "E2E_PINNED_CODE_FILE"


def pinned_codes(path: Path) -> None:
    """Make ``codes.new_code`` take its next code from ``path`` while that file exists."""
    from verification import codes

    random_code = codes.new_code

    def new_code(length: int) -> str:
        try:
            code = path.read_text().strip()
        except FileNotFoundError:
            return random_code(length)
        path.unlink()
        if len(code) != length or not code.isdigit():
            # Refused loudly (the test wrote a wrong code); never echo the value itself.
            raise ValueError(f"pinned code in {path} is not {length} digits")
        return code

    codes.new_code = new_code


def main() -> int:
    """Install the seam (when asked for) and run ``clinic-voice serve``."""
    # Imported here: the tests import this module for its constant alone.
    from clinic_voice import cli

    pinned = os.environ.get(PINNED_CODE_ENV)
    if pinned:
        pinned_codes(Path(pinned))
    return cli.main(["serve"])


if __name__ == "__main__":
    sys.exit(main())
