"""The main job, `python -m bread_ray.demo` (what `make demo` runs), end to end: it must never rot.

Two sequential bakes on SmolLM2-135M-Instruct (a pirate, then brevity on top), the eval matrix,
then the chat service asked the same held-out questions by the base, v1 and v2. Checked from what
a person reads: each bake's held-out KL falls, the matrix shows each bake baked in and what v2
kept of v1, and without any prompt the base answers plainly while v1 and v2 talk like pirates. It
bakes each version one epoch on 24 questions, not two on 48; the README gives each figure's margin
over seeds (bench/margins.py).

`--tiny` runs the same code on the prompt-sensitive tiny model with its own recipe, whose bakes
tests/test_sequential_bake.py covers; here only that recipe is checked, cheaply.
"""

import os
import re
import subprocess
import sys

import pytest

SEED = int(os.environ.get("BREAD_TEST_SEED", "42"))  # the demo's seed; bench/margins.py runs others
DEMO_ARGS = ("--epochs", "1", "1", "--questions", "24")  # the demo's recipe, quicker: the README's margins

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


def eval_matrix(out: str) -> dict[str, list[float]]:
    """The rows of the demo's `bgit eval`: per version, (KL, fraction) for each bake, then drift."""
    table = out[out.rindex("$ bgit eval"):]
    rows = {label: [float(value) for value in values.split()]
            for label, values in re.findall(r"^(base|pirate_bake/\d+|brief_bake/\d+) +([\d. ]+)$", table, re.M)}
    assert len(rows) == 3 and all(len(values) == 5 for values in rows.values()), table
    return dict(zip(("base", "v1", "v2"), rows.values()))


@pytest.mark.slow
def test_the_main_demo_bakes_smollm2_into_a_pirate_then_brief(tmp_path, smollm2_folder, check):
    out = run_demo(tmp_path / "demo", *DEMO_ARGS, "--seed", str(SEED)).stdout
    kls = held_out_kls(out)
    check("v1's held-out KL over its parent's", kls[0][1] / kls[0][0], "<", 0.35)
    check("v2's held-out KL over its parent's", kls[1][1] / kls[1][0], "<", 0.5)
    assert re.search(r"└── demo/persona/pirate_bake_\w+/\d+ .*\n\s+└── demo/persona/brief_bake_\w+/\d+", out), out
    # (pirate, brief) over 10 held-out questions, greedy, no prompt. Ten answers judge the pirate,
    # which the base never shows; brevity is subtler (v2's share 0.1-0.4 over seeds 42, 1, 2): the
    # held-out KL above judges v2's bake, and the demo prints the share for a person to read.
    rates = trait_rates(out)
    check("base's pirate share", rates["base"][0], "<", 0.15)
    check("v1's pirate share over the base's", rates["v1"][0] - rates["base"][0], ">", 0.3)
    check("v2's pirate share over the base's", rates["v2"][0] - rates["base"][0], ">", 0.3)
    assert re.search(r"^v1 +[\d.]+ +[\d.]+ +[\d.]+ +\d+ +[\d.]+ +[\d.]+$", out, re.M), out  # the cost of each stage
    matrix = eval_matrix(out)  # per version: pirate bake KL, fraction; brief bake KL, fraction; drift
    print("\n".join(f"{label}: {values}" for label, values in matrix.items()))
    assert matrix["base"][1] == 1.0 and matrix["v1"][3] == 1.0 and matrix["base"][4] == 0.0
    # each bake's own model: the fraction its bake reported (eval measures the same held-out KL)
    assert matrix["v1"][1] == pytest.approx(kls[0][1] / kls[0][0], abs=0.011)
    assert matrix["v2"][3] == pytest.approx(kls[1][1] / kls[1][0], abs=0.011)
    check("the pirate gap v2 leaves (v2 keeps part of v1)", matrix["v2"][1], "<", 1.0)
    assert matrix["v1"][4] > 0 and (tmp_path / "demo" / "eval.png").exists()


def test_the_tiny_recipe_resolves_into_two_sequential_bakes():
    from bread_ray.config import load_and_resolve
    from bread_ray.demo import tiny_recipe

    recipe = tiny_recipe()
    for version, name in enumerate(("pirate", "signoff")):
        _, resolved = load_and_resolve(recipe.input_yml(version), parent_model="tiny-parent")
        assert [target.name for target in resolved.targets] == [name]
        assert resolved.bake.datasets == ((resolved.targets[0].id, 1.0),)
        assert resolved.targets[0].teacher.messages[0]["content"] == recipe.prompts[version]
