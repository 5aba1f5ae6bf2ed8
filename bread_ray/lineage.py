"""Model names and the rules for their parts.

A model is named `owner/repo/bake_id/step` (e.g. `alice/pirate/3f2a9c1d/120`) and that name is
also its place in the store (`models/<owner>/<repo>/<bake_id>/<step>/`). Names come from users
and from lineage files, so every part is checked before it becomes a path: only
`[A-Za-z0-9._-]`, not starting with `.` (which rules out `.`, `..` and hidden files), and the step
is a plain non-negative integer. Store keys (bread_ray.store) follow the same rule.

A model's weights are its base plus the LoRA deltas of its whole chain, base-most first. LoRA
deltas add (W = W0 + sum_i s_i * B_i @ A_i), so `fold_lineage` turns the chain into one adapter
of the summed rank that serving and the rollout load like any other.
"""

from __future__ import annotations

import json
import math
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

if TYPE_CHECKING:
    import torch

MAX_COMPONENT_LENGTH = 255  # the usual file name limit


class InvalidName(ValueError):
    """An owner, repo or bake id that cannot be used as a name (and so as a store path)."""


class InvalidModelName(InvalidName):
    """Text that is not a valid `owner/repo/bake_id/step` model name."""


def component_problem(value: object, extra_chars: str = "") -> str | None:
    """Why `value` cannot be one part of a name or store key, or None if it can.

    Allowed: `[A-Za-z0-9._-]` plus `extra_chars`, not starting with `.`; store keys add `=` for
    `key=value` partition folders.
    """
    allowed = f"[A-Za-z0-9._{extra_chars}-]"
    if not isinstance(value, str):
        return f"{value!r} is not a string"
    if value == "":
        return "'' is empty"
    if value in (".", ".."):
        return f"{value!r} is not allowed (use {allowed})"
    if len(value) > MAX_COMPONENT_LENGTH:
        return f"{value[:20]!r}... is longer than {MAX_COMPONENT_LENGTH} characters"
    if value.startswith("."):
        return f"{value!r} must not start with '.'"
    extra = re.escape(extra_chars)
    if not re.fullmatch(f"[A-Za-z0-9._{extra}-]+", value):
        return f"{value!r} has characters outside {allowed}"
    return None


def validate_name_component(kind: str, value: str) -> str:
    """Check one name part such as an owner or repo name; returns it, raises InvalidName."""
    problem = component_problem(value)
    if problem:
        raise InvalidName(f"invalid {kind} {value!r}: {problem}")
    return value


@dataclass(frozen=True, order=True)
class ModelName:
    """`owner/repo/bake_id/step`; ordered so that steps sort numerically."""

    owner: str
    repo: str
    bake_id: str
    step: int

    def __post_init__(self):
        for kind in ("owner", "repo", "bake_id"):
            problem = component_problem(getattr(self, kind))
            if problem:
                raise InvalidModelName(f"invalid model name {str(self)!r}: component {problem}")
        if type(self.step) is not int or self.step < 0:
            raise InvalidModelName(f"invalid model name {str(self)!r}: step {self.step!r} "
                                   "is not a non-negative integer")

    @classmethod
    def parse(cls, text: str) -> ModelName:
        if not isinstance(text, str):
            raise InvalidModelName(f"invalid model name {text!r}: not a string")
        parts = text.split("/")
        if len(parts) != 4:
            raise InvalidModelName(f"invalid model name {text!r}: expected owner/repo/bake_id/step "
                                   f"(4 parts separated by '/'), got {len(parts)}")
        owner, repo, bake_id, step = parts
        # Digits only and no leading zeros, so that each model has exactly one name.
        if not re.fullmatch(r"0|[1-9][0-9]*", step):
            raise InvalidModelName(f"invalid model name {text!r}: step {step!r} is not a "
                                   "non-negative integer (digits, no leading zeros)")
        return cls(owner, repo, bake_id, int(step))

    def __str__(self) -> str:
        return f"{self.owner}/{self.repo}/{self.bake_id}/{self.step}"


