"""What goes before a child's argv (:func:`sip_config.child_process.setpriv_prefix`)."""

from __future__ import annotations

from sip_config.child_process import RunAs, setpriv_prefix


def test_no_setpriv_puts_nothing_in_front() -> None:
    assert setpriv_prefix(None, None) == []
    assert setpriv_prefix(None, RunAs(1000, 1000)) == []  # the loop's own options drop it


def test_setpriv_sets_the_parent_death_signal() -> None:
    assert setpriv_prefix("/usr/bin/setpriv", None) == [
        "/usr/bin/setpriv",
        "--pdeathsig",
        "TERM",
        "--",
    ]


def test_a_user_to_run_as_has_its_group_as_its_only_one() -> None:
    # As os.setgroups([gid]); os.setgid(gid); os.setuid(uid) did in the child before.
    assert setpriv_prefix("setpriv", RunAs(1001, 1002)) == [
        "setpriv",
        "--pdeathsig",
        "TERM",
        "--reuid=1001",
        "--regid=1002",
        "--groups=1002",
        "--",
    ]
