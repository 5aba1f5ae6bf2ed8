"""The bake's loss: chunked_divergence against plain autograd on full logits in float64 (forward KL,
reverse KL and the generalized JSD, each over the vocabulary or a top-k support), the divergences
written out by hand, their direction, bf16 inputs, bad inputs, and gradcheck."""

import pytest
import torch

from bread_ray.bake.loss import chunked_divergence, naive_divergence

TOKENS, HIDDEN, VOCAB = 13, 8, 50
TOLERANCE = {torch.float64: dict(rtol=1e-10, atol=1e-12), torch.float32: dict(rtol=1e-5, atol=1e-6)}


def make_inputs(dtype=torch.float64, tokens=TOKENS, hidden=HIDDEN, vocab=VOCAB, seed=0):
    """Student and teacher hidden states [tokens, hidden] and a head [vocab, hidden], scaled so
    that the distributions are neither uniform nor one-hot."""
    generator = torch.Generator().manual_seed(seed)
    student = torch.randn(tokens, hidden, generator=generator, dtype=dtype)
    teacher = torch.randn(tokens, hidden, generator=generator, dtype=dtype)
    head = torch.randn(vocab, hidden, generator=generator, dtype=dtype)
    return student.requires_grad_(), teacher, head


def naive_value_and_grad(student, teacher, head, top_k, beta=0.0):
    student = student.detach().requires_grad_()
    loss = naive_divergence(student @ head.T, teacher @ head.T, top_k=top_k, beta=beta)
    loss.backward()
    return loss.detach(), student.grad


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("beta", [0.0, 0.25, 0.5, 1.0])  # forward KL, JSD_beta, reverse KL
@pytest.mark.parametrize("top_k", [None, 1, 5, VOCAB])  # VOCAB: a support with an empty tail
@pytest.mark.parametrize("chunk_tokens", [1, 5, 64])
def test_chunked_matches_naive_in_value_and_gradient(dtype, beta, top_k, chunk_tokens):
    student, teacher, head = make_inputs(dtype)
    loss = chunked_divergence(student, teacher, head, beta=beta, top_k=top_k, chunk_tokens=chunk_tokens)
    loss.backward()
    expected_loss, expected_grad = naive_value_and_grad(student, teacher, head, top_k, beta)
    assert loss.dtype == dtype
    torch.testing.assert_close(loss.detach(), expected_loss, **TOLERANCE[dtype])
    torch.testing.assert_close(student.grad, expected_grad, **TOLERANCE[dtype])


def test_kl_is_zero_for_identical_hidden_states_and_positive_otherwise():
    student, teacher, head = make_inputs()
    same = chunked_divergence(student, student.detach().clone(), head)
    assert abs(same.item()) < 1e-12
    different = chunked_divergence(student, teacher, head)
    assert different.item() > 1e-3
    for seed in range(5):
        assert chunked_divergence(*make_inputs(seed=seed), top_k=5).item() >= 0


def test_direction_is_teacher_to_student():
    """Σ p_t log(p_t / p_s), written out with explicit softmaxes, and not its reverse."""
    student, teacher, head = make_inputs(tokens=3, vocab=7)
    p_s = torch.softmax(student.detach() @ head.T, dim=-1)
    p_t = torch.softmax(teacher @ head.T, dim=-1)
    forward_kl = (p_t * torch.log(p_t / p_s)).sum(-1).mean()
    reverse_kl = (p_s * torch.log(p_s / p_t)).sum(-1).mean()
    loss = chunked_divergence(student, teacher, head, chunk_tokens=2)
    torch.testing.assert_close(loss.detach(), forward_kl, **TOLERANCE[torch.float64])
    assert abs(loss.item() - reverse_kl.item()) > 1e-3


def test_reverse_kl_and_jsd_are_trls_divergences_written_out():
    """beta 1: Σ q log(q / p); 0 < beta < 1: beta · KL(p ‖ m) + (1 − beta) · KL(q ‖ m) with
    m = beta · p + (1 − beta) · q (TRL's generalized JSD), from explicit softmaxes; at beta 0.5 it
    is the Jensen-Shannon divergence, the same with student and teacher swapped."""
    student, teacher, head = make_inputs(tokens=3, vocab=7)
    q = torch.softmax(student.detach() @ head.T, dim=-1)
    p = torch.softmax(teacher @ head.T, dim=-1)

    def kl(a, b):
        return (a * torch.log(a / b)).sum(-1).mean()

    torch.testing.assert_close(chunked_divergence(student, teacher, head, beta=1.0).detach(), kl(q, p))
    for beta in (0.3, 0.5):
        m = beta * p + (1 - beta) * q
        torch.testing.assert_close(chunked_divergence(student, teacher, head, beta=beta).detach(),
                                   beta * kl(p, m) + (1 - beta) * kl(q, m))
    torch.testing.assert_close(chunked_divergence(student, teacher, head, beta=0.5).detach(),
                               chunked_divergence(teacher, student.detach(), head, beta=0.5))


def test_reverse_kl_over_the_top_1_is_two_outcomes_the_students_argmax_and_the_tail():
    """TRL's support for reverse KL is the student's top-k, each model's full probabilities on it,
    plus the tail's: with k = 1 the divergence of two Bernoulli distributions."""
    student, teacher, head = make_inputs(tokens=4, vocab=9)
    q = torch.softmax(student.detach() @ head.T, dim=-1)
    p = torch.softmax(teacher @ head.T, dim=-1)
    top = q.argmax(-1, keepdim=True)
    q1, p1 = q.gather(-1, top), p.gather(-1, top)
    expected = (q1 * torch.log(q1 / p1) + (1 - q1) * torch.log((1 - q1) / (1 - p1))).mean()
    torch.testing.assert_close(chunked_divergence(student, teacher, head, beta=1.0, top_k=1).detach(), expected)


