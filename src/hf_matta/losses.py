"""The MatTA loss terms as pure functions of logits and labels (DESIGN.md, "The method in one page").

With z_T, z_A, z_S the teacher, TA and student logits, y the labels and KL_tau(p||q) = tau^2 KL(softmax(p/tau) ||
softmax(q/tau)) summed over the vocabulary:

    target(z) = (1 - gamma) CE(y, z) + gamma KL_tauT(z_T || z)            (gamma = 0 when there is no teacher)
    L         = w_S target(z_S) + w_A target(z_A) + w_D KL_tauD(sg(z_A) || z_S)   (+ the extra widths, as students)

Conventions shared by every function here:
- `labels` are the model's labels as GPT-2 takes them (`labels = input_ids`, -100 ignored): the next-token shift
  happens here, once, in `shift_labels`, exactly as in GPT-2's own loss. A position whose shifted label is -100
  counts for no term, the KL terms included.
- Each term is a sum over valid tokens divided by `num_items`, a count given from outside, so that the Trainer can
  normalise by the tokens of the whole optimizer step (gradient accumulation and data parallelism). `None` counts
  the valid tokens of `labels` (a mean over this batch).
- `chunk_size` bounds memory. Three (B, T, V) logits tensors are the bottleneck (8 x 1024 x 50257 fp32 is 1.6 GB
  each), and a plain autograd loss keeps several more vocabulary-sized tensors per model alive until backward
  (softmaxes, log-softmaxes, upcasts). With a chunk size, the terms are computed over `chunk_size` tokens at a
  time and each chunk's gradient with respect to the logits is computed at once and written into one buffer per
  trained model, so at most one chunk's vocabulary-sized intermediates exist at any time, backward included
  (`benchmarks/loss_memory.md` measures it). `None` is the plain autograd computation, the reference.
- `compiled=True` runs each chunk's closed-form function through `torch.compile`, which fuses its elementwise passes
  over the vocabulary (same values and gradients; `benchmarks/step_cost.py` measures where it is faster). Where
  compilation is unavailable it falls back, with a warning, to the eager function, which stays the reference.
- A teacher may be given as its top-k tokens only (`TopKLogProbs`, e.g. read from a cache of a one-time teacher pass,
  `hf_matta.teacher_cache`). Its KL keeps the rest of the vocabulary as one bucket ("tail") holding the mass the k
  tokens leave: KL(p~ || q~) over k + 1 outcomes, p~ = (p_1..p_k, 1 - sum p_i), q~ = (q_1..q_k, 1 - sum q_i) at the
  same k tokens. We keep the tail rather than renormalise p over the k tokens because renormalising tells the student
  that the k tokens hold all the mass: where the teacher is unsure (a top-64 of 50257 tokens that covers 40 % of its
  mass) it would teach the student to be 2.5x more confident than the teacher is, and it leaves the mass the student
  puts outside the k tokens unconstrained. With the tail bucket the loss is a true KL (>= 0, 0 only when the student
  matches the teacher on the k tokens and on the rest's total), it never exceeds the full KL (grouping outcomes can
  only lower a KL), and it is the full KL when the k tokens hold all of the teacher's mass (k = V).
"""

import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable


IGNORE_INDEX = -100
DEFAULT_CHUNK_SIZE = 512  # tokens per chunk: about 10 (512, V) fp32 intermediates, 1 GB at GPT-2's V = 50257


def shift_labels(labels: torch.LongTensor) -> torch.LongTensor:
    """Next-token targets aligned with the logits: position t is scored on `labels[t + 1]`, the last on nothing.

    `(..., T) -> (..., T)`, padded with -100 instead of slicing the logits, as transformers' `ForCausalLMLoss`.
    """
    return F.pad(labels, (0, 1), value=IGNORE_INDEX)[..., 1:]


def count_valid_tokens(labels: torch.LongTensor) -> torch.Tensor:
    """Number of tokens that count for the loss of `labels` (after the shift): the default `num_items`."""
    return shift_labels(labels).ne(IGNORE_INDEX).sum()


