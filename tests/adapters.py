"""Test adapters: saved PEFT LoRAs with random non-zero weights, as a bake would publish them."""

import torch
from peft import LoraConfig, get_peft_model

from bread_ray.models import load_causal_lm


def make_lora(model_dir, out_dir, seed, **lora):
    """A saved LoRA adapter with random non-zero A and B (a fresh one has B = 0 and changes nothing)."""
    peft_model = get_peft_model(load_causal_lm(model_dir, device="cpu"), LoraConfig(**lora))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_" in name:
                param.copy_(0.2 * torch.randn(param.shape, generator=generator))
    peft_model.save_pretrained(out_dir)
    return out_dir
