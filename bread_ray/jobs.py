"""Detached runs: `bgit run ... --detach` as a Ray job on a cluster, and the commands that follow it.

    bgit run stim rollout bake --detach [--address URL]   check, submit, print the job id, return
    bgit status                                          the job's state, then each stage's progress in the store
    bgit logs [--follow]                                 the job's log
    bgit fetch                                           a finished job's bake commit, made here

The job runs `python -m bread_ray.jobs STAGES` (its one entry point: `main` below) in a snapshot of
the repository: Ray uploads its folder, `.git` included (which Ray leaves out by default), as the
job's working dir, so the job
reads the staged input.yml and the history as they were at submission. It runs the same
`pipeline.run` as a local run, with the same store settings, and leaves everything in the store
(manifests, the bake's result.json with its model names and metrics, the models). It makes no
commit: `bgit fetch` runs the same stages here, where each finds its output in the store and
computes nothing, and so makes the bake commit exactly as a local run does.

The submitted job is remembered in `.git/bread-job.json`, which no commit ever includes. Ray's
token authentication stays on: where this machine has a token (`ray get-auth-token`), the client
sends it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path
from urllib.parse import urlparse

from pydantic import ValidationError

from bread_ray.landing import RunStart
from bread_ray.pipeline import STAGE_NAMES, check_run, run
from bread_ray.records import DetachedJob, record_problem
from bread_ray.repo import BreadRepo, RepoError
from bread_ray.store import LocalStore, Store, open_store

JOB_RECORD = "bread-job.json"
TERMINAL_STATES = {"SUCCEEDED", "FAILED", "STOPPED"}
AGENT_WAIT_S = 60  # how long a just-started head may take to accept jobs
JOBS_API_TIMEOUT_S = 10  # how long a Jobs API address may take to answer before bgit gives up
# What travels to the job from this environment, where set: the store's settings (the same store,
# seen from the cluster) and the question generator's API. On AWS, prefer the nodes' instance
# profile to sending keys: unset AWS_ACCESS_KEY_ID here and the job uses the profile.
FORWARDED_ENV = ("BREAD_STORE", "AWS_ENDPOINT_URL", "AWS_DEFAULT_REGION", "AWS_REGION", "AWS_ACCESS_KEY_ID",
                 "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_REQUEST_CHECKSUM_CALCULATION",
                 "AWS_RESPONSE_CHECKSUM_VALIDATION", "BREAD_S3_CONNECT_TIMEOUT", "BREAD_S3_READ_TIMEOUT",
                 "ANTHROPIC_API_KEY", "ANTHROPIC_BASE_URL")


def record_path(repo: BreadRepo) -> Path:
    return repo.root / repo.git("rev-parse", "--git-dir").strip() / JOB_RECORD


def read_record(repo: BreadRepo) -> DetachedJob | None:
    path = record_path(repo)
    if not path.exists():
        return None
    try:
        return DetachedJob.model_validate_json(path.read_text())
    except ValidationError as error:
        raise RepoError(f"{path} is not a detached run's record: {record_problem(error)} (delete it to forget "
                        "that run)") from None


def cluster_address(address: str | None) -> str:
    """The Jobs API address from --address or RAY_ADDRESS: the dashboard's, http://HOST:8265."""
    address = address or os.environ.get("RAY_ADDRESS")
    if not address:
        raise RepoError("a detached run needs a cluster: pass --address http://HEAD:8265 or set RAY_ADDRESS "
                        "(`ray start --head` or `ray up cluster.yaml` starts one)")
    return address if "://" in address else f"http://{address}"


def job_client(address: str):
    """A JobSubmissionClient for `address`, sending Ray's token when this machine has one (see
    bread_ray/__init__.py: the token mode is chosen before ray is imported). The address must
    answer HTTP within JOBS_API_TIMEOUT_S first: Ray's client itself waits for ever."""
    import httpx
    from ray.job_submission import JobSubmissionClient

    try:
        httpx.get(f"{address}/api/version", timeout=JOBS_API_TIMEOUT_S)
    except httpx.TimeoutException:
        raise RepoError(f"no Ray cluster's Jobs API answers at {address}: it accepts connections but did not answer "
                        f"within {JOBS_API_TIMEOUT_S:g} s; is it the head's dashboard (http://HEAD:8265)?") from None
    except httpx.ConnectError as error:  # refused, or no such host: Ray's client would retry for ever
        raise RepoError(f"no Ray cluster's Jobs API answers at {address}: {error}; is it the head's dashboard "
                        "(http://HEAD:8265), and is the cluster up?") from None
    except httpx.HTTPError:
        pass  # not HTTP: Ray's client says so, below
    try:
        return JobSubmissionClient(address)
    except Exception as error:  # ConnectionError, or the cluster refusing us
        hint = ("; the cluster may require Ray's token: put it in ~/.ray/auth_token (`ray get-auth-token`) "
                "or RAY_AUTH_TOKEN" if "401" in str(error) or "auth" in str(error).lower() else "")
        raise RepoError(f"no Ray cluster's Jobs API answers at {address}: {error}{hint}") from None


