"""The loss of a bake: forward KL(teacher ‖ student) per response token, over the full vocabulary.

Baking trains the student (the model without the prompt, plus a LoRA) to match the teacher (the
same model with the prompt) on each response token:

    KL(p_t ‖ p_s) = Σ_v p_t(v) (log p_t(v) − log p_s(v)),    averaged over response tokens.

Mind the direction: F.kl_div(input, target) computes KL(target ‖ input), the reverse of the order
its arguments are written in; this module does not use it.

Qwen3's vocabulary has 151,936 entries, so the fp32 logits of a 2,048-token sequence take 1.2 GB
per model, and plain autograd keeps several tensors of that size alive (both models' logits, the
log-softmaxes, the product, then the gradients). `chunked_kl` takes the final hidden states and
the output head instead, and holds only `chunk_tokens` rows of logits at a time: the gradient
w.r.t. the student's logits has a closed form (p_s − p_t), so each chunk's loss and gradient are
computed together in the forward pass and the logits are dropped before the next chunk.
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

# Rows of logits held at once: 3 x 256 x 151,936 floats (Qwen3's vocabulary) is 0.47 GB in
# float32, under a tenth of what plain autograd holds for 2,048 tokens (bench/bake.py), and each
# chunk's matmul with the head is still large enough to run at full speed.
CHUNK_TOKENS = 256


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Softmaxes run in float32 at least: bf16's 8-bit mantissa loses the small probabilities."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _chunk_kl_and_grad(student_hidden: torch.Tensor, teacher_hidden: torch.Tensor, head_weight: torch.Tensor,
                       top_k: int | None, need_grad: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One chunk's sum over its rows of KL(teacher ‖ student), and that sum's gradient w.r.t.
    student_hidden (None unless need_grad).

    student_hidden, teacher_hidden: [chunk, hidden]; head_weight: [vocab, hidden]. At most three
    [chunk, vocab] tensors are alive at once; they are freed when this function returns.
    """
    compute = _compute_dtype(student_hidden.dtype)
    # [chunk, vocab] each. The matmuls run in the inputs' dtype, as the model's own head does.
    log_q = (student_hidden @ head_weight.T).log_softmax(-1, dtype=compute)
    teacher_logits = teacher_hidden @ head_weight.T
    if top_k is None:
        log_p = teacher_logits.log_softmax(-1, dtype=compute)
        del teacher_logits  # before p: three [chunk, vocab] tensors at the peak, not four
        p = log_p.exp()
        # Where p underflows to 0, log p (from log_softmax, not the log of p) is still finite, so
        # the term is 0 · finite = 0: the xlogy convention holds without a mask.
        kl = log_p.sub_(log_q).mul_(p).sum()
    else:
        top_logits, top_ids = teacher_logits.topk(top_k, dim=-1)  # [chunk, k]
        del teacher_logits
        log_p = top_logits.log_softmax(-1, dtype=compute)
        p = log_p.exp()
        kl = (p * (log_p - log_q.gather(-1, top_ids))).sum()
    if not need_grad:
        return kl, None
    # d KL / d student_logits = q − p, with p zero outside the top-k (it sums to 1 there).
    grad_logits = log_q.exp_()
    if top_k is None:
        grad_logits -= p
    else:
        grad_logits.scatter_add_(-1, top_ids, -p)
    return kl, grad_logits.to(head_weight.dtype) @ head_weight


class _ChunkedKL(torch.autograd.Function):
    """KL and its gradient w.r.t. the student's hidden states in one chunked forward pass;
    backward only scales the stored gradient."""

    @staticmethod
    def forward(ctx, student_hidden, teacher_hidden, head_weight, top_k, chunk_tokens, need_grad):
        tokens = student_hidden.shape[0]
        kl_sum = torch.zeros((), dtype=_compute_dtype(student_hidden.dtype), device=student_hidden.device)
        grad_hidden = torch.empty_like(student_hidden) if need_grad else None  # [tokens, hidden]
        for start in range(0, tokens, chunk_tokens):
            rows = slice(start, start + chunk_tokens)
            kl, grad = _chunk_kl_and_grad(student_hidden[rows], teacher_hidden[rows], head_weight, top_k,
                                          need_grad)
            kl_sum += kl
            if need_grad:
                grad_hidden[rows] = grad
        if need_grad:
            ctx.save_for_backward(grad_hidden)
        ctx.tokens = tokens
        # Zero tokens gives 0 rather than the mean's 0/0: a data-parallel rank whose micro-batch
        # holds no response token must still run backward with the others, with a zero gradient.
        return kl_sum / max(tokens, 1)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output):
        (grad_hidden,) = ctx.saved_tensors
        return grad_hidden * (grad_output / max(ctx.tokens, 1)), None, None, None, None, None


