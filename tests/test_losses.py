"""The MatTA loss terms against closed forms (TRL's generalized_jsd_loss tests): identical logits give 0, a zero
weight removes a term, no teacher and no TA give GPT-2's own loss, masked tokens do not count, chunked equals
unchunked in values and gradients, compiled equals eager, and a top-k teacher's KL is the KL over its k tokens and
one bucket for the rest."""

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from hf_matta.losses import (
    IGNORE_INDEX,
    TopKLogProbs,
    _Compiled,
    compile_supported,
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


def _teacher(kind: str | None, temperature: float = 1.5) -> torch.Tensor | TopKLogProbs | None:
    """No teacher, a teacher's logits, or its top-8 log-probabilities at `temperature`."""
    if kind is None:
        return None
    logits = torch.randn(B, T, VOCAB)
    return logits if kind == "full" else TopKLogProbs.from_logits(logits, 8, temperature)


@pytest.mark.parametrize("chunk_size", [1, 4, 1000])
@pytest.mark.parametrize("detach", [True, False])
@pytest.mark.parametrize("with_teacher", ["full", "top_k", None])
def test_chunked_equals_unchunked(labels, chunk_size, detach, with_teacher):
    student, ta, extra = _logits(3, dtype=torch.float32)
    teacher = _teacher(with_teacher)
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


def test_a_named_extra_term_is_the_width_term_under_its_own_name(labels):
    """A string key names its terms (the trainer's `mixed` plan): the same values as under a width, other names
    left alone; a name that exists already is refused rather than overwriting that term."""
    student, ta, extra = _logits(3)
    by_width = matta_loss(student, labels, ta_logits=ta, extra_logits={48: extra})
    named = matta_loss(student, labels, ta_logits=ta, extra_logits={"mixed": extra})
    assert named.terms.keys() == {"student", "ta", "distill", "mixed", "distill_mixed"}
    torch.testing.assert_close(named.total, by_width.total)
    torch.testing.assert_close(named.terms["mixed"], by_width.terms["w48"])
    torch.testing.assert_close(named.terms["distill_mixed"], by_width.terms["distill_w48"])
    for name in ("ta", "student"):
        with pytest.raises(ValueError, match=f"'{name}'"):
            matta_loss(student, labels, ta_logits=ta, extra_logits={name: extra})


def test_a_scaled_chunked_loss_scales_its_gradient(labels):
    """The chunked loss's buffers hold the gradient of the loss as it is; an outer factor (DDP's number of
    processes, gradient accumulation) still reaches them."""
    student, ta = _logits(2)
    grads = [
        torch.autograd.grad(scale * matta_loss(student, labels, ta_logits=ta, chunk_size=4).total, [student, ta])
        for scale in (1.0, 3.0)
    ]
    for once, thrice in zip(*grads):
        torch.testing.assert_close(thrice, 3 * once)


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


def _coarse_kl(teacher_logits, logits, labels, k, tau):
    """The KL over the teacher's top-k tokens and one bucket for the rest, written out: both distributions are
    grouped into k + 1 outcomes, then KL(p~ || q~) = sum p~ log(p~ / q~), times tau^2, a mean over valid tokens."""
    p, q = torch.softmax(teacher_logits / tau, -1), torch.softmax(logits / tau, -1)
    top = p.topk(k, dim=-1).indices
    p_k, q_k = p.gather(-1, top), q.gather(-1, top)
    p_coarse = torch.cat([p_k, 1 - p_k.sum(-1, keepdim=True)], -1)  # (B, T, k + 1)
    q_coarse = torch.cat([q_k, 1 - q_k.sum(-1, keepdim=True)], -1)
    rows = (p_coarse * (p_coarse / q_coarse).log()).sum(-1)
    valid = shift_labels(labels).ne(IGNORE_INDEX)
    return tau**2 * rows[valid].sum() / valid.sum()


@pytest.mark.parametrize("k", [1, 8, 50])
@pytest.mark.parametrize("tau", [1.0, 2.0])
@pytest.mark.parametrize("chunk_size", [None, 4])
def test_top_k_teacher_kl_is_the_kl_over_k_tokens_and_a_tail_bucket(labels, k, tau, chunk_size):
    teacher_logits, student = _logits(2)
    teacher_logits = teacher_logits.detach() * 3  # a peaked teacher: its top k hold most of its mass
    top_k = TopKLogProbs.from_logits(teacher_logits, k, tau)
    expected = _coarse_kl(teacher_logits, student, labels, k, tau)
    got = kl_divergence(top_k, student, labels, temperature=tau, chunk_size=chunk_size)
    torch.testing.assert_close(got, expected)
    # the gradient reaching the student is the written-out KL's (closed form when chunked, autograd when not)
    torch.testing.assert_close(torch.autograd.grad(got, student)[0], torch.autograd.grad(expected, student)[0])
    # grouping outcomes can only lower a KL: the top-k KL is at most the full one
    assert got.item() <= kl_divergence(teacher_logits, student, labels, temperature=tau, chunk_size=None).item()


@pytest.mark.parametrize("chunk_size", [None, 4])
def test_top_k_teacher_with_every_token_is_the_full_kl(labels, chunk_size):
    teacher_logits, student = _logits(2)
    top_k = TopKLogProbs.from_logits(teacher_logits.detach(), VOCAB, 2.0)
    full = kl_divergence(teacher_logits.detach(), student, labels, temperature=2.0, chunk_size=None)
    got = kl_divergence(top_k, student, labels, temperature=2.0, chunk_size=chunk_size)
    torch.testing.assert_close(got, full)
    torch.testing.assert_close(torch.autograd.grad(got, student)[0], torch.autograd.grad(full, student)[0])


def _confident_logits(top: list[float], rest: float) -> torch.Tensor:
    """fp32 logits `(B, T, V)`: `top` on the first tokens, `rest` on every other token."""
    logits = torch.full((B, T, VOCAB), rest)
    logits[..., : len(top)] = torch.tensor(top)
    return logits


CONFIDENT_TEACHERS = {  # the teacher's logits: on its 5 most likely tokens, and on every other
    "no_tail": ([0.0, -100, -101, -102, -103], -150.0),  # at tau 0.5 its top token holds all: tail mass exactly 0
    "tail": ([0.0, -1, -2, -3, -4], -5.0),
}


@pytest.mark.parametrize("teacher_logits", CONFIDENT_TEACHERS.values(), ids=CONFIDENT_TEACHERS.keys())
@pytest.mark.parametrize("chunk_size", [1, 4])
def test_top_k_kl_gradient_is_finite_when_the_students_tail_underflows(labels, teacher_logits, chunk_size):
    """A student that puts ~1e-50 of its mass outside the teacher's top k (its tail underflows in fp32 at
    temperature 0.5) gets a finite gradient, autograd's of the unchunked reference, whether the teacher leaves mass
    outside its top k or none."""
    tau = 0.5
    teacher = TopKLogProbs.from_logits(_confident_logits(*teacher_logits), 5, tau)
    student = _confident_logits(torch.randn(5).tolist(), rest=-60.0).requires_grad_()
    reference = kl_divergence(teacher, student, labels, temperature=tau, chunk_size=None)
    got = kl_divergence(teacher, student, labels, temperature=tau, chunk_size=chunk_size)
    torch.testing.assert_close(got, reference)
    (grad,) = torch.autograd.grad(got, student)
    (expected,) = torch.autograd.grad(reference, student)
    assert torch.isfinite(expected).all() and torch.isfinite(grad).all()
    torch.testing.assert_close(grad, expected, atol=1e-6, rtol=1e-5)


def test_a_top_k_teacher_of_other_positions_is_refused(labels):
    teacher_logits, student = _logits(2)
    top_k = TopKLogProbs.from_logits(teacher_logits[:, :-1].detach(), 4)
    message = r"indices \(3, 8, 4\).*the logits are \(3, 9, 99\), so \(\.\.\., T\) = \(3, 9\)"
    with pytest.raises(ValueError, match=message):
        kl_divergence(top_k, student, labels)


def test_a_second_backward_through_the_chunked_loss_is_refused(labels):
    """backward scales the chunked loss's gradient buffers in place: a retained graph's second backward would scale
    them again, so it is refused."""
    (z,) = _logits()
    loss = 2 * cross_entropy(z, labels, chunk_size=4)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="differentiated twice through a retained graph"):
        loss.backward()


