"""Stage 1, stim: the stimuli (user questions) of a target, from its generators, in order.

    hardcoded     the questions written in input.yml (the first numq)
    from_dataset  numq rows sampled (seeded) from a local JSONL / Parquet / CSV file or folder
    oneshot_qs    an LLM writes numq questions for the teacher prompt
    persona       an LLM writes numq questions that probe the teacher prompt's persona

The LLM generators split numq into requests of at most REQUEST_SIZE questions. Anthropic requests
run on Ray Data: one writer actor with at most `max_concurrency` requests in flight (threads),
each retried by the anthropic client (bread_ray.llm). The questions are parsed, de-duplicated,
and more requests are made while a generator is short.
A local writer (`model: local:<path or hub id>` or `model: parent`) generates in this process.
Each finished request's questions are stored as it finishes, so a re-run after a failure makes
only the missing requests; the manifest is written last (the layout: bread_ray.store). When the
run also does the rollout, bread_ray.stream makes the requests of every target at once, round by
round, and rolls out each question as it arrives; this stage then only writes what they made.
"""

from __future__ import annotations

import importlib.util
import json
import os
import random
import re
import string
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from bread_ray.chat_format import encode_chat
from bread_ray.config import ResolvedTarget
from bread_ray.config_errors import ConfigError, Path_, Problem
from bread_ray.errors import UserError
from bread_ray.llm import LLMSettings, anthropic_client, ask
from bread_ray.model_sources import ModelNotFoundError, resolve_model_source
from bread_ray.progress import add_bar, progress_bars
from bread_ray.records import GeneratorCount, QuestionPart, QuestionReply, QuestionRequest, StimManifest
from bread_ray.stage import Run, Stage, Streamed
from bread_ray.store import STIM_MANIFEST, Store

REQUEST_SIZE = 20  # questions per LLM request: long lists drift and repeat themselves
MAX_ROUNDS = 5  # rounds of requests per generator before giving up on reaching numq
WRITER_CPUS = 0.1  # the writer actor mostly waits on the network
LLM_TYPES = ("oneshot_qs", "persona")
TEMPLATE_FIELDS = {"numq", "prompt_u"}
QUESTION_COLUMNS = ("question", "prompt", "instruction", "text", "input")
DATASET_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv")

ONESHOT_TEMPLATE = """\
You are writing test questions for an AI assistant. The assistant runs with the prompt below
(one turn per line, as `role: content`):

<prompt>
${prompt_u}
</prompt>

Write ${numq} different questions or requests that a user might send to this assistant. Mix
questions whose answers show how the prompt shapes the assistant's behaviour with ordinary
everyday requests. Vary topic, length, tone and difficulty; make each one self-contained, and
never mention the prompt itself.

Reply with a JSON array of ${numq} strings and nothing else.
"""

PERSONA_TEMPLATE = """\
An AI assistant has been given a persona by the prompt below (one turn per line, as
`role: content`):

<prompt>
${prompt_u}
</prompt>

Write ${numq} different questions that a user might ask to probe this persona: who it is, its
background, opinions and values, its way of speaking, how it handles awkward situations, and
questions that tempt it to break character. Touch on these topics: ${topics}. Vary length and
tone; make each question self-contained, and never mention the prompt itself.

Reply with a JSON array of ${numq} strings and nothing else.
"""

PERSONA_TOPICS = [
    "childhood and origins", "daily routine", "friends and rivals", "food", "travel", "fears",
    "ambitions", "moral dilemmas", "science and technology", "history", "art and music",
    "money", "work", "nature and animals", "humour", "giving advice", "a heated argument",
    "being told it is an AI", "a request to drop the act", "regrets", "the future", "love",
    "games and sport", "teaching a skill",
]

LIST_ITEM = re.compile(r"^\s*(?:\d+\s*[.):]|[-*•])\s+(.*\S)\s*$")
FENCED = re.compile(r"```[\w-]*\s*\n(.*?)```", re.DOTALL)


class StimError(UserError, RuntimeError):
    """Stimuli could not be generated (an LLM kept failing, too few distinct questions, ...): one
    line for the user, saying which target and what is kept."""


# --------------------------------------------------------------------------------------------
# Checks before any work
# --------------------------------------------------------------------------------------------


def is_local_writer(model: str) -> bool:
    return model == "parent" or model.startswith("local:")


