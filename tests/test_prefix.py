"""Shared prompt prefixes run once (bread_ray.bake.prefix): the rows that continue a prefix's keys
and values get the hidden states, the KL and the LoRA gradient that whole rows get, with and
without activation checkpointing."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model
from test_bake import HOUSE_STYLE, bake_config, trajectories

from bread_ray.bake.data import build_bake_data, collate
from bread_ray.bake.loss import chunked_divergence
from bread_ray.bake.prefix import (
    CHECKPOINTING_KEEPS_A_READ_CACHE,
    SharedPrefix,
    final_hidden,
    prefixes_to_share,
    run_prefix,
)
from bread_ray.chat_format import MIN_SHARED_PREFIX
from bread_ray.models import load_causal_lm, load_tokenizer


class Engine(torch.nn.Module):
    """What the bake's functions use of a DeepSpeed engine, without DeepSpeed: calling it runs its module."""

    def __init__(self, module: torch.nn.Module):
        super().__init__()
        self.module = module

    def forward(self, **inputs):
        return self.module(**inputs)


def student_model(tiny_model, checkpointing: bool) -> Engine:
    """The tiny parent with a LoRA whose B is not zero (so the adapter changes the outputs), no
    dropout (shared and whole rows draw the same nothing), its head replaced by Identity."""
    model = load_causal_lm(str(tiny_model), dtype=torch.float32, device=torch.device("cpu"))
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    torch.manual_seed(0)
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear",
                                             init_lora_weights=False))
    model.base_model.model.lm_head = torch.nn.Identity()
    model.train()
    return Engine(model)


