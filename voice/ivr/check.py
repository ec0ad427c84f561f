"""``clinic-voice flow check``: find what would go wrong in a flow before a caller does.

Checks, each reported as ``file:line: message``:

* the schema (kinds, keys, types, reserved keys, digit entries), from :mod:`voice.ivr.flow`;
* unknown targets and routes, unreachable nodes, dead ends (a branch that can find no case),
  loops that never wait for the caller, and paths that never end (nodes from which no
  transfer or hang-up can be reached by answering);
* the safety rules, replayed over every path with the same triage rules the engine runs:
  urgency never goes down (no outcome less urgent than the urgency reached, no hang-up
  without a human at U2 or above), every danger-sign question has an answer that makes the
  call U1 or U0 and its give-up path ends with a human, never a plain hang-up; a path goes
  on across ``@`` jumps with the state it reached (urgency, risks, danger signs asked,
  closed), as the call does, and what it meets in another flow is this flow's finding when
  that flow, from its own start, would not meet it so (at the line where the path last left
  this flow, naming the chain of flows);
* the way back to the main menu (``@menu``): never after a danger-sign question or an
  answer the triage weighed (an urgency or a risk group): red flags come first, and a
  caller half-way through a triage is not sent round the menu. Such a return is one finding,
  where it is offered: the replay does not follow it (round the menu into the other flows,
  whose steps it would report again in that state). A return is otherwise an edge like any
  other, so a menu and its sub-flows that only lead to one another still "never end" (the
  engine's cap on returns, a human, is a last resort, not a way out a flow may count on);
* opening hours: a ``branch`` on ``hours`` has both cases (or a default), and no path the
  flow takes while the practice is closed ends in a ``transfer: staff`` (the engine would
  say "closed" instead of the transfer the flow promised), also in a sub-flow it goes on to
  (``@name``) while closed, which inherits the closed state; both cases are explored, and
  an ask's ``on_closed`` (taken only while closed) names another question of its own flow,
  in a flow whose human is staff;
* a say's ``backs_outcome`` (with its ``outcome_unheard``) is the outcome of a goodbye that
  can follow it, short of a transfer: otherwise the line backs nothing (the keys' own rules,
  both or neither, no triage action, are the schema's);
* spoken hints: in an ask that takes speech the prompt says "Say {label} or press {key}", so
  each such label must be heard as its own choice (one of its phrases, by the engine's own
  matching) and as no other; no phrase holds another choice's (heard as both: no answer).
  An ask takes speech on a call with a speech model in its flow's language unless it is a
  keypad question or a keypad entry (:func:`voice.ivr.flow.hears_speech`): the settings are
  not read, so a flow that passes here passes with any;
* what a caller with only a keypad can reach: a choice of a question that takes speech
  with phrases and no key is out of reach on a line without a speech model in the flow's
  language, unless a choice with a key goes the same way;
* what a caller hears: a prompt made of a webhook reply's field alone (a reply without it
  is silence), and a goodbye that ends with a triage's advice (``same_day``) but says none;
* a branch on a setting (``clinic_name``: spoken, never a value of the call) or on what
  nothing saves, naming what a branch can read;
* a record step with no prompt is reached only through a say (that says what to record
  before the beep), and is no flow's start;
* a case of a branch on urgency that no path reaches at its level, whose target no other
  path reaches: a step the flow counts on that no caller gets to;
* a case of a branch on a collected value that no value it can hold equals (the engine
  compares the text exactly: ``Yes`` for an answer saved as ``yes``, ``01:`` that YAML
  reads as ``1``), and on a value that may hold any text (an entry, a reply), a case YAML
  reads as another text than written.
"""

from __future__ import annotations

import argparse
import difflib
import sys
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from sip_config.settings import SettingsError, flows_dir_from_env
from voice.ivr.engine import phrase_in, urgent_question
from voice.ivr.flow import (
    HOURS,
    HOURS_CASES,
    MENU_TARGET,
    MESSAGE_VALUE,
    ON_CLOSED,
    PARAM_NAMES,
    ROUTES_FILE,
    Ask,
    Assess,
    Branch,
    Effect,
    Finding,
    Flow,
    FlowSet,
    Goto,
    Hangup,
    Human,
    Node,
    Record,
    Say,
    SetValues,
    Transfer,
    Webhook,
    flows_folder_problem,
    hears_speech,
    node_outcome,
    node_texts,
    parse_flow,
    parse_flowset,
    placeholders,
    render,
    successors,
)
from voice.ivr.triage import (
    RiskGroup,
    TriageAction,
    TriageState,
    Urgency,
    action_allows,
    with_risk,
)

NodeRef = tuple[str, str]  # (flow id, node id)


def check_files(paths: Iterable[str | Path]) -> list[Finding]:
    """Every finding for ``paths`` (files or folders).

    A file is checked together with the other flows in its folder, so targets such as
    ``@triage`` resolve; only findings in the named files are returned.
    """
    findings: list[Finding] = []
    for path in paths:
        p = Path(path)
        if p.is_dir():
            flowset, found = parse_flowset(p)
            findings += found + check_flowset(flowset)
            continue
        flowset, found = parse_flowset(p.parent) if p.parent.is_dir() else (FlowSet({}), [])
        flow, own = (None, []) if p.name == ROUTES_FILE else parse_flow(p)
        if flow is not None and flow.id not in flowset.flows:
            flowset = FlowSet({**flowset.flows, flow.id: flow}, flowset.routes, flowset.default)
        wanted = {str(p)}
        findings += own
        findings += [f for f in found + check_flowset(flowset) if f.file in wanted]
    return sorted(set(findings), key=lambda f: (f.file, f.line, f.message))