def local_writer_source(model: str, parent_model: str, base_dir: Path) -> str:
    """`parent` -> the parent model; `local:<x>` -> x relative to base_dir if it exists there, else x."""
    if model == "parent":
        return parent_model
    name = model.removeprefix("local:")
    path = Path(base_dir, name).expanduser()
    return str(path) if path.exists() else name


def generator_problems(target: ResolvedTarget, *, base_dir: Path, target_index: int = 0) -> list[Problem]:
    """Every generator's problem that would fail it later: a missing or bad template, a missing
    dataset or column, too few rows, no API key for an Anthropic writer. Costs no request and no
    generation (a local dataset file is read)."""
    problems = []
    for j, generator in enumerate(target.spec.generators):
        where = ("TARGET", target_index, "generators", j)
        if generator.type == "oneshot_qs" and generator.template_path is not None:
            problem = template_problem(Path(base_dir, generator.template_path))
            if problem:
                problems.append(Problem((*where, "template_path"), problem))
        if generator.type == "from_dataset":
            problem = dataset_problem(generator.dataset, Path(base_dir))
            if problem:
                problems.append(Problem((*where, "dataset"), problem))
            elif Path(base_dir, generator.dataset).expanduser().exists():  # a hub dataset is read by stim only
                problems += dataset_values(generator, Path(base_dir), where=where)[1]
        if generator.type in LLM_TYPES and generator.model.startswith("local:"):
            problem = local_writer_problem(generator.model, Path(base_dir))
            if problem:
                problems.append(Problem((*where, "model"), problem))
        anthropic_writer = generator.type in LLM_TYPES and not is_local_writer(generator.model)
        if anthropic_writer and not os.environ.get("ANTHROPIC_API_KEY"):
            problems.append(Problem((*where, "model"), (
                f"{generator.model!r} is an Anthropic model and ANTHROPIC_API_KEY is not set: set it, or write "
                "the questions offline with `model: local:<path or hub id>` or `model: parent`"
            )))
    return problems


def local_writer_problem(model: str, base_dir: Path) -> str | None:
    try:
        resolve_model_source(local_writer_source(model, "", base_dir))
    except ModelNotFoundError as error:
        return str(error)
    return None


def template_problem(path: Path) -> str | None:
    if not path.is_file():
        return f"template file {path} does not exist"
    template = string.Template(path.read_text())
    if not template.is_valid():
        return f"template {path} is not a valid string.Template (write a literal $ as $$)"
    fields = set(template.get_identifiers())
    if TEMPLATE_FIELDS - fields:
        missing = " and ".join(f"${{{name}}}" for name in sorted(TEMPLATE_FIELDS - fields))
        return f"template {path} must contain {missing}"
    if fields - TEMPLATE_FIELDS:
        unknown = ", ".join(f"${{{name}}}" for name in sorted(fields - TEMPLATE_FIELDS))
        return f"template {path} uses {unknown}; only ${{numq}} and ${{prompt_u}} are filled in"
    return None


def dataset_problem(dataset: str, base_dir: Path) -> str | None:
    path = Path(base_dir, dataset).expanduser()
    if path.is_file():
        return None if path.suffix in DATASET_SUFFIXES else f"{path} is not a {'/'.join(DATASET_SUFFIXES)} file"
    if path.is_dir():
        return None if dataset_files(path) else f"folder {path} holds no {'/'.join(DATASET_SUFFIXES)} files"
    looks_local = dataset.startswith((".", "/", "~")) or dataset.endswith(DATASET_SUFFIXES) or dataset.count("/") > 1
    if looks_local:
        return f"dataset file {path} does not exist"
    if importlib.util.find_spec("datasets") is None:
        return (f"no file or folder {path}, and {dataset!r} cannot be loaded as a Hugging Face dataset: the "
                "`datasets` package is not installed (pip install datasets, or use a local JSONL/Parquet/CSV file)")
    return None


# --------------------------------------------------------------------------------------------
# The stage
# --------------------------------------------------------------------------------------------


class Stim(Stage):
    """The questions (stimuli) of each target, from its generators."""

    name = "stim"

    def items(self, run: Run) -> list[ResolvedTarget]:
        return list(run.resolved.targets)

    def done(self, run: Run, target: ResolvedTarget) -> bool:
        return run.store.exists(f"{run.target_prefix(target.id)}/{STIM_MANIFEST}")

    def problems(self, run: Run, target: ResolvedTarget) -> list[Problem]:
        return generator_problems(target, base_dir=run.repo.root, target_index=run.target_index(target))

    def execute(self, run: Run, target: ResolvedTarget, streamed: Streamed) -> list[str]:
        return generate_stimuli(target, store=run.store, prefix=run.target_prefix(target.id),
                                parent_model=run.resolved.parent_model, base_dir=run.repo.root, progress=run.progress,
                                target_index=run.target_index(target))