def kl_and_grads(engine: Engine, head: torch.Tensor, batch, teacher_prefix: list[int], student_prefix: list[int]):
    """The bake's KL for `batch`, as batch_loss computes it, and the LoRA weights' gradients."""
    engine.module.zero_grad()
    teacher_cache = None
    with torch.no_grad(), engine.module.disable_adapter():
        if teacher_prefix:
            teacher_cache = run_prefix(engine, torch.tensor([teacher_prefix]))
        teacher = final_hidden(engine, batch.teacher_ids, batch.teacher_mask, batch.teacher_positions, teacher_cache)
    student_cache = run_prefix(engine, torch.tensor([student_prefix])) if student_prefix else None
    student = final_hidden(engine, batch.student_ids, batch.student_mask, batch.student_positions, student_cache)
    kl = chunked_divergence(student, teacher, head)
    kl.backward()
    grads = {name: p.grad.clone() for name, p in engine.module.named_parameters() if p.requires_grad}
    return kl.detach(), teacher, student.detach(), grads


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "checkpointing"])
def test_rows_after_shared_prefixes_get_the_whole_rows_kl_and_gradient(tiny_model, checkpointing):
    tokenizer = load_tokenizer(str(tiny_model))
    data = build_bake_data({"t_1": trajectories(6, student=HOUSE_STYLE)}, {"t_1": 1.0}, tokenizer, bake_config())
    assert len(data.teacher_prefix) >= MIN_SHARED_PREFIX and len(data.student_prefix) >= MIN_SHARED_PREFIX
    engine = student_model(tiny_model, checkpointing)
    teacher_prefix, student_prefix = prefixes_to_share(engine.module, data.teacher_prefix, data.student_prefix,
                                                       checkpointing=checkpointing)
    # under checkpointing the student's runs apart where transformers keeps a read-only cache (5.24 and later)
    shared_student = data.student_prefix if not checkpointing or CHECKPOINTING_KEEPS_A_READ_CACHE else []
    assert (teacher_prefix, student_prefix) == (data.teacher_prefix, shared_student)
    head = engine.module.get_input_embeddings().weight.detach()  # the tiny model ties its head to them
    examples = data.train[:4]
    whole = kl_and_grads(engine, head, collate(examples, data.pad_id), [], [])
    shared = kl_and_grads(engine, head, collate(examples, data.pad_id, len(teacher_prefix), len(student_prefix)),
                          teacher_prefix, student_prefix)
    assert whole[0] > 1e-3  # the adapter moved the student away from the teacher: there is a gradient to compare
    torch.testing.assert_close(shared[0], whole[0], rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(shared[1], whole[1], rtol=1e-5, atol=1e-6)  # teacher states
    torch.testing.assert_close(shared[2], whole[2], rtol=1e-5, atol=1e-6)  # student states
    assert whole[3].keys() == shared[3].keys() and len(whole[3]) > 0
    for name, grad in whole[3].items():
        torch.testing.assert_close(shared[3][name], grad, rtol=1e-4, atol=1e-7, msg=name)
    # the prefix states reached every LoRA weight that sees them: the gradients are not zero there
    assert all(grad.abs().sum() > 0 for grad in shared[3].values())


def test_a_shared_prefix_is_read_never_written(tiny_model):
    engine = student_model(tiny_model, checkpointing=False)
    with torch.no_grad():
        prefix = run_prefix(engine, torch.tensor([list(range(5, 25))]))
        assert isinstance(prefix, SharedPrefix) and prefix.get_seq_length() == 20
        keys = [layer.keys.clone() for layer in prefix.layers]
        ids, mask = torch.tensor([[30, 31, 32], [40, 41, 0]]), torch.tensor([[1, 1, 1], [1, 1, 0]])
        first = final_hidden(engine, ids, mask, torch.arange(6), prefix)
        again = final_hidden(engine, ids, mask, torch.arange(6), prefix)
    assert prefix.get_seq_length() == 20 and all(torch.equal(k, layer.keys) for k, layer in zip(keys, prefix.layers))
    torch.testing.assert_close(first, again)


def test_grouped_key_value_heads_read_as_they_are_give_the_same_kl_and_gradient(tiny_model, monkeypatch):
    """On the CPU a bake lets torch's attention read grouped keys and values with the padding mask
    (attend_with_grouped_heads) rather than copies for every query head: same KL, states, gradients."""
    from bread_ray.bake.worker import SDPA_GROUPED_HEADS, attend_with_grouped_heads

    tokenizer = load_tokenizer(str(tiny_model))
    data = build_bake_data({"t_1": trajectories(6, student=HOUSE_STYLE)}, {"t_1": 1.0}, tokenizer, bake_config())
    engine = student_model(tiny_model, checkpointing=False)
    config = engine.module.get_base_model().config
    assert config.num_key_value_heads < config.num_attention_heads  # the tiny model groups its heads
    head = engine.module.get_input_embeddings().weight.detach()
    batch = collate(data.train[:4], data.pad_id)
    assert not batch.student_mask.all()  # rows of several lengths: the attention gets a padding mask
    sdpa, calls = torch.nn.functional.scaled_dot_product_attention, []

    def recorded(query, key, value, attn_mask=None, **kwargs):
        calls.append((key.shape[1], attn_mask is not None, kwargs.get("enable_gqa", False)))
        return sdpa(query, key, value, attn_mask=attn_mask, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", recorded)
    monkeypatch.setenv(SDPA_GROUPED_HEADS, "0")
    copied = kl_and_grads(engine, head, batch, [], [])
    assert calls and all(call == (config.num_attention_heads, True, False) for call in calls)
    calls.clear()
    monkeypatch.delenv(SDPA_GROUPED_HEADS)
    attend_with_grouped_heads()
    grouped = kl_and_grads(engine, head, batch, [], [])
    assert calls and all(call == (config.num_key_value_heads, True, True) for call in calls)
    assert copied[0] > 1e-3
    for a, b in zip(grouped[:3], copied[:3]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    for name, grad in copied[3].items():
        torch.testing.assert_close(grouped[3][name], grad, rtol=1e-4, atol=1e-7, msg=name)
