"""The README stays short, the documentation names no path of one machine, and every `koala-trt`
command the README shows exists and parses with the options it is given."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import click
import pytest

from koala_trt.cli import COMMANDS, cli

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
DOCS = [README, REPO / "BENCHMARKS.md", *sorted((REPO / "docs").glob("*.md"))]

# An absolute path into this machine's temporary, work or home folders: `/tmp/...`, `/work/...`,
# `/root/...` at the start of a word (so `out/tmp` or `a/work` do not count).
MACHINE_PATH = re.compile(r"(?<![\w./~$-])/(?:tmp|work|root)(?:/|\b)")


def test_readme_is_short() -> None:
    size = len(README.read_bytes())
    assert size < 15 * 1024, f"README.md is {size} bytes; keep it under 15 KB and move reference text to docs/"


def test_machine_path_pattern() -> None:
    assert MACHINE_PATH.search("koala-trt export --out /tmp/x")
    assert MACHINE_PATH.search("PY=/work/main/.venv/bin/python")
    assert MACHINE_PATH.search("cd /root")
    assert not MACHINE_PATH.search("koala-trt export --out out/tmp/x")
    assert not MACHINE_PATH.search("grep model /proc/cpuinfo; /usr/bin/time -v; /opt/koala")


def lines_matching(path: Path, pattern: re.Pattern[str]) -> list[str]:
    """`file:line: text` of each line of `path` that `pattern` finds something in."""
    return [f"{path.name}:{i}: {line.strip()}" for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
            if pattern.search(line)]


@pytest.mark.parametrize("path", DOCS, ids=lambda p: str(p.relative_to(REPO)))
def test_no_machine_specific_paths(path: Path) -> None:
    bad = lines_matching(path, MACHINE_PATH)
    assert not bad, "machine-specific paths (use paths relative to the repository root):\n" + "\n".join(bad)


def readme_commands() -> list[str]:
    """Every inline `koala-trt ...` command of the README (code spans), as written."""
    return re.findall(r"`(koala-trt [^`]+)`", README.read_text(encoding="utf-8"))


def test_readme_names_only_real_commands() -> None:
    text = README.read_text(encoding="utf-8")
    named = set(re.findall(r"koala-trt ([a-z][a-z0-9-]*)", text))  # `koala-trt COMMAND`, `--debug`: not matched
    unknown = sorted(n for n in named if n not in COMMANDS)
    assert not unknown, f"README names commands koala-trt does not have: {unknown}"
    # Every command of the CLI appears in the README's tour.
    shown = {shlex.split(c)[1] for c in readme_commands()}
    assert sorted(set(COMMANDS) - shown) == []


@pytest.mark.parametrize("command", readme_commands())
def test_readme_command_parses(command: str) -> None:
    """Each example parses as the CLI would parse it (options exist, values have the right type),
    without running anything."""
    args = shlex.split(command)[1:]
    while args and args[0] == "--debug":  # `koala-trt --debug COMMAND ...`
        args = args[1:]
    if not args or args[0] in ("--help", "COMMAND"):  # the group's own help; the placeholder
        return
    ctx = cli.make_context("koala-trt", list(args), resilient_parsing=True)
    cmd: click.Command | None = cli.get_command(ctx, args[0])
    assert cmd is not None, f"unknown command in README: {command}"
    rest = args[1:]
    with cmd.make_context(args[0], list(rest)) as sub:
        if isinstance(cmd, click.Group):
            name = sub.protected_args[0] if sub.protected_args else sub.args[0]
            leaf = cmd.get_command(sub, name)
            assert leaf is not None, f"unknown subcommand in README: {command}"
            leaf.make_context(name, list(rest[1:]))


# A reference to the project's own tracker ("issue 17", "the target"): meaningless to a reader
# of the product. A library's "known issue" is a different thing and stays.
TRACKER_REFERENCE = re.compile(r"(?i)(?<!known )(?<!wrong-results )(?<!the )\bissues? ?#?\d+|\bthe issue\b|\bissue's\b")


def test_tracker_reference_pattern() -> None:
    assert TRACKER_REFERENCE.search("met issue 17's target") and TRACKER_REFERENCE.search("the issue asks for 40 dB")
    assert TRACKER_REFERENCE.search("(issue #7)") and TRACKER_REFERENCE.search("the issue's hand figures")
    assert not TRACKER_REFERENCE.search("TensorRT 11.3 documents a known issue with refit")
    assert not TRACKER_REFERENCE.search("its known wrong-results issue")


@pytest.mark.parametrize("path", DOCS, ids=lambda p: str(p.relative_to(REPO)))
def test_docs_speak_of_the_product(path: Path) -> None:
    bad = lines_matching(path, TRACKER_REFERENCE)
    assert not bad, "references to the project's tracker (say what the figure or rule is instead):\n" + "\n".join(bad)


def test_benchmarks_page_is_current_and_short() -> None:
    """BENCHMARKS.md is the current page (under 20 KB, its charts beside it in docs/, the `make bench`
    block scripts/bench.py rewrites); every older run is in docs/bench-history.md."""
    page = (REPO / "BENCHMARKS.md").read_text(encoding="utf-8")
    assert len(page.encode()) < 20 * 1024
    charts = re.findall(r"!\[[^\]]*\]\((docs/[^)]+\.png)\)", page)
    assert charts and all((REPO / c).is_file() and (REPO / c).stat().st_size < 200 * 1024 for c in charts)
    assert page.count("<!-- make bench: begin -->") == 1 and page.count("<!-- make bench: end -->") == 1
    assert (REPO / "docs" / "bench-history.md").is_file()
    readme = README.read_text(encoding="utf-8")
    for figure in re.findall(r"\b\d+\.\d+x\b", readme.split("Figures in [BENCHMARKS.md]")[1].split("##")[0]):
        assert figure in page, f"README's {figure} is not on BENCHMARKS.md"