def generate_stimuli(
    target: ResolvedTarget,
    *,
    store: Store,
    prefix: str,
    parent_model: str,
    base_dir: Path,
    max_concurrency: int | None = None,
    progress: bool = True,
    llm: LLMSettings = LLMSettings(),
    target_index: int = 0,
    load_writer: Callable[[str], tuple[Any, Any]] | None = None,
) -> list[str]:
    """All generators' questions, in order, written to `<prefix>/stim/`; stored ones when present.

    `max_concurrency` bounds the LLM requests in flight (default: the target's). The cheap
    generators run first, so a bad dataset column fails before any LLM request is made.
    `load_writer` loads local question writers (default: each once, for this call).
    """
    if store.exists(f"{prefix}/{STIM_MANIFEST}"):
        return [record["question"] for record in read_stimuli(store, prefix)]
    problems = generator_problems(target, base_dir=base_dir, target_index=target_index)
    if problems:
        raise ConfigError("input.yml", problems)
    generators = target.spec.generators
    per_generator = fixed_questions(target, Path(base_dir), target_index)
    llm_generators = {j: g for j, g in enumerate(generators) if g.type in LLM_TYPES}
    if llm_generators:
        per_generator |= write_llm_questions(
            target, llm_generators, store=store, prefix=prefix, parent_model=parent_model, base_dir=Path(base_dir),
            max_concurrency=max_concurrency or target.spec.max_concurrency, progress=progress, llm=llm,
            load_writer=load_writer or local_writer_loader(store),
        )
    records = [{"generator": j, "question": q} for j in range(len(generators)) for q in per_generator[j]]
    records = [{"index": index, **record} for index, record in enumerate(records)]
    jsonl = "".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records)
    store.put_bytes(f"{prefix}/stim/stimuli.jsonl", jsonl.encode())
    store.put_record(f"{prefix}/{STIM_MANIFEST}", StimManifest(
        target=target.id, total=len(records),
        generators=[GeneratorCount(index=j, type=g.type, count=len(per_generator[j])) for j, g in enumerate(generators)]))
    return [record["question"] for record in records]


def fixed_questions(target: ResolvedTarget, base_dir: Path, target_index: int = 0) -> dict[int, list[str]]:
    """The questions of the generators that need no LLM (hardcoded, from_dataset), by index."""
    fixed = {}
    for j, generator in enumerate(target.spec.generators):
        if generator.type == "hardcoded":
            fixed[j] = generator.questions[: generator.numq or len(generator.questions)]
        elif generator.type == "from_dataset":
            fixed[j] = sample_dataset(generator, base_dir, where=("TARGET", target_index, "generators", j))
    return fixed


def read_stimuli(store: Store, prefix: str) -> list[dict[str, Any]]:
    """The stored `{"index", "generator", "question"}` records of a target."""
    text = store.get_bytes(f"{prefix}/stim/stimuli.jsonl").decode()
    return [json.loads(line) for line in text.splitlines() if line.strip()]


# --------------------------------------------------------------------------------------------
# from_dataset
# --------------------------------------------------------------------------------------------


def dataset_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix in DATASET_SUFFIXES)


def read_table(path: Path):
    import pandas

    if path.suffix == ".parquet":
        return pandas.read_parquet(path)
    if path.suffix == ".csv":
        return pandas.read_csv(path)
    return pandas.read_json(path, lines=path.suffix == ".jsonl")


def read_dataset(dataset: str, split: str, base_dir: Path):
    """A pandas DataFrame of a local file, a folder of files, or a Hugging Face dataset."""
    import pandas

    path = Path(base_dir, dataset).expanduser()
    if path.exists():
        files = [path] if path.is_file() else dataset_files(path)
        return pandas.concat([read_table(f) for f in files], ignore_index=True)
    import datasets

    return datasets.load_dataset(dataset, split=split).to_pandas()


