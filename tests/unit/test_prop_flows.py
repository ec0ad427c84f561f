"""Properties of flow loading and ``flow check`` (pure: files in a temporary folder).

Any YAML a clinic may write, near the flow schema or far from it, gives findings (``flow
check`` exits 1) or a clean flow (0), never a traceback: ``serve`` and ``flow check`` read
these files, and a traceback tells the person editing them nothing about their line.
"""

from __future__ import annotations

import contextlib
import io
import string
import tempfile
from pathlib import Path
from typing import Any

import yaml
from hypothesis import given
from hypothesis import strategies as st

from voice.ivr import check
from voice.ivr.flow import NODE_KINDS, FlowError, load_flows, parse_flowset

_IDS = ["start", "menu", "a", "b", "bye", "human"]
_TARGETS = st.sampled_from([*_IDS, "@triage", "@menu", "@nowhere", "nowhere", "", "@"])
# YAML that the dumper cannot write from Python values: odd dates, tags, huge numbers,
# escapes, anchors. Each stands in a document as a RAW<n> placeholder.
_RAW = [
    "2026-13-45",
    "2026-02-30",
    "1" * 5000,
    "0x" + "f" * 4000,
    '"a\\0b"',
    '"audio\\x00.wav"',
    "!!binary aGk=",
    "!!binary ***",
    "!!set {a, b}",
    "!!omap [a: 1]",
    "!!pairs [a: 1, a: 2]",
    "!!int x",
    "!!float x",
    "!!timestamp x",
    "!!str",
    "!!python/name:os.system",
    "&r [*r]",
    "*nowhere",
    ".nan",
    "-.inf",
    "~",
    "{? [a]: b}",
    "[[[[[[[[[[[[]]]]]]]]]]]]",
    "<<: {a: 1}",
    "U9",
    "u1",
]
_SCALAR = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(),
    st.text(max_size=12),
    st.sampled_from(["U0", "U2", "U5", "yes", "no", "on", "staff", "nurse", "sip:6100@pbx"]),
    st.sampled_from([f"RAW{i}" for i in range(len(_RAW))]),
    st.dates(),
)
_ANY = st.recursive(
    _SCALAR,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=6,
)


def _maybe(draw: st.DrawFn, value: Any) -> Any:
    """``value``, or now and then anything at all in its place."""
    return draw(_ANY) if draw(st.integers(0, 5)) == 0 else value


@st.composite
def _effect(draw: st.DrawFn) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if draw(st.booleans()):
        out["urgency"] = _maybe(draw, draw(st.sampled_from(["U0", "U1", "U2", "U3", "U5", "U9"])))
        out["reason"] = _maybe(draw, "a reason")
    if draw(st.integers(0, 3)) == 0:
        out["risk"] = _maybe(draw, draw(st.sampled_from(["pregnant", "elderly", "child", "x"])))
    return out


@st.composite
def _choice(draw: st.DrawFn) -> Any:
    c: dict[str, Any] = {"goto": draw(_TARGETS)}
    if draw(st.booleans()):
        c["key"] = _maybe(draw, draw(st.sampled_from([*"0123456789*#", "10", ""])))
    if draw(st.booleans()):
        c["phrases"] = _maybe(draw, draw(st.lists(st.sampled_from(["yes", "no", "help"]))))
    if draw(st.booleans()):
        c["label"] = _maybe(draw, "help")
    c.update(draw(_effect()))
    return _maybe(draw, c)