def check_flowset(flowset: FlowSet) -> list[Finding]:
    """Graph and safety findings for loaded flows (the schema is checked while loading)."""
    out: list[Finding] = []
    walks: dict[str, _Walk] = {}
    for flow in flowset.flows.values():
        out += _Checker(flowset, flow, walks).run()
    return out


@dataclass(frozen=True, slots=True)
class _Abstract:
    """What the safety replay tracks along a path: the triage state without its reasons."""

    urgency: Urgency | None
    risks: frozenset[RiskGroup]
    # Whether the path has asked a danger-sign question yet (MINDD: danger signs first).
    asked_danger: bool = False
    # Whether the path went through the "closed" case of a branch on hours.
    closed: bool = False

    @property
    def level(self) -> Urgency:
        """The urgency reached, U5 before any: as the engine's empty triage. Not
        ``urgency or U5``: U0 is an ``IntEnum`` 0, false, and would be read as U5."""
        return Urgency.U5 if self.urgency is None else self.urgency

    def apply(self, effect: Effect | None) -> _Abstract:
        if effect is None:
            return self
        tri = TriageState(self.level, (), self.risks)
        if effect.risk is not None:
            tri = tri.add_risk(effect.risk)
        if effect.urgency is not None:
            tri = tri.raise_to(effect.urgency, effect.reason)
        return _Abstract(tri.urgency, tri.risk_groups, self.asked_danger, self.closed)

    def unclear(self) -> _Abstract:
        # The engine raises an unclear danger-sign answer, and an urgent question given up
        # unanswered, to U2 (risk groups do not step U2).
        return _Abstract(
            self.level.at_least(with_risk(Urgency.U2, self.risks)),
            self.risks,
            self.asked_danger,
            self.closed,
        )


_Item = tuple[NodeRef, _Abstract]
# Each step of a walk and the step before it (None: the start).
_Walk = dict[_Item, _Item | None]

_HUMAN_ACTIONS = frozenset({TriageAction.CALL_EMERGENCY, TriageAction.TRANSFER_NURSE})


def _grades(node: Node) -> bool:
    """Whether ``node`` grades a complaint without a clinician: a question or step that sets
    an urgency, or an outcome that sends the caller away (a booking, self-care)."""
    if isinstance(node, Ask) and not node.danger_sign:
        levels = [
            c.effect.urgency
            for c in node.choices
            if c.effect is not None and c.effect.urgency is not None
        ]
        # An ask with a U0/U1 answer is a danger sign not marked so: its own finding says so.
        return bool(levels) and min(levels) > Urgency.U1
    if isinstance(node, Assess):
        return node.effect.urgency is not None
    if isinstance(node, Transfer | Hangup):
        action = node_outcome(node)
        return action is not None and action not in _HUMAN_ACTIONS
    return False