def dataset_values(generator: Any, base_dir: Path, *, where: Path_) -> tuple[list[str], list[Problem]]:
    """The non-empty values of the dataset's question column, and what prevents sampling `numq`
    of them (no such column, too few rows)."""
    frame = read_dataset(generator.dataset, generator.split, base_dir)
    columns = [str(c) for c in frame.columns]
    column = generator.field or next((c for c in QUESTION_COLUMNS if c in columns), None)
    if column not in columns:
        message = (f"no column {column!r}" if column else f"no column named {', '.join(QUESTION_COLUMNS)}") + (
            f" in {generator.dataset}: its columns are {', '.join(columns)}; set `field`")
        return [], [Problem((*where, "field"), message)]
    values = [str(v).strip() for v in frame[column].dropna().tolist()]
    values = [v for v in values if v]
    if len(values) < generator.numq:
        message = f"is {generator.numq} but {generator.dataset} has only {len(values)} non-empty rows in {column!r}"
        return values, [Problem((*where, "numq"), message)]
    return values, []


def sample_dataset(generator: Any, base_dir: Path, *, where: Path_) -> list[str]:
    """`numq` non-empty values of the question column, sampled without replacement with `seed`."""
    values, problems = dataset_values(generator, base_dir, where=where)
    if problems:
        raise ConfigError("input.yml", problems)
    return [values[i] for i in random.Random(generator.seed).sample(range(len(values)), generator.numq)]


# --------------------------------------------------------------------------------------------
# LLM generators: requests, rounds, parts
# --------------------------------------------------------------------------------------------


def render_teacher_prompt(target: ResolvedTarget) -> str:
    """The teacher prompt as text for ${prompt_u}: one `role: content` line per message."""
    lines = [f"{m['role']}: {m['content']}" for m in target.teacher.messages]
    tools = [tool["function"]["name"] for tool in target.teacher.tools]
    return "\n".join(lines + ([f"tools: {', '.join(tools)}"] if tools else []))


def plan_requests(
    j: int, generator: Any, *, first: int, numq: int, prompt_u: str, base_dir: Path, parent_model: str
) -> list[QuestionRequest]:
    """Requests of at most REQUEST_SIZE questions for `numq`, numbered from `first`."""
    if generator.type == "persona":
        template = PERSONA_TEMPLATE
    elif generator.template_path is not None:
        template = Path(base_dir, generator.template_path).read_text()
    else:
        template = ONESHOT_TEMPLATE
    seed = getattr(generator, "seed", 0)
    model = generator.model
    if is_local_writer(model):
        model = "local:" + local_writer_source(model, parent_model, base_dir)
    requests = []
    for offset, start in enumerate(range(0, numq, REQUEST_SIZE)):
        index = first + offset
        count = min(REQUEST_SIZE, numq - start)
        topics = ", ".join(random.Random(f"{seed}:{index}").sample(PERSONA_TOPICS, 3))
        prompt = string.Template(template).substitute(numq=count, prompt_u=prompt_u, topics=topics)
        requests.append(QuestionRequest(generator=j, request=index, count=count, model=model,
                                        temperature=generator.temperature, seed=seed + index, prompt=prompt))
    return requests


def part_key(prefix: str, j: int, index: int) -> str:
    return f"{prefix}/stim/parts/{j}-{index}.json"


def distinct(questions: list[str]) -> list[str]:
    """Questions in order without repeats, comparing with whitespace and case normalised."""
    seen, kept = set(), []
    for question in questions:
        key = " ".join(question.split()).casefold()
        if key not in seen:
            seen.add(key)
            kept.append(question)
    return kept


