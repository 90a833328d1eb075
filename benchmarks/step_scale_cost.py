"""Cost of `ta_neuron_lr_scale`: the optimizer step with and without the TA-only neurons' step scaled.

    .venv/bin/python benchmarks/step_scale_cost.py                  # AdamW on tiny and gpt2-small, Shampoo on tiny

`hf_matta.optim.scale_ta_neuron_steps` hooks the optimizer's step: before it, a copy of the FFN slices beyond the
student's width; after it, those slices moved to `before + K (after - before)`. This times exactly that: one nested
MatGPT2 per shape, fixed random gradients, two optimizers over its parameters built by `hf_matta.optim.build_optimizer`
(one of them hooked by `scale_ta_neuron_steps`, K = 2), stepped alternately, the order swapped every round, for
`--repeats` rounds after `--warmup` each; so slow drifts of a shared machine hit both arms alike. Reported: the median
step time of each arm with its range, the overhead per round (hooked / plain - 1) as its median and range, and the
memory the copy holds during a step (the slices' size). Shampoo at the trainer's defaults: it preconditions from step
10 and recomputes its preconditioners every 10 steps, at the same rounds in both arms (the default warm-up, 12 rounds,
passes the first).

Only the optimizer step is timed: a training step adds the forward and backward passes, which the hooks do not touch
(`step_cost.py` measures those).
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

from hf_matta import MatGPT2Config, MatGPT2LMHeadModel
from hf_matta.models.matgpt2 import nested_ffn_parameters
from hf_matta.optim import build_optimizer, scale_ta_neuron_steps
from hf_matta.pipeline.report import provenance, write_section
from hf_matta.training_args import OPTIMIZERS


ROOT = Path(__file__).resolve().parent.parent
SHAPES = {  # name: (n_layer, n_embd, n_head, vocab, student FFN, TA FFN)
    "tiny": (4, 128, 4, 1024, 128, 512),
    "gpt2-small": (12, 768, 12, 50257, 1536, 3072),
}
SCALE = 2.0
# Shampoo on gpt2-small's shape (its 50257 x 768 embedding blocked by 1024) did not finish 32 rounds in 10 minutes on
# 2 CPU threads: the default times it on the tiny shape only.
CASES = ["tiny:adamw", "tiny:shampoo", "gpt2-small:adamw"]


def _optimizer_args(name: str):
    """MatTATrainingArguments' optimizer fields at the trainer's defaults (Shampoo: preconditioners from step 10,
    recomputed every 10 steps)."""
    from types import SimpleNamespace

    return SimpleNamespace(
        optimizer=name, learning_rate=1e-4, weight_decay=0.1, adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-8,
        max_preconditioner_dim=1024, precondition_frequency=10, start_preconditioning_step=10, shampoo_epsilon=1e-6,
        grafting="adam", align_blocks_to_widths=False,
    )  # fmt: skip


def measure(shape: str, optimizer: str, repeats: int, warmup: int) -> dict:
    """Step times of the plain and the hooked optimizer (seconds per round), and the copied slices' bytes."""
    n_layer, n_embd, n_head, vocab, student, ta = SHAPES[shape]
    torch.manual_seed(0)
    config = MatGPT2Config(
        n_layer=n_layer, n_embd=n_embd, n_head=n_head, vocab_size=vocab, n_positions=128, mat_widths=[student, ta]
    )
    model = MatGPT2LMHeadModel(config)
    for param in model.parameters():
        param.grad = torch.randn_like(param) * 1e-3
    args = _optimizer_args(optimizer)
    arms = {"plain": build_optimizer(model, args), "hooked": build_optimizer(model, args)}
    scale_ta_neuron_steps(arms["hooked"], model, SCALE)
    times: dict[str, list[float]] = {name: [] for name in arms}
    for round_ in range(warmup + repeats):
        for name in list(arms)[:: 1 if round_ % 2 == 0 else -1]:
            start = time.perf_counter()
            arms[name].step()
            if round_ >= warmup:
                times[name].append(time.perf_counter() - start)
    # c_fc: (d, W) weight and (W,) bias, one column or entry per neuron; c_proj: (W, d) weight, one row per neuron
    copied = sum(
        param.numel() // param.shape[dim] * (ta - student) * param.element_size()
        for layer_idx in range(n_layer)
        for name, dim in nested_ffn_parameters(layer_idx).items()
        if (param := model.get_parameter(name)) is not None
    )
    parameters = sum(param.numel() for param in model.parameters())
    return {"times": times, "copied": copied, "parameters": parameters}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--cases", nargs="+", default=CASES, help=f"SHAPE:OPTIMIZER pairs (default {' '.join(CASES)}; shapes: "
        f"{', '.join(SHAPES)})",
    )  # fmt: skip
    parser.add_argument("--repeats", type=int, default=20, help="timed rounds per arm (default 20)")
    parser.add_argument("--warmup", type=int, default=12, help="untimed rounds first (default 12)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "RESULTS.md")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    rows = []
    cases = [case.partition(":")[::2] for case in args.cases]
    for case, (shape, optimizer) in zip(args.cases, cases):  # every case checked before any is timed
        if shape not in SHAPES or optimizer not in OPTIMIZERS:
            parser.error(f"case {case!r} is not SHAPE:OPTIMIZER, SHAPE in {list(SHAPES)}, OPTIMIZER in {OPTIMIZERS}")
    for shape, optimizer in cases:
        result = measure(shape, optimizer, args.repeats, args.warmup)
        plain, hooked = result["times"]["plain"], result["times"]["hooked"]
        overhead = [h / p - 1 for h, p in zip(hooked, plain)]
        rows.append(
            f"| {shape} | {result['parameters'] / 1e6:.1f} M | {optimizer} | {_ms(plain)} | {_ms(hooked)} | "
            f"{statistics.median(overhead) * 100:+.0f} % ({min(overhead) * 100:+.0f} to "
            f"{max(overhead) * 100:+.0f}) | {result['copied'] / 2**20:.1f} MiB |"
        )
        print(rows[-1], flush=True)
    lines = [
        "## Cost of `ta_neuron_lr_scale`: `step_scale_cost.py`",
        "",
        *provenance("benchmarks/step_scale_cost.py", time.perf_counter() - started, f"{args.threads} threads"),
        f"- The optimizer step alone on fixed gradients, plain and hooked by `scale_ta_neuron_steps` (K = {SCALE:g}), "
        f"alternating, {args.repeats} rounds after {args.warmup}; overhead = hooked / plain - 1 per round.",
        "",
        "| shape | parameters | optimizer | plain step (median, range) | hooked step | overhead (median, range) | "
        "copied per step |",
        "|---|---|---|---|---|---|---|",
        *rows,
    ]
    write_section(args.out, "step_scale_cost", "\n".join(lines) + "\n")
    print("\n".join(lines))


def _ms(seconds: list[float]) -> str:
    return f"{statistics.median(seconds) * 1e3:.1f} ms ({min(seconds) * 1e3:.1f}-{max(seconds) * 1e3:.1f})"


if __name__ == "__main__":
    main(sys.argv[1:])