@dataclass(frozen=True)
class TopKLogProbs:
    """A teacher's distribution kept as its `k` most likely tokens per position (the module docstring says how the
    KL treats the rest of the vocabulary): `indices` `(..., T, k)` and their `log_probs` `(..., T, k)`, the log of
    softmax(z / `temperature`) at those tokens."""

    indices: torch.Tensor
    log_probs: torch.Tensor
    temperature: float = 1.0

    @classmethod
    def from_logits(cls, logits: torch.Tensor, k: int, temperature: float = 1.0) -> "TopKLogProbs":
        """The top-`k` log-probabilities of `logits` `(..., V)` at `temperature` (computed in fp32 at least)."""
        if not 1 <= k <= logits.size(-1):
            raise ValueError(f"k={k} must be between 1 and the vocabulary size {logits.size(-1)}.")
        z = logits.to(torch.promote_types(logits.dtype, torch.float32)) / temperature  # (..., V)
        values, indices = z.topk(k, dim=-1)  # (..., k), most likely first
        return cls(indices, values - z.logsumexp(-1, keepdim=True), temperature)


@dataclass(frozen=True)
class _Term:
    """One atomic term on the stacked logits: CE(labels, logits[model]) when `target` is None, else
    KL_temperature(logits[target] || logits[model]); `share` is its coefficient inside its reported term."""

    model: int
    target: int | None = None
    temperature: float = 1.0
    detach_target: bool = True
    share: float = 1.0


# The stacked inputs of the functions below: one entry per model, None (absent), logits (n, V) or, for a top-k teacher,
# the pair (indices, log-probabilities), (n, k) each.
_Logits = torch.Tensor | tuple[torch.Tensor, torch.Tensor] | None