class _Checker:
    def __init__(self, flowset: FlowSet, flow: Flow, walks: dict[str, _Walk]) -> None:
        self.flowset = flowset
        self.walks = walks  # shared by the checks of one flow set
        self.flow = flow
        self.file = str(flow.path)
        self.findings: list[Finding] = []

    def add(self, line: int, message: str) -> None:
        self.findings.append(Finding(self.file, line, message))

    def run(self) -> list[Finding]:
        if not self.flow.start or self.flow.start not in self.flow.nodes:
            return self.findings  # the schema finding says why; nothing to walk
        self.targets()
        broken = any(not t for n in self.flow.nodes.values() for t, _, _ in successors(n))
        if broken or any(f.message.startswith("unknown target") for f in self.findings):
            return self.findings
        self.reachable()
        self.dead_ends()
        self.endless()
        self.danger_signs()
        self.backed_outcomes()
        self.safety_paths()
        self.urgency_cases()
        self.placeholders()
        self.spoken_labels()
        self.keypad_reach()
        self.advice_goodbyes()
        self.record_prompts()
        self.branch_cases()
        return self.findings

    # -- structure

    def resolve(self, target: str) -> NodeRef | None:
        try:
            flow, node_id = self.flowset.resolve(self.flow, target)
        except KeyError:
            return None
        return (flow.id, node_id) if node_id in flow.nodes else None

    def targets(self) -> None:
        for node in self.flow.nodes.values():
            lines = {c.goto: c.line for c in node.choices} if isinstance(node, Ask) else {}
            for target, _, _ in successors(node):
                if target and self.resolve(target) is None:
                    why = self.unknown_why(target)
                    self.add(
                        lines.get(target, node.line),
                        f"unknown target {target!r} in {node.id!r}{why}",
                    )
            if isinstance(node, Ask) and node.on_closed is not None:
                self.on_closed(node, node.on_closed)

    def unknown_why(self, target: str) -> str:
        """What an admin needs to mend an unknown target: the likely meant name, or why the
        flow it names is not there (its file did not load, or is not a ``.yaml`` file)."""
        if target == MENU_TARGET:
            return f": the routes' default flow {self.flowset.default!r} is missing"
        flow_id = target.removeprefix("@").partition(":")[0]
        if target.startswith("@") and flow_id not in self.flowset.flows:
            folder = self.flow.path.parent
            if (folder / f"{flow_id}.yaml").is_file():
                ids = [f.id for f in self.flowset.flows.values() if f.path.stem == flow_id]
                if ids:
                    return f" ({flow_id}.yaml has the id {ids[0]!r})"
                return f" ({flow_id}.yaml did not load: see its findings)"
            for ext in (".yml", ".json"):
                if (folder / f"{flow_id}{ext}").is_file():
                    return f" (only *.yaml files are read: rename {flow_id}{ext})"
            names = [f"@{f}" for f in self.flowset.flows]
        elif target.startswith("@"):
            names = [f"@{flow_id}:{n}" for n in self.flowset.flows[flow_id].nodes]
        else:
            names = list(self.flow.nodes)
        close = difflib.get_close_matches(target, names, n=1)
        return f" (did you mean {close[0]!r}?)" if close else ""

    def on_closed(self, node: Ask, target: str) -> None:
        """An ask's ``on_closed`` names another question of its own flow: the engine asks it
        in place of ``node`` after a 0 at the closed desk, or in place of asking ``node``
        again while closed (a reprompt, a ``*``); anything else would be no question for the
        caller to answer there, and the engine asks ``node`` again."""
        other = None if target.startswith("@") else self.flow.nodes.get(target)
        if not isinstance(other, Ask) or other is node:
            if target.startswith("@") or other is not None:  # else: an unknown target
                self.add(
                    node.line,
                    f"'on_closed' of {node.id!r} must name a question in its flow, not {target!r}",
                )
        elif self.flow.human is not Human.STAFF:
            self.add(
                node.line,
                f"'on_closed' of {node.id!r} is never taken: the flow's human is "
                f"{self.flow.human.value}, who has no opening hours",
            )

    def edges(self, ref: NodeRef) -> list[NodeRef]:
        flow = self.flowset.get(ref[0])
        out = []
        for target, _, _ in successors(flow.nodes[ref[1]]):
            try:
                other, node_id = self.flowset.resolve(flow, target)
            except KeyError:
                continue
            if node_id in other.nodes:
                out.append((other.id, node_id))
        return out

    def reachable(self) -> None:
        entries = {(self.flow.id, self.flow.start)}
        # Nodes other flows jump into (``@flow:node``) are entries too.
        for other in self.flowset.flows.values():
            for node in other.nodes.values():
                for target, _, _ in successors(node):
                    if target.startswith(f"@{self.flow.id}:"):
                        entries.add((self.flow.id, target.partition(":")[2]))
        seen = set(entries)
        queue = deque(entries)
        while queue:
            ref = queue.popleft()
            for nxt in self.edges(ref):
                if nxt[0] == self.flow.id and nxt not in seen:
                    seen.add(nxt)
                    queue.append(nxt)
        for node_id, node in self.flow.nodes.items():
            if (self.flow.id, node_id) not in seen:
                self.add(node.line, f"unreachable node {node_id!r}")

    def dead_ends(self) -> None:
        for node in self.flow.nodes.values():
            if isinstance(node, Branch) and node.default is None:
                if node.on in {"urgency", HOURS}:
                    names = [u.name for u in Urgency] if node.on == "urgency" else HOURS_CASES
                    missing = [n for n in names if n not in dict(node.cases)]
                    if missing:
                        self.add(
                            node.line,
                            f"dead end: branch {node.id!r} has no case for "
                            f"{', '.join(missing)} and no default",
                        )
                else:
                    self.add(
                        node.line,
                        f"dead end: branch {node.id!r} on {node.on!r} has no default",
                    )

    def endless(self) -> None:
        """Loops that never wait, and nodes from which no answer leads to an end.

        Both are linear in the flow set's nodes and edges, and iterative: a fixpoint over
        every node took a pass per node of a long chain (a 2000-step flow: 10 s; 20000: over
        10 minutes, and ``serve`` runs this check at start), and a recursive walk of a chain
        of steps that never wait ended in a RecursionError past a thousand."""
        flowset = self.flowset
        all_refs = [(f.id, n) for f in flowset.flows.values() for n in f.nodes]
        edges = {ref: self.edges(ref) for ref in all_refs}
        before: dict[NodeRef, list[NodeRef]] = {}
        for ref, outs in edges.items():
            for nxt in outs:
                before.setdefault(nxt, []).append(ref)
        can_end: set[NodeRef] = {
            r for r in all_refs if isinstance(flowset.get(r[0]).nodes[r[1]], Transfer | Hangup)
        }
        queue = deque(can_end)
        while queue:
            for prev in before.get(queue.popleft(), []):
                if prev not in can_end:
                    can_end.add(prev)
                    queue.append(prev)
        for node_id, node in self.flow.nodes.items():
            if (self.flow.id, node_id) not in can_end:
                self.add(node.line, f"path never ends: no hang-up or transfer after {node_id!r}")
        # A cycle of nodes that never wait for the caller spins for ever.
        instant = (SetValues, Assess, Goto, Branch)

        def waits(ref: NodeRef) -> bool:
            return not isinstance(flowset.get(ref[0]).nodes[ref[1]], instant)

        state: dict[NodeRef, int] = {}  # 1: on the current path, 2: done

        def visit(root: NodeRef) -> NodeRef | None:
            state[root] = 1
            stack = [(root, iter(edges[root]))]
            while stack:
                ref, outs = stack[-1]
                for nxt in outs:
                    if waits(nxt):
                        continue
                    if state.get(nxt) == 1:
                        return nxt
                    if nxt not in state:
                        state[nxt] = 1
                        stack.append((nxt, iter(edges[nxt])))
                        break
                else:
                    state[ref] = 2
                    stack.pop()
            return None

        for node_id, node in self.flow.nodes.items():
            ref = (self.flow.id, node_id)
            if isinstance(node, instant) and ref not in state:
                looped = visit(ref)
                if looped is not None and looped[0] == self.flow.id:
                    line = self.flow.nodes[looped[1]].line
                    self.add(line, f"loop without waiting for the caller at {looped[1]!r}")

    # -- safety

    def danger_signs(self) -> None:
        for node in self.flow.nodes.values():
            if isinstance(node, Hangup) and node_outcome(node) in _HUMAN_ACTIONS:
                # The record would say "put through" of a caller who was hung up on.
                self.add(
                    node.line,
                    f"hang-up {node.id!r} with outcome {node.outcome!r}: "
                    "an outcome that promises a human needs a transfer",
                )
            if not isinstance(node, Ask):
                continue
            escalates = any(
                c.effect is not None and c.effect.urgency is not None and c.effect.urgency <= 1
                for c in node.choices
            )
            if escalates and not node.danger_sign:
                # The safety rules (no unclear "no", no type-ahead) apply to danger signs only.
                self.add(
                    node.line,
                    f"ask {node.id!r} has an answer giving U1 or U0: mark it danger_sign: true",
                )
            if not node.danger_sign:
                continue
            if not escalates:
                self.add(node.line, f"danger-sign ask {node.id!r} has no answer giving U1 or U0")
            if node.on_fail is not None:
                start = self.resolve(node.on_fail)
                if start is not None:
                    bad = self.first_hangup(start)
                    if bad is not None:
                        self.add(
                            node.line,
                            f"danger-sign ask {node.id!r}: no input or no match can end "
                            f"without a human (hang-up {bad[1]!r})",
                        )

    def backed_outcomes(self) -> None:
        """A say's ``backs_outcome`` is the outcome of a goodbye that can follow it (past a
        transfer only by its ``on_fail``: a human takes over otherwise): otherwise its
        ``outcome_unheard`` could never stand for anything, and the line would only be said
        twice for nothing."""
        for node in self.flow.nodes.values():
            if not isinstance(node, Say) or not node.backs_outcome:
                continue
            start = (self.flow.id, node.id)
            seen = {start}
            queue = deque([start])
            found = False
            while queue and not found:
                ref = queue.popleft()
                for nxt in self.edges(ref):
                    other = self.flowset.get(nxt[0]).nodes[nxt[1]]
                    if isinstance(other, Hangup) and other.outcome == node.backs_outcome:
                        found = True
                    elif nxt not in seen:
                        # Past a transfer only by its on_fail (its one edge): nobody took the
                        # call, which goes on there with the line still unheard.
                        seen.add(nxt)
                        queue.append(nxt)
            if not found:
                self.add(
                    node.line,
                    f"say {node.id!r} backs_outcome {node.backs_outcome!r}, but no goodbye "
                    "with that outcome can follow it",
                )

    def first_hangup(self, start: NodeRef) -> NodeRef | None:
        seen = {start}
        queue = deque([start])
        while queue:
            ref = queue.popleft()
            node = self.flowset.get(ref[0]).nodes[ref[1]]
            if isinstance(node, Hangup):
                return ref
            if isinstance(node, Transfer):
                continue  # a human takes over here
            for nxt in self.edges(ref):
                if nxt not in seen:
                    seen.add(nxt)
                    queue.append(nxt)
        return None

    def safety_paths(self) -> None:
        """Replay triage effects over every path from the start; check every outcome.

        A path goes on across ``@`` jumps with the state it reached (as the engine's call
        does), so a step of another flow is checked too, as that path reaches it: see
        :meth:`add_in_other_flow` for when that is this flow's finding."""
        parent = self.walk_of(self.flow.id)
        reported: set[NodeRef] = set()
        returns_reported: set[NodeRef] = set()
        for item in parent:  # breadth-first order: the shortest path to each finding
            ref, ab = item
            node = self.flowset.get(ref[0]).nodes[ref[1]]
            own = ref[0] == self.flow.id
            problem = self.outcome_problem(node, ab)
            if problem and ref not in reported:
                if own:
                    reported.add(ref)
                    self.add(node.line, f"{problem} (path: {self.trail(parent, item)})")
                elif self.add_in_other_flow(parent, item, problem):
                    reported.add(ref)
            if ref not in returns_reported and _refused_return(node, ab):
                problem = (
                    f"{node.id!r} goes back to the menu after a danger-sign question or "
                    "a triage answer"
                )
                if own:
                    returns_reported.add(ref)
                    self.add(_menu_line(node), f"{problem} (path: {self.trail(parent, item)})")
                elif self.add_in_other_flow(parent, item, problem):
                    returns_reported.add(ref)

    def urgency_cases(self) -> None:
        """A case of a branch on urgency that no path reaches at its level, whose target no
        other path reaches either: a step the flow counts on (a same-day booking, advice)
        that no caller ever gets to, which the graph alone shows as reachable."""
        met: dict[NodeRef, set[str]] = {}
        walked: set[NodeRef] = set()
        for flow_id in self.flowset.flows:
            for ref, ab in self.walk_of(flow_id):
                walked.add(ref)
                met.setdefault(ref, set()).add(ab.level.name)
        for node in self.flow.nodes.values():
            ref = (self.flow.id, node.id)
            if not isinstance(node, Branch) or node.on != "urgency" or ref not in walked:
                continue
            for level, target in node.cases:
                if level in met[ref] or self.resolve(target) in walked:
                    continue
                levels = ", ".join(sorted(met[ref]))
                self.add(
                    node.line,
                    f"branch {node.id!r}: case {level} is never taken, so {target!r} is never "
                    f"reached (paths come here at {levels} only: no answer before it gives "
                    f"{level})",
                )

    def walk_of(self, flow_id: str) -> _Walk:
        """The walk from ``flow_id``'s start, made once per flow set."""
        if flow_id not in self.walks:
            self.walks[flow_id] = _walk(self.flowset, self.flowset.get(flow_id))
        return self.walks[flow_id]

    def outcome_problem(self, node: Node, ab: _Abstract) -> str:
        if not ab.asked_danger and _grades(node):
            return f"{node.id!r} grades the call before any danger-sign question was asked"
        if self.closed_staff(node, ab):
            # The engine would not ring the empty desk: the caller hears the closed notice
            # instead of what this step's prompt promised.
            return f"{node.id!r} transfers to staff on a path taken while the practice is closed"
        if ab.urgency is None or not isinstance(node, Transfer | Hangup):
            return ""
        action = node_outcome(node)
        if action is not None and not action_allows(action, ab.urgency):
            return f"urgency would go down: outcome {action.value} reached at {ab.urgency.name}"
        if isinstance(node, Hangup) and action is None and ab.urgency <= Urgency.U2:
            return f"call can end without a human at {ab.urgency.name}"
        if isinstance(node, Hangup) and action is None and ab.urgency < Urgency.U5:
            # "Goodbye" to a caller who should see a doctor today: no booking, no advice.
            return (
                f"call can end at {ab.urgency.name} with outcome {node.outcome!r}, "
                "which is no triage action"
            )
        if isinstance(node, Transfer) and action is None and ab.urgency <= Urgency.U1:
            # A U0/U1 caller must hear the emergency advice and reach a clinician.
            return (
                f"call can end at {ab.urgency.name} with outcome {node.outcome!r}: "
                f"expected {TriageAction.CALL_EMERGENCY.value}"
            )
        return ""

    @staticmethod
    def closed_staff(node: Node, ab: _Abstract) -> bool:
        """Whether ``node`` rings the staff desk on a path taken while closed, below U2 (a
        caller at U2 or more is put through open or closed: the safety rules)."""
        urgent = ab.urgency is not None and ab.urgency <= Urgency.U2
        return ab.closed and isinstance(node, Transfer) and node.to == "staff" and not urgent

    def add_in_other_flow(self, parent: _Walk, item: _Item, problem: str) -> bool:
        """Report ``problem`` of a step in another flow, on a path from this flow's start,
        at the line where that path last left this flow, naming the chain of flows; whether
        it was reported.

        It is this flow's finding when the state it left with is the cause: not when the
        flow it went on to reaches that step in that state from its own start (that flow's
        check says it). No path goes past a refused way back to the menu (:func:`_walk`):
        one finding for the cause, not one per step after it."""
        items = self.items(parent, item)
        left = max(i for i, (ref, _) in enumerate(items) if ref[0] == self.flow.id)
        (out_ref, _), entered = items[left], items[left + 1]
        out_node = self.flow.nodes[out_ref[1]]
        if entered in self.walk_of(entered[0][0]):
            return False
        chain = [items[0][0][0]]
        for ref, _ in items[1:]:
            if ref[0] != chain[-1]:
                chain.append(ref[0])
        flow_id, node_id = item[0]
        name = repr(node_id)
        if problem.startswith(f"{name} "):
            text = f"{name} in flow {flow_id!r} {problem.removeprefix(name + ' ')}"
        else:
            text = f"{name} in flow {flow_id!r}: {problem}"
        via = self.trail(parent, item)
        self.add(out_node.line, f"{text} (flows: {' > '.join(chain)}; path: {via})")
        return True

    @staticmethod
    def items(parent: _Walk, item: _Item) -> list[_Item]:
        """The steps of the path to ``item``, from the start."""
        out: list[_Item] = []
        cur: _Item | None = item
        while cur is not None:
            out.append(cur)
            cur = parent[cur]
        return out[::-1]

    @staticmethod
    def refs(parent: _Walk, item: _Item) -> list[NodeRef]:
        """The nodes of the path to ``item``, from the start."""
        return [ref for ref, _ in _Checker.items(parent, item)]

    @classmethod
    def trail(cls, parent: _Walk, item: _Item) -> str:
        """The path's node ids (its last 50); a node of another flow than the one before it
        as ``@flow:node``."""
        refs = cls.refs(parent, item)
        names = [
            ref[1] if i == 0 or ref[0] == refs[i - 1][0] else f"@{ref[0]}:{ref[1]}"
            for i, ref in enumerate(refs)
        ]
        return " > ".join(names[-50:])

    # -- texts

    def placeholders(self) -> None:
        known = set(PARAM_NAMES)
        prefixes: set[str] = set()
        for flow in self.flowset.flows.values():
            for n in flow.nodes.values():
                if isinstance(n, Ask) and n.save:
                    known.add(n.save)
                elif isinstance(n, SetValues):
                    known.update(k for k, _ in n.values)
                elif isinstance(n, Record):
                    known.add(n.save)
                elif isinstance(n, Webhook):
                    prefixes.add(n.save + ".")

        def unknown(name: str) -> bool:
            return name not in known and not any(name.startswith(p) for p in prefixes)

        for node in self.flow.nodes.values():
            texts = node_texts(node)
            if isinstance(node, Webhook):
                texts += [text for _, text in node.extra]
                for name in node.values:
                    # A setting ({clinic_name}) is spoken, not posted: only what the call
                    # collected is. Anything else would be posted empty, every call.
                    if name in PARAM_NAMES or unknown(name):
                        self.add(node.line, f"webhook posts {name!r}, which nothing collects")
            for text in texts:
                for name in placeholders(text):
                    if unknown(name):
                        self.add(node.line, f"unknown placeholder {{{name}}}")
            if isinstance(node, Branch) and node.on not in {"urgency", HOURS}:
                if node.on in PARAM_NAMES:
                    # A setting is spoken ({clinic_name}), never a value of the call: the
                    # engine reads the call's values, so every caller took the default.
                    self.add(
                        node.line,
                        f"branch {node.id!r} on {node.on!r}, a setting, not a value the call "
                        f"collects: every call takes its default ({_readable(known, prefixes)})",
                    )
                elif unknown(node.on):
                    self.add(
                        node.line,
                        f"branch on {node.on!r}, which nothing collects "
                        f"({_readable(known, prefixes)})",
                    )
            for text in _reply_only(node, prefixes):
                self.add(
                    node.line,
                    f"{_kind(node)} {node.id!r} says only {text.strip()!r}, a webhook reply's "
                    "field: a reply without it would be silence; add words of your own "
                    f'("Thank you. {{{_reply_names(text, prefixes)[0]}}}")',
                )

    def spoken_labels(self) -> None:
        """A caller who says what the hint told them to say must get that choice."""
        for node in self.flow.nodes.values():
            if not isinstance(node, Ask) or not hears_speech(node):
                continue  # no "Say ..." hint, and no phrase is heard
            for choice in node.choices:
                if not (choice.label and choice.key):
                    continue  # no "Say ... or press ..." hint for it
                heard = [
                    c for c in node.choices if any(phrase_in(p, choice.label) for p in c.phrases)
                ]
                if choice not in heard:
                    # The hint says "Say {label} or press {key}": a caller who says it must
                    # be understood. Name the phrases the practice manager can pick from.
                    own = ", ".join(choice.phrases) or "it has none"
                    self.add(
                        choice.line,
                        f"label {choice.label!r} is spoken as an answer but none of its "
                        f'phrases matches it: the hint says "Say {choice.label} or press '
                        f'{choice.key}"; add {choice.label!r} to its phrases ({own}), or make'
                        " the label one of them",
                    )
                elif len(heard) > 1:
                    others = ", ".join(repr(c.label or c.value) for c in heard if c is not choice)
                    self.add(
                        choice.line,
                        f"label {choice.label!r} is spoken as an answer but also matches {others}",
                    )
            for choice in node.choices:
                for phrase in choice.phrases:
                    # "test results" said for one choice holds "results" of another: heard
                    # as both, it is asked again every time (the same phrase twice is the
                    # schema's finding).
                    also = [
                        repr(c.label or c.value)
                        for c in node.choices
                        if c is not choice
                        and phrase not in c.phrases
                        and any(phrase_in(p, phrase) for p in c.phrases)
                    ]
                    if also:
                        self.add(
                            choice.line,
                            f"phrase {phrase!r} also matches {', '.join(also)}: a caller who "
                            "says it is never understood",
                        )

    def advice_goodbyes(self) -> None:
        """A goodbye whose outcome is a triage's advice (``same_day``, ``within_24h``,
        ``self_care``) says it in its own words. Else the caller is hung up on with no
        advice, and the record says it was given (the nurse reads "same day" and calls
        nobody back). Not in a say before it: the engine says a goodbye's advice once more
        should it fail, then puts the caller through to the nurse; a say that fails is
        skipped."""
        for node in self.flow.nodes.values():
            if not isinstance(node, Hangup) or any(ch.isalnum() for ch in node.prompt):
                continue
            action = node_outcome(node)
            if action is None or action in _HUMAN_ACTIONS:
                continue  # no advice (a claim of a human is the schema's finding)
            self.add(
                node.line,
                f"hang-up {node.id!r} ends with the advice {action.value!r} but says none: "
                'write the advice in its goodbye (hangup: "You should see a doctor today. '
                '... Goodbye.")',
            )

    def ways_in(self, ref: NodeRef) -> list[Node]:
        """The steps of any flow with an edge to ``ref``."""
        return [
            other.nodes[node_id]
            for other in self.flowset.flows.values()
            for node_id in other.nodes
            if ref in self.edges((other.id, node_id))
        ]

    def keypad_reach(self) -> None:
        """Every choice can be taken on the keypad: a line without a speech model in the
        flow's language (none installed, or ``CLINIC_VOSK_LANGUAGE`` another language) hears
        no word, and the check reads no settings. A choice with phrases and no key is taken
        only by speech, unless a choice of the same question with a key goes the same way."""
        for node in self.flow.nodes.values():
            if not isinstance(node, Ask) or not hears_speech(node):
                continue  # a keypad question's phrase-only choice is the schema's finding
            keyed = {(c.goto, c.value, c.effect) for c in node.choices if c.key}
            for choice in node.choices:
                if choice.key or (choice.goto, choice.value, choice.effect) in keyed:
                    continue
                name = choice.label or choice.value or choice.phrases[0]
                self.add(
                    choice.line,
                    f"choice {name!r} of ask {node.id!r} has phrases and no 'key': a caller "
                    "on a line without speech (no speech model in the flow's language) "
                    "cannot take it; give it a 'key'",
                )

    def record_prompts(self) -> None:
        """A caller about to be recorded is told what to say: by the record's own prompt, or
        by the say that every way into it plays just before ("After the tone, please leave
        your message.", then a record with no prompt: the engine beeps at once). Else the
        caller hears the beep and no word of what to say (a name? the medicines?), nor that
        a recording is under way."""
        for node in self.flow.nodes.values():
            if not isinstance(node, Record) or node.prompt.strip():
                continue
            ref = (self.flow.id, node.id)
            ways_in = self.ways_in(ref)
            if node.id != self.flow.start and not ways_in:
                continue  # unreachable: that finding says so
            if node.id == self.flow.start or not all(isinstance(n, Say) for n in ways_in):
                self.add(
                    node.line,
                    f"record {node.id!r} has no 'prompt': say what to record before the beep"
                    " (in it, or in a say that every way into it passes just before)",
                )

    def branch_cases(self) -> None:
        """A case of a branch on a collected value is a value the call can hold: the engine
        compares the text exactly, so ``Yes:`` for an answer saved as ``yes``, or ``01:``
        (YAML's octal 1, read as ``1``) for one saved as ``01``, was never taken, and its
        callers went to the default in silence. A case ``""`` is a value not collected yet."""
        saved = _saved_values(self.flowset)
        for node in self.flow.nodes.values():
            if not isinstance(node, Branch) or node.on in {"urgency", HOURS}:
                continue
            reply = _from_reply(self.flowset, node.on)
            if node.on not in saved and not reply:
                continue  # nothing collects it: that finding says so
            values, open_ = saved.get(node.on, (frozenset(), True))
            open_ = open_ or reply
            written_as = node.written or tuple((case, node.line) for case, _ in node.cases)
            for (case, _), (written, line) in zip(node.cases, written_as, strict=True):
                if case in values or not case:
                    # "": the engine reads a value not collected yet as "" (Engine._branch),
                    # so that case is taken by every caller who has not answered yet.
                    continue
                misread = f"YAML reads {written} as {case!r}"
                if open_:
                    # An entry, a reply or a text of the call's own may hold anything; but a
                    # key YAML reads as another text is never the text the flow wrote.
                    if written != case:
                        self.add(
                            line,
                            f"case {written!r} of branch {node.id!r}: {misread}: write it in "
                            f'quotes, "{written}"',
                        )
                    continue
                if written != case and written in values:
                    hint = f'{misread}: write it in quotes, "{written}"'
                else:
                    near = sorted(v for v in values if _one_once_read(v, case))
                    hint = misread if written != case else ""
                    if near:
                        said = f"did you mean {near[0]!r}? the engine compares the text exactly"
                        hint = f"{hint}; {said}" if hint else said
                listed = ", ".join(repr(v) for v in sorted(values)[:_LISTED])
                more = f" (and {len(values) - _LISTED} more)" if len(values) > _LISTED else ""
                self.add(
                    line,
                    f"case {written!r} of branch {node.id!r} is never taken: {node.on!r} is only "
                    f"ever {listed}{more}" + (f" ({hint})" if hint else ""),
                )


