"""DeepSpeed for a bake: the ZeRO config, the optimizer and the learning-rate schedule, built
from BAKE in one place.

No DeepSpeed op is JIT-compiled unless CPU offload asks for it: a torch optimizer is passed in
(`zero_allow_untested_optimizer`), so a fresh machine does not spend a minute building FusedAdam.
With `offload_optimizer: cpu` the optimizer step runs on the CPU, where DeepSpeedCPUAdam is the
fast one (built once, cached in $TORCH_EXTENSIONS_DIR).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from bread_ray.schema import Bake


def deepspeed_config(bake: Bake, *, world_size: int, hidden_size: int, bf16: bool) -> dict[str, Any]:
    """The DeepSpeed config dict for BAKE on `world_size` workers.

    Bucket sizes follow Hugging Face's "auto" values for the model's hidden size. Parameters
    smaller than 10 x hidden stay whole on every rank under ZeRO-3 (norms, biases): sharding
    them costs a collective each for nothing.
    """
    zero = bake.deepspeed.zero_optimization
    zero_config: dict[str, Any] = {
        "stage": zero.stage,
        "offload_optimizer": {"device": zero.offload_optimizer.device},
        "reduce_bucket_size": hidden_size * hidden_size,
        "overlap_comm": False,
        "contiguous_gradients": True,
    }
    if zero.stage == 3:
        zero_config |= {
            "offload_param": {"device": zero.offload_param.device},
            "stage3_param_persistence_threshold": 10 * hidden_size,
            "stage3_prefetch_bucket_size": int(0.9 * hidden_size * hidden_size),
            "stage3_gather_16bit_weights_on_model_save": False,  # we gather the adapter only
        }
    micro_batch = bake.micro_batch_size
    accumulation = bake.gradient_accumulation_steps
    return {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": accumulation,
        "train_batch_size": micro_batch * accumulation * world_size,
        "gradient_clipping": 1.0,
        "zero_optimization": zero_config,
        "bf16": {"enabled": bf16},
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 1 << 30,  # we report every step ourselves
        "wall_clock_breakdown": False,
    }


def build_optimizer(params: list[torch.nn.Parameter], bake: Bake) -> torch.optim.Optimizer:
    """BAKE.optimizer over the trainable (LoRA) parameters."""
    settings = bake.optimizer
    kind, lr, decay, betas = settings.type, settings.learning_rate, settings.weight_decay, tuple(settings.betas)
    if kind == "sgd":
        return torch.optim.SGD(params, lr=lr, weight_decay=decay)
    if bake.deepspeed.zero_optimization.offload_optimizer.device == "cpu":
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(params, lr=lr, betas=betas, weight_decay=decay, adamw_mode=kind == "adamw")
    optimizer = torch.optim.AdamW if kind == "adamw" else torch.optim.Adam
    return optimizer(params, lr=lr, betas=betas, weight_decay=decay)


def lr_multiplier(step: int, *, total_steps: int, warmup_ratio: float, kind: str) -> float:
    """The learning rate at optimizer step `step` (0-based) as a fraction of the configured one:
    linear warm-up over the first ceil(warmup_ratio x total) steps, then `kind` decay to zero
    (`huggingface` is Hugging Face Trainer's default: linear)."""
    warmup = math.ceil(warmup_ratio * total_steps)
    if step < warmup:
        return (step + 1) / (warmup + 1)
    if kind == "constant":
        return 1.0
    progress = (step - warmup) / max(1, total_steps - warmup)
    if kind == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    return max(0.0, 1.0 - progress)  # linear, huggingface


def build_scheduler(bake: Bake, total_steps: int):
    """A callable DeepSpeed calls with its wrapped optimizer, returning the LambdaLR of BAKE.scheduler."""
    settings = bake.scheduler

    def schedule(optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LambdaLR:
        return torch.optim.lr_scheduler.LambdaLR(
            optimizer,
            lambda step: lr_multiplier(step, total_steps=total_steps, warmup_ratio=settings.warmup_ratio, kind=settings.type),
        )

    return schedule