def submit(repo: BreadRepo, stages: list[str], *, store: Store, address: str | None,
           workers: int | None) -> DetachedJob:
    """Check the run as a local run would, then submit it as a Ray job; nothing is computed here."""
    address = cluster_address(address)
    if "bake" in stages:
        RunStart.capture(repo)  # refuses a detached HEAD, on which `bgit fetch` could land no bake commit
    check_run(repo, stages, store)
    if isinstance(store, LocalStore) and urlparse(address).hostname not in ("127.0.0.1", "localhost", "::1"):
        raise RepoError(f"the store {store.uri} is a folder on this machine, which the cluster at {address} "
                        "cannot reach: set BREAD_STORE=s3://bucket/prefix")
    previous = read_record(repo)
    client = job_client(address)
    if previous and str(client.get_job_status(previous.submission_id)) not in TERMINAL_STATES:
        raise RepoError(f"job {previous.submission_id} is still running: `bgit status` shows it, `bgit logs` "
                        "its log, and `bgit fetch` applies it once it is done")
    entrypoint = " ".join(["python -m bread_ray.jobs", *stages, *(["--workers", str(workers)] if workers else [])])
    env = {name: os.environ[name] for name in FORWARDED_ENV if os.environ.get(name)}
    env["BREAD_STORE"] = store.uri
    job = DetachedJob(submission_id=f"bgit-{repo.name}-{uuid.uuid4().hex[:8]}", address=address,
                      stages=list(stages), head=repo.git("rev-parse", "HEAD").strip(), store=store.uri,
                      submitted_at=datetime.now(timezone.utc).isoformat(timespec="seconds"))
    # Ray leaves `.git` out of a working dir by default; the job needs it (the staged input.yml,
    # the commits whose targets a bake replays, HEAD for the lineage). The rest of Ray's list stays.
    os.environ["RAY_OVERRIDE_RUNTIME_ENV_DEFAULT_EXCLUDES"] = ".venv,venv,__pycache__"
    deadline = time.monotonic() + AGENT_WAIT_S
    while True:
        try:
            client.submit_job(entrypoint=entrypoint, submission_id=job.submission_id,
                              runtime_env={"working_dir": str(repo.root), "env_vars": env})
            break
        except RuntimeError as error:  # a head that has just started has no job agent yet
            if "No available agent" not in str(error) or time.monotonic() > deadline:
                raise RepoError(f"the cluster at {address} refused the job: {error}") from None
            time.sleep(2)
    record_path(repo).write_text(json.dumps(job.to_json(), indent=2) + "\n")
    return job


def require_record(repo: BreadRepo) -> DetachedJob:
    job = read_record(repo)
    if job is None:
        raise RepoError("no detached run in this repository: `bgit run STAGES --detach` submits one")
    return job


def job_state(job: DetachedJob) -> tuple[str, str]:
    """(state, Ray's message) of the job."""
    info = job_client(job.address).get_job_info(job.submission_id)
    return str(info.status), info.message or ""


def job_logs(job: DetachedJob, follow: bool, write=print) -> None:
    client = job_client(job.address)
    if not follow:
        write(client.get_job_logs(job.submission_id), end="")
        return

    async def tail() -> None:
        async for lines in client.tail_job_logs(job.submission_id):
            write(lines, end="", flush=True)

    asyncio.run(tail())


def fetch(repo: BreadRepo, store: Store):
    """Apply a finished job: run its stages here (each finds its output in the store) and make
    the bake commit as a local run does. Returns the job and the pipeline's RunResult."""
    job = require_record(repo)
    state, message = job_state(job)
    if state not in TERMINAL_STATES:
        raise RepoError(f"job {job.submission_id} is {state}: `bgit status` shows its progress, `bgit logs` its log")
    if state != "SUCCEEDED":
        raise RepoError(f"job {job.submission_id} {state}: {message.strip()} (see `bgit logs`; "
                        "`bgit run ... --detach` again resumes from what the store holds)")
    head = repo.git("rev-parse", "HEAD").strip()
    if head != job.head:
        raise RepoError(f"HEAD is {head[:12]}, but job {job.submission_id} ran on {job.head[:12]}: check that "
                        "commit out again to fetch it")
    if store.uri != job.store:
        raise RepoError(f"the job wrote to store {job.store}, but BREAD_STORE is {store.uri}")
    result = run(repo, job.stages, store=store, progress=False)
    record_path(repo).unlink()
    return job, result


def main(argv: list[str] | None = None) -> int:
    """The job's entrypoint, in the repository snapshot: the stages, no commit."""
    parser = argparse.ArgumentParser(prog="python -m bread_ray.jobs", description=main.__doc__)
    parser.add_argument("stages", nargs="+", choices=STAGE_NAMES)
    parser.add_argument("--workers", type=int)
    parser.add_argument("--repo", default=".", help="the bgit repository (default: the working dir)")
    args = parser.parse_args(argv)
    repo, store = BreadRepo.find(Path(args.repo)), open_store()
    # The repository is Ray's copy of the job's working dir, which Ray unpacks afresh (at the same
    # path) when the job joins the cluster: work from its parent, by the repository's absolute path,
    # so that this process's working folder never vanishes under it (torch and transformers read it).
    os.chdir(repo.root.parent)
    print(f"bgit job: {' '.join(args.stages)} for {repo.owner}/{repo.name} at "
          f"{repo.git('rev-parse', 'HEAD').strip()[:12]}, store {store.uri}", flush=True)
    result = run(repo, args.stages, store=store, progress=False, workers=args.workers, commit=False)
    for target in result.resolved.targets:
        print(f"Done: {target.id}", flush=True)
    if result.bake is not None:
        print("\n".join([*result.bake.describe(), *result.eval_lines()]), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