_LISTED = 6  # values named in a finding, at most


def _readable(known: set[str], prefixes: set[str]) -> str:
    """What a branch can read, for a finding: ``urgency``, ``hours`` and the values that
    the flows' steps save (a webhook's reply as ``<save>.<field>``)."""
    names = sorted(known - PARAM_NAMES) + sorted(p + "<field>" for p in prefixes)
    listed = ", ".join(names[:_LISTED]) + (", ..." if len(names) > _LISTED else "")
    if names:
        return f"a branch reads urgency, hours or a value a step saves: {listed}"
    return "a branch reads urgency, hours or a value a step saves: none is saved"


def _kind(node: Node) -> str:
    return type(node).__name__.lower()


def _reply_names(text: str, prefixes: set[str]) -> list[str]:
    """The webhook reply fields ``text`` names (``booking.message``), sorted."""
    return sorted(n for n in placeholders(text) if any(n.startswith(p) for p in prefixes))


def _reply_only(node: Node, prefixes: set[str]) -> list[str]:
    """The texts of ``node`` the caller hears that hold a webhook reply's field and no word
    besides: the reply may lack it, or hold "" (it is any text), and the caller would hear
    nothing (before a goodbye, or a question's listening) where the flow meant words."""
    if isinstance(node, Say) and node.audio is None:
        texts = [node.text]
    elif isinstance(node, Ask):
        texts = [node.prompt, node.keypad_prompt or ""]
    elif isinstance(node, Transfer | Record | Hangup):
        texts = [node.prompt]
    else:
        return []
    out: list[str] = []
    for text in texts:
        names = placeholders(text)
        if not _reply_names(text, prefixes):
            continue
        # A setting or a collected value has words; a reply's field may be empty.
        words = render(text, {n: "" if n in _reply_names(text, prefixes) else "x" for n in names})
        if not any(ch.isalnum() for ch in words):
            out.append(text)
    return out


