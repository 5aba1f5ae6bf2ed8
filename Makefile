# The two commands of the README. Each does all set-up on a fresh machine first.
.PHONY: demo test test-fast

# The venv's tools first on PATH, as in a shell that activated it: every process (Ray's workers,
# jobs started from a user's shell in the tests) then builds DeepSpeed's C++ ops with the venv's
# ninja. The system's ninja keeps another build log, and each switch between the two rebuilt them.
VENV_PATH = PATH="$(CURDIR)/.venv/bin:$$PATH"

demo:            ## install into .venv, then run the main job (the demo) on the embedded defaults
	bash scripts/setup.sh
	$(VENV_PATH) .venv/bin/python -m bread_ray.demo

# Two pytest-xdist workers, one per core of the 2-core machines this runs on: in one process the
# tests leave the cores idle while they wait on processes, servers and Ray (the README's figures).
# Each worker takes whole files (module fixtures are built once), longest first (tests/conftest.py).
PYTEST = $(VENV_PATH) .venv/bin/python -m pytest -q -n 2 --dist loadfile --no-loadscope-reorder

test:            ## install into .venv with the test tools and the S3-compatible server, lint, run every test
	bash scripts/setup.sh --test
	.venv/bin/ruff check bread_ray tests bench
	$(PYTEST) --durations=30

test-fast:       ## lint, and the tests without the slow end-to-end ones (after `make test` has installed once)
	.venv/bin/ruff check bread_ray tests bench
	$(PYTEST) -m "not slow"