def chunked_kl(student_hidden: torch.Tensor, teacher_hidden: torch.Tensor, head_weight: torch.Tensor,
               *, top_k: int | None = None, chunk_tokens: int = CHUNK_TOKENS) -> torch.Tensor:
    """Mean over response tokens of KL(teacher ‖ student).

    student_hidden: [tokens, hidden] final (normed) hidden states of the student at the positions
        that predict each response token; the gradient flows to it.
    teacher_hidden: [tokens, hidden] the teacher's at the aligned positions; treated as a constant
        (it gets no gradient even if it requires one).
    head_weight: [vocab, hidden] the output head, shared by teacher and student and frozen.
    top_k: None = full-vocabulary KL; k = KL to the teacher's distribution renormalised over its
        top-k tokens (Bread's Tinker variant uses top-20). The student's side is always the full
        softmax.
    chunk_tokens: rows of logits held at once; peak memory is about 3 x chunk_tokens x vocab floats
        (float32, or float64 for float64 inputs).
    All three tensors share one dtype and device. Returns a scalar, float32 for float32 and bf16
    inputs (float64 for float64). Zero tokens give 0 with a zero gradient.
    Under torch.no_grad (evaluation) the gradient is not computed.
    """
    if student_hidden.ndim != 2 or student_hidden.shape != teacher_hidden.shape:
        raise ValueError(f"student_hidden and teacher_hidden must both be [tokens, hidden], got "
                         f"{tuple(student_hidden.shape)} and {tuple(teacher_hidden.shape)}")
    if head_weight.ndim != 2 or head_weight.shape[1] != student_hidden.shape[1]:
        raise ValueError(f"head_weight must be [vocab, hidden={student_hidden.shape[1]}], "
                         f"got {tuple(head_weight.shape)}")
    if not student_hidden.dtype == teacher_hidden.dtype == head_weight.dtype:
        raise ValueError(f"student_hidden, teacher_hidden and head_weight must share a dtype, got "
                         f"{student_hidden.dtype}, {teacher_hidden.dtype} and {head_weight.dtype}")
    # The head gets no gradient here. LoRA's all-linear target leaves the output layer out, so the
    # head is frozen in a bake; one that requires grad would silently get none, so refuse it.
    if head_weight.requires_grad:
        raise ValueError("head_weight requires grad, but chunked_kl gives the output head no gradient: "
                         "pass a frozen head (or head.weight.detach() if freezing it is intended)")
    if top_k is not None and not 1 <= top_k <= head_weight.shape[0]:
        raise ValueError(f"top_k must be None or in 1..vocab={head_weight.shape[0]}, got {top_k}")
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be at least 1, got {chunk_tokens}")
    # Inside forward grad mode is off and needs_input_grad ignores no_grad, so decide out here.
    need_grad = torch.is_grad_enabled() and student_hidden.requires_grad
    return _ChunkedKL.apply(student_hidden, teacher_hidden.detach(), head_weight, top_k, chunk_tokens,
                            need_grad)


def naive_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, *,
             top_k: int | None = None) -> torch.Tensor:
    """Reference: the same quantity as chunked_kl from full logits with plain autograd (for tests
    and the benchmark).

    student_logits, teacher_logits: [tokens, vocab]. Returns a scalar (float32, or float64 for
    float64 inputs); zero tokens give 0.
    """
    if student_logits.ndim != 2 or student_logits.shape != teacher_logits.shape:
        raise ValueError(f"student_logits and teacher_logits must both be [tokens, vocab], got "
                         f"{tuple(student_logits.shape)} and {tuple(teacher_logits.shape)}")
    compute = _compute_dtype(student_logits.dtype)
    log_q = student_logits.log_softmax(-1, dtype=compute)
    if top_k is None:
        log_p = teacher_logits.log_softmax(-1, dtype=compute)
        p = log_p.exp()
        # Logits may hold -inf (a masked vocabulary entry): there p = 0 and log p = -inf, and the
        # term must be 0, not 0 · -inf = nan.
        kl_rows = torch.where(p > 0, p * (log_p - log_q), 0.0).sum(-1)
    else:
        top_logits, top_ids = teacher_logits.topk(top_k, dim=-1)
        log_p = top_logits.log_softmax(-1, dtype=compute)
        kl_rows = (log_p.exp() * (log_p - log_q.gather(-1, top_ids))).sum(-1)
    return kl_rows.sum() / max(kl_rows.shape[0], 1)