def _saved_values(flowset: FlowSet) -> dict[str, tuple[frozenset[str], bool]]:
    """For each value name a step of ``flowset`` saves: the texts it may hold, and whether
    it may hold others too (a keypad entry, a recording's reference, a text with
    placeholders, the engine's own message). A call's values travel across flows."""
    texts: dict[str, set[str]] = {}
    open_: set[str] = {MESSAGE_VALUE}
    for flow in flowset.flows.values():
        for node in flow.nodes.values():
            if isinstance(node, Ask) and node.save:
                texts.setdefault(node.save, set())
                if node.digits is not None:
                    open_.add(node.save)
                else:
                    # The way back to the menu saves nothing (Engine._choose).
                    texts[node.save].update(c.value for c in node.choices if c.goto != MENU_TARGET)
            elif isinstance(node, SetValues):
                for name, text in node.values:
                    texts.setdefault(name, set()).add(text)
                    if placeholders(text):
                        open_.add(name)
            elif isinstance(node, Record):
                texts.setdefault(node.save, set())
                open_.add(node.save)
    return {name: (frozenset(v), name in open_) for name, v in texts.items()}


def _from_reply(flowset: FlowSet, name: str) -> bool:
    """Whether ``name`` is a field of a webhook's reply (``booking.ready``): any text."""
    return any(
        isinstance(n, Webhook) and name.startswith(n.save + ".")
        for f in flowset.flows.values()
        for n in f.nodes.values()
    )


