"""README.md and docs/ stay true: their marked command examples run as shown, the `wan-batch` options they use
exist, and every relative link points at a file (and heading) that exists.

A fenced block preceded by a `<!-- runs-in-tests -->` line is run here: each `$ ` line is a command (run in a
scratch copy of the repository's configs/ and manifests/, so files it writes stay out of the checkout), the
lines after it are the output it must print, in that order (a shown line containing `...` is elided text and
is not compared). Mark only examples that run on a CPU in seconds; the demo has a slow test of its own below.
"""
from __future__ import annotations

import contextlib
import io
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO

MARK = "<!-- runs-in-tests -->"
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


def _rel(path: Path) -> str:
    return str(path.relative_to(REPO))


def _outside_fences(text: str):
    """(line number, line) of the Markdown text that is not inside a fenced code block."""
    fenced = False
    for n, line in enumerate(text.splitlines(), 1):
        if line.lstrip().startswith("```"):
            fenced = not fenced
            continue
        if not fenced:
            yield n, line


def _fenced_blocks(text: str):
    """(line number of the opening fence, the line before it, the block's lines) of every fenced block."""
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        if lines[i].lstrip().startswith("```"):
            start, body = i, []
            i += 1
            while i < len(lines) and not lines[i].lstrip().startswith("```"):
                body.append(lines[i])
                i += 1
            before = next((lines[j] for j in range(start - 1, -1, -1) if lines[j].strip()), "")
            yield start + 1, before.strip(), body
        i += 1


def marked_examples() -> list:
    """One pytest param per marked block: [(command, [shown output lines]), ...]."""
    params = []
    for doc in DOCS:
        for lineno, before, body in _fenced_blocks(doc.read_text(encoding="utf-8")):
            if before != MARK:
                continue
            steps: list[tuple[str, list[str]]] = []
            for line in body:
                if line.startswith("$ "):
                    steps.append((line[2:].strip(), []))
                elif steps and line.strip():
                    steps[-1][1].append(line.rstrip())
            assert steps, f"{_rel(doc)}:{lineno}: a block marked {MARK} has no '$ ' command line"
            params.append(pytest.param(steps, id=f"{_rel(doc)}:{lineno}"))
    return params


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    """What the examples' relative paths expect to find in the current folder, outside the checkout."""
    root = tmp_path_factory.mktemp("docs-examples")
    for folder in ("configs", "manifests"):
        shutil.copytree(REPO / folder, root / folder)
    return root


def _run(command: str, cwd: Path) -> tuple[int, str]:
    """Run one documented command line; (exit code, stdout). `wan-batch` runs in this process (the console
    script is `pipeline.cli:main`: the same function, without paying the imports again on a busy CPU), and so
    does `python -c CODE`; any other `python` command runs this session's interpreter with the checkout on its
    path."""
    argv = shlex.split(command)
    if argv[0] == "wan-batch" or (argv[0] in ("python", "python3") and argv[1:2] == ["-c"] and len(argv) == 3):
        def call() -> int:
            if argv[0] != "wan-batch":
                exec(compile(argv[2], "<-c>", "exec"), {"__name__": "__main__"})
                return 0
            from pipeline.cli import main

            return main(argv[1:])

        out = io.StringIO()
        old = Path.cwd()
        os.chdir(cwd)
        try:
            with contextlib.redirect_stdout(out):
                try:
                    code = call()
                except SystemExit as e:  # argparse's --help and usage errors
                    code = e.code if isinstance(e.code, int) else 1
        finally:
            os.chdir(old)
        return code, out.getvalue()
    if argv[0] in ("python", "python3"):
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
        proc = subprocess.run([sys.executable, *argv[1:]], cwd=cwd, env=env, capture_output=True, text=True,
                              timeout=300)
        return proc.returncode, proc.stdout + (f"\n[stderr]\n{proc.stderr[-3000:]}" if proc.returncode else "")
    raise AssertionError(f"a runs-in-tests example may only run `wan-batch` or `python`, not {argv[0]!r}")


def _missing_in_order(shown: list[str], actual: str) -> list[str]:
    """The shown lines that are not found, in order, among the actual output's lines."""
    lines = [line.rstrip() for line in actual.splitlines()]
    missing, pos = [], 0
    for want in shown:
        if "..." in want:
            continue
        try:
            pos = lines.index(want, pos) + 1
        except ValueError:
            missing.append(want)
    return missing


@pytest.mark.parametrize("steps", marked_examples())
def test_marked_example_runs_as_shown(steps, workspace):
    for command, shown in steps:
        code, out = _run(command, workspace)
        assert code == 0, f"`{command}` exited {code}:\n{out[-3000:]}"
        missing = _missing_in_order(shown, out)
        assert not missing, f"`{command}` did not print (in this order):\n" + "\n".join(missing) + \
            f"\n--- it printed:\n{out[-3000:]}"


def test_the_docs_mark_the_cpu_examples():
    """The examples this file promises to run are marked (a lost marker would silently test nothing)."""
    commands = [c for p in marked_examples() for c, _ in p.values[0]]
    for expected in ("wan-batch validate --manifest manifests/demo.parquet",
                     "wan-batch check-config configs/wan_moe_i2v_gguf_q4_k_m_distill_lora.json",
                     "wan-batch download wan2.2-i2v --dit gguf-Q4_K_M --lora distill --dry-run"):
        assert expected in commands, f"no runs-in-tests block runs `{expected}` (marked: {commands})"


