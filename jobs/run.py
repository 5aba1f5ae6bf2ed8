"""Run pipeline stages for a bgit repository snapshot, as a Ray job. What `bgit run --detach` submits.

    ray job submit --working-dir <bgit repository> -- python -m bread_ray.jobs stim rollout bake
    ray job submit --working-dir . -- python jobs/run.py --repo <repository folder in .> stim rollout bake

The stages run as `bgit run` runs them and leave their results in the store (BREAD_STORE, passed
with `--runtime-env-json '{"env_vars": {...}}'`); no commit is made: `bgit fetch` makes it.
"""

import sys

from bread_ray.jobs import main

if __name__ == "__main__":
    sys.exit(main())
