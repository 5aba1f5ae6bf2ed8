# The two commands of the README. Each does all set-up on a fresh machine first.
.PHONY: demo test test-fast

demo:            ## install into .venv, then run the main job (the demo) on the embedded defaults
	bash scripts/setup.sh
	.venv/bin/python -m bread_ray.demo

test:            ## install into .venv with the test tools and the S3-compatible server, lint, run every test
	bash scripts/setup.sh --test
	.venv/bin/ruff check bread_ray tests bench
	.venv/bin/python -m pytest -q --durations=15

test-fast:       ## lint, and the tests without the slow end-to-end ones (after `make test` has installed once)
	.venv/bin/ruff check bread_ray tests bench
	.venv/bin/python -m pytest -q -m "not slow"