@st.composite
def _node(draw: st.DrawFn) -> Any:
    kind = draw(st.sampled_from(NODE_KINDS))
    nxt = draw(_TARGETS)
    body: dict[str, Any]
    if kind == "say":
        say: Any = draw(st.sampled_from(["Hello {clinic_name}.", "{nope}", ""]))
        if draw(st.booleans()):
            say = {"text": say, "audio": draw(st.sampled_from(["x.wav", "RAW5", "/", ""]))}
        body = {"say": say, "next": nxt}
    elif kind == "ask":
        ask: dict[str, Any] = {"prompt": "Which?", "choices": draw(st.lists(_choice(), max_size=3))}
        if draw(st.integers(0, 3)) == 0:
            ask["digits"] = _maybe(
                draw,
                {
                    "min": draw(st.integers(-1, 40)),
                    "max": draw(st.integers(-1, 40)),
                    "format": draw(st.sampled_from(["date_ddmmyyyy", "x"])),
                },
            )
            ask["next"] = nxt
        for key in ("mode", "timeout_s", "danger_sign", "max_noinput", "on_fail", "save"):
            if draw(st.integers(0, 4)) == 0:
                ask[key] = draw(_SCALAR)
        body = {"ask": _maybe(draw, ask)}
    elif kind == "branch":
        on = draw(st.sampled_from(["hours", "urgency", "answer", "booking.ready"]))
        cases = draw(st.dictionaries(_SCALAR.filter(lambda v: v is not None), _TARGETS, max_size=3))
        body = {"branch": _maybe(draw, {"on": on, "cases": cases, "default": nxt})}
    elif kind == "set":
        body = {"set": draw(st.dictionaries(st.text(max_size=6), _SCALAR, max_size=3)), "next": nxt}
    elif kind == "urgency":
        body = {**draw(_effect()), "urgency": draw(st.sampled_from(["U1", "U3", "x"])), "next": nxt}
    elif kind == "transfer":
        body = {"transfer": draw(st.sampled_from(["staff", "nurse", "sip:6100@pbx", "x"]))}
    elif kind == "record":
        body = {"record": _maybe(draw, {"prompt": "Speak.", "max_s": 60}), "next": nxt}
    elif kind == "webhook":
        hook = {"url": draw(st.sampled_from(["scheduling", "x"])), "extra": draw(_ANY)}
        body = {"webhook": _maybe(draw, hook), "next": nxt, "on_fail": draw(_TARGETS)}
    elif kind == "goto":
        body = {"goto": nxt}
    else:
        body = {"hangup": draw(st.sampled_from([True, "Goodbye.", 3])), "outcome": "completed"}
    if draw(st.integers(0, 4)) == 0:
        body[draw(st.sampled_from(["nxt", "say", "goto", "RAW0"]))] = draw(_SCALAR)
    return _maybe(draw, body)


@st.composite
def flow_docs(draw: st.DrawFn) -> Any:
    nodes = draw(st.dictionaries(st.sampled_from([*_IDS, "bad id", "1x"]), _node(), max_size=5))
    doc: dict[str, Any] = {
        "id": _maybe(draw, draw(st.sampled_from(["f", "triage", "menu", "main_menu"]))),
        "start": _maybe(draw, draw(st.sampled_from(_IDS))),
        "nodes": _maybe(draw, nodes),
    }
    for key in ("language", "human", "extra"):
        if draw(st.integers(0, 3)) == 0:
            doc[key] = draw(_SCALAR)
    return _maybe(draw, doc)


def _dump(draw: st.DrawFn, doc: Any) -> bytes:
    text = yaml.safe_dump(doc, allow_unicode=True, sort_keys=False)
    for i in reversed(range(len(_RAW))):  # RAW10 before RAW1
        text = text.replace(f"RAW{i}", _RAW[i])
    data = text.encode("utf-8")
    if draw(st.integers(0, 9)) == 0:  # a file saved in Latin-1
        data = b"# caf\xe9\n" + data
    if draw(st.integers(0, 9)) == 0:  # byte-level damage
        at = draw(st.integers(0, len(data)))
        data = data[:at] + draw(st.binary(max_size=3)) + data[at + 1 :]
    return data


@st.composite
def flow_folders(draw: st.DrawFn) -> dict[str, bytes]:
    files = {f"f{i}.yaml": _dump(draw, draw(flow_docs())) for i in range(draw(st.integers(1, 2)))}
    if draw(st.booleans()):
        routes = {"default": draw(_TARGETS), "routes": draw(st.dictionaries(_SCALAR, _TARGETS))}
        files["routes.yaml"] = _dump(draw, _maybe(draw, routes))
    return files


def _run_check(argv: list[str]) -> tuple[int, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = check.main(argv)
    return code, out.getvalue()


@given(flow_folders())
def test_any_flow_folder_gives_findings_or_flows(files: dict[str, bytes]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        for name, data in files.items():
            (folder / name).write_bytes(data)
        _flowset, findings = parse_flowset(folder)
        try:
            load_flows(folder)
        except FlowError as exc:
            assert exc.findings
        code, printed = _run_check([str(folder)])
        assert code in (0, 1)
        assert (code == 1) == bool(printed.strip())
        if findings:
            assert code == 1
        code, _ = _run_check([str(folder / "f0.yaml")])  # one file, with its folder
        assert code in (0, 1)


@given(st.text(string.printable + "éü✓\x00\x85", max_size=200))
def test_any_text_in_a_flow_file_gives_findings_or_a_flow(text: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "f.yaml"
        path.write_text(text, encoding="utf-8")
        code, _ = _run_check([str(path)])
        assert code in (0, 1)