def _top_k_kl_rows(
    log_q: torch.Tensor, indices: torch.Tensor, log_p: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """KL(p~ || q~) per row for a top-k teacher with its tail bucket, `(r, 1)`, with the student's tail log-mass
    `(r, 1)` (None when k = V: no tail) and the teacher's tail mass `(r, 1)`. `log_q` `(r, V)` is the student's
    log-probabilities; `indices` and `log_p` `(r, k)` the teacher's tokens and log-probabilities."""
    p = log_p.exp()  # (r, k)
    kl = torch.where(p > 0, p * (log_p - log_q.gather(-1, indices)), 0.0).sum(-1, keepdim=True)  # (r, 1)
    tail_p = (1 - p.sum(-1, keepdim=True)).clamp(min=0)  # (r, 1)
    if indices.size(-1) == log_q.size(-1):
        return kl, None, tail_p
    log_q_tail = log_q.scatter(-1, indices, float("-inf")).logsumexp(-1, keepdim=True)  # (r, 1)
    return kl + torch.xlogy(tail_p, tail_p) - tail_p * log_q_tail, log_q_tail, tail_p


def _term_sums(logits: Sequence[_Logits], targets: torch.Tensor, terms: Sequence[_Term]) -> torch.Tensor:
    """Each term summed over valid rows, `(len(terms),)`: logits `(n, V)` each, `targets` the shifted labels `(n,)`.

    Computed in fp32 at least, whatever the logits' dtype; log-softmaxes are shared between terms of one call.
    """
    valid = targets.ne(IGNORE_INDEX)  # (n,)
    log_probs: dict[tuple[int, float], torch.Tensor] = {}

    def log_softmax(index: int, temperature: float) -> torch.Tensor:
        if (index, temperature) not in log_probs:
            z = logits[index]
            z = z.to(torch.promote_types(z.dtype, torch.float32))
            log_probs[index, temperature] = F.log_softmax(z / temperature, dim=-1)  # (n, V)
        return log_probs[index, temperature]

    sums = []
    for term in terms:
        if term.target is None:
            sums.append(F.nll_loss(log_softmax(term.model, 1.0), targets, ignore_index=IGNORE_INDEX, reduction="sum"))
            continue
        tau = term.temperature
        log_q = log_softmax(term.model, tau)  # (n, V), the model that learns it
        if isinstance(logits[term.target], tuple):  # a top-k teacher
            indices, log_p = logits[term.target]
            kl_rows = _top_k_kl_rows(log_q, indices, log_p.to(log_q.dtype))[0].squeeze(-1)  # (n,)
        else:
            log_p = log_softmax(term.target, tau)  # (n, V), the distribution taught
            if term.detach_target:
                log_p = log_p.detach()
            # kl_div keeps only its inputs for backward, where exp(log_p) * (log_p - log_q) would keep two more (n, V)
            kl_rows = F.kl_div(log_q, log_p, reduction="none", log_target=True).sum(-1)  # (n,)
        sums.append(tau**2 * torch.where(valid, kl_rows, 0.0).sum())
    return torch.stack(sums)


@torch.no_grad()
def _chunk_sums_and_grads(
    logits: Sequence[_Logits],
    targets: torch.Tensor,
    terms: Sequence[_Term],
    weights: torch.Tensor,
    grad_terms: tuple[bool, ...],
    out: Sequence[torch.Tensor | None],
) -> torch.Tensor:
    """`_term_sums` of one chunk of rows; the gradient of `sum(weights * sums)` with respect to every logits tensor
    with an `out` buffer (this chunk's rows of it, `(r, V)`) is written there, in closed form, with no autograd graph;
    only the terms in `grad_terms` (those of nonzero weight) contribute to it. With q = softmax(z / tau),
    p = softmax(z_t / tau):

        d/dz CE(y, z)             = softmax(z) - onehot(y)
        d/dz tau^2 KL(p || q)     = tau (q - p)
        d/dz_t tau^2 KL(p || q)   = tau p (log p - log q - KL)          (only when the target is not detached)
        d/dz tau^2 KL(p~ || q~)   = tau (q - p^)                        (a top-k teacher with its tail bucket)

    where p^ is p on the teacher's k tokens and, on the others, the tail mass spread as the student spreads its own
    tail (q_j (1 - sum p_i) / (1 - sum q_i)). One log-softmax per model and temperature serves every term's value and
    gradient (fp32 at least). This is the function `compiled=True` compiles: weights are a tensor, so that a changing
    schedule weight does not trigger a recompilation, and compiled, the gradient is computed straight into `out`.
    """
    needs_grad = [buffer is not None for buffer in out]
    valid = targets.ne(IGNORE_INDEX).unsqueeze(-1)  # (r, 1)
    safe_targets = targets.clamp(min=0).unsqueeze(-1)  # (r, 1)
    log_probs: dict[tuple[int, float], torch.Tensor] = {}
    grads: list[torch.Tensor | None] = [None] * len(logits)

    def log_softmax(index: int, temperature: float) -> torch.Tensor:
        if (index, temperature) not in log_probs:
            z = logits[index].to(torch.promote_types(logits[index].dtype, torch.float32))
            log_probs[index, temperature] = F.log_softmax(z / temperature if temperature != 1 else z, dim=-1)
        return log_probs[index, temperature]  # (r, V)

    def add_grad(index: int, grad: torch.Tensor) -> None:
        grads[index] = grad if grads[index] is None else grads[index].add_(grad)

    sums = []
    for i, term in enumerate(terms):
        grad_model = grad_terms[i] and needs_grad[term.model]
        if term.target is None:
            log_q = log_softmax(term.model, 1.0)
            sums.append(-torch.where(valid, log_q.gather(-1, safe_targets), 0.0).sum())
            if grad_model:
                grad = log_q.exp().scatter_add_(-1, safe_targets, torch.full_like(safe_targets, -1, dtype=log_q.dtype))
                add_grad(term.model, grad.mul_(weights[i]))
            continue
        tau = term.temperature
        log_q = log_softmax(term.model, tau)
        if isinstance(logits[term.target], tuple):  # a top-k teacher
            indices, log_p = logits[term.target]
            log_p = log_p.to(log_q.dtype)
            kl_rows, log_q_tail, tail_p = _top_k_kl_rows(log_q, indices, log_p)
            sums.append(tau**2 * torch.where(valid, kl_rows, 0.0).sum())
            if grad_model:
                scale = weights[i] * tau
                if log_q_tail is None:
                    grad = log_q.exp().mul_(scale)  # (r, V)
                else:
                    # off the k tokens q - p^ = (q / q_tail) (q_tail - p_tail), the ratio taken in logs (<= 1 there):
                    # a confident student's q_tail underflows, and q (1 - p_tail / q_tail) would be 0 * inf
                    row_scale = (log_q_tail.exp() - tail_p).mul_(scale)  # (r, 1)
                    grad = (log_q - log_q_tail).exp_().mul_(row_scale)  # (r, V)
                # on the k tokens q - p (written over the ratio, which may overflow there)
                grad.scatter_(-1, indices, (log_q.gather(-1, indices).exp() - log_p.exp()).mul_(scale))
                add_grad(term.model, grad)
            continue
        log_p = log_softmax(term.target, tau)
        p = log_p.exp()  # (r, V), the distribution taught
        log_ratio = log_p - log_q  # (r, V)
        kl_rows = (p * log_ratio).sum(-1, keepdim=True)  # (r, 1)
        sums.append(tau**2 * torch.where(valid, kl_rows, 0.0).sum())
        if grad_model:
            add_grad(term.model, (log_q.exp() - p).mul_(weights[i] * tau))
        if grad_terms[i] and not term.detach_target and needs_grad[term.target]:
            add_grad(term.target, p.mul_(log_ratio.sub_(kl_rows)).mul_(weights[i] * tau))
    for buffer, grad in zip(out, grads):
        if buffer is not None:
            buffer.copy_(torch.where(valid, grad, 0.0) if grad is not None else torch.zeros_like(buffer))
    return torch.stack(sums)


class _Compiled:
    """`_chunk_sums_and_grads` through `torch.compile`, built at its first use and shared by every caller in the
    process (compiled graphs are cached by input shapes and term sets); after a failure to compile, the eager function
    with a warning."""

    function: Callable | None = None
    failure: str | None = None

    @classmethod
    def run(cls, *args):
        if cls.failure is None:
            try:
                if cls.function is None:
                    cls.function = torch.compile(_chunk_sums_and_grads)
                return cls.function(*args)
            except (torch._dynamo.exc.TorchDynamoException, RuntimeError) as error:
                if isinstance(error, RuntimeError) and not _is_compile_failure(error):
                    raise
                cls.failure = f"{type(error).__name__}: {str(error).strip().splitlines()[0] if str(error) else ''}"
                warnings.warn(
                    f"the compiled loss is unavailable here ({cls.failure}); using the eager loss (same values, "
                    "slower). Set compile_loss='off' to silence this.",
                    stacklevel=2,
                )
        return _chunk_sums_and_grads(*args)


def _is_compile_failure(error: RuntimeError) -> bool:
    """Whether a RuntimeError comes from torch.compile's toolchain (no C++ compiler, an unsupported Python)."""
    return any(name in type(error).__module__ for name in ("torch._dynamo", "torch._inductor"))


# Where `compile_loss="auto"` compiles: the device types on which the compiled loss measured faster than the eager one
# (benchmarks/step_cost.py, RESULTS.md), each with the smallest vocabulary it was measured faster at. Below it (the
# tests' tiny models) compiling costs seconds and saves nothing; elsewhere (CUDA) it stays eager until measured.
COMPILED_LOSS_MEASURED_FASTER = {"cpu": 4096}


def compiled_loss_pays(device_type: str, vocab_size: int) -> bool:
    """Whether the compiled loss measured faster than the eager one for this device type and vocabulary size."""
    smallest = COMPILED_LOSS_MEASURED_FASTER.get(device_type)
    return smallest is not None and vocab_size >= smallest and compile_supported()


def compile_supported() -> bool:
    """Whether `torch.compile` can run here at all (it needs a supported Python version)."""
    return torch._dynamo.is_dynamo_supported() and _Compiled.failure is None


class _ChunkedTerms(torch.autograd.Function):
    """The weighted total and the per-term sums of `_term_sums`, computed over chunks of rows.

    Forward computes, chunk by chunk, the terms and (in closed form, `_chunk_sums_and_grads`) the gradient of their
    weighted sum with respect to that chunk of every logits tensor that requires grad, and writes it into one `(n, V)`
    buffer per such tensor; backward only scales the buffers, in place (by the incoming gradient, which the weights
    already hold the 1 / num_items of). So no chunk's intermediates outlive the chunk, and no autograd graph is built
    over vocabulary-sized tensors. The per-term sums are not differentiable, and the loss is differentiated once
    (a second backward through a retained graph is refused: its buffers are scaled already).
    `grad_terms` says which terms have a nonzero weight.
    """

    @staticmethod
    def forward(ctx, targets, terms, weights, grad_terms, chunk_size, compiled, *logits):
        needs_grad = tuple(isinstance(z, torch.Tensor) and z.requires_grad for z in logits)
        grads = [torch.empty_like(z) if need else None for z, need in zip(logits, needs_grad)]  # every row written
        run = _Compiled.run if compiled else _chunk_sums_and_grads
        sums = torch.zeros_like(weights)
        for start in range(0, targets.numel(), chunk_size):
            rows = slice(start, start + chunk_size)
            chunk = [_rows(z, rows) for z in logits]
            sums += run(chunk, targets[rows], terms, weights, grad_terms, [_rows(g, rows) for g in grads])
        ctx.save_for_backward(*(g for g in grads if g is not None))
        ctx.needs_grad = needs_grad
        ctx.scaled = False
        total = _weighted_total(weights, sums)
        ctx.mark_non_differentiable(sums)
        return total, sums

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_total, grad_sums):
        if ctx.scaled:
            raise RuntimeError(
                "the chunked loss was differentiated twice through a retained graph: its gradient buffers were scaled "
                "in place by the first backward. Differentiate it once, or use chunk_size=None (plain autograd)."
            )
        buffers = iter(ctx.saved_tensors)
        # A loss differentiated as it is sends 1: no pass over the buffers then (read only where it is free, the CPU)
        unscaled = grad_total.device.type == "cpu" and grad_total.item() == 1.0
        ctx.scaled = not unscaled
        grads = [(next(buffers) if unscaled else next(buffers).mul_(grad_total)) if need else None
                 for need in ctx.needs_grad]  # fmt: skip
        return None, None, None, None, None, None, *grads


