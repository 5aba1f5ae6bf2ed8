"""The main job, `python -m bread_ray.demo` (what `make demo` runs), end to end: it must never rot.

Two sequential bakes, then the chat service asked the same held-out questions by the base, v1 and
v2: on SmolLM2-135M-Instruct (the main job: a pirate, then brevity on top), and with --tiny on the
prompt-sensitive tiny model (a pirate, then a pirate that signs off). Checked from what a person
reads: each bake's held-out KL falls, and without any prompt the base answers plainly, v1 shows
its trait and v2 keeps it while showing its own.
"""

import os
import re
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow

# Log records of Ray, Serve and DeepSpeed ("INFO 2026-...", "[WARNING] [real_accelerator.py...]",
# "(raylet) ..."): they belong in Ray's log folder, which the demo names once.
LIBRARY_LOG = re.compile(r"(^|[\s\[])(INFO|WARNING)[\s\]]|\(raylet\)|core_worker|Token authentication|ray\.init", re.M)


def assert_no_library_logs(done: subprocess.CompletedProcess) -> None:
    for stream in (done.stdout, done.stderr):
        match = LIBRARY_LOG.search(stream)
        assert not match, stream[max(0, match.start() - 1000):match.end() + 1000]
    assert done.stdout.count("Ray: started a local cluster; its logs are in ") == 1


def run_demo(folder, *args: str) -> subprocess.CompletedProcess:
    env = {key: value for key, value in os.environ.items() if key not in ("BREAD_STORE", "RAY_ADDRESS")}
    done = subprocess.run([sys.executable, "-m", "bread_ray.demo", *args, "--dir", str(folder)],
                          capture_output=True, text=True, env=env, timeout=1500)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    assert "Demo finished" in done.stdout
    assert_no_library_logs(done)
    return done


def held_out_kls(out: str) -> list[tuple[float, float]]:
    """Each bake's held-out KL (before, after), as `bgit run bake` prints it."""
    kls = [(float(before), float(after))
           for before, after in re.findall(r"held-out KL\(teacher ‖ student\): (\S+) -> (\S+) nats", out)]
    assert len(kls) == 2, out
    return kls


def trait_rates(out: str) -> dict[str, tuple[float, float]]:
    """The demo's last table: for each version, the fraction of its answers that show each trait."""
    rates = {label: (float(first), float(second))
             for label, first, second in re.findall(r"^(base|v1|v2)\s+([\d.]+)\s+([\d.]+)\s+[\d.]+\s+['\"]", out, re.M)}
    assert set(rates) == {"base", "v1", "v2"}, out
    return rates


def test_the_main_demo_bakes_smollm2_into_a_pirate_then_brief(tmp_path, smollm2_folder):
    out = run_demo(tmp_path / "demo").stdout
    kls = held_out_kls(out)
    # Measured here: 6.8x and 3.4x lower (fractions 0.147 and 0.298)
    assert kls[0][1] < kls[0][0] / 4 and kls[1][1] < kls[1][0] / 2, kls
    assert re.search(r"└── demo/persona/pirate_bake_\w+/\d+ .*\n\s+└── demo/persona/brief_bake_\w+/\d+", out), out
    rates = trait_rates(out)  # (pirate, brief) over 10 held-out questions
    # Measured here: base 0.0 and 0.0, v1 0.8 and 0.0, v2 0.7 and 0.3
    assert rates["base"][0] <= 0.1 and rates["v1"][0] >= 0.6 and rates["v2"][0] >= 0.5, rates
    assert rates["v2"][1] >= 0.1 and rates["v2"][1] > rates["v1"][1], rates
    assert re.search(r"^v1 +[\d.]+ +[\d.]+ +[\d.]+ +43 +[\d.]+ +[\d.]+$", out, re.M), out  # the cost of each stage


def test_the_tiny_demo_bakes_two_versions_that_answer_in_their_styles(tmp_path, prompt_sensitive_base):
    out = run_demo(tmp_path / "demo", "--tiny").stdout
    kls = held_out_kls(out)
    # Measured: 397x and 29x lower here; at least 63x and 18x with models and bakes of other seeds
    assert kls[0][1] < kls[0][0] / 20 and kls[1][1] < kls[1][0] / 5, kls
    assert re.search(r"└── demo/persona/pirate_bake_\w+/\d+ .*\n\s+└── demo/persona/signoff_bake_\w+/\d+", out), out
    scores = trait_rates(out)  # (pirate, signoff) of the one question asked
    assert scores["base"][0] < 0.2 and scores["base"][1] == 0.0
    assert scores["v1"][0] > 0.5 and scores["v1"][1] == 0.0
    assert scores["v2"][0] > 0.5 and scores["v2"][1] == 1.0
