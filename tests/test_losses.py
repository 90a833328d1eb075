"""The MatTA loss terms against closed forms (TRL's generalized_jsd_loss tests): identical logits give 0, a zero
weight removes a term, no teacher and no TA give GPT-2's own loss, masked tokens do not count, chunked equals
unchunked in values and gradients."""

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from hf_matta.losses import (
    IGNORE_INDEX,
    count_valid_tokens,
    cross_entropy,
    kl_divergence,
    matta_loss,
    shift_labels,
    target_loss,
)

from .conftest import VOCAB, tiny_kwargs


B, T = 3, 9


def _logits(n: int = 1, dtype=torch.float64) -> list[torch.Tensor]:
    return [torch.randn(B, T, VOCAB, dtype=dtype, requires_grad=True) for _ in range(n)]


@pytest.fixture
def labels() -> torch.LongTensor:
    labels = torch.randint(0, VOCAB, (B, T))
    labels[0, 5:] = IGNORE_INDEX  # right padding
    labels[1, :2] = IGNORE_INDEX  # a masked prompt
    return labels


def test_shift_is_gpt2s():
    labels = torch.tensor([[1, 2, 3, IGNORE_INDEX]])
    assert shift_labels(labels).tolist() == [[2, 3, IGNORE_INDEX, IGNORE_INDEX]]
    assert count_valid_tokens(labels).item() == 2


@pytest.mark.parametrize("temperature", [0.5, 1.0, 4.0])
@pytest.mark.parametrize("chunk_size", [None, 4])
def test_identical_logits_give_zero_kl(labels, temperature, chunk_size):
    (z,) = _logits()
    kl = kl_divergence(z, z, labels, temperature=temperature, chunk_size=chunk_size)
    assert kl.abs().item() < 1e-12
    assert torch.autograd.grad(kl, z)[0].abs().max().item() < 1e-12


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
@pytest.mark.parametrize("chunk_size", [None, 4])
def test_kl_closed_form(labels, temperature, chunk_size):
    target, z = _logits(2)
    p = torch.softmax(target / temperature, -1)
    q = torch.softmax(z / temperature, -1)
    rows = (p * (p / q).log()).sum(-1)  # (B, T)
    valid = shift_labels(labels).ne(IGNORE_INDEX)
    expected = temperature**2 * rows[valid].sum() / valid.sum()
    kl = kl_divergence(target, z, labels, temperature=temperature, chunk_size=chunk_size)
    torch.testing.assert_close(kl, expected)


@pytest.mark.parametrize("chunk_size", [None, 5])
def test_no_teacher_no_ta_is_gpt2s_own_loss(labels, chunk_size):
    model = GPT2LMHeadModel(GPT2Config(**tiny_kwargs()))
    input_ids = torch.randint(0, VOCAB, (B, T))
    output = model(input_ids, labels=labels)
    expected = output.loss
    torch.testing.assert_close(cross_entropy(output.logits, labels, chunk_size=chunk_size), expected)
    loss = matta_loss(output.logits, labels, chunk_size=chunk_size)
    torch.testing.assert_close(loss.total, expected)
    assert set(loss.terms) == {"student"}
    # a teacher given with weight 0 leaves plain CE
    teacher = torch.randn_like(output.logits)
    torch.testing.assert_close(
        target_loss(output.logits, labels, teacher, teacher_weight=0.0, chunk_size=chunk_size), expected
    )