def test_top_k_teacher_needs_its_own_temperature_and_a_valid_k(labels):
    teacher_logits, student = _logits(2)
    top_k = TopKLogProbs.from_logits(teacher_logits, 4, temperature=1.0)
    with pytest.raises(ValueError, match="at temperature 1.0, but the KL is asked at teacher_temperature=2.0"):
        matta_loss(student, labels, teacher_logits=top_k, teacher_temperature=2.0)
    with pytest.raises(ValueError, match=f"k=0 must be between 1 and the vocabulary size {VOCAB}"):
        TopKLogProbs.from_logits(teacher_logits, 0)


COMPILED_CASES = [  # every kind of term: CE, teacher KL (full or top-k) at tau != 1, distillation into extra widths
    dict(teacher="full", detach_ta_targets=False, extra=True),
    dict(teacher="top_k", detach_ta_targets=True, extra=False),
]


@pytest.mark.skipif(not compile_supported(), reason="torch.compile does not run on this Python")
@pytest.mark.parametrize("case", COMPILED_CASES)
def test_compiled_loss_equals_the_eager_loss(labels, case):
    """The compiled per-chunk function (torch.compile, seconds to build) gives the eager one's values and
    gradients, whatever the weights (a tensor, not baked into the compiled graph)."""
    student, ta, extra = _logits(3, dtype=torch.float32)
    teacher = _teacher(case["teacher"])
    for student_weight in (0.8, 0.3):  # a schedule's changing weight: the same compiled graph
        kwargs = dict(
            ta_logits=ta, teacher_logits=teacher, extra_logits={48: extra} if case["extra"] else None,
            student_weight=student_weight, ta_weight=1.2, distill_weight=0.5, distill_temperature=2.0,
            teacher_weight=0.3, teacher_temperature=1.5, detach_ta_targets=case["detach_ta_targets"],
            num_items=torch.tensor(17), chunk_size=5,
        )  # fmt: skip
        eager = matta_loss(student, labels, compiled=False, **kwargs)
        compiled = matta_loss(student, labels, compiled=True, **kwargs)
        # a compilation that fails at run time falls back to the eager function: this would compare eager with eager
        assert _Compiled.failure is None, f"torch.compile failed: {_Compiled.failure}"
        torch.testing.assert_close(compiled.total, eager.total, atol=1e-6, rtol=1e-6)
        for name in eager.terms:
            torch.testing.assert_close(compiled.terms[name], eager.terms[name], atol=1e-6, rtol=1e-6)
        inputs = [student, ta, extra] if case["extra"] else [student, ta]
        grads = torch.autograd.grad(compiled.total, inputs), torch.autograd.grad(eager.total, inputs)
        for got, expected in zip(*grads):
            torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-5)