def _one_once_read(value: str, case: str) -> bool:
    """Whether ``value`` and ``case`` differ only as YAML or a person might not see: in
    letter case (``Yes`` and ``yes``), or in leading zeros (``01`` and ``1``)."""
    if value.casefold() == case.casefold():
        return True
    return value.isdigit() and case.isdigit() and int(value) == int(case)


def _moves(node: Node, ab: _Abstract) -> list[tuple[_Abstract, str]]:
    """The states and targets a step at ``node`` in state ``ab`` goes on to."""
    if isinstance(node, Branch) and node.on == "urgency":
        level = ab.level.name
        # The first case of that level, as the engine takes it (a dict kept the last).
        target = next((t for value, t in node.cases if value == level), node.default)
        return [] if target is None else [(ab, target)]
    if isinstance(node, Branch) and node.on == HOURS:
        # Both: a call may come at any hour.
        cases = dict(node.cases)
        return [
            (replace(ab, closed=value == "closed"), target)
            for value in HOURS_CASES
            if (target := cases.get(value, node.default)) is not None
        ]
    if isinstance(node, Ask) and node.danger_sign:
        ab = replace(ab, asked_danger=True)
    out = [
        (ab.apply(effect), target) for target, effect, kind in successors(node) if kind != ON_CLOSED
    ]
    if isinstance(node, Ask) and node.on_closed is not None:
        # Taken only while the desk is closed (a 0, a reprompt, a *): the question after it is
        # asked closed.
        out.append((replace(ab, closed=True), node.on_closed))
    if isinstance(node, Ask) and node.danger_sign:
        unclear = ab.unclear()
        out += [(unclear.apply(c.effect), c.goto) for c in node.choices]
        if node.on_fail is not None:
            out.append((unclear, node.on_fail))
    elif isinstance(node, Ask) and urgent_question(node) and node.on_fail is not None:
        # An urgent question given up unanswered goes on at U2 at least, as in the engine.
        out.append((ab.unclear(), node.on_fail))
    return out