def write_llm_questions(
    target: ResolvedTarget, generators: dict[int, Any], *, store: Store, prefix: str, parent_model: str,
    base_dir: Path, max_concurrency: int, progress: bool, llm: LLMSettings,
    load_writer: Callable[[str], tuple[Any, Any]],
) -> dict[int, list[str]]:
    """Exactly numq distinct questions per LLM generator, in rounds: each round makes the requests
    not yet in the store (all generators together, so the concurrency bound is global), then plans
    more requests for any generator still short."""
    prompt_u = render_teacher_prompt(target)
    planned = first_round(target, generators, base_dir=base_dir, parent_model=parent_model)
    parts = stored_parts(store, prefix)

    def collected(j: int) -> list[str]:
        return distinct([q for r in planned[j] for q in parts.get((j, r.request), [])])

    with progress_bars(progress) as bars:
        bar = {j: add_bar(bars, f"stim: {g.type} [{j}]", "questions", g.numq) for j, g in generators.items()}
        for _ in range(MAX_ROUNDS):
            for j in generators:
                bars.update(bar[j], completed=min(len(collected(j)), generators[j].numq))
            missing = [r for j in generators for r in planned[j] if (j, r.request) not in parts]
            failures = []
            for reply in run_requests(missing, max_concurrency=max_concurrency, llm=llm, load_writer=load_writer):
                if reply.error:
                    failures.append(reply)
                    continue
                store_part(store, prefix, reply)
                parts[reply.generator, reply.request] = reply.questions
                bars.update(bar[reply.generator], completed=min(len(collected(reply.generator)),
                                                                generators[reply.generator].numq))
            if failures:
                raise StimError(
                    f"target {target.name}: {len(failures)} of {len(missing)} question requests failed "
                    f"(generators {sorted({f.generator for f in failures})}); first error: {failures[0].error}. "
                    f"The {len(missing) - len(failures)} finished requests are saved: a re-run makes only the rest."
                )
            more = {j: more_requests(j, g, planned[j], len(collected(j)), prompt_u=prompt_u, base_dir=base_dir,
                                     parent_model=parent_model) for j, g in generators.items()}
            if not any(more.values()):
                return {j: collected(j)[: g.numq] for j, g in generators.items()}
            for j, requests in more.items():
                planned[j] += requests
    j = next(j for j, g in generators.items() if len(collected(j)) < g.numq)
    raise StimError(
        f"target {target.name}: generator {j} ({generators[j].type}) has only {len(collected(j))} "
        f"distinct questions of {generators[j].numq} after {MAX_ROUNDS} rounds of requests"
    )


def more_requests(j: int, generator: Any, planned: list[QuestionRequest], have: int, *, prompt_u: str,
                  base_dir: Path, parent_model: str) -> list[QuestionRequest]:
    """Generator j's next round, once its `planned` requests have arrived with `have` distinct
    questions: requests for the numq - have it still lacks, numbered after the last; none when
    it has numq."""
    if have >= generator.numq:
        return []
    return plan_requests(j, generator, first=planned[-1].request + 1, numq=generator.numq - have, prompt_u=prompt_u,
                         base_dir=base_dir, parent_model=parent_model)


def first_round(target: ResolvedTarget, generators: dict[int, Any], *, base_dir: Path,
                parent_model: str) -> dict[int, list[QuestionRequest]]:
    """Each LLM generator's first requests: numq questions in requests of at most REQUEST_SIZE."""
    prompt_u = render_teacher_prompt(target)
    return {j: plan_requests(j, g, first=0, numq=g.numq, prompt_u=prompt_u, base_dir=base_dir,
                             parent_model=parent_model) for j, g in generators.items()}


def stored_parts(store: Store, prefix: str) -> dict[tuple[int, int], list[str]]:
    """{(generator, request): questions} of the requests already made for a target."""
    parts = {}
    for key in store.list(f"{prefix}/stim/parts"):
        part = store.get_record(key, QuestionPart)
        parts[part.generator, part.request] = part.questions
    return parts


def store_part(store: Store, prefix: str, reply: QuestionReply) -> None:
    """Keep one finished request's questions."""
    store.put_record(part_key(prefix, reply.generator, reply.request), reply.part())


def local_writer_loader(store: Store) -> Callable[[str], tuple[Any, Any]]:
    """`load(source) -> (tokenizer, model)` of local question writers, each loaded once by this
    loader; a lineage name loads with its adapters."""
    loaded: dict[str, tuple[Any, Any]] = {}

    def load(source: str) -> tuple[Any, Any]:
        from bread_ray.models import load_teacher

        if source not in loaded:
            model, tokenizer = load_teacher(source, store)
            loaded[source] = (tokenizer, model)
        return loaded[source]
    return load


def run_requests(
    requests: list[QuestionRequest], *, max_concurrency: int, llm: LLMSettings,
    load_writer: Callable[[str], tuple[Any, Any]],
) -> Iterator[QuestionReply]:
    """Replies as requests finish: local writers here (`load_writer(source) -> (tokenizer,
    model)`), Anthropic ones on Ray Data."""
    local = [r for r in requests if r.local_source]
    remote = [r for r in requests if not r.local_source]
    if local:
        yield from write_locally(local, load_writer)
    if remote:
        yield from write_on_ray(remote, max_concurrency=max_concurrency, llm=llm)


# --------------------------------------------------------------------------------------------
# Anthropic writers on Ray Data
# --------------------------------------------------------------------------------------------


