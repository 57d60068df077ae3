"""The README and the guide (docs/*.md) run as written, on the bundled tiny model.

The convention, for whoever writes a page:

- A page is a session: its runnable shell blocks and its python blocks run in the order they
  appear, one after another, in one fresh temporary directory, as a reader types them (a later
  block may read what an earlier one wrote). That directory holds a copy of the repository's
  ``reference/`` and ``scripts/``, so ``reference/baselines/...`` reads a copy and nothing committed
  is ever rewritten; ``xbackend`` is a shell function for ``sys.executable -m xbackend``,
  ``python``/``python3`` the current interpreter, this tree first on ``PYTHONPATH``.
- Every shell block (a fence with info string ``bash``, ``sh`` or ``shell``) has an HTML comment on
  the line right before its fence; an unmarked one fails this test:

  - ``<!-- runnable: exit=1 files=runs/demo/report.json prints="SAMPLER_DIVERGENCE" -->``: run
    under ``bash -e -o pipefail``. ``exit=N`` is the status the block ends with (default 0),
    ``files=A,B`` paths that exist afterwards (relative to the page's directory), ``prints=TEXT``
    (repeatable, shell quoting) text its output (stdout and stderr) contains. ``slow`` marks a
    block that takes more than a few seconds: its page's test carries ``@pytest.mark.slow``.
  - ``<!-- not-runnable: WHY -->``: never run (installs, a Mac, a GPU, a download, a Rust app's
    logs); WHY is said on the page.
- Every ``python`` block executes as a script and must exit 0. One preceded by
  ``<!-- file: NAME.py -->`` is also saved as NAME.py before the page's first block runs (a plugin
  the page's commands load with ``--plugin NAME.py``).
- A ``json`` block preceded by ``<!-- include: figures/NAME.json -->`` quotes a figures file a
  benchmark script wrote (``xbackend.testing.figures``): it must equal the file, and every file
  under ``docs/figures/`` must be quoted and say its command, date and machine.
- The README's first block is the two commands: line 1 ends in an ``xbackend`` command that a
  runnable block of the README runs as written, line 2 is exactly what ``.ci/run`` runs, and the
  README's command table names exactly the CLI's commands.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from .helpers import ROOT

PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```([\w-]*)[^\n]*\n(.*?)^```\s*$", re.M | re.S)
MARK = re.compile(r"<!--\s*(runnable|not-runnable|file|include)\s*:?(.*?)-->\s*$", re.S)
SHELL = {"bash", "sh", "shell"}
SHELL_PRELUDE = f"""xbackend() {{ {shlex.quote(sys.executable)} -m xbackend "$@"; }}
python() {{ {shlex.quote(sys.executable)} "$@"; }}
python3() {{ {shlex.quote(sys.executable)} "$@"; }}
"""


@dataclass(frozen=True)
class Block:
    page: Path
    line: int
    lang: str
    code: str
    mark: str | None          # runnable, not-runnable, file, or None
    args: str

    @property
    def name(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"


@dataclass
class Expect:
    exit: int = 0
    files: list[str] = field(default_factory=list)
    prints: list[str] = field(default_factory=list)
    slow: bool = False


def blocks(page: Path) -> list[Block]:
    text = page.read_text()
    found = []
    for m in FENCE.finditer(text):
        before = text[:m.start()].rstrip("\n").rsplit("\n", 1)[-1]
        mark = MARK.search(before) if before.lstrip().startswith("<!--") else None
        found.append(Block(page, text.count("\n", 0, m.start()) + 1, m.group(1), m.group(2),
                           mark.group(1) if mark else None, mark.group(2).strip() if mark else ""))
    return found


ALL = [b for page in PAGES for b in blocks(page)]
RUNNABLE = [b for b in ALL if b.lang in SHELL and b.mark == "runnable"]
PYTHON = [b for b in ALL if b.lang == "python"]


def expect(block: Block) -> Expect:
    out = Expect()
    for word in shlex.split(block.args):
        key, _, value = word.partition("=")
        if key == "slow" and not value:
            out.slow = True
        elif key == "exit":
            out.exit = int(value)
        elif key == "files":
            out.files += value.split(",")
        elif key == "prints":
            out.prints.append(value)
        else:
            raise AssertionError(f"{block.name}: unknown runnable key {word!r}")
    return out


def page_params() -> list:
    out = []
    for page in PAGES:
        steps = [b for b in blocks(page) if b.lang == "python" or (b.lang in SHELL and b.mark == "runnable")]
        if steps:
            slow = any(b.lang in SHELL and expect(b).slow for b in steps)
            out.append(pytest.param(page, steps, id=str(page.relative_to(ROOT)), marks=[pytest.mark.slow] if slow else []))
    return out


def workdir(tmp: Path, page: Path) -> Path:
    for name in ("reference", "scripts"):
        shutil.copytree(ROOT / name, tmp / name, symlinks=True)
    for b in blocks(page):
        if b.lang == "python" and b.mark == "file":
            (tmp / b.args).write_text(b.code)
    return tmp


def env() -> dict:
    e = dict(os.environ)
    e["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [e.get("PYTHONPATH")])])
    e.pop("XBACKEND_CAPTURE_PATH", None)
    return e


def run(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=cwd, env=env(), capture_output=True, text=True, timeout=900)


def test_the_pages_exist_and_have_blocks():
    names = {p.name for p in PAGES}
    assert {"README.md", "getting-started.md", "compare-and-verdicts.md", "design.md"} <= names
    assert len(RUNNABLE) >= 10 and len(PYTHON) >= 3


@pytest.mark.parametrize("block", [b for b in ALL if b.lang in SHELL], ids=lambda b: b.name)
def test_every_shell_block_is_marked(block: Block):
    assert block.mark in ("runnable", "not-runnable"), (
        f"{block.name}: a shell block needs <!-- runnable: ... --> or <!-- not-runnable: why --> on the line before it")
    if block.mark == "not-runnable":
        assert block.args, f"{block.name}: say why the block is not runnable"
    else:
        expect(block)  # its keys parse


def check_shell(block: Block, cwd: Path) -> None:
    want = expect(block)
    done = run(["bash", "-e", "-o", "pipefail", "-c", SHELL_PRELUDE + block.code], cwd)
    output = done.stdout + done.stderr
    assert done.returncode == want.exit, f"{block.name}: exit {done.returncode}, the page says {want.exit}\n{output[-3000:]}"
    for path in want.files:
        assert (cwd / path).exists(), f"{block.name}: {path} was not written\n{output[-2000:]}"
    for text in want.prints:
        assert text in output, f"{block.name}: output lacks {text!r}\n{output[-3000:]}"


def check_python(block: Block, cwd: Path) -> None:
    script = cwd / f"block-{block.line}.py"
    script.write_text(block.code)
    done = run([sys.executable, script.name], cwd)
    assert done.returncode == 0, f"{block.name}:\n{done.stdout[-2000:]}{done.stderr[-3000:]}"


@pytest.mark.parametrize("page,steps", page_params())
def test_page_does_what_it_says(page: Path, steps: list[Block], tmp_path: Path):
    cwd = workdir(tmp_path, page)
    for block in steps:
        (check_python if block.lang == "python" else check_shell)(block, cwd)


def first_block() -> list[str]:
    readme = blocks(ROOT / "README.md")
    assert readme and readme[0].lang in SHELL, "README.md starts with its two commands"
    return readme[0].code.strip().splitlines()


def test_readme_line_two_is_what_ci_runs():
    ci = [line for line in (ROOT / ".ci" / "run").read_text().splitlines() if line.strip() and not line.startswith(("#", "set ", "cd "))]
    lines = first_block()
    assert len(lines) == 2
    assert lines[1] == ci[-1]


def test_readme_line_one_is_exercised():
    setup, sep, command = first_block()[0].partition(".venv/bin/xbackend ")
    assert sep and setup.startswith("python3 -m venv .venv && .venv/bin/pip install -e '.[all]'")
    ran = [line.strip() for b in RUNNABLE if b.page.name == "README.md" for line in b.code.splitlines()]
    assert "xbackend " + command in ran


def test_readme_is_a_front_page():
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= 200
    for page in PAGES[1:]:
        assert f"docs/{page.name}" in text, f"README.md does not link docs/{page.name}"


def test_links_between_pages_resolve():
    for page in PAGES:
        prose = FENCE.sub("", page.read_text())  # a quoted report.md links its own plots/
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", prose):
            if "://" in target:
                continue
            assert (page.parent / target).exists(), f"{page.name} links {target}, which does not exist"


def test_readme_command_table_is_the_cli():
    import typer

    from xbackend.cli import app

    commands = set(typer.main.get_command(app).commands)
    text = (ROOT / "README.md").read_text()
    table = set(re.findall(r"^\| `xbackend ([a-z]+)[^`]*` \|", text, re.M))
    assert table == commands, f"README command table {sorted(table)} against the CLI's {sorted(commands)}"


def test_figures_are_quoted_as_their_files_say():
    includes = [b for b in ALL if b.mark == "include"]
    quoted = set()
    for b in includes:
        assert b.lang == "json", f"{b.name}: an include is a json block"
        path = (b.page.parent / b.args).resolve()
        doc = json.loads(path.read_text())
        assert json.loads(b.code) == doc, f"{b.name}: the quote differs from {b.args}; paste the file again"
        quoted.add(path)
    files = set((ROOT / "docs" / "figures").glob("*.json"))
    assert files and files <= quoted, f"figures files no page quotes: {sorted(p.name for p in files - quoted)}"
    for path in files:
        doc = json.loads(path.read_text())
        assert doc["command"].startswith("python scripts/") and doc["date"] and doc["machine"]["cpu"], path.name
        script = ROOT / doc["command"].split()[1]
        assert script.is_file() and "write_figures" in script.read_text(), f"{path.name}: {script.name} does not write it"