# --- folding a chain of LoRA adapters into one ---------------------------------------------------
# torch and safetensors are imported inside the functions below: the bgit CLI imports this module
# (through the store) for names alone, and importing torch would add seconds to every command.

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."  # how PEFT prefixes the module names in a saved LoRA adapter

# adapter_config.json fields that make an adapter something other than W += s * B @ A on linear
# layers (or that store whole weights), so that no plain LoRA equals a chain holding it.
UNFOLDABLE_FEATURES = {
    "use_dora": "DoRA rescales the merged weight by a learned magnitude, which does not add across adapters",
    "modules_to_save": "modules_to_save stores whole trained modules, not low-rank deltas",
    "trainable_token_indices": "trainable tokens replace embedding rows, not low-rank deltas",
    "target_parameters": "LoRA on bare parameters (target_parameters) is not a linear-layer LoRA",
    "layer_replication": "layer_replication changes the model's layers",
    "alora_invocation_tokens": "activated LoRA applies only after its invocation tokens, so it never merges",
    "use_qalora": "QA-LoRA pools the input before A, so its delta is not B @ A",
    "use_bdlora": "BD-LoRA's block-diagonal factors are not stored as plain A and B",
    "arrow_config": "Arrow routes each token among several LoRA experts",
    "kasa_config": "KaSA truncates the base weight and scales B @ A by a learned diagonal",
    "monteclora_config": "MonteCLoRA samples its LoRA weights",
    "lora_bias": "lora_bias adds a bias delta, which folds only into layers whose base has a bias",
}
# init_lora_weights that rewrite the base weights when the adapter is created: the adapter is then a
# delta on that rewritten base, not on its parent.
BASE_REWRITING_INITS = ("pissa", "corda", "olora", "loftq", "lora_ga")


class UnfoldableAdapter(ValueError):
    """An adapter of the chain is not a plain LoRA on linear layers, so no single LoRA equals the chain."""


@dataclass
class LoraDeltas:
    """One adapter's contribution: per module (PEFT's name, without PEFT_PREFIX), A already multiplied
    by the module's scaling, and B; plus its bias values (full values, keyed by module name)."""

    delta: dict[str, tuple[torch.Tensor, torch.Tensor]]  # module -> (s * A [r, in], B [out, r])
    bias: dict[str, torch.Tensor]  # module -> bias [out]

    @property
    def width(self) -> int:
        """The rank block this adapter takes in the folded adapter: its largest module rank."""
        return max((a.shape[0] for a, _ in self.delta.values()), default=0)


