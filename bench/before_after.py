"""This checkout against another, side by side: ``python -m bench.before_after --against DIR``.

Tables 1 and 4 of ``make bench`` (one worker ``--burst`` draining N turns: turns/s from the
results' timestamps; then one telemetry consumer ``--burst`` aggregating what it wrote:
events/s) measured for both checkouts in one run, interleaved (rep 1 of this, rep 1 of the
other, rep 2 of the other, rep 2 of this, ...: the order alternates so neither side always
runs on a warmer machine), each rep in a fresh process of that checkout's own ``.venv`` on its
own private ``redis-server``. DIR is another checkout of turnfleet with its ``.venv`` built
(``git worktree add DIR <commit> && make -C DIR install``); both must have
``bench.run.bench_fleet(n, base, rep)``. Prints a Markdown table (median, min–max, ratio);
``--out FILE`` also writes it there. Speed is never asserted.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import tempfile
from pathlib import Path

from bench.common import ROOT

CODE = (
    "import json, sys; from pathlib import Path; from bench.run import bench_fleet; "
    "print('RESULT ' + json.dumps(bench_fleet(int(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3]))))"
)


def _rev(tree: Path) -> str:
    out = subprocess.run(["git", "-C", str(tree), "log", "-1", "--format=%h %s"], capture_output=True,
                         text=True, check=True).stdout.strip()
    return out[:90]


def one_rep(tree: Path, n: int, rep: int) -> dict[str, float]:
    with tempfile.TemporaryDirectory(prefix="tf-ba-") as tmp:
        proc = subprocess.run([str(tree / ".venv" / "bin" / "python"), "-c", CODE, str(n), tmp, str(rep)],
                              cwd=tree, capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        raise RuntimeError(f"{tree}: rep {rep} failed:\n{proc.stderr[-3000:]}")
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))
    return json.loads(line.removeprefix("RESULT "))


def cell(values: list[float]) -> str:
    return f"{statistics.median(values):,.0f} ({min(values):,.0f}–{max(values):,.0f})"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--against", required=True, type=Path, help="the other checkout (with .venv)")
    ap.add_argument("--n", type=int, default=1000, help="turns per rep (default 1000, as make bench)")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    trees = {"this": ROOT, "other": args.against.resolve()}
    runs: dict[str, list[dict[str, float]]] = {"this": [], "other": []}
    for rep in range(args.reps):
        order = ("this", "other") if rep % 2 == 0 else ("other", "this")
        for side in order:
            r = one_rep(trees[side], args.n, rep)
            runs[side].append(r)
            print(f"rep {rep + 1}/{args.reps} {side}: {r['turns_s']:.0f} turns/s, "
                  f"{r['tel_events_s']:,.0f} events/s", flush=True)
    lines = [
        f"| | {_rev(trees['other'])} (other) | {_rev(trees['this'])} (this) | this ÷ other (medians) |",
        "|---|---|---|---|",
    ]
    for key, label in (("turns_s", "table 1: one worker `--burst`, turns/s"),
                       ("tel_events_s", "table 4: one telemetry consumer `--burst`, events/s")):
        a = [r[key] for r in runs["other"]]
        b = [r[key] for r in runs["this"]]
        lines.append(f"| {label} | {cell(a)} | {cell(b)} | "
                     f"{statistics.median(b) / statistics.median(a):.3f}× |")
    table = "\n".join(lines)
    print(f"\n{args.reps} reps of {args.n} turns per side, interleaved\n\n{table}")
    if args.out:
        args.out.write_text(table + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
