"""bread_ray: open, self-hosted prompt baking on Ray, driven by the git-based CLI `bgit`."""

import os
from pathlib import Path

__version__ = "0.1.0"

# Ray's token authentication stays on. A Ray client sends this machine's token only when
# RAY_AUTH_MODE=token is in its environment before `import ray` (Ray reads it once, then), and
# `ray start --head` clusters refuse clients without it. So where a token exists and the user has
# chosen no mode, choose token here: this runs before any module of ours imports ray.
if "RAY_AUTH_MODE" not in os.environ and (
    os.environ.get("RAY_AUTH_TOKEN")
    or Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token").is_file()
):
    os.environ["RAY_AUTH_MODE"] = "token"
