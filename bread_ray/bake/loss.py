"""The loss of a bake: a divergence between the teacher and the student per response token.

Baking trains the student (the model without the prompt, plus a LoRA) to match the teacher (the
same model with the prompt) on each response token. The divergences are TRL's generalized JSD
family (GKDTrainer's `beta`), with p the teacher's distribution and q the student's:

    beta = 0        forward KL(p ‖ q) = Σ_v p(v) (log p(v) − log q(v))      (the default)
    beta = 1        reverse KL(q ‖ p) = Σ_v q(v) (log q(v) − log p(v))
    0 < beta < 1    JSD_beta = beta · KL(p ‖ m) + (1 − beta) · KL(q ‖ m),  m = beta · p + (1 − beta) · q

each averaged over response tokens. Mind the direction: F.kl_div(input, target) computes
KL(target ‖ input), the reverse of the order its arguments are written in; this module does not use it.

With `top_k` the divergence is taken over a few tokens rather than the vocabulary. Forward KL keeps
Bread's Tinker definition: the teacher renormalised over its top-k tokens, against the student's
full log-probabilities there. Reverse KL and the JSD need the teacher's probability wherever the
student puts mass, so they follow TRL's DistillationTrainer (`top_k`, `add_tail`): the support is
the student's top-k (reverse KL) or the union of both models' top-k (JSD), each model's full
probabilities on it, and one more outcome, the tail, holding the rest of each model's mass.

Qwen3's vocabulary has 151,936 entries, so the fp32 logits of a 2,048-token sequence take 1.2 GB
per model, and plain autograd keeps several tensors of that size alive (both models' logits, the
log-softmaxes, the product, then the gradients). `chunked_divergence` takes the final hidden states
and the output head instead, and holds only `chunk_tokens` rows of logits at a time: the gradient
w.r.t. the student's logits has a closed form, so each chunk's loss and gradient are computed
together in the forward pass and the logits are dropped before the next chunk.

The closed form: for a divergence D over outcomes o (tokens, or the support and its tail) whose
probabilities under the student are q_o, write h_o = ∂D/∂q_o. Through the softmax, the gradient
w.r.t. the student's logit of token j is q_j (h_o(j) − Σ_o q_o h_o), o(j) being j's outcome. Forward
KL has h = −p/q (so the gradient is q − p), reverse KL h = log q − log p, and JSD_beta
h = (1 − beta)(log q − log m) (constants added to every h_o cancel).
"""

from __future__ import annotations

import math

import torch
from torch.autograd.function import once_differentiable

# Rows of logits held at once: 3 x 256 x 151,936 floats (Qwen3's vocabulary) is 0.47 GB in
# float32 for forward KL, under a tenth of what plain autograd holds for 2,048 tokens
# (bench/bake.py), and each chunk's matmul with the head is still large enough to run at full speed.
CHUNK_TOKENS = 256


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Softmaxes run in float32 at least: bf16's 8-bit mantissa loses the small probabilities."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _forward_kl_and_grad(log_q: torch.Tensor, teacher_logits: torch.Tensor, top_k: int | None,
                         need_grad: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Σ over the chunk's rows of KL(p ‖ q), and its gradient w.r.t. the student's logits.

    log_q: [chunk, vocab] the student's log-probabilities (freed into the gradient);
    teacher_logits: [chunk, vocab]. At most three [chunk, vocab] tensors are alive at once.
    """
    compute = log_q.dtype
    if top_k is None:
        log_p = teacher_logits.log_softmax(-1, dtype=compute)
        del teacher_logits  # before p: three [chunk, vocab] tensors at the peak, not four
        p = log_p.exp()
        # Where p underflows to 0, log p (from log_softmax, not the log of p) is still finite, so
        # the term is 0 · finite = 0: the xlogy convention holds without a mask.
        loss = log_p.sub_(log_q).mul_(p).sum()
    else:
        top_logits, top_ids = teacher_logits.topk(top_k, dim=-1)  # [chunk, k]
        del teacher_logits
        log_p = top_logits.log_softmax(-1, dtype=compute)
        p = log_p.exp()
        loss = (p * (log_p - log_q.gather(-1, top_ids))).sum()
    if not need_grad:
        return loss, None
    # q − p, with p zero outside the top-k (it sums to 1 there).
    grad_logits = log_q.exp_()
    if top_k is None:
        grad_logits -= p
    else:
        grad_logits.scatter_add_(-1, top_ids, -p)
    return loss, grad_logits


def _outcome_terms(log_q: torch.Tensor, log_p: torch.Tensor, beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Elementwise over outcomes: each one's term of the divergence (reverse KL for beta 1, JSD_beta
    below it) and h = ∂D/∂q (up to a constant). Finite log-probabilities in, same shape out."""
    q = log_q.exp()
    if beta == 1:
        h = log_q - log_p
        return q * h, h
    log_m = torch.logaddexp(log_q + math.log1p(-beta), log_p + math.log(beta))
    h = (1 - beta) * (log_q - log_m)
    return beta * log_p.exp() * (log_p - log_m) + q * h, h


