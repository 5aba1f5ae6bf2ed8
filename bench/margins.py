"""How far each figure that a test module judges on a bake stays from its bound, over bake seeds
and over the kernels of other CPUs.

    .venv/bin/python bench/margins.py                      # the sequential bakes: 3 seeds x 2 kernel sets
    .venv/bin/python bench/margins.py --seeds 42 --kernels native             # one run
    .venv/bin/python bench/margins.py --module tests/test_demo.py --kernels native   # the main demo's bakes

The modules judged so: tests/test_sequential_bake.py (the shipped prompt-sensitive model: the same
weights on every machine) and tests/test_demo.py (SmolLM2-135M-Instruct). A bake itself runs with
the machine's own kernels and thread count, whose float sums round differently. Each run here is
the test module, run by pytest in a child process with BREAD_TEST_SEED (every target's and bake's
seed) and the kernels set: `native` (this CPU's own), `avx2` (torch's AVX2
kernels and MKL's AVX2 branch, what a CPU without AVX-512 runs) or `plain` (torch's unvectorized
kernels, MKL's SSE2 branch: far from both). Each judged figure comes back from the test report; the
table shows its bound, its value in every run, and the worst run's distance from the bound.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ElementTree
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
KERNELS = {
    "native": {},
    "avx2": {"ATEN_CPU_CAPABILITY": "avx2", "MKL_CBWR": "AVX2"},
    "plain": {"ATEN_CPU_CAPABILITY": "default", "MKL_CBWR": "COMPATIBLE"},
}


def run_module(module: str, seed: int, kernels: str, report: Path) -> tuple[dict[str, tuple[float, str, float]], str]:
    """The judged figures of one run of the test module, by name: (value, "<" or ">", bound), and
    pytest's summary line."""
    env = {**os.environ, "BREAD_TEST_SEED": str(seed), **KERNELS[kernels]}
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--junitxml", str(report),
                           module], cwd=ROOT, env=env, capture_output=True, text=True)
    summary = done.stdout.strip().splitlines()[-1] if done.stdout.strip() else done.stderr[-300:]
    figures = {}
    for prop in ElementTree.parse(report).iter("property"):
        value, op, bound = json.loads(prop.get("value"))
        figures[prop.get("name")] = (value, op, bound)
    return figures, summary


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--module", default="tests/test_sequential_bake.py", help="the test module to run")
    parser.add_argument("--seeds", type=int, nargs="+", default=[42, 1, 2])
    parser.add_argument("--kernels", nargs="+", choices=sorted(KERNELS), default=["native", "avx2"])
    args = parser.parse_args(argv)

    runs = [(seed, kernels) for kernels in args.kernels for seed in args.seeds]
    results = {}
    with tempfile.TemporaryDirectory(prefix="bench-margins-") as folder:
        for seed, kernels in runs:
            figures, summary = run_module(args.module, seed, kernels, Path(folder) / f"{seed}-{kernels}.xml")
            results[seed, kernels] = figures
            print(f"seed {seed}, {kernels} kernels: {summary}", flush=True)

    names = list(dict.fromkeys(name for figures in results.values() for name in figures))
    header = ["figure", "bound"] + [f"{seed}/{kernels}" for seed, kernels in runs] + ["worst margin"]
    rows = []
    for name in names:
        op, bound = next(figures[name][1:] for figures in results.values() if name in figures)
        values = [results[run].get(name, (None,))[0] for run in runs]
        margins = [(bound - v) if op == "<" else (v - bound) for v in values if v is not None]
        rows.append([name, f"{op} {bound:g}"] + ["-" if v is None else f"{v:.3f}" for v in values]
                    + [f"{min(margins):+.3f}" if margins else "-"])
    widths = [max(len(str(row[i])) for row in [header] + rows) for i in range(len(header))]
    for row in [header] + rows:
        print("  ".join(str(cell).ljust(width) if i == 0 else str(cell).rjust(width)
                        for i, (cell, width) in enumerate(zip(row, widths))))


if __name__ == "__main__":
    main()
