"""Every page of docs/tutorials runs as shown (tools/tutorials.py), and the runner catches a page
whose shown output is wrong.

Each page runs in its own interpreter (no state leaks between pages); the selected pages are
started two at a time as soon as the first of them is reached, so the set takes about half its
CPU time on the two cores CI has.
"""

from __future__ import annotations

import importlib.util
import sys
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("tutorials_runner", ROOT / "tools" / "tutorials.py")
assert _spec is not None and _spec.loader is not None
runner = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = runner  # dataclasses look their module up by name
_spec.loader.exec_module(runner)

PAGES = runner.pages()
_started: dict[Path, Future] = {}
_pool = ThreadPoolExecutor(max_workers=2)


@pytest.fixture
def page_outcome(request: pytest.FixtureRequest):
    """The outcome of the requested page, with every selected page already started."""
    if not _started:
        selected = [
            item.callspec.params["page"]
            for item in request.session.items
            if getattr(item, "originalname", "") == "test_tutorial_page" and hasattr(item, "callspec")
        ]
        for page in selected:
            if not runner.missing(page):
                _started[page] = _pool.submit(runner.run_isolated, page)
    page = request.node.callspec.params["page"]
    if page not in _started:
        _started[page] = _pool.submit(runner.run_isolated, page)
    return _started[page]


def test_there_are_pages():
    assert len(PAGES) >= 8, [p.name for p in PAGES]


@pytest.mark.parametrize("page", PAGES, ids=[p.stem for p in PAGES])
def test_tutorial_page(page: Path, page_outcome):
    if gone := runner.missing(page):
        pytest.skip(f"{page.name} needs {', '.join(gone)}")
    outcome = page_outcome.result()
    assert outcome.passed, outcome.report


# The runner itself, on pages written here (no torch: these take milliseconds).


def _page(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "page.md"
    p.write_text(text)
    return p


PYTHON_PAGE = """# A page

```python
x = 6 * 7
print("answer", x)
print("id 1234-abcd")
```

```text
answer 42
id ...
```
"""


def test_a_correct_page_passes(tmp_path):
    runner.run_page(_page(tmp_path, PYTHON_PAGE))


def test_wrong_python_output_fails_with_page_line_expected_and_got(tmp_path):
    page = _page(tmp_path, PYTHON_PAGE.replace("answer 42", "answer 43"))
    with pytest.raises(runner.PageError) as e:
        runner.run_page(page)
    msg = str(e.value)
    assert "page.md:9:" in msg  # the line of the text block that is wrong
    assert "expected 'answer 43', got 'answer 42'" in msg


def test_missing_and_extra_lines_fail(tmp_path):
    with pytest.raises(runner.PageError, match="end of output"):
        runner.run_page(_page(tmp_path, PYTHON_PAGE.replace("id ...\n", "id ...\nmore\n")))
    with pytest.raises(runner.PageError, match="end of expected output"):
        runner.run_page(_page(tmp_path, PYTHON_PAGE.replace("id ...\n", "")))


def test_state_is_shared_within_a_page_and_the_folder_is_fresh(tmp_path):
    text = (
        "```python\nimport os\nn = 1\n```\n\n"
        "```python\nprint(n + 1, sorted(os.listdir('.')))\n```\n\n"
        "```text\n2 ['configs']\n```\n"
    )
    runner.run_page(_page(tmp_path, text))


CONSOLE_PAGE = """```console
$ cat > cfg.txt <<'EOF'
a: 1
EOF
$ cat cfg.txt && echo done
a: 1
done
$ python -c "print('two'); print('lines')"
...
lines
$ printf 'x\\n' && exit 3
x
```
"""


def test_console_commands_heredocs_and_ellipsis_lines(tmp_path):
    runner.run_page(_page(tmp_path, CONSOLE_PAGE))


def test_wrong_console_output_fails_at_its_command_line(tmp_path):
    page = _page(tmp_path, CONSOLE_PAGE.replace("a: 1\ndone\n", "a: 1\nfinished\n"))
    with pytest.raises(runner.PageError) as e:
        runner.run_page(page)
    assert "page.md:5:" in str(e.value) and "expected 'finished', got 'done'" in str(e.value)


def test_a_failing_command_without_shown_output_fails(tmp_path):
    with pytest.raises(runner.PageError, match="exited 1"):
        runner.run_page(_page(tmp_path, "```console\n$ false\n```\n"))


def test_console_output_before_any_command_is_refused(tmp_path):
    with pytest.raises(runner.PageError, match=r"page.md:2: console output before"):
        runner.run_page(_page(tmp_path, "```console\noutput\n$ true\n```\n"))


def test_other_blocks_are_not_run_and_text_after_prose_is_not_output(tmp_path):
    text = "```bash\nexit 1\n```\n\n```python\nprint(1)\n```\n\nprose\n\n```text\nnot 1\n```\n"
    runner.run_page(_page(tmp_path, text))


def test_ellipsis_matching():
    assert runner.match(["a", "...", "d"], ["a", "b", "c", "d"])[0]
    assert runner.match(["a", "...", "b"], ["a", "b"])[0]  # any number of lines, zero too
    assert runner.match(["x ... z"], ["x y y z  "])[0]  # trailing spaces stripped
    assert not runner.match(["x ... z"], ["x y y"])[0]
    assert not runner.match(["a", "..."], ["b", "c"])[0]
    assert runner.match(["a", "", ""], ["a"])[0]  # trailing blank lines ignored


def test_needs_comment():
    assert runner.needs("x <!-- needs: tokenizers  gensim --> y") == ["tokenizers", "gensim"]


def test_the_site_home_page_is_the_readme():
    """docs/index.md is generated from README.md (tools/docs_index.py), never edited apart from it."""
    spec = importlib.util.spec_from_file_location("docs_index", ROOT / "tools" / "docs_index.py")
    assert spec is not None and spec.loader is not None
    docs_index = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(docs_index)
    want = docs_index.index_text((ROOT / "README.md").read_text())
    assert (ROOT / "docs" / "index.md").read_text() == want, "run: python tools/docs_index.py"
    assert "[data.md](data.md)" in docs_index.index_text("# t\n`docs/data.md` is the contract\n")