def read_adapter(adapter_dir: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """(adapter_config.json, adapter_model.safetensors) of a PEFT adapter folder."""
    from safetensors.torch import load_file

    for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
        if not (adapter_dir / name).is_file():
            raise FileNotFoundError(f"adapter folder {adapter_dir} has no {name}")
    return json.loads((adapter_dir / ADAPTER_CONFIG).read_text()), load_file(adapter_dir / ADAPTER_WEIGHTS)


def check_foldable(config: dict, adapter_dir: Path) -> None:
    """Raise UnfoldableAdapter, naming the adapter and the reason, unless it is a plain LoRA."""
    def refuse(reason: str) -> NoReturn:
        raise UnfoldableAdapter(f"cannot fold adapter {adapter_dir}: {reason}")

    if config.get("peft_type") != "LORA":
        refuse(f"peft_type is {config.get('peft_type')!r}, not 'LORA'")
    for field, reason in UNFOLDABLE_FEATURES.items():
        if config.get(field):
            refuse(f"{field}={config[field]!r}: {reason}")
    init = config.get("init_lora_weights")
    if isinstance(init, str) and init.lower().startswith(BASE_REWRITING_INITS):
        refuse(f"init_lora_weights={init!r} rewrote the base weights when the adapter was created, "
               "so the adapter is not a delta on its parent")


def module_scaling(config: dict, module: str, rank: int) -> float:
    """PEFT's LoRA scaling of one module: alpha / r, or alpha / sqrt(r) with rsLoRA. The module's
    rank comes from its tensors (so rank_pattern is already applied), its alpha from alpha_pattern,
    matched the way PEFT matches it (peft.utils.other.get_pattern_key)."""
    alpha = config["lora_alpha"]
    for pattern, value in (config.get("alpha_pattern") or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", module):
            alpha = value
            break
    return alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank


def lora_deltas(config: dict, state: dict[str, torch.Tensor], adapter_dir: Path) -> LoraDeltas:
    """Split a checked adapter's saved tensors into scaled LoRA deltas and bias values; any other
    tensor (embedding or conv LoRA, DoRA magnitudes, whole modules...) is refused by name."""
    import torch

    def refuse(key: str, reason: str) -> NoReturn:
        raise UnfoldableAdapter(f"cannot fold adapter {adapter_dir}: tensor {key} {reason}")

    factors: dict[str, dict[str, torch.Tensor]] = {}
    bias = {}
    others = []
    for key, tensor in state.items():
        if not key.startswith(PEFT_PREFIX):
            refuse(key, f"does not start with {PEFT_PREFIX!r}, as a saved PEFT LoRA adapter's do")
        path = key.removeprefix(PEFT_PREFIX)
        if match := re.fullmatch(r"(.+)\.lora_([AB])\.weight", path):
            if tensor.dim() != 2:
                refuse(key, f"has shape {list(tensor.shape)}: only LoRA on linear layers folds (not conv)")
            factors.setdefault(match[1], {})[match[2]] = tensor
        elif "lora_" not in path and path.endswith(".bias"):
            # bias="all" / "lora_only": whole trained values (on a targeted layer, of its base_layer)
            bias[path.removesuffix(".bias").removesuffix(".base_layer")] = tensor
        else:
            others.append(key)
    if others:  # an embedding LoRA also saves the whole embedding: name the LoRA, the cause
        embedding = [key for key in others if ".lora_embedding_" in key]
        if embedding:
            refuse(embedding[0], "is an embedding LoRA factor: only LoRA on linear layers folds")
        refuse(others[0], "is neither a linear-layer LoRA factor (lora_A / lora_B) nor a bias "
               "(DoRA magnitudes and whole saved modules do not fold)")
    delta = {}
    for module, pair in factors.items():
        if pair.keys() != {"A", "B"}:
            refuse(f"{PEFT_PREFIX}{module}.lora_*", f"has lora_{''.join(pair)} alone")
        a, b = pair["A"], pair["B"]
        if a.shape[0] != b.shape[1]:
            refuse(f"{PEFT_PREFIX}{module}.lora_*", f"has A {list(a.shape)} and B {list(b.shape)} "
                   "of different ranks")
        # float32 arithmetic, or the adapter's own dtype where that is wider; saved as float32
        dtype = torch.promote_types(a.dtype, torch.float32)
        scaling = module_scaling(config, module, a.shape[0])
        delta[module] = ((a.to(dtype) * scaling).float(), b.float())
    return LoraDeltas(delta, {module: value.float() for module, value in bias.items()})


def fold_adapters(adapter_dirs: list[Path]) -> tuple[dict, dict[str, torch.Tensor]]:
    """Fold PEFT adapter folders (base-most first) into one: (adapter_config dict, state dict in PEFT's
    saved key layout).

    Adapter i takes rank block i of width r_i (its largest module rank): A = [s_1 A_1; ...; s_n A_n]
    [R, in] and B = [B_1 ... B_n] [out, R], with R = sum r_i and lora_alpha = R, so the folded scaling
    is 1 and B @ A = sum_i s_i B_i @ A_i exactly. A module that adapter i does not target (or targets
    at a lower rank) gets zeros in that block. Zero blocks rather than a rank_pattern: one rank and
    one alpha for every module leave a loader (PEFT, a serving engine, a hand-written merge) no
    pattern to match, and each bake's block sits at the same place in every module. The price is
    zeros where bakes targeted different modules. Biases (bias="all" / "lora_only") are whole
    values, not deltas: the latest adapter that has one wins, as when the adapters are merged in turn.
    """
    import torch

    if not adapter_dirs:
        raise ValueError("fold_adapters: no adapters to fold")
    adapter_dirs = [Path(d) for d in adapter_dirs]
    configs, parts = [], []
    for adapter_dir in adapter_dirs:
        config, state = read_adapter(adapter_dir)
        check_foldable(config, adapter_dir)
        configs.append(config)
        parts.append(lora_deltas(config, state, adapter_dir))
    fan_in_fan_out = {bool(c.get("fan_in_fan_out")) for c in configs}
    if len(fan_in_fan_out) > 1:
        raise UnfoldableAdapter(f"cannot fold adapters {[str(d) for d in adapter_dirs]}: they "
                                "disagree on fan_in_fan_out (the layout of their base weights)")

    shapes: dict[str, tuple[int, int]] = {}  # module -> (out, in), the same in every adapter
    for adapter_dir, part in zip(adapter_dirs, parts):
        for module, (a, b) in part.delta.items():
            shape = shapes.setdefault(module, (b.shape[0], a.shape[1]))
            if shape != (b.shape[0], a.shape[1]):
                raise UnfoldableAdapter(f"cannot fold adapter {adapter_dir}: module {module} is "
                                        f"{b.shape[0]}x{a.shape[1]} there but {shape[0]}x{shape[1]} "
                                        "in an earlier adapter (another base model?)")
    rank = sum(part.width for part in parts)
    if rank == 0:
        raise UnfoldableAdapter(f"cannot fold adapters {[str(d) for d in adapter_dirs]}: "
                                "none has a LoRA factor")

    state = {}
    for module, (out_features, in_features) in sorted(shapes.items()):
        a_folded = torch.zeros(rank, in_features)
        b_folded = torch.zeros(out_features, rank)
        start = 0
        for part in parts:
            if module in part.delta:
                a, b = part.delta[module]
                a_folded[start:start + a.shape[0]] = a
                b_folded[:, start:start + a.shape[0]] = b
            start += part.width
        state[f"{PEFT_PREFIX}{module}.lora_A.weight"] = a_folded
        state[f"{PEFT_PREFIX}{module}.lora_B.weight"] = b_folded

    bias = {}
    for part in parts:
        bias.update(part.bias)  # later adapters win
    for module, value in bias.items():  # PEFT keeps a targeted layer's bias on its base_layer
        state[f"{PEFT_PREFIX}{module}{'.base_layer' if module in shapes else ''}.bias"] = value

    config = {
        **configs[-1],  # task type, base model, dropout...: the latest adapter's
        "r": rank,
        "lora_alpha": rank,
        "use_rslora": False,
        "rank_pattern": {},
        "alpha_pattern": {},
        "target_modules": sorted(shapes),  # explicit names: the union across the chain
        "exclude_modules": None,
        "layers_to_transform": None,
        "layers_pattern": None,
        "bias": "none" if not bias else "lora_only" if bias.keys() <= shapes.keys() else "all",
        "init_lora_weights": True,  # a targeted module with no saved factors stays a no-op (B = 0)
        "inference_mode": True,
    }
    return config, state


def write_adapter(config: dict, state: dict[str, torch.Tensor], out_dir: Path) -> Path:
    """A PEFT adapter folder (adapter_config.json + adapter_model.safetensors) that
    PeftModel.from_pretrained loads."""
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    save_file({key: value.contiguous() for key, value in state.items()}, out_dir / ADAPTER_WEIGHTS,
              metadata={"format": "pt"})
    return out_dir


def fold_lineage(adapter_dirs: list[Path], out_dir: Path) -> Path:
    """The adapters (base-most first) as one PEFT adapter folder; a chain of one is copied as is
    (whatever kind of PEFT adapter it is: nothing needs folding)."""
    if len(adapter_dirs) == 1:
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
            source = Path(adapter_dirs[0], name)
            if not source.is_file():
                raise FileNotFoundError(f"adapter folder {adapter_dirs[0]} has no {name}")
            shutil.copyfile(source, out_dir / name)
        return out_dir
    return write_adapter(*fold_adapters(adapter_dirs), out_dir)