def test_top_k_renormalises_the_teachers_top_tokens():
    """With k = vocab the renormalisation changes nothing; with k = 1 the teacher is one-hot on its
    argmax, so the KL is the student's cross-entropy on that token."""
    student, teacher, head = make_inputs()
    torch.testing.assert_close(chunked_divergence(student, teacher, head, top_k=VOCAB),
                               chunked_divergence(student, teacher, head))
    argmax = (teacher @ head.T).argmax(-1)
    cross_entropy = torch.nn.functional.cross_entropy(student @ head.T, argmax)
    torch.testing.assert_close(chunked_divergence(student, teacher, head, top_k=1), cross_entropy)


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_teacher_probabilities_that_underflow_to_zero_contribute_zero(beta):
    """A confident teacher: most of p_t is exactly 0 in float32, and the loss stays finite and
    equal to the reference."""
    student, teacher, head = make_inputs(torch.float32)
    teacher = teacher * 40
    assert (torch.softmax(teacher @ head.T, -1) == 0).any()
    loss = chunked_divergence(student, teacher, head, beta=beta, chunk_tokens=4)
    loss.backward()
    expected_loss, expected_grad = naive_value_and_grad(student, teacher, head, None, beta)
    assert torch.isfinite(loss) and torch.isfinite(student.grad).all()
    torch.testing.assert_close(loss.detach(), expected_loss, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(student.grad, expected_grad, rtol=1e-5, atol=1e-5)


def test_naive_divergence_treats_masked_teacher_logits_as_zero_probability():
    teacher_logits = torch.tensor([[0.0, 1.0, -float("inf")]])
    student_logits = torch.tensor([[0.5, 0.5, 0.0]])
    p_t = torch.softmax(teacher_logits[:, :2], -1)
    p_s = torch.softmax(student_logits, -1)[:, :2]
    torch.testing.assert_close(naive_divergence(student_logits, teacher_logits), (p_t * torch.log(p_t / p_s)).sum())


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_bf16_inputs_give_a_finite_result_close_to_float32(beta):
    student, teacher, head = make_inputs(torch.float32, tokens=32, hidden=64, vocab=1000)
    reference = chunked_divergence(student, teacher, head, beta=beta, chunk_tokens=8)
    reference.backward()
    student_bf16 = student.detach().bfloat16().requires_grad_()
    loss = chunked_divergence(student_bf16, teacher.bfloat16(), head.bfloat16(), beta=beta, chunk_tokens=8)
    loss.backward()
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    assert student_bf16.grad.dtype == torch.bfloat16 and torch.isfinite(student_bf16.grad).all()
    # bf16 keeps ~3 significant digits of each hidden state, weight and logit.
    torch.testing.assert_close(loss.detach(), reference.detach(), rtol=1e-2, atol=0)
    torch.testing.assert_close(student_bf16.grad.float(), student.grad, rtol=0,
                               atol=0.05 * student.grad.abs().max().item())


def test_zero_tokens_give_zero_with_a_gradient_path():
    student, teacher, head = make_inputs(tokens=0)
    loss = chunked_divergence(student, teacher, head)
    loss.backward()
    assert loss.item() == 0 and student.grad.shape == (0, HIDDEN)


def test_no_gradient_under_no_grad():
    student, teacher, head = make_inputs()
    with torch.no_grad():
        loss = chunked_divergence(student, teacher, head)
    assert loss.grad_fn is None
    torch.testing.assert_close(loss, chunked_divergence(student, teacher, head).detach())


@pytest.mark.parametrize("student_shape, teacher_shape, head_shape, message", [
    ((4, 8), (5, 8), (50, 8), r"\(4, 8\) and \(5, 8\)"),
    ((4, 8), (4, 9), (50, 8), r"\(4, 8\) and \(4, 9\)"),
    ((4, 8), (4, 8), (50, 9), r"hidden=8.*\(50, 9\)"),
    ((8,), (8,), (50, 8), r"\(8,\) and \(8,\)"),
])
def test_bad_shapes_raise(student_shape, teacher_shape, head_shape, message):
    with pytest.raises(ValueError, match=message):
        chunked_divergence(torch.zeros(student_shape), torch.zeros(teacher_shape), torch.zeros(head_shape))


def test_bad_arguments_raise():
    student, teacher, head = make_inputs()
    with pytest.raises(ValueError, match=r"\(13, 50\) and \(12, 50\)"):
        naive_divergence(torch.zeros(13, 50), torch.zeros(12, 50))
    with pytest.raises(ValueError, match="head_weight requires grad"):
        chunked_divergence(student, teacher, head.clone().requires_grad_())
    with pytest.raises(ValueError, match="share a dtype"):
        chunked_divergence(student, teacher.float(), head)
    with pytest.raises(ValueError, match="top_k"):
        chunked_divergence(student, teacher, head, top_k=VOCAB + 1)
    with pytest.raises(ValueError, match="chunk_tokens"):
        chunked_divergence(student, teacher, head, chunk_tokens=0)
    with pytest.raises(ValueError, match=r"beta must be in \[0, 1\], got 1.5"):
        chunked_divergence(student, teacher, head, beta=1.5)


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("top_k", [None, 3])
def test_gradcheck(top_k, beta):
    student, teacher, head = make_inputs(tokens=5, hidden=4, vocab=11)
    assert torch.autograd.gradcheck(
        lambda hidden: chunked_divergence(hidden, teacher, head, beta=beta, top_k=top_k, chunk_tokens=2), (student,))