def _mixed_divergence_and_grad(log_q: torch.Tensor, teacher_logits: torch.Tensor, beta: float, top_k: int | None,
                               need_grad: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Σ over the chunk's rows of reverse KL (beta 1) or JSD_beta (0 < beta < 1), and its gradient
    w.r.t. the student's logits. log_q, teacher_logits: [chunk, vocab]."""
    log_p = teacher_logits.log_softmax(-1, dtype=log_q.dtype)
    terms, h = _outcome_terms(log_q, log_p, beta)  # [chunk, vocab] each
    if top_k is None:
        row_q_h = (log_q.exp() * h).sum(-1, keepdim=True)  # Σ_o q_o h_o: [chunk, 1]
        loss = terms.sum()
    else:
        support = torch.zeros_like(log_q, dtype=torch.bool)  # [chunk, vocab]
        support.scatter_(-1, log_q.topk(top_k, dim=-1).indices, True)
        if beta < 1:  # JSD: the union of both models' top-k
            support.scatter_(-1, teacher_logits.topk(top_k, dim=-1).indices, True)
        # Each model's mass outside the support, the tail outcome: [chunk, 1]. Where the support
        # is the whole vocabulary the tail is empty (-inf on both sides) and its term is 0.
        log_q_tail = log_q.masked_fill(support, -math.inf).logsumexp(-1, keepdim=True)
        log_p_tail = log_p.masked_fill(support, -math.inf).logsumexp(-1, keepdim=True)
        has_tail = torch.isfinite(log_q_tail)
        tail_terms, tail_h = _outcome_terms(log_q_tail.masked_fill(~has_tail, 0),
                                            log_p_tail.masked_fill(~has_tail, 0), beta)
        tail_terms, tail_h = tail_terms.masked_fill(~has_tail, 0), tail_h.masked_fill(~has_tail, 0)
        loss = terms.masked_fill(~support, 0).sum() + tail_terms.sum()
        h = torch.where(support, h, tail_h)  # each token's outcome: itself, or the tail
        row_q_h = (log_q.exp() * h).sum(-1, keepdim=True)  # tail tokens sum to q_tail · h_tail
    if not need_grad:
        return loss, None
    return loss, log_q.exp_().mul_(h.sub_(row_q_h))


def _chunk_divergence_and_grad(student_hidden: torch.Tensor, teacher_hidden: torch.Tensor, head_weight: torch.Tensor,
                               beta: float, top_k: int | None,
                               need_grad: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One chunk's sum over its rows of the divergence, and that sum's gradient w.r.t.
    student_hidden (None unless need_grad).

    student_hidden, teacher_hidden: [chunk, hidden]; head_weight: [vocab, hidden]. The [chunk, vocab]
    tensors are freed when this function returns.
    """
    # [chunk, vocab] each. The matmuls run in the inputs' dtype, as the model's own head does.
    log_q = (student_hidden @ head_weight.T).log_softmax(-1, dtype=_compute_dtype(student_hidden.dtype))
    teacher_logits = teacher_hidden @ head_weight.T
    if beta == 0:
        loss, grad_logits = _forward_kl_and_grad(log_q, teacher_logits, top_k, need_grad)
    else:
        loss, grad_logits = _mixed_divergence_and_grad(log_q, teacher_logits, beta, top_k, need_grad)
    if grad_logits is None:
        return loss, None
    return loss, grad_logits.to(head_weight.dtype) @ head_weight


class _ChunkedDivergence(torch.autograd.Function):
    """The divergence and its gradient w.r.t. the student's hidden states in one chunked forward
    pass; backward only scales the stored gradient."""

    @staticmethod
    def forward(ctx, student_hidden, teacher_hidden, head_weight, beta, top_k, chunk_tokens, need_grad):
        tokens = student_hidden.shape[0]
        total = torch.zeros((), dtype=_compute_dtype(student_hidden.dtype), device=student_hidden.device)
        grad_hidden = torch.empty_like(student_hidden) if need_grad else None  # [tokens, hidden]
        for start in range(0, tokens, chunk_tokens):
            rows = slice(start, start + chunk_tokens)
            loss, grad = _chunk_divergence_and_grad(student_hidden[rows], teacher_hidden[rows], head_weight, beta,
                                                    top_k, need_grad)
            total += loss
            if need_grad:
                grad_hidden[rows] = grad
        if need_grad:
            ctx.save_for_backward(grad_hidden)
        ctx.tokens = tokens
        # Zero tokens gives 0 rather than the mean's 0/0: a data-parallel rank whose micro-batch
        # holds no response token must still run backward with the others, with a zero gradient.
        return total / max(tokens, 1)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output):
        (grad_hidden,) = ctx.saved_tensors
        return grad_hidden * (grad_output / max(ctx.tokens, 1)), None, None, None, None, None, None


def chunked_divergence(student_hidden: torch.Tensor, teacher_hidden: torch.Tensor, head_weight: torch.Tensor, *,
                       beta: float = 0.0, top_k: int | None = None, chunk_tokens: int = CHUNK_TOKENS) -> torch.Tensor:
    """Mean over response tokens of the divergence between teacher and student (the module's
    docstring): forward KL(teacher ‖ student) for beta 0, reverse KL for 1, JSD_beta between.

    student_hidden: [tokens, hidden] final (normed) hidden states of the student at the positions
        that predict each response token; the gradient flows to it.
    teacher_hidden: [tokens, hidden] the teacher's at the aligned positions; treated as a constant
        (it gets no gradient even if it requires one).
    head_weight: [vocab, hidden] the output head, shared by teacher and student and frozen.
    top_k: None = over the full vocabulary; k = over the top-k tokens (the module's docstring;
        Bread's Tinker bakes use forward KL with top-20).
    chunk_tokens: rows of logits held at once; peak memory is about 3 x chunk_tokens x vocab floats
        for forward KL (float32, or float64 for float64 inputs), a few more for reverse KL and the
        JSD (their closed forms hold log p, log m and h beside log q).
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
        raise ValueError("head_weight requires grad, but chunked_divergence gives the output head no gradient: "
                         "pass a frozen head (or head.weight.detach() if freezing it is intended)")
    if not 0 <= beta <= 1:
        raise ValueError(f"beta must be in [0, 1], got {beta}")
    if top_k is not None and not 1 <= top_k <= head_weight.shape[0]:
        raise ValueError(f"top_k must be None or in 1..vocab={head_weight.shape[0]}, got {top_k}")
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be at least 1, got {chunk_tokens}")
    # Inside forward grad mode is off and needs_input_grad ignores no_grad, so decide out here.
    need_grad = torch.is_grad_enabled() and student_hidden.requires_grad
    return _ChunkedDivergence.apply(student_hidden, teacher_hidden.detach(), head_weight, float(beta), top_k,
                                    chunk_tokens, need_grad)


def naive_divergence(student_logits: torch.Tensor, teacher_logits: torch.Tensor, *, beta: float = 0.0,
                     top_k: int | None = None) -> torch.Tensor:
    """Reference: the same quantity as chunked_divergence from full logits with plain autograd (for
    tests and benchmarks), written over explicit outcomes: the support's tokens and the tail.

    student_logits, teacher_logits: [tokens, vocab]. Returns a scalar (float32, or float64 for
    float64 inputs); zero tokens give 0. Teacher logits may hold -inf (a masked vocabulary entry).
    """
    if student_logits.ndim != 2 or student_logits.shape != teacher_logits.shape:
        raise ValueError(f"student_logits and teacher_logits must both be [tokens, vocab], got "
                         f"{tuple(student_logits.shape)} and {tuple(teacher_logits.shape)}")
    compute = _compute_dtype(student_logits.dtype)
    log_q = student_logits.log_softmax(-1, dtype=compute)
    if beta == 0:
        if top_k is None:
            log_p = teacher_logits.log_softmax(-1, dtype=compute)
            p = log_p.exp()
            # Logits may hold -inf: there p = 0 and log p = -inf, and the term must be 0, not nan.
            rows = torch.where(p > 0, p * (log_p - log_q), 0.0).sum(-1)
        else:
            top_logits, top_ids = teacher_logits.topk(top_k, dim=-1)
            log_p = top_logits.log_softmax(-1, dtype=compute)
            rows = (log_p.exp() * (log_p - log_q.gather(-1, top_ids))).sum(-1)
        return rows.sum() / max(rows.shape[0], 1)
    log_p = teacher_logits.log_softmax(-1, dtype=compute)
    if top_k is not None:
        support = torch.zeros_like(log_q, dtype=torch.bool)
        support.scatter_(-1, student_logits.topk(top_k, dim=-1).indices, True)
        if beta < 1:
            support.scatter_(-1, teacher_logits.topk(top_k, dim=-1).indices, True)
        outside = torch.tensor(-math.inf, dtype=compute)
        # Outcomes [tokens, vocab + 1]: the support's tokens (-inf elsewhere), then the tail.
        log_q = torch.cat([torch.where(support, log_q, outside),
                           torch.where(support, outside, log_q).logsumexp(-1, keepdim=True)], -1)
        log_p = torch.cat([torch.where(support, log_p, outside),
                           torch.where(support, outside, log_p).logsumexp(-1, keepdim=True)], -1)

    def kl(log_a: torch.Tensor, log_b: torch.Tensor) -> torch.Tensor:
        """KL(a ‖ b) per row; outcomes that a gives probability 0 add 0 (inputs made finite
        there first, so that no nan reaches the gradient)."""
        present = torch.isfinite(log_a)
        log_a, log_b = torch.where(present, log_a, 0.0), torch.where(present, log_b, 0.0)
        return torch.where(present, log_a.exp() * (log_a - log_b), 0.0).sum(-1)

    if beta == 1:
        rows = kl(log_q, log_p)
    else:
        log_m = torch.logsumexp(torch.stack([log_q + math.log(1 - beta), log_p + math.log(beta)]), dim=0)
        rows = beta * kl(log_p, log_m) + (1 - beta) * kl(log_q, log_m)
    return rows.sum() / max(rows.shape[0], 1)