def write_on_ray(requests: list[QuestionRequest], *, max_concurrency: int, llm: LLMSettings) -> Iterator[QuestionReply]:
    """One request per batch, on one writer actor that runs min(max_concurrency, requests) of
    them at once in threads: never more than max_concurrency requests in flight, and one process
    to start (the requests wait on the network, not on a CPU). One block per request."""
    from bread_ray.ray_cluster import actor_pool

    rows = [{"request": request.model_dump_json()} for request in requests]
    dataset = actor_pool(rows, AnthropicQuestionWriter, {
        "api_key": os.environ.get("ANTHROPIC_API_KEY"),
        "base_url": os.environ.get("ANTHROPIC_BASE_URL"),  # read here: actors may not share our env
        "llm": llm,
    }, actors=1, cpus=WRITER_CPUS, gpu=False, concurrent_calls=min(max_concurrency, len(requests)))
    for row in dataset.iter_rows():
        yield QuestionReply.model_validate_json(row["reply"])


class AnthropicQuestionWriter:
    """A Ray Data actor: one Anthropic client (thread-safe), shared by the calls that run at once;
    each batch one request. A request that still fails after its retries becomes an `error` row,
    so the requests that finished are kept."""

    def __init__(self, api_key: str | None, base_url: str | None, llm: LLMSettings):
        self.client = anthropic_client(llm, api_key=api_key, base_url=base_url)
        self.llm = llm

    def __call__(self, batch: dict[str, Any]) -> dict[str, list[str]]:
        replies = []
        for text in batch["request"]:
            request = QuestionRequest.model_validate_json(text)
            try:
                questions, error = ask_questions(self.client, request, self.llm), ""
            except Exception as failure:  # noqa: BLE001 - reported per request, with its type
                questions, error = [], f"{type(failure).__name__}: {failure}"
            replies.append(QuestionReply(target=request.target, generator=request.generator, request=request.request,
                                         questions=questions, error=error).model_dump_json())
        return {"reply": replies}


def ask_questions(client: Any, request: QuestionRequest, llm: LLMSettings) -> list[str]:
    """The questions of one request of a generator."""
    return ask(client, model=request.model, prompt=request.prompt, max_tokens=min(8192, 150 * request.count + 256),
               temperature=request.temperature, parse=parse_questions, wanted="questions", settings=llm)


# --------------------------------------------------------------------------------------------
# Parsing replies; local writers
# --------------------------------------------------------------------------------------------


def parse_questions(text: str) -> list[str]:
    """Questions from an LLM reply: a JSON array of strings, else numbered or bulleted list
    items, in or out of code fences. Empty when neither is found."""
    body = "\n".join(FENCED.findall(text)) or text
    start, end = body.find("["), body.rfind("]")
    if 0 <= start < end:
        try:
            items = json.loads(body[start : end + 1])
        except ValueError:
            items = None
        if isinstance(items, list) and items and all(isinstance(item, str) for item in items):
            return [item.strip() for item in items if item.strip()]
    items = [match.group(1) for line in body.splitlines() if (match := LIST_ITEM.match(line))]
    return [item.strip().strip('"').strip() for item in items if item.strip('" ')]


def write_locally(requests: list[QuestionRequest], load_writer: Callable[[str], tuple[Any, Any]]) -> Iterator[QuestionReply]:
    """Requests answered by a local model in this process: sampled at the generator's temperature,
    seeded per request. Small models rarely format lists, so any non-empty line then counts."""
    import torch

    for request in requests:
        tokenizer, model = load_writer(request.local_source)
        ids = encode_chat(tokenizer, [{"role": "user", "content": request.prompt}])
        temperature = request.temperature
        sampling = {"do_sample": True, "temperature": temperature} if temperature > 0 else {"do_sample": False}
        with torch.random.fork_rng(devices=[]), torch.no_grad():
            torch.manual_seed(request.seed)
            output = model.generate(
                torch.tensor([ids], device=model.device), max_new_tokens=min(1024, 32 * request.count + 32),
                pad_token_id=tokenizer.pad_token_id, **sampling,
            )
        text = tokenizer.decode(output[0, len(ids):], skip_special_tokens=True)
        questions = parse_questions(text) or [line.strip() for line in text.splitlines() if line.strip()]
        yield QuestionReply(target=request.target, generator=request.generator, request=request.request,
                            questions=questions)