def _weighted_total(weights: torch.Tensor, sums: torch.Tensor) -> torch.Tensor:
    """`sum(weights * sums)` over the terms of nonzero weight (a zero-weight term that is NaN stays out)."""
    return torch.where(weights != 0, weights * sums, 0.0).sum()


def _rows(z: _Logits, rows: slice) -> _Logits:
    """A chunk of rows of one stacked input, detached."""
    if z is None:
        return None
    if isinstance(z, tuple):
        return tuple(part[rows] for part in z)
    return z[rows].detach()


def _flatten(z: torch.Tensor | TopKLogProbs | None, like: torch.Tensor) -> _Logits:
    """One model's logits `(..., T, V)` as `(n, V)` rows, a top-k teacher as its pair of `(n, k)` rows; `like` is
    the first model's logits, whose positions a top-k teacher must cover."""
    if z is None:
        return None
    if isinstance(z, TopKLogProbs):
        shape, positions = tuple(z.indices.shape), tuple(like.shape[:-1])
        if shape[:-1] != positions or tuple(z.log_probs.shape) != shape:
            raise ValueError(
                f"the top-k teacher's indices {shape} and log_probs {tuple(z.log_probs.shape)} must be (..., T, k) "
                f"over the logits' positions: the logits are {tuple(like.shape)}, so (..., T) = {positions}. Give "
                "the teacher's targets of the same batch."
            )
        return z.indices.reshape(-1, shape[-1]), z.log_probs.reshape(-1, shape[-1])
    return z.reshape(-1, like.size(-1))


