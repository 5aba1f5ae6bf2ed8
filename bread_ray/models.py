"""Loading models and tokenizers, and rendering chats: one path for hub ids and local folders.

Every stage (rollout, bake, serve, eval) loads through here, so a model name means the same
weights, dtype and chat template everywhere.
"""

from __future__ import annotations

import importlib.util
import json
import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from bread_ray.lineage import InvalidModelName, ModelName, fold_lineage

if TYPE_CHECKING:
    from bread_ray.store import Store


class ModelNotFoundError(FileNotFoundError):
    """The model is neither an existing local folder nor loadable from the Hugging Face Hub."""


def _hub_offline() -> bool:
    """Read at call time: huggingface_hub reads HF_HUB_OFFLINE only once, at import."""
    return any(os.environ.get(var, "").upper() in {"1", "ON", "YES", "TRUE"}
               for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def resolve_model_source(name_or_path: str | Path) -> str:
    """An existing local folder, or a hub id (`name` or `org/name`); anything else is an error.

    transformers reports a missing local path as a malformed repo id, so we check first.
    """
    text = str(name_or_path)
    path = Path(text).expanduser()
    if path.is_dir():
        return str(path)
    if path.exists():
        raise ModelNotFoundError(f"model path {text!r} is a file, not a model folder")
    if isinstance(name_or_path, Path) or text.startswith(("/", ".", "~")) or text.count("/") > 1:
        raise ModelNotFoundError(f"model path {text!r} does not exist")
    return text


def _load(loader: Any, name_or_path: str | Path, **kwargs: Any) -> Any:
    """Call `loader.from_pretrained`, turning a hub miss into an error that names the model."""
    source = resolve_model_source(name_or_path)
    if Path(source).is_dir():
        return loader.from_pretrained(source, **kwargs)
    offline = _hub_offline()
    try:
        return loader.from_pretrained(source, local_files_only=offline, **kwargs)
    except OSError as err:
        why = ("HF_HUB_OFFLINE is set and it is not in the local cache" if offline
               else "the Hugging Face Hub is unreachable or has no such repository")
        raise ModelNotFoundError(
            f"model {source!r}: no local folder of that name, and it cannot be loaded from the hub ({why}): {err}"
        ) from err


def load_tokenizer(name_or_path: str | Path) -> PreTrainedTokenizerBase:
    """The tokenizer with its chat template, from a local folder or a hub id."""
    return _load(AutoTokenizer, name_or_path)


def default_dtype(device: str | torch.device) -> torch.dtype:
    """bf16 on CUDA (what the GPUs train and serve in), fp32 on CPU (bf16 matmuls are slow there)."""
    return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32


def load_causal_lm(
    name_or_path: str | Path,
    dtype: torch.dtype | str | None = None,
    device: str | torch.device | None = None,
) -> PreTrainedModel:
    """AutoModelForCausalLM on `device` (default: CUDA if available), in eval mode.

    The dtype is always explicit: transformers 5 otherwise loads in the checkpoint's dtype.
    """
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = _load(AutoModelForCausalLM, name_or_path, dtype=dtype or default_dtype(device))
    return model.to(device).eval()


def lineage_chain(model_name: str, store: Store) -> list[dict]:
    """The lineages of a published `owner/repo/bake_id/step` model, child first; [] for a hub id
    or a local folder (anything that is not a valid model name published in `store`)."""
    try:
        ModelName.parse(model_name)
    except InvalidModelName:
        return []
    return store.model_chain(model_name) if store.model_exists(model_name) else []


FOLDED_CHAIN_FILE = "chain.json"


def download_folded_adapter(model_name: str, store: Store, out_dir: Path,
                            chain: list[dict] | None = None) -> Path:
    """The model's whole chain folded into one PEFT adapter folder, to apply to its base model.
    `chain`: the model's lineages (child first) if the caller has read them already.

    Beside the adapter, chain.json names the model, its base and the lineages folded in (base-most
    first). Not a lineage.json: that file describes a delta on the parent, and this adapter holds
    the whole chain (publish_model also refuses a folder holding a lineage.json).
    """
    chain = chain or lineage_chain(model_name, store)
    if not chain:
        raise ModelNotFoundError(f"{model_name!r} is not a model published in store {store.uri}: "
                                 "only lineage models (owner/repo/bake_id/step) have adapters")
    out_dir = Path(out_dir)
    with tempfile.TemporaryDirectory(prefix="bread-adapters-") as folder:
        adapter_dirs = [store.download_model(lineage["model_name"], Path(folder, str(depth)))
                        for depth, lineage in enumerate(reversed(chain))]
        fold_lineage(adapter_dirs, out_dir)
    record = {"model_name": model_name, "base_model": chain[-1]["base_model"],
              "chain": list(reversed(chain))}
    (out_dir / FOLDED_CHAIN_FILE).write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    return out_dir


def load_teacher(
    model_name: str,
    store: Store,
    device: str | torch.device | None = None,
    dtype: torch.dtype | str | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """A model as the rollout samples from it: a hub id or local folder as is, or a lineage model
    name as its base with its whole chain, folded into one adapter, merged in.

    Merging (rather than keeping a PEFT adapter) gives a plain model whose generate is as fast as
    the base's; folding first merges once, with the deltas summed in float32, rather than once per
    bake in the model's dtype.
    """
    chain = lineage_chain(model_name, store)
    base = chain[-1]["base_model"] if chain else model_name
    model = load_causal_lm(base, dtype=dtype, device=device)
    if chain:
        with tempfile.TemporaryDirectory(prefix="bread-adapter-") as folder:
            adapter_dir = download_folded_adapter(model_name, store, Path(folder), chain)
            model = PeftModel.from_pretrained(model, adapter_dir).merge_and_unload()
    return model.eval(), load_tokenizer(base)


def render_chat(
    tokenizer: PreTrainedTokenizerBase,
    messages: list[dict[str, Any]],
    tools: list[dict[str, Any]] | None = None,
    add_generation_prompt: bool = True,
    **template_kwargs: Any,
) -> str:
    """The chat as the model sees it; `tools` are OpenAI-format function specs.

    `template_kwargs` reach the template (e.g. `enable_thinking=False`).
    """
    return tokenizer.apply_chat_template(
        messages,
        tools=tools,
        add_generation_prompt=add_generation_prompt,
        tokenize=False,
        **template_kwargs,
    )


def encode_chat(
    tokenizer: PreTrainedTokenizerBase,
    messages: list[dict[str, Any]],
    tools: list[dict[str, Any]] | None = None,
    add_generation_prompt: bool = True,
    **template_kwargs: Any,
) -> list[int]:
    """Token ids of `render_chat`: a plain list (transformers 5's `apply_chat_template(tokenize=True)`
    returns a BatchEncoding). No special tokens are added: the template writes them all.
    """
    text = render_chat(tokenizer, messages, tools, add_generation_prompt, **template_kwargs)
    return tokenizer.encode(text, add_special_tokens=False)


def eos_token_ids(model: Any, tokenizer: Any) -> list[int]:
    """The generation config's end tokens (Qwen lists two) and the tokenizer's."""
    configured = model.generation_config.eos_token_id
    ids = configured if isinstance(configured, list) else [configured]
    return sorted({i for i in [*ids, tokenizer.eos_token_id] if i is not None})


def cut_at_eos(token_ids: list[int], eos_ids: list[int]) -> list[int]:
    """The tokens up to and including the first end token (generate pads the rows after it)."""
    for position, token in enumerate(token_ids):
        if token in eos_ids:
            return token_ids[:position + 1]
    return token_ids


def vllm_available() -> bool:
    """vLLM is the engine on GPU machines that have it installed (rollout and serving)."""
    return torch.cuda.is_available() and importlib.util.find_spec("vllm") is not None
