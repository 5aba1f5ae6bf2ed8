"""Torch processes that share the cores: OpenMP's waiting threads spinning or sleeping.

    .venv/bin/python bench/threads.py [--seconds 10] [--rows 400]

Each process runs the same CPU training steps (a stack of [rows, 576] x [576, 576] matmuls, the
width of SmolLM2-135M, forward and backward) with torch's default threads (one per core) and
counts steps per second, alone and two at once, under OMP_WAIT_POLICY unset (libgomp's threads spin
a while before they sleep), PASSIVE (they sleep at once) and with one thread per process. Printed
side by side in one run: each setting's steps/s (two at once: their sum) and its ratio to the
default alone. The tests set PASSIVE (tests/conftest.py): their processes share the machine's
cores (two pytest-xdist workers, each with its Ray cluster).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

STEPS = """
import sys, time, torch
torch.manual_seed(0)
x = torch.randn({rows}, 576)
weights = [torch.randn(576, 576, requires_grad=True) for _ in range(30)]
def step():
    h = x
    for w in weights:
        h = torch.tanh(h @ w)
    h.sum().backward()
step()
started, steps = time.perf_counter(), 0
while time.perf_counter() - started < {seconds}:
    step()
    steps += 1
print(steps / (time.perf_counter() - started))
"""

SETTINGS = {"default (spin, then sleep)": {}, "OMP_WAIT_POLICY=PASSIVE": {"OMP_WAIT_POLICY": "PASSIVE"},
            "one thread each": {"OMP_NUM_THREADS": "1"}}


def steps_per_second(processes: int, extra_env: dict[str, str], rows: int, seconds: float) -> float:
    """The summed steps/s of `processes` started at once."""
    env = {key: value for key, value in os.environ.items() if key not in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS")}
    code = STEPS.format(rows=rows, seconds=seconds)
    running = [subprocess.Popen([sys.executable, "-c", code], env={**env, **extra_env}, stdout=subprocess.PIPE, text=True)
               for _ in range(processes)]
    return sum(float(process.communicate()[0]) for process in running)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=10.0, help="each measurement's length")
    parser.add_argument("--rows", type=int, default=400, help="rows of each matmul (tokens in a step)")
    args = parser.parse_args()
    print(f"{os.cpu_count()} cores; steps/s of [{args.rows}, 576] x [576, 576] matmul stacks, {args.seconds:g} s each")
    rates = {(name, processes): steps_per_second(processes, env, args.rows, args.seconds)
             for name, env in SETTINGS.items() for processes in (1, 2)}
    reference = rates[(next(iter(SETTINGS)), 1)]
    print(f"{'':28}{'alone':>10}{'ratio':>8}{'two at once':>14}{'ratio':>8}")
    for name in SETTINGS:
        alone, pair = rates[(name, 1)], rates[(name, 2)]
        print(f"{name:28}{alone:10.2f}{alone / reference:7.2f}x{pair:14.2f}{pair / reference:7.2f}x")


if __name__ == "__main__":
    main()