@pytest.mark.parametrize("gamma", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("tau", [1.0, 2.0])
def test_target_mixes_labels_and_teacher(labels, gamma, tau):
    z, teacher = _logits(2)
    expected = (1 - gamma) * cross_entropy(z, labels, chunk_size=None) + gamma * kl_divergence(
        teacher, z, labels, temperature=tau, chunk_size=None
    )
    got = target_loss(z, labels, teacher, teacher_weight=gamma, teacher_temperature=tau, chunk_size=3)
    torch.testing.assert_close(got, expected)


WEIGHTS = [  # (w_S, w_A, w_D)
    (1.0, 1.0, 1.0),
    (0.0, 1.0, 1.0),
    (1.0, 0.0, 1.0),
    (1.0, 1.0, 0.0),
    (0.7, 0.2, 3.0),
]


@pytest.mark.parametrize("weights", WEIGHTS)
@pytest.mark.parametrize("chunk_size", [None, 4])
def test_total_is_the_weighted_sum_and_zero_weights_remove_terms(labels, weights, chunk_size):
    w_s, w_a, w_d = weights
    student, ta = _logits(2)
    teacher = torch.randn(B, T, VOCAB, dtype=torch.float64)
    kwargs = dict(teacher_weight=0.4, teacher_temperature=2.0, chunk_size=None)
    target_s = target_loss(student, labels, teacher, **kwargs)
    target_a = target_loss(ta, labels, teacher, **kwargs)
    distill = kl_divergence(ta, student, labels, temperature=3.0, chunk_size=None)
    loss = matta_loss(
        student, labels, ta_logits=ta, teacher_logits=teacher, student_weight=w_s, ta_weight=w_a,
        distill_weight=w_d, distill_temperature=3.0, teacher_weight=0.4, teacher_temperature=2.0,
        chunk_size=chunk_size,
    )
    torch.testing.assert_close(loss.total, w_s * target_s + w_a * target_a + w_d * distill)
    # every term is reported before its weight, zero-weighted ones too
    torch.testing.assert_close(loss.terms["student"], target_s.detach())
    torch.testing.assert_close(loss.terms["ta"], target_a.detach())
    torch.testing.assert_close(loss.terms["distill"], distill.detach())
    grad_student, grad_ta = torch.autograd.grad(loss.total, [student, ta])
    if w_s == 0 and w_d == 0:
        assert grad_student.abs().max() == 0
    if w_a == 0:  # the distillation target is detached: nothing else reaches the TA
        assert grad_ta.abs().max() == 0
    if w_d == 0:
        torch.testing.assert_close(grad_student, torch.autograd.grad(w_s * target_s, student)[0])


def test_detach_ta_targets_controls_the_distillation_gradient(labels):
    student, ta = _logits(2)
    for detach in (True, False):
        loss = matta_loss(student, labels, ta_logits=ta, ta_weight=0.0, detach_ta_targets=detach, chunk_size=4)
        grad_ta = torch.autograd.grad(loss.total, ta)[0]
        expected = torch.autograd.grad(kl_divergence(ta, student, labels, detach_target=False, chunk_size=None), ta)
        if detach:
            assert grad_ta.abs().max() == 0
        else:
            torch.testing.assert_close(grad_ta, expected[0])


@pytest.mark.parametrize("chunk_size", [None, 4])
def test_masked_tokens_do_not_count(labels, chunk_size):
    student, ta = _logits(2)
    masked = ~shift_labels(labels).ne(IGNORE_INDEX)  # (B, T) positions that predict nothing

    def total(student, ta, labels):
        return matta_loss(student, labels, ta_logits=ta, chunk_size=chunk_size).total

    loss = total(student, ta, labels)
    noise = torch.where(masked[..., None], 100 * torch.randn_like(student), 0.0)
    relabelled = torch.where(labels.eq(IGNORE_INDEX), IGNORE_INDEX, labels)
    torch.testing.assert_close(total(student + noise, ta - noise, relabelled), loss)
    grad_student, grad_ta = torch.autograd.grad(loss, [student, ta])
    assert grad_student[masked].abs().max() == 0 and grad_ta[masked].abs().max() == 0
    # the divisor is the count given from outside: sums stay sums
    n = count_valid_tokens(labels).item()
    summed = matta_loss(student, labels, ta_logits=ta, num_items=1, chunk_size=chunk_size).total
    torch.testing.assert_close(summed, loss * n)


@pytest.mark.parametrize("chunk_size", [1, 4, 1000])
@pytest.mark.parametrize("detach", [True, False])
@pytest.mark.parametrize("with_teacher", [True, False])
def test_chunked_equals_unchunked(labels, chunk_size, detach, with_teacher):
    student, ta, extra = _logits(3, dtype=torch.float32)
    teacher = torch.randn(B, T, VOCAB) if with_teacher else None
    kwargs = dict(
        ta_logits=ta, teacher_logits=teacher, extra_logits={48: extra}, student_weight=0.8, ta_weight=1.2,
        distill_weight=0.5, distill_temperature=2.0, teacher_weight=0.3, teacher_temperature=1.5,
        detach_ta_targets=detach, num_items=torch.tensor(17),
    )
    reference = matta_loss(student, labels, chunk_size=None, **kwargs)
    chunked = matta_loss(student, labels, chunk_size=chunk_size, **kwargs)
    assert chunked.terms.keys() == reference.terms.keys() == {"student", "ta", "distill", "w48", "distill_w48"}
    torch.testing.assert_close(chunked.total, reference.total, atol=1e-6, rtol=1e-6)
    for name in reference.terms:
        torch.testing.assert_close(chunked.terms[name], reference.terms[name], atol=1e-6, rtol=1e-6)
    for got, expected in zip(
        torch.autograd.grad(chunked.total, [student, ta, extra]),
        torch.autograd.grad(reference.total, [student, ta, extra]),
    ):
        torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)


def test_chunked_bf16_logits_get_bf16_gradients(labels):
    (student,) = _logits(1, dtype=torch.bfloat16)
    loss = cross_entropy(student, labels, chunk_size=4)
    assert loss.dtype == torch.float32
    (grad,) = torch.autograd.grad(loss, student)
    assert grad.dtype == torch.bfloat16
    expected = torch.autograd.grad(cross_entropy(student, labels, chunk_size=None), student)[0]
    torch.testing.assert_close(grad, expected)


def test_no_grad_needs_no_buffers(labels):
    student, ta = _logits(2)
    with torch.no_grad():
        loss = matta_loss(student, labels, ta_logits=ta, chunk_size=4)
    assert not loss.total.requires_grad
    torch.testing.assert_close(loss.total, matta_loss(student, labels, ta_logits=ta, chunk_size=None).total.detach())


def test_bad_chunk_size_is_refused(labels):
    (z,) = _logits()
    with pytest.raises(ValueError, match="chunk_size=0"):
        cross_entropy(z, labels, chunk_size=0)
