"""Two commits' per-token decode overhead, in alternating processes: ``token_overhead.py`` run
from a checkout of each commit in turn, the order swapped every pair.

    python benchmarks/ab_commits.py --base HEAD~1 [--head WORKTREE] [--pairs 6] [-- token_overhead options]

On this kind of shared CPU machine two processes of the same code differ by up to 30%
(BENCHMARKS.md), so a change to the runtime's Python, which cannot be timed against its old
self in one process the way ``compare_step_variants`` times step variants, is timed over
several pairs of processes, each pair one run of either side, and judged by the median of the
pairs' ratios. ``--base`` is checked out into a temporary git worktree (removed at the end);
``--head`` defaults to this checkout as it is, uncommitted changes included (the table's
command records its commit and whether it had changes). Each side's ``import graphdelta``
reads its own tree: a staging folder on PYTHONPATH holds a ``graphdelta`` package of links to
the tree's ``graphdelta/``, ``passes/`` and ``lowering/`` (which pyproject.toml maps to
``graphdelta.passes`` and ``graphdelta.lowering``), checked before timing; both sides use this
environment's other packages.
The table gives, per row of token_overhead.py (``generate``, ``Runner.decode``, ...), each
side's median over the pairs and the median of the per-pair ratios base / head (> 1: head is
faster). Writes ab_commits.{json,md,png} to the results folder (``common.results_dir()``).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from common import write_results

ROOT = Path(__file__).resolve().parents[1]


def stage(tree: Path, where: Path) -> Path:
    """A folder to put on PYTHONPATH for ``import graphdelta`` to read ``tree``: its package is
    a folder of links to the entries of ``tree/graphdelta`` and to ``tree/passes`` and
    ``tree/lowering`` (an editable install maps those two to this checkout otherwise)."""
    package = where / "graphdelta"
    package.mkdir(parents=True)
    for entry in (tree / "graphdelta").iterdir():
        (package / entry.name).symlink_to(entry.resolve())
    for name in ("passes", "lowering"):
        (package / name).symlink_to((tree / name).resolve())
    return where


def check_stage(path: Path, tree: Path) -> None:
    """Raise unless graphdelta and its subpackages import from ``tree`` with ``path`` first (run
    from ``path``: a ``-c`` probe puts its working folder first on sys.path)."""
    probe = ("import graphdelta.lowering, graphdelta.passes, graphdelta.runtime, os; "
             "print('\\n'.join(os.path.realpath(m.__file__) for m in "
             "(graphdelta, graphdelta.lowering, graphdelta.passes, graphdelta.runtime)))")
    files = subprocess.run([sys.executable, "-c", probe], env={**os.environ, "PYTHONPATH": str(path)},
                           cwd=path, capture_output=True, text=True, check=True).stdout.split()
    outside = [f for f in files if not Path(f).is_relative_to(tree.resolve())]
    if len(files) != 4 or outside:
        raise RuntimeError(f"graphdelta does not import from {tree} here: {outside or files}")


def run_side(tree: Path, path: Path, options: list[str], out: Path) -> dict[str, float]:
    """One token_overhead.py process from ``tree`` (``path``: its staging folder): its ms per
    token by row."""
    env = {**os.environ, "PYTHONPATH": str(path), "GRAPHDELTA_BENCH_RESULTS": str(out)}
    subprocess.run([sys.executable, str(tree / "benchmarks" / "token_overhead.py"), *options],
                   env=env, cwd=path, check=True, stdout=subprocess.DEVNULL)
    rows = json.loads((out / "token_overhead.json").read_text())["rows"]
    return {row["what"]: row["ms_per_token"] for row in rows}


def describe(tree: Path) -> str:
    """``tree``'s commit, and whether its files differ from it."""
    commit = subprocess.run(["git", "-C", str(tree), "rev-parse", "--short", "HEAD"],
                            capture_output=True, text=True).stdout.strip() or "unknown"
    changed = subprocess.run(["git", "-C", str(tree), "status", "--porcelain", "--untracked-files=no"],
                             capture_output=True, text=True).stdout.strip()
    return commit + (" with uncommitted changes" if changed else "")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", required=True, help="a commit of this repository")
    parser.add_argument("--head", type=Path, default=ROOT, help="a checkout (default: this one, as it is)")
    parser.add_argument("--pairs", type=int, default=6)
    parser.add_argument("options", nargs="*", help="token_overhead.py's options (after --)")
    args = parser.parse_args(argv)
    if args.pairs < 1:
        parser.error(f"--pairs {args.pairs}: must be at least 1")
    if not (args.head / "benchmarks" / "token_overhead.py").is_file():
        parser.error(f"--head {args.head}: not a graphdelta checkout (no benchmarks/token_overhead.py)")
    found = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--verify", f"{args.base}^{{commit}}"],
                           capture_output=True, text=True)
    if found.returncode:
        parser.error(f"--base {args.base!r}: not a commit of {ROOT}")
    base_commit = found.stdout.strip()
    sides_text = f"base {base_commit[:7]}, head {describe(args.head)}"

    with tempfile.TemporaryDirectory() as scratch:
        base = Path(scratch) / "base"
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(base), base_commit],
                       check=True, capture_output=True)
        try:
            sides = {"base": base, "head": args.head}
            paths = {side: stage(tree, Path(scratch) / f"{side}-path") for side, tree in sides.items()}
            for side, tree in sides.items():
                check_stage(paths[side], tree)
            runs: dict[str, list[dict[str, float]]] = {"base": [], "head": []}
            for pair in range(args.pairs):
                for side in (("base", "head") if pair % 2 == 0 else ("head", "base")):
                    runs[side].append(run_side(sides[side], paths[side], args.options, Path(scratch) / side))
                print(f"pair {pair + 1}: " + ", ".join(f"{side} generate {runs[side][-1].get('generate', 0):.3f} ms"
                                                       for side in runs), flush=True)
        finally:
            removed = subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(base)],
                                     capture_output=True)
            if removed.returncode:  # the folder goes with the temporary one: drop git's record of it
                subprocess.run(["git", "-C", str(ROOT), "worktree", "prune"], capture_output=True)

    rows = []
    for what in runs["head"][0]:
        if not all(what in r for r in runs["base"]):
            print(f"row {what!r}: not in the base's token_overhead.py, left out", flush=True)
            continue
        ratios = [b[what] / h[what] for b, h in zip(runs["base"], runs["head"])]
        rows.append({"what": what, "base_ms": statistics.median(r[what] for r in runs["base"]),
                     "head_ms": statistics.median(r[what] for r in runs["head"]),
                     "ratio_median": statistics.median(ratios), "ratio_min": min(ratios), "ratio_max": max(ratios)})
    for row in rows:
        print(row, flush=True)

    def plot(path: Path) -> None:
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 3.2))
        x = range(len(rows))
        for offset, key in ((-0.2, "base_ms"), (0.2, "head_ms")):
            ax.bar([i + offset for i in x], [r[key] for r in rows], 0.4, label=key[:-3])
        ax.set_xticks(list(x), [r["what"] for r in rows], rotation=30, ha="right", fontsize=6)
        ax.set_ylabel("ms per token (median of pairs)")
        ax.set_title(f"{args.base} against {args.head.name}, {args.pairs} pairs of processes", fontsize=8)
        ax.legend()
        fig.tight_layout()
        fig.savefig(path)

    command = "python benchmarks/ab_commits.py " + " ".join(sys.argv[1:] if argv is None else argv)
    columns = ["what", "base_ms", "head_ms", "ratio_median", "ratio_min", "ratio_max"]
    print(write_results("ab_commits", rows, columns, f"{command.strip()} ({sides_text})", plot))


if __name__ == "__main__":
    main()
