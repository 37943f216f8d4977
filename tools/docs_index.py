"""docs/index.md (the site's home page) made from README.md, so the two never drift.

File references become links that work inside the site: `` `docs/x.md` `` -> ``[x.md](x.md)``
and ``](docs/x)`` -> ``](x)``; a pointer to the tutorials follows the title. ``--check`` exits 1
when docs/index.md is not what README.md gives (tests/test_tutorials.py runs it).

    python tools/docs_index.py          # rewrite docs/index.md
    python tools/docs_index.py --check  # is it up to date?
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HEADER = (
    "<!-- Derived from README.md by tools/docs_index.py: edit the README, then run it. -->\n\n"
    "New here? Start with the [tutorials](tutorials/index.md): each one's code runs in CI and prints what it shows.\n"
)


def index_text(readme: str) -> str:
    """The home page for ``readme``'s text."""
    text = re.sub(r"`docs/([\w./-]+\.md)`", r"[\1](\1)", readme)
    text = text.replace("](docs/", "](")
    title, _, rest = text.partition("\n")
    return f"{title}\n\n{HEADER}{rest}"


def main(argv: list[str]) -> int:
    want = index_text((ROOT / "README.md").read_text())
    target = ROOT / "docs" / "index.md"
    if "--check" in argv:
        if target.read_text() != want:
            print("docs/index.md is out of date with README.md: run python tools/docs_index.py", file=sys.stderr)
            return 1
        return 0
    target.write_text(want)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
