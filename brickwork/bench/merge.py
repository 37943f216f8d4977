"""`brickwork bench merge`: streaming merges of N MiniLM-size checkpoints against reading the files once.

Checkpoints of all-MiniLM-L6-v2's tensor shapes (22.7M float32 parameters, random weights: the
cost does not depend on the values) are written with :func:`brickwork.persist.save_tensors`.
Per cell (N models, a method) two candidates run in fresh subprocesses, so each one's peak
memory is its own:

* ``read``: every byte of the N files read once (the I/O limit);
* ``merge``: :func:`brickwork.ops.merge_files` of the N files (task vectors against one more
  file as the base, for the methods that need one), written to a new checkpoint.

Times are the work inside the subprocess (imports excluded), in rotating order after a warm-up
round (:func:`brickwork.analysis.timing.time_rounds`, median); ``--clock cpu`` takes the
subprocess's CPU time (all its threads) instead of wall-clock time, which a loaded, shared
machine distorts (another process's time slices, torch threads waiting for a core). Peak memory is the rise of the
peak resident size (``VmHWM``, reset after the imports; else ``ru_maxrss``) over the resident
size before the work. Ratios: ``merge / read`` time and ``merge peak / one model``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from brickwork.analysis.timing import add_clock_option, describe_machine, named_clock, time_rounds


def minilm_shapes(layers: int = 6, d: int = 384, ffn: int = 1536, vocab: int = 30522) -> dict[str, tuple[int, ...]]:
    """Tensor shapes of a BERT encoder (all-MiniLM-L6-v2 by default: 22.7M parameters)."""
    s: dict[str, tuple[int, ...]] = {
        "embeddings.word_embeddings.weight": (vocab, d),
        "embeddings.position_embeddings.weight": (512, d),
        "embeddings.token_type_embeddings.weight": (2, d),
        "embeddings.LayerNorm.weight": (d,),
        "embeddings.LayerNorm.bias": (d,),
    }
    for i in range(layers):
        p = f"encoder.layer.{i}."
        for name in ("attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense"):
            s[p + name + ".weight"], s[p + name + ".bias"] = (d, d), (d,)
        s[p + "intermediate.dense.weight"], s[p + "intermediate.dense.bias"] = (ffn, d), (ffn,)
        s[p + "output.dense.weight"], s[p + "output.dense.bias"] = (d, ffn), (d,)
        for ln in ("attention.output.LayerNorm", "output.LayerNorm"):
            s[p + ln + ".weight"], s[p + ln + ".bias"] = (d,), (d,)
    return s


def write_checkpoints(folder: Path, n: int) -> list[Path]:
    """``n`` random MiniLM-shaped checkpoints ``m0 .. m{n-1}`` (and their JSON) in ``folder``."""
    from brickwork.persist import save_tensors

    out = []
    for i in range(n):
        stem = folder / f"m{i}"
        if not stem.with_suffix(".safetensors").exists():
            g = torch.Generator().manual_seed(i)
            save_tensors(stem, {k: torch.randn(v, generator=g) * 0.02 for k, v in minilm_shapes().items()})
        out.append(stem.with_suffix(".safetensors"))
    return out


def _rss() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def cell(kind: str, paths: list[str], method: str, out: str, clock: str = "wall") -> dict[str, float]:
    """Run one candidate in this process; seconds of the work (``clock``: ``wall`` or ``cpu``) and
    peak bytes above the start."""
    from brickwork.ops.merge import NEEDS_BASE
    from brickwork.ops.merge_files import merge_files

    reset = _reset_peak()
    before = _rss()
    now = named_clock(clock)
    t0 = now()
    if kind == "read":  # every byte of every file, once, into one reused 1 MiB buffer
        buf = bytearray(1 << 20)
        for p in paths:
            with open(p, "rb", buffering=0) as f:
                while f.readinto(buf):
                    pass
    else:
        needs_base = method in NEEDS_BASE
        models, base = (paths[1:], paths[0]) if needs_base else (paths, None)
        merge_files(models, out, method, base=base, verify=False)  # type: ignore[arg-type]
    seconds = now() - t0
    peak = _hwm() if reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"seconds": seconds, "peak": max(0, peak - before)}


def _reset_peak() -> bool:
    """Reset this process's peak resident size (Linux ``clear_refs`` 5), so imports do not count."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _hwm() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def _spawn(kind: str, paths: list[Path], method: str, out: Path, clock: str = "wall") -> dict[str, float]:
    for p in (out.with_suffix(".safetensors"), out.with_suffix(".json")):
        p.unlink(missing_ok=True)
    args = [sys.executable, "-m", "brickwork.bench.merge", "--cell", kind, "--method", method, "--out", str(out)]
    args += ["--clock", clock]
    res = subprocess.run([*args, "--paths", *map(str, paths)], capture_output=True, text=True, check=False)
    if res.returncode != 0:
        raise RuntimeError(f"bench merge cell {kind} failed:\n{res.stderr[-2000:]}")
    result: dict[str, float] = json.loads(res.stdout.strip().splitlines()[-1])
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="brickwork bench merge", description=__doc__.splitlines()[0])
    p.add_argument("--counts", type=int, nargs="+", default=[2, 4, 8], help="models merged per cell")
    p.add_argument("--methods", nargs="+", default=["linear", "ties"])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--dir", type=Path, default=None, help="where the checkpoints go (default: a temporary folder)")
    add_clock_option(p, "each subprocess's")
    p.add_argument("--cell", choices=["read", "merge"], help=argparse.SUPPRESS)
    p.add_argument("--paths", nargs="*", default=[], help=argparse.SUPPRESS)
    p.add_argument("--method", default="linear", help=argparse.SUPPRESS)
    p.add_argument("--out", default="", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.cell:
        print(json.dumps(cell(args.cell, args.paths, args.method, args.out, args.clock)))
        return 0
    folder = args.dir or Path(tempfile.mkdtemp(prefix="bench-merge-"))
    folder.mkdir(parents=True, exist_ok=True)
    try:
        from brickwork.ops.merge import NEEDS_BASE

        paths = write_checkpoints(folder, max(args.counts) + 1)
        model_bytes = 4 * sum(torch.Size(s).numel() for s in minilm_shapes().values())
        print(f"machine: {describe_machine()}")
        print(
            f"load average before: {os.getloadavg()[0]:.2f}; one model {model_bytes / 2**20:.1f} MiB "
            f"({model_bytes // 4 / 1e6:.1f}M float32 parameters); median of {args.repeats} rounds after 1 warm-up, "
            f"{args.clock} clock, "
            "each candidate a fresh subprocess; merge/read is the time against reading the N files once"
        )
        print("| method | models | read s | merge s | merge/read | read peak / model | merge peak / model |")
        print("|---|---|---|---|---|---|---|")
        for method in args.methods:
            for n in args.counts:
                files = paths[: n + 1] if method in NEEDS_BASE else paths[:n]
                peaks: dict[str, list[float]] = {"read": [], "merge": []}
                spent = [0.0]

                def run(
                    kind: str,
                    files: list[Path] = files,
                    method: str = method,
                    spent: list[float] = spent,
                    peaks: dict[str, list[float]] = peaks,
                ) -> None:
                    r = _spawn(kind, files, method, folder / "out", args.clock)
                    spent[0] += r["seconds"]
                    peaks[kind].append(r["peak"])

                samples = time_rounds(
                    {"read": lambda: run("read"), "merge": lambda: run("merge")},
                    repeats=args.repeats,
                    clock=lambda spent=spent: spent[0],  # type: ignore[misc]  # the work's own seconds
                )
                read, mrg = samples["read"].median(), samples["merge"].median()
                print(
                    f"| {method} | {n} | {read:.2f} | {mrg:.2f} | {mrg / read:.2f} | "
                    f"{max(peaks['read']) / model_bytes:.2f} | {max(peaks['merge']) / model_bytes:.2f} |",
                    flush=True,
                )
        print(f"load average after: {os.getloadavg()[0]:.2f}")
    finally:
        if args.dir is None:
            shutil.rmtree(folder, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
