"""Loading models and tokenizers: one path for hub ids and local folders (bread_ray.model_sources).

Every stage (rollout, bake, serve, eval) loads through here, so a model name means the same
weights, dtype and chat template everywhere.
"""

from __future__ import annotations

import importlib.util
import inspect
import json
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from bread_ray.lineage import InvalidModelName, ModelName, fold_lineage
from bread_ray.model_sources import ModelNotFoundError, hub_miss, hub_offline, resolve_model_source
from bread_ray.records import FoldedChain, Lineage

if TYPE_CHECKING:
    from bread_ray.store import Store


def _load(loader: Any, name_or_path: str | Path, **kwargs: Any) -> Any:
    """Call `loader.from_pretrained`, turning a hub miss into an error that names the model."""
    source = resolve_model_source(name_or_path)
    if Path(source).is_dir():
        return loader.from_pretrained(source, **kwargs)
    try:
        return loader.from_pretrained(source, local_files_only=hub_offline(), **kwargs)
    except OSError as err:
        raise hub_miss(source, err) from err


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


def lineage_chain(model_name: str, store: Store) -> list[Lineage]:
    """The lineages of a published `owner/repo/bake_id/step` model, child first; [] for a hub id
    or a local folder (anything that is not a valid model name published in `store`)."""
    try:
        ModelName.parse(model_name)
    except InvalidModelName:
        return []
    return store.model_chain(model_name) if store.model_exists(model_name) else []


FOLDED_CHAIN_FILE = "chain.json"


def download_folded_adapter(model_name: str, store: Store, out_dir: Path,
                            chain: list[Lineage] | None = None) -> Path:
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
        adapter_dirs = [store.download_model(lineage.model_name, Path(folder, str(depth)))
                        for depth, lineage in enumerate(reversed(chain))]
        fold_lineage(adapter_dirs, out_dir)
    record = FoldedChain(model_name=model_name, base_model=chain[-1].base_model, chain=list(reversed(chain)))
    (out_dir / FOLDED_CHAIN_FILE).write_text(json.dumps(record.to_json(), indent=2, sort_keys=True) + "\n")
    return out_dir


def add_adapter(model: Any, adapter_dir: Path, name: str) -> PeftModel:
    """`model` with the PEFT adapter in `adapter_dir` added under `name`, in eval mode: the first
    adapter wraps the model in a PeftModel, later ones load beside it (select one with
    `set_adapter`). Returns the PeftModel."""
    if isinstance(model, PeftModel):
        model.load_adapter(str(adapter_dir), adapter_name=name, is_trainable=False)
    else:
        model = PeftModel.from_pretrained(model, str(adapter_dir), adapter_name=name, is_trainable=False)
    return model.eval()


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
    base = chain[-1].base_model if chain else model_name
    model = load_causal_lm(base, dtype=dtype, device=device)
    if chain:
        with tempfile.TemporaryDirectory(prefix="bread-adapter-") as folder:
            adapter_dir = download_folded_adapter(model_name, store, Path(folder), chain)
            model = PeftModel.from_pretrained(model, adapter_dir).merge_and_unload()
    return model.eval(), load_tokenizer(base)


def eos_token_ids(model: Any, tokenizer: Any) -> list[int]:
    """The generation config's end tokens (Qwen lists two) and the tokenizer's."""
    configured = model.generation_config.eos_token_id
    ids = configured if isinstance(configured, list) else [configured]
    return sorted({i for i in [*ids, tokenizer.eos_token_id] if i is not None})


def kv_cache_argument(model: Any) -> str:
    """The keyword under which `model`'s forward takes its KV cache: `cache` in recent transformers,
    `past_key_values` (deprecated there) before."""
    base = model.get_base_model() if isinstance(model, PeftModel) else model
    return "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"


def cut_at_eos(token_ids: list[int], eos_ids: list[int]) -> list[int]:
    """The tokens up to and including the first end token (generate pads the rows after it)."""
    for position, token in enumerate(token_ids):
        if token in eos_ids:
            return token_ids[:position + 1]
    return token_ids


def vllm_available() -> bool:
    """vLLM is the engine on GPU machines that have it installed (rollout and serving)."""
    return torch.cuda.is_available() and importlib.util.find_spec("vllm") is not None
