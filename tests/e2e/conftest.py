"""Fixtures for the end-to-end tests: one real Asterisk 22 (chroot) per session, softphones."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.e2e.rig import AsteriskRig, RigError, build_rootfs, pick_port
from tests.peers.pbx_softphone import Softphone

PASSWORDS = {ext: f"clinic-{ext}" for ext in ("6001", "6002", "6003", "6100", "6200")}


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    """Keep each phase's report on the test item, so fixtures can tell that a test failed."""
    report = yield
    setattr(item, f"report_{report.when}", report)  # type: ignore[attr-defined]
    return report


def failed(request: pytest.FixtureRequest) -> bool:
    """True when the requesting test's call phase failed (for teardown diagnostics)."""
    report = getattr(request.node, "report_call", None)
    return report is None or bool(report.failed)


@pytest.fixture(scope="session")
def asterisk() -> Iterator[AsteriskRig]:
    """Asterisk on a random free 127.0.0.1 port (never 5160: a ``make asterisk`` rig, or a
    service left running by an earlier session, may expect that one); the rootfs is built on
    first use (about a minute) and unmounted at the end, whatever happened."""
    if os.geteuid() != 0:
        pytest.fail("the Asterisk rig needs root (chroot and mount)")
    try:
        root = build_rootfs()
    except RigError as exc:
        pytest.fail(f"could not build the Asterisk rootfs: {exc}")
    rig = None
    for _ in range(3):
        rig = AsteriskRig(root, pick_port(None))
        try:
            rig.start()
            break
        except RigError as exc:
            if "is taken" not in str(exc):  # only a port race is worth another try
                pytest.fail(f"Asterisk did not start: {exc}")
    else:
        pytest.fail("no free port for Asterisk after 3 tries")
    try:
        yield rig
    finally:
        rig.stop()
        rig.remove_instance()


@pytest.fixture(autouse=True)
def asterisk_log_on_failure(
    request: pytest.FixtureRequest, asterisk: AsteriskRig
) -> Iterator[None]:
    """When a test fails, show what Asterisk logged meanwhile (notices, warnings, errors)."""
    offset = asterisk.log_size()
    yield
    if failed(request):
        print(f"--- Asterisk console ({asterisk.host_log}) during the test ---")
        print(asterisk.log_since(offset))


PhoneFactory = Callable[..., Softphone]


@pytest.fixture
def phone(
    asterisk: AsteriskRig, tmp_path: Path, request: pytest.FixtureRequest
) -> Iterator[PhoneFactory]:
    """Make softphones on the rig: ``phone("6001")`` registers 6001 and waits for the 200;
    ``phone("clinic", register=False)`` is a caller with the service's credentials;
    ``wait=False`` returns at once (to see a registration fail). When the test fails, what
    every one of them reported is printed (a failed expect names only its own phone)."""
    made: list[Softphone] = []

    def make(
        user: str, *, register: bool = True, wait: bool = True, **options: object
    ) -> Softphone:
        password = "clinic-local-secret" if user == "clinic" else PASSWORDS[user]
        password = str(options.pop("password", password))
        sp = Softphone(f"127.0.0.1:{asterisk.port}", user, password, register=register, **options)  # type: ignore[arg-type]
        made.append(sp)
        if wait:
            sp.expect("registered" if register else "ready", timeout_s=10)
        return sp

    try:
        yield make
    finally:
        if failed(request):
            for sp in made:
                print(sp.story())
        for sp in made:  # all at once: each takes a moment to unregister
            sp.begin_close()
        with contextlib.ExitStack() as closing:  # every one is closed, even after a failure
            for sp in made:
                closing.callback(sp.close)
