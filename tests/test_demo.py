"""The main job, `python -m bread_ray.demo` (what `make demo` runs), end to end: it must never rot.

Two sequential bakes on the prompt-sensitive tiny model, then the chat service asked the same
question by the base, v1 and v2. Checked from what a person reads: each bake's held-out KL falls,
and without any prompt the base answers plainly, v1 like a pirate, and v2 like a pirate that
signs off.
"""

import os
import re
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow


def test_the_demo_bakes_two_versions_that_answer_in_their_styles(tmp_path, prompt_sensitive_base):
    env = {key: value for key, value in os.environ.items() if key not in ("BREAD_STORE", "RAY_ADDRESS")}
    done = subprocess.run([sys.executable, "-m", "bread_ray.demo", "--dir", str(tmp_path / "demo")],
                          capture_output=True, text=True, env=env, timeout=1500)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    out = done.stdout
    kls = [(float(before), float(after))
           for before, after in re.findall(r"held-out KL\(teacher ‖ student\): (\S+) -> (\S+) nats", out)]
    assert len(kls) == 2, out
    # Measured: 397x and 29x lower here; at least 63x and 18x with models and bakes of other seeds
    assert kls[0][1] < kls[0][0] / 20 and kls[1][1] < kls[1][0] / 5, kls
    assert re.search(r"└── demo/persona/pirate_bake_\w+/\d+ .*\n\s+└── demo/persona/signoff_bake_\w+/\d+", out), out
    scores = {label: (float(pirate), float(signoff))
              for label, pirate, signoff in re.findall(r"^(base|v1|v2)\s+([\d.]+)\s+([\d.]+)\s+'", out, re.M)}
    assert set(scores) == {"base", "v1", "v2"}, out
    assert scores["base"][0] < 0.2 and scores["base"][1] == 0.0
    assert scores["v1"][0] > 0.5 and scores["v1"][1] == 0.0
    assert scores["v2"][0] > 0.5 and scores["v2"][1] == 1.0
    assert "Demo finished" in out
    for ray_internals in (" INFO ", " WARNING ", "(raylet)", "core_worker", "Token authentication", "ray.init"):
        assert ray_internals not in out and ray_internals not in done.stderr, ray_internals  # in Ray's log folder
    assert out.count("Ray: started a local cluster; its logs are in ") == 1