def _walk(flowset: FlowSet, flow: Flow) -> _Walk:
    """Every (node, state) a path from ``flow``'s start reaches, across ``@`` jumps, with the
    step before it. Breadth first, one visit per (node, state): bounded by nodes x states,
    however many paths lead there (flows that jump to one another do not multiply).

    A refused way back to the menu is not followed: the step that offers it is the finding,
    and what the path would meet past it (the menu and every sub-flow again, in that state)
    is no fault of its own. Followed, one refused return was reported again in each flow the
    menu leads to, and as each of their goodbyes ending the call without a human."""
    if flow.start not in flow.nodes:
        return {}
    start: _Item = ((flow.id, flow.start), _Abstract(None, frozenset()))
    parent: _Walk = {start: None}
    queue = deque([start])
    while queue:
        item = queue.popleft()
        here = flowset.get(item[0][0])
        for ab, target in _moves(here.nodes[item[0][1]], item[1]):
            if _refused(ab, target):
                continue  # its own finding, at the step that offers it
            try:
                other, node_id = flowset.resolve(here, target)
            except KeyError:
                continue  # an unknown target: its own finding
            key = ((other.id, node_id), ab)
            if node_id in other.nodes and key not in parent:
                parent[key] = item
                queue.append(key)
    return parent


def _refused_return(node: Node, ab: _Abstract) -> bool:
    """Whether ``node`` in state ``ab`` can go back to the menu after a danger-sign question
    or an answer the triage weighed."""
    if all(target != MENU_TARGET for target, _, _ in successors(node)):
        return False  # most steps: no need to replay their moves
    return any(_refused(nxt, target) for nxt, target in _moves(node, ab))