def _subparsers():
    from pipeline.cli import build_parser

    action = next(a for a in build_parser()._subparsers._group_actions if a.choices)
    return action.choices


def _documented_command_lines():
    """(doc, line number, command line) of every `wan-batch ...` line in a fenced block (continuations joined)."""
    for doc in DOCS:
        for lineno, _, body in _fenced_blocks(doc.read_text(encoding="utf-8")):
            joined, first = "", 0
            prompted = any(line.startswith("$ ") for line in body)  # then the other lines are output
            for k, line in enumerate(body):
                if prompted and not joined and not line.startswith("$ "):
                    continue
                text = line[2:] if line.startswith("$ ") else line
                joined, first = (joined + " " + text, first) if joined else (text, lineno + 1 + k)
                if joined.rstrip().endswith("\\"):
                    joined = joined.rstrip()[:-1]
                    continue
                command = re.sub(r"^\s*(\w+=\S+\s+)*", "", joined)  # VAR=value prefixes
                if command.startswith("wan-batch "):
                    yield doc, first, command.split("#")[0].split("|")[0].split(">")[0]
                joined = ""


def test_documented_wan_batch_commands_and_options_exist():
    """Every `wan-batch <command> --option` written in README or docs is one the CLI accepts."""
    subs = _subparsers()
    problems, seen = [], 0
    for doc, lineno, line in _documented_command_lines():
        words = line.split()
        if len(words) < 2 or words[1].startswith("-"):
            continue  # `wan-batch --help`
        seen += 1
        sub = subs.get(words[1])
        if sub is None:
            problems.append(f"{_rel(doc)}:{lineno}: no command `wan-batch {words[1]}`")
            continue
        known = {s for a in sub._actions for s in a.option_strings}
        for option in re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", line):
            if option not in known:
                problems.append(f"{_rel(doc)}:{lineno}: `wan-batch {words[1]}` has no option {option}")
    assert seen > 20, f"only {seen} wan-batch command lines found: the parser of this test is broken"
    assert not problems, "\n".join(problems)


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    anchors, counts = set(), {}
    for _, line in _outside_fences(path.read_text(encoding="utf-8")):
        m = re.match(r"#{1,6}\s+(.*)", line)
        if m:
            slug = _slug(m.group(1))
            n = counts.get(slug, 0)
            anchors.add(slug if n == 0 else f"{slug}-{n}")
            counts[slug] = n + 1
    return anchors


def test_relative_links_point_at_files_and_headings_that_exist():
    problems, checked = [], 0
    for doc in DOCS:
        for lineno, line in _outside_fences(doc.read_text(encoding="utf-8")):
            for target in re.findall(r"\]\(([^)\s]+)\)", line):
                if re.match(r"[a-z]+:", target):
                    continue  # http(s), mailto
                checked += 1
                path, _, anchor = target.partition("#")
                dest = (doc.parent / path).resolve() if path else doc
                if not dest.exists():
                    problems.append(f"{_rel(doc)}:{lineno}: link to {target}: no file {dest}")
                elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
                    problems.append(f"{_rel(doc)}:{lineno}: link to {target}: no heading #{anchor} in "
                                    f"{_rel(dest)}")
    assert checked > 20, f"only {checked} relative links found: the parser of this test is broken"
    assert not problems, "\n".join(problems)


def test_readme_links_every_docs_page_and_each_page_says_what_it_is_for():
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    for page in sorted((REPO / "docs").glob("*.md")):
        assert f"](docs/{page.name})" in readme, f"README.md does not link docs/{page.name}"
        body = page.read_text(encoding="utf-8").split("\n\n")
        assert body[0].startswith("# ") and body[1].startswith("What it is for:"), \
            f"docs/{page.name} must start with its title and a paragraph 'What it is for: ...'"


@pytest.mark.slow
def test_readme_demo_command_writes_five_videos(tmp_path):
    """README's quick-start demo, exactly as written there, in a copy of manifests/."""
    import pyarrow.parquet as pq

    from pipeline.inspect import read_video

    command = "luigi --module pipeline RunManifest --manifest manifests/demo.parquet"
    assert command in (REPO / "README.md").read_text(encoding="utf-8")
    shutil.copytree(REPO / "manifests", tmp_path / "manifests")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-m", *shlex.split(command)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    rows = pq.read_table(tmp_path / "outputs" / "results.parquet").to_pylist()
    assert [r["status"] for r in rows] == ["ok"] * 5, rows
    for r in rows:
        frames = read_video(tmp_path / "outputs" / f"{r['job_id']}.mp4")
        assert frames.shape == (17, 64, 64, 3), (r["job_id"], frames.shape)


def test_readme_first_batch_manifest_validates(workspace):
    """README's first-batch Python writes a manifest that `wan-batch validate` (the README's next command) passes."""
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    section = readme.split("## A first batch", 1)[1]
    code = section.split("```python\n", 1)[1].split("```", 1)[0]
    old = Path.cwd()
    os.chdir(workspace)
    try:
        exec(compile(code, "README.md: A first batch", "exec"), {})
    finally:
        os.chdir(old)
    assert "wan-batch validate --manifest jobs.parquet" in section
    code, out = _run("wan-batch validate --manifest jobs.parquet", workspace)
    assert code == 0 and "2 rows, 2 runnable, 0 with problems" in out, out