def _weighted_terms(
    logits: Sequence[torch.Tensor | TopKLogProbs | None],
    labels: torch.LongTensor,
    terms: Sequence[_Term],
    weights: Sequence[float],
    num_items: torch.Tensor | int | None,
    chunk_size: int | None,
    compiled: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`(total, per-term values)`, both divided by `num_items`: logits `(..., T, V)`, labels `(..., T)`; the total
    is the sum of the terms times `weights`, a zero weight leaving its term out."""
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size={chunk_size} must be a positive number of tokens, or None for no chunking.")
    if num_items is None:
        num_items = count_valid_tokens(labels).clamp(min=1)
    first = next(z for z in logits if isinstance(z, torch.Tensor))
    flat = [_flatten(z, first) for z in logits]  # (n, V) views
    targets = shift_labels(labels).reshape(-1).to(first.device)  # (n,)
    dtype = torch.promote_types(first.dtype, torch.float32)
    grad_terms = tuple(weight != 0 for weight in weights)  # from the Python weights: no device sync
    weights = torch.tensor(weights, dtype=dtype, device=targets.device)
    if chunk_size is None:
        sums = _term_sums(flat, targets, terms)
        return _weighted_total(weights, sums) / num_items, sums.detach() / num_items
    scaled_weights = weights / num_items
    total, sums = _ChunkedTerms.apply(targets, tuple(terms), scaled_weights, grad_terms, chunk_size, compiled, *flat)
    return total, sums / num_items


def _check_teacher_temperature(teacher: torch.Tensor | TopKLogProbs | None, temperature: float) -> None:
    """A top-k teacher's log-probabilities hold one temperature: the KL must use that one."""
    if isinstance(teacher, TopKLogProbs) and teacher.temperature != temperature:
        raise ValueError(
            f"the top-k teacher's log-probabilities are at temperature {teacher.temperature}, but the KL is asked at "
            f"teacher_temperature={temperature}: its tail mass is only known at the temperature it was stored at; "
            f"use teacher_temperature={teacher.temperature}, or rebuild the teacher cache at {temperature}."
        )


def cross_entropy(
    logits: torch.Tensor,
    labels: torch.LongTensor,
    num_items: torch.Tensor | int | None = None,
    chunk_size: int | None = DEFAULT_CHUNK_SIZE,
    compiled: bool = False,
) -> torch.Tensor:
    """Next-token cross-entropy of `logits` `(..., T, V)` on `labels` `(..., T)`, summed over valid tokens and
    divided by `num_items`; with `num_items=None` it is GPT-2's own `loss`."""
    return _weighted_terms([logits], labels, [_Term(model=0)], [1.0], num_items, chunk_size, compiled)[0]


def kl_divergence(
    target_logits: torch.Tensor | TopKLogProbs,
    logits: torch.Tensor,
    labels: torch.LongTensor,
    num_items: torch.Tensor | int | None = None,
    temperature: float = 1.0,
    detach_target: bool = True,
    chunk_size: int | None = DEFAULT_CHUNK_SIZE,
    compiled: bool = False,
) -> torch.Tensor:
    """tau^2 KL(softmax(target_logits / tau) || softmax(logits / tau)), summed over the vocabulary and over the
    tokens whose shifted label is valid, divided by `num_items`. With `detach_target` no gradient reaches the target.
    A `TopKLogProbs` target gives the KL with its tail bucket (module docstring), at its own temperature.
    """
    _check_teacher_temperature(target_logits, temperature)
    term = _Term(model=1, target=0, temperature=temperature, detach_target=detach_target)
    return _weighted_terms([target_logits, logits], labels, [term], [1.0], num_items, chunk_size, compiled)[0]


def _target_terms(model: int, teacher: int | None, gamma: float, tau: float) -> list[_Term]:
    """The atomic terms of target(z): CE and teacher KL, each left out when its share is zero."""
    if teacher is None:
        gamma = 0.0
    terms = [_Term(model=model, share=1 - gamma)] if gamma < 1 else []
    if gamma > 0:
        terms.append(_Term(model=model, target=teacher, temperature=tau, share=gamma))
    return terms


def target_loss(
    logits: torch.Tensor,
    labels: torch.LongTensor,
    teacher_logits: torch.Tensor | TopKLogProbs | None = None,
    teacher_weight: float = 0.5,
    teacher_temperature: float = 1.0,
    num_items: torch.Tensor | int | None = None,
    chunk_size: int | None = DEFAULT_CHUNK_SIZE,
    compiled: bool = False,
) -> torch.Tensor:
    """target(z) = (1 - gamma) CE(y, z) + gamma KL_tauT(z_T || z), gamma = `teacher_weight` (0 without a teacher)."""
    _check_teacher_temperature(teacher_logits, teacher_temperature)
    terms = _target_terms(0, None if teacher_logits is None else 1, teacher_weight, teacher_temperature)
    shares = [term.share for term in terms]
    return _weighted_terms([logits, teacher_logits], labels, terms, shares, num_items, chunk_size, compiled)[0]


@dataclass
class MatTALoss:
    """The MatTA objective and its terms.

    Attributes:
        total: the weighted loss to differentiate.
        terms: each term's value (detached, before its weight): `student` = target(z_S), `ta` = target(z_A),
            `distill` = KL_tauD(z_A || z_S), and for every extra width `w`: `w{w}` = target(z_w) and
            `distill_w{w}` = KL_tauD(z_A || z_w). A term is present when its logits were given.
    """

    total: torch.Tensor
    terms: dict[str, torch.Tensor]


def matta_loss(
    student_logits: torch.Tensor | None,
    labels: torch.LongTensor,
    ta_logits: torch.Tensor | None = None,
    teacher_logits: torch.Tensor | TopKLogProbs | None = None,
    extra_logits: Mapping[int | str, torch.Tensor] | None = None,
    student_weight: float = 1.0,
    ta_weight: float = 1.0,
    distill_weight: float = 1.0,
    distill_temperature: float = 1.0,
    teacher_weight: float = 0.5,
    teacher_temperature: float = 1.0,
    detach_ta_targets: bool = True,
    num_items: torch.Tensor | int | None = None,
    chunk_size: int | None = DEFAULT_CHUNK_SIZE,
    ta_term: bool = True,
    compiled: bool = False,
) -> MatTALoss:
    """L = w_S target(z_S) + w_A target(z_A) + w_D KL_tauD(sg(z_A) || z_S), plus, for every extra width `w` in
    `extra_logits` (trained as a student of the TA), w_S target(z_w) + w_D KL_tauD(sg(z_A) || z_w), reported as
    `w{w}` and `distill_w{w}`; a string key names its terms itself (the trainer's sampled Mix'n'Match plan, `mixed`).

    Logits are `(..., T, V)`, all on the same tokens; `labels` `(..., T)` unshifted. A model whose logits are None
    takes no part: no TA means no TA and no distillation terms, no teacher means gamma = 0, no student means no
    student terms (a step that trains the TA or an extra width alone, as MatFormer's sampled schedule does).
    The teacher may be a `TopKLogProbs` (its KL then keeps the rest of the vocabulary as one bucket).
    A zero weight removes its term from the total (and from the gradient) but the term is still reported when its
    logits were given. `ta_term=False` leaves the TA's own term out (neither computed nor reported): its logits are
    then only the distillation target, as in the student's part of a step whose TA part was differentiated first.
    `detach_ta_targets=False` lets the distillation gradient reach the TA. `compiled` runs the chunked computation
    through `torch.compile` (module docstring).
    """
    _check_teacher_temperature(teacher_logits, teacher_temperature)
    extra_logits = dict(extra_logits or {})
    logits = [student_logits, ta_logits, teacher_logits, *extra_logits.values()]
    teacher = None if teacher_logits is None else 2
    # Each reported term: (its weight in the total, its atomic terms); its value sums them times their shares.
    groups: dict[str, tuple[float, list[_Term]]] = {}

    def add_student(name: str, model: int) -> None:
        groups[name] = (student_weight, _target_terms(model, teacher, teacher_weight, teacher_temperature))
        if ta_logits is not None:
            distill = _Term(model=model, target=1, temperature=distill_temperature, detach_target=detach_ta_targets)
            groups["distill" if name == "student" else f"distill_{name}"] = (distill_weight, [distill])

    if student_logits is not None:
        add_student("student", 0)
    if ta_logits is not None and ta_term:
        groups["ta"] = (ta_weight, _target_terms(1, teacher, teacher_weight, teacher_temperature))
    for index, width in enumerate(extra_logits, start=3):
        name = width if isinstance(width, str) else f"w{width}"
        if name in groups or f"distill_{name}" in groups:
            raise ValueError(f"extra_logits key {width!r} names a term that exists already ({name}): give it another.")
        add_student(name, index)

    terms = [term for _, group in groups.values() for term in group]
    weights = [weight * term.share for weight, group in groups.values() for term in group]
    total, sums = _weighted_terms(logits, labels, terms, weights, num_items, chunk_size, compiled)
    values, start = {}, 0
    for name, (_, group) in groups.items():
        shares = torch.tensor([term.share for term in group], device=sums.device)
        values[name] = (shares * sums[start : start + len(group)]).sum()
        start += len(group)
    return MatTALoss(total=total, terms=values)