def _refused(nxt: _Abstract, target: str) -> bool:
    """Whether a move to ``target`` in state ``nxt`` is a way back to the menu that the
    safety rules refuse: after a danger-sign question or an answer the triage weighed."""
    return target == MENU_TARGET and (nxt.asked_danger or nxt.urgency is not None)


def _menu_line(node: Node) -> int:
    """The line of the way back to the menu in ``node``: its choice's, else the node's."""
    if isinstance(node, Ask):
        for choice in node.choices:
            if choice.goto == MENU_TARGET:
                return choice.line
    return node.line


DESCRIPTION = (
    "Check IVR flows before a caller meets them: schema, targets, reachability, endless "
    "paths, the triage safety rules and spoken hints. Prints file:line: message per finding. "
    "Exit 0: no finding; 1: findings (serve refuses to start with them); 2: nothing was "
    "checked (a path that is not there, a folder without flows)."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The checker's arguments: on its own parser and on ``clinic-voice flow check``'s."""
    parser.add_argument(
        "paths",
        nargs="*",
        type=Path,
        metavar="FILE_OR_DIR",
        help="flow files or folders of flows (default: CLINIC_FLOWS_DIR, as serve reads it: "
        "ivr_flows when unset)",
    )


def main(argv: Sequence[str] | None = None) -> int:
    """``clinic-voice flow check [FILE_OR_DIR ...]``: print findings; 0 when clean, 1 with
    findings, 2 when there is nothing to check (a path that is not there, no flows)."""
    parser = argparse.ArgumentParser(prog="clinic-voice flow check", description=DESCRIPTION)
    add_arguments(parser)
    try:
        args = parser.parse_args(list(argv) if argv is not None else None)
    except SystemExit as exc:
        return int(exc.code or 0) and 2
    return run(args)


def run(args: argparse.Namespace) -> int:
    """Check the parsed :func:`add_arguments` (exit codes as :func:`main`)."""
    given: list[Path] = args.paths
    problems: list[str] = []
    if given:
        paths = given
        for p in paths:
            if not p.exists():
                problems.append(f"{p}: no such file or directory")
            elif p.is_dir() and (problem := flows_folder_problem(p)):
                problems.append(f"{p}: {problem}")
    else:
        try:
            folder = flows_dir_from_env()
        except SettingsError as exc:
            print(f"clinic-voice flow check: configuration error: {exc}", file=sys.stderr)
            return 2
        paths = [folder]
        problem = flows_folder_problem(folder)
        if problem:
            # Named, with the folder it means here: run outside the repository, the default
            # (relative) folder is not the one meant.
            problems.append(
                f"CLINIC_FLOWS_DIR={str(folder)!r} ({folder.absolute()}): {problem}; "
                "set CLINIC_FLOWS_DIR or name flow files or folders"
            )
    if problems:
        # Exit 2 as for bad usage, not 1 as for findings: nothing was checked (an empty
        # folder used to print "ok" and exit 0).
        for problem in problems:
            print(f"clinic-voice flow check: {problem}", file=sys.stderr)
        return 2
    findings = check_files(paths)
    for finding in findings:
        print(finding)
    if not findings:
        print(f"ok: {', '.join(str(p) for p in paths)}", file=sys.stderr)
    return 1 if findings else 0


if __name__ == "__main__":
    raise SystemExit(main())
