"""Cost of one MatTA training step against the passes it must make: time, memory and model FLOP utilisation.

    .venv/bin/python benchmarks/step_cost.py --size tiny
    .venv/bin/python benchmarks/step_cost.py --size gpt2-small                 # 124M student, batch 1 x 1024 on CPU
    .venv/bin/python benchmarks/step_cost.py --size gpt2-small --device cuda   # bf16 autocast, batch 8

In one process, on the same batches (random token ids, fixed seed), after warm-up steps, the median over repeated
steps of:
  (a) a plain cross-entropy training step of a stock `GPT2LMHeadModel` of the TA's size (its own loss, AdamW step),
  (b) the same at the student's size,
  (c) the teacher's forward pass alone (`no_grad`, as the trainer runs it),
  (d) a KD step: `MatTATrainer.training_step` on a single-granularity model of the student's size with the teacher,
  (e) a MatTA step: `MatTATrainer.training_step` on the nested model (TA + student) with the teacher,
where (d) and (e) run exactly the trainer's code path (forwards, `hf_matta.losses.matta_loss` chunked over tokens,
backward) followed by the optimizer step, and every optimizer is `hf_matta.optim.build_optimizer`'s AdamW.

Reported: tokens/s of each, the overhead ratio (e) / ((a) + (b) + (c)) (goal <= 1.05), the peak memory of each
(goal: (e) <= 1.3 x (a) + the teacher's weights) and MFU: model FLOPs per step (`hf_matta.widths.
count_flops_per_token`, x3 for a trained forward, x1 for the teacher) over the step time, against the peak of a
square matmul timed in the same run and dtype.

Memory. CUDA: `torch.cuda.max_memory_allocated` during the timed steps, less what was allocated before the arm
built its models. CPU: the process's resident-set high-water mark (`VmHWM`, reset before the timed steps by writing
5 to `/proc/self/clear_refs`) less the resident set before the arm built its models. For that to be a fair per-arm
figure, freed memory must go back to the system: glibc's mmap threshold is fixed at 64 KiB (`mallopt`), so every
tensor buffer is its own mapping and is unmapped when freed, and `malloc_trim` runs between arms. Each arm's figure
therefore holds its models' weights, gradients, optimizer state and the step's peak of activations. The teacher is
built once and shared, so its weight bytes are added to (c), (d) and (e).

Two more rows measure prototypes of fixes to the project's code (see benchmarks/README.md): (e*) the same loss and
gradient with one backward per model (TA first, its graph freed, then the student), which bounds memory; (e**) the
trainer's step with `hf_matta.losses`' per-chunk closed-form loss and gradient fused by `torch.compile` (the
project's own function, compiled; its equality with the reference is tested in tests/test_losses.py), which bounds time.

The last line printed is `overhead_ratio=<x> memory_ratio=<y>`, with memory_ratio = ((e) - teacher weights) / (a)
(goal <= 1.3). `--profile` also prints torch.profiler's top operators of (e) and of (a) + (b) + (c).
"""

import argparse
import contextlib
import ctypes
import gc
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import GPT2Config, GPT2LMHeadModel

from hf_matta import MatGPT2Config, MatGPT2LMHeadModel
import hf_matta.losses
from hf_matta.losses import count_valid_tokens, matta_loss
from hf_matta.optim import build_optimizer
from hf_matta.pipeline.report import provenance, write_section
from hf_matta.trainer import MatTATrainer
from hf_matta.training_args import MatTATrainingArguments
from hf_matta.widths import count_flops_per_token, count_parameters


# Shapes. tiny is recipes/configs/tiny_cpu.yaml's: 4 x 128 student (FFN 256) in a TA with FFN 1024, a 4 x 192
# teacher, a 4096-token vocabulary, 16 x 128 tokens. gpt2-small is GPT-2 small (124 M) in a TA with twice its FFN
# (6144), taught by a GPT-2-medium-shaped teacher (24 x 1024, 355 M), full 50257 vocabulary, 1024-token sequences.
SIZES = {
    "tiny": dict(
        n_layer=4, n_embd=128, n_head=4, vocab_size=4096, seq=128, student_ffn=256, ta_ffn=1024,
        teacher=dict(n_layer=4, n_embd=192, n_head=4), batch={"cpu": 16, "cuda": 16},
    ),
    "gpt2-small": dict(
        n_layer=12, n_embd=768, n_head=12, vocab_size=50257, seq=1024, student_ffn=3072, ta_ffn=6144,
        teacher=dict(n_layer=24, n_embd=1024, n_head=16), batch={"cpu": 1, "cuda": 8},
    ),
}  # fmt: skip
_NO_DROPOUT = dict(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
_M_MMAP_THRESHOLD = -3  # glibc mallopt parameter number


@dataclass
class Arm:
    """One measured step: `step()` runs it; `flops` are model FLOPs per step; `teacher` says it uses the teacher."""

    name: str
    step: Callable[[dict], None]
    flops: float
    teacher: bool
    models: tuple


@dataclass
class Result:
    name: str
    seconds: list[float]
    peak_bytes: int
    flops: float
    tokens: int

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)


class _Memory:
    """Peak memory of a phase, above the memory in use when the phase's models did not exist yet."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        if not self.cuda:
            self.libc = ctypes.CDLL("libc.so.6")
            self.libc.mallopt(_M_MMAP_THRESHOLD, 64 * 1024)  # every tensor buffer its own mapping, unmapped on free

    def current(self) -> int:
        """Memory in use now, after freeing what can be freed."""
        gc.collect()
        if self.cuda:
            torch.cuda.synchronize()
            return torch.cuda.memory_allocated()
        self.libc.malloc_trim(0)
        return self._status("VmRSS")

    def reset_peak(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        else:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # resets VmHWM to the current resident set

    def peak(self) -> int:
        if self.cuda:
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated()
        return self._status("VmHWM")

    @staticmethod
    def _status(field: str) -> int:
        with open("/proc/self/status") as f:
            line = next(line for line in f if line.startswith(field + ":"))
        return int(line.split()[1]) * 1024


def shapes(size: dict) -> dict[str, MatGPT2Config]:
    """The configs of every model, as MatGPT2 configs (FLOP and parameter counts read them)."""
    common = dict(
        n_layer=size["n_layer"], n_embd=size["n_embd"], n_head=size["n_head"], vocab_size=size["vocab_size"],
        n_positions=size["seq"], bos_token_id=size["vocab_size"] - 1, eos_token_id=size["vocab_size"] - 1,
        **_NO_DROPOUT,
    )  # fmt: skip
    teacher = {**common, **size["teacher"]}
    return {
        "nested": MatGPT2Config(**common, mat_widths=[size["student_ffn"], size["ta_ffn"]]),
        "student": MatGPT2Config(**common, mat_widths=[size["student_ffn"]]),
        "ta": MatGPT2Config(**common, mat_widths=[size["ta_ffn"]]),
        "teacher": MatGPT2Config(**teacher, n_inner=4 * teacher["n_embd"]),
    }


def _gpt2(config: MatGPT2Config, device: torch.device) -> GPT2LMHeadModel:
    """A stock GPT-2 of the same shape as `config` (its uniform FFN width)."""
    keys = ("n_layer", "n_embd", "n_head", "vocab_size", "n_positions", "bos_token_id", "eos_token_id", *_NO_DROPOUT)
    return GPT2LMHeadModel(GPT2Config(**{key: getattr(config, key) for key in keys}, n_inner=config.n_inner[0])).to(
        device
    )


def training_args(device: torch.device, out_dir: str) -> MatTATrainingArguments:
    """The trainer's arguments for every arm: hf_matta's AdamW, untuned MatTA weights (gamma 0.5, all terms on)."""
    return MatTATrainingArguments(
        output_dir=out_dir, use_cpu=device.type == "cpu", report_to="none", optimizer="adamw", learning_rate=1e-4,
        weight_decay=0.1, teacher_weight=0.5, distill_weight=1.0, save_strategy="no", logging_strategy="no",
    )  # fmt: skip


def plain_arm(name: str, config: MatGPT2Config, args, device, seq: int, tokens: int) -> Arm:
    """(a) / (b): stock GPT-2, its own cross-entropy loss, backward, AdamW step."""
    model = _gpt2(config, device).train()
    optimizer = build_optimizer(model, args)

    def step(batch: dict) -> None:
        model(input_ids=batch["input_ids"], labels=batch["labels"], use_cache=False).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return Arm(name, step, 3 * count_flops_per_token(config, None, seq) * tokens, False, (model, optimizer))


def teacher_arm(teacher: GPT2LMHeadModel, config: MatGPT2Config, seq: int, tokens: int) -> Arm:
    """(c): the teacher's forward alone, as `MatTATrainer._teacher_logits` runs it."""

    def step(batch: dict) -> None:
        with torch.no_grad():
            teacher(input_ids=batch["input_ids"], use_cache=False).logits

    return Arm("(c) teacher forward", step, count_flops_per_token(config, None, seq) * tokens, True, ())


def trainer_arm(name: str, config: MatGPT2Config, teacher, teacher_config, args, device, seq, tokens) -> Arm:
    """(d) / (e): `MatTATrainer.training_step` (its forwards, loss and backward), then the optimizer step."""
    model = MatGPT2LMHeadModel(config).to(device)
    trainer = MatTATrainer(model=model, args=args, teacher_model=teacher)
    optimizer = trainer.create_optimizer()

    def step(batch: dict) -> None:
        trainer.training_step(model, batch, num_items_in_batch=count_valid_tokens(batch["labels"]))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    trained = [config.student_width] + ([config.mat_widths[-1]] if len(config.mat_widths) > 1 else [])
    flops = sum(3 * count_flops_per_token(config, width, seq) for width in trained)
    flops += count_flops_per_token(teacher_config, None, seq)
    return Arm(name, step, flops * tokens, True, (model, trainer, optimizer))


def compiled_loss_arm(*arm_args) -> Arm:
    """(e**): (e) with `hf_matta.losses`' per-chunk closed-form loss and gradient fused by `torch.compile` (the
    proposed opt-in; compiled once, at the first warm-up step)."""
    arm = trainer_arm(*arm_args)
    trainer_step = arm.step
    eager_chunk = hf_matta.losses._chunk_sums_and_grads
    compiled_chunk = torch.compile(eager_chunk, dynamic=False)

    def step(batch: dict) -> None:
        hf_matta.losses._chunk_sums_and_grads = compiled_chunk
        try:
            trainer_step(batch)
        finally:
            hf_matta.losses._chunk_sums_and_grads = eager_chunk

    arm.step = step
    return arm


def sequential_arm(name: str, config: MatGPT2Config, teacher, teacher_config, args, device, seq, tokens) -> Arm:
    """(e*), a prototype of a fix to MatTATrainer's step: the same loss and gradient as (e), but one backward per
    model. With `detach_ta_targets` the student's terms see the TA's logits as constants, so the TA's terms can be
    differentiated (and its graph freed) before the student's forward runs: peak memory holds one model's graph."""
    model = MatGPT2LMHeadModel(config).to(device)
    trainer = MatTATrainer(model=model, args=args, teacher_model=teacher)
    optimizer = trainer.create_optimizer()
    loss_args = dict(
        teacher_weight=args.teacher_weight, teacher_temperature=args.teacher_temperature,
        distill_weight=args.distill_weight, distill_temperature=args.distill_temperature,
        student_weight=args.student_weight, chunk_size=args.loss_chunk_size or None,
    )  # fmt: skip

    def step(batch: dict) -> None:
        model.train()
        labels, inputs = batch["labels"], {"input_ids": batch["input_ids"]}
        num_items = count_valid_tokens(labels)
        teacher_logits = trainer._teacher_logits(inputs)  # (B, T, V), no graph
        ta_logits = model(**inputs, use_cache=False).logits  # (B, T, V)
        matta_loss(None, labels, ta_logits=ta_logits, teacher_logits=teacher_logits, ta_weight=args.ta_weight,
                   num_items=num_items, **loss_args).total.backward()  # fmt: skip
        student_logits = model(**inputs, ffn_widths=config.student_width, use_cache=False).logits
        matta_loss(student_logits, labels, ta_logits=ta_logits.detach(), teacher_logits=teacher_logits, ta_weight=0.0,
                   num_items=num_items, **loss_args).total.backward()  # fmt: skip
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    flops = sum(3 * count_flops_per_token(config, width, seq) for width in config.mat_widths)
    flops += count_flops_per_token(teacher_config, None, seq)
    return Arm(name, step, flops * tokens, True, (model, trainer, optimizer))


def matmul_peak(device: torch.device, dtype: torch.dtype, seconds: float = 1.0) -> float:
    """FLOP/s of a square matmul in `dtype`: the best of repeated timings, the reference for MFU."""
    n = 4096 if device.type == "cuda" else 2048
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    best, deadline = float("inf"), time.perf_counter() + seconds
    torch.mm(a, b)
    while time.perf_counter() < deadline:
        start = _now(device)
        torch.mm(a, b)
        best = min(best, _now(device) - start)
    return 2 * n**3 / best


def _now(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter()


def measure(arm_factory, batches, warmup, memory, device, autocast, teacher_bytes) -> Result:
    """Build an arm, warm it up, time its repeated steps and record its peak memory."""
    base = memory.current()
    arm = arm_factory()
    for batch in batches[:warmup]:
        with autocast():
            arm.step(batch)
    memory.reset_peak()
    seconds = []
    for batch in batches[warmup:]:
        start = _now(device)
        with autocast():
            arm.step(batch)
        seconds.append(_now(device) - start)
    peak = memory.peak() - base + (teacher_bytes if arm.teacher else 0)
    tokens = batches[0]["input_ids"].numel()
    result = Result(arm.name, seconds, peak, arm.flops, tokens)
    print(f"{arm.name}: median {result.median:.4f} s, peak {peak / 2**20:,.0f} MiB", file=sys.stderr, flush=True)
    del arm
    memory.current()
    return result


def profile(arm_factories, batches, autocast, device, rows: int = 15) -> None:
    """torch.profiler's top operators (self time) over one step of each arm built by `arm_factories`."""
    from torch.profiler import ProfilerActivity, profile as torch_profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    arms = [factory() for factory in arm_factories]
    for arm in arms:
        with autocast():
            arm.step(batches[0])
    with torch_profile(activities=activities, profile_memory=True) as prof:
        for arm in arms:
            with autocast():
                arm.step(batches[1])
    sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    print(f"\n--- profile: {' + '.join(arm.name for arm in arms)} ---")
    print(prof.key_averages().table(sort_by=sort, row_limit=rows, max_name_column_width=40))


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="tiny")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (cuda:N)")
    parser.add_argument("--dtype", choices=["fp32", "bf16"], help="default: bf16 autocast on cuda, fp32 on cpu")
    parser.add_argument("--batch", type=int, help="sequences per step (default: the size's, per device type)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, help="timed steps per arm (default 10 tiny, 3 gpt2-small on cpu)")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    parser.add_argument("--profile", action="store_true", help="also print torch.profiler tables of (e) and a+b+c")
    parser.add_argument("--out", default=str(Path(__file__).parent / "RESULTS.md"),
                        help="markdown file whose section for this size and device gets the table ('' for none)")  # fmt: skip
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device {args.device}: CUDA is not available here; use --device cpu.")
    if args.threads:
        torch.set_num_threads(args.threads)
    size = SIZES[args.size]
    dtype_name = args.dtype or ("bf16" if device.type == "cuda" else "fp32")
    dtype = torch.bfloat16 if dtype_name == "bf16" else torch.float32
    batch_size = args.batch or size["batch"][device.type]
    repeats = args.repeats or (3 if args.size == "gpt2-small" and device.type == "cpu" else 10)
    seq = size["seq"]
    for name, value in (("batch", batch_size), ("repeats", repeats)):
        if value < 1:
            raise SystemExit(f"--{name} {value} must be at least 1.")

    def autocast():
        if dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(device.type, dtype=dtype)

    started = time.perf_counter()
    torch.manual_seed(0)
    configs = shapes(size)
    memory = _Memory(device)
    generator = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(args.warmup + repeats):
        ids = torch.randint(0, size["vocab_size"], (batch_size, seq), generator=generator).to(device)
        batches.append({"input_ids": ids, "labels": ids})
    tokens = batch_size * seq
    peak_flops = matmul_peak(device, dtype)
    teacher = _gpt2(configs["teacher"], device).eval().requires_grad_(False)
    teacher_bytes = sum(p.numel() * p.element_size() for p in teacher.parameters())
    tmp = tempfile.mkdtemp(prefix="step_cost_")
    targs = training_args(device, tmp)
    factories = {
        "a": lambda: plain_arm("(a) CE step, TA size", configs["ta"], targs, device, seq, tokens),
        "b": lambda: plain_arm("(b) CE step, student size", configs["student"], targs, device, seq, tokens),
        "c": lambda: teacher_arm(teacher, configs["teacher"], seq, tokens),
        "d": lambda: trainer_arm(
            "(d) KD step (student + teacher)", configs["student"], teacher, configs["teacher"], targs, device, seq,
            tokens,
        ),
        "e": lambda: trainer_arm(
            "(e) MatTA step (teacher + TA + student)", configs["nested"], teacher, configs["teacher"], targs, device,
            seq, tokens,
        ),
        "e*": lambda: sequential_arm(
            "(e*) MatTA step, one backward per model (proposed fix)", configs["nested"], teacher, configs["teacher"],
            targs, device, seq, tokens,
        ),
        "e**": lambda: compiled_loss_arm(
            "(e**) MatTA step, compiled chunked loss (proposed fix)", configs["nested"], teacher,
            configs["teacher"], targs, device, seq, tokens,
        ),
    }  # fmt: skip
    results = {
        key: measure(factory, batches, args.warmup, memory, device, autocast, teacher_bytes)
        for key, factory in factories.items()
    }

    nested = configs["nested"]
    teacher_config = configs["teacher"]
    lines = [
        f"## Step cost: `step_cost.py --size {args.size} --device {device.type}`",
        "",
        *provenance("benchmarks/step_cost.py", time.perf_counter() - started, f"{torch.get_num_threads()} threads"),
        f"- {device}, {dtype_name}; student {count_parameters(nested, nested.student_width) / 1e6:.1f} M parameters "
        f"(FFN {nested.student_width}), TA {count_parameters(nested) / 1e6:.1f} M (FFN {nested.mat_widths[-1]}), "
        f"teacher {count_parameters(teacher_config) / 1e6:.1f} M ({teacher_config.n_layer} x {teacher_config.n_embd}),"
        f" vocabulary {size['vocab_size']}, batch {batch_size} x {seq} tokens; median of {repeats} steps after "
        f"{args.warmup} warm-up; matmul peak ({dtype_name}, measured here) {peak_flops / 1e9:.1f} GFLOP/s.",
        "",
        "| step | median s | min s | max s | tokens/s | peak memory MiB | model GFLOP | MFU |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for result in results.values():
        lines.append(
            f"| {result.name} | {result.median:.4f} | {min(result.seconds):.4f} | {max(result.seconds):.4f} | "
            f"{result.tokens / result.median:,.0f} | {result.peak_bytes / 2**20:,.0f} | {result.flops / 1e9:.1f} | "
            f"{result.flops / result.median / peak_flops:.1%} |"
        )
    passes = results["a"].median + results["b"].median + results["c"].median
    overhead = results["e"].median / passes
    memory_ratio = (results["e"].peak_bytes - teacher_bytes) / results["a"].peak_bytes
    fixed_ratio = (results["e*"].peak_bytes - teacher_bytes) / results["a"].peak_bytes
    kd_ratio = results["d"].median / (results["b"].median + results["c"].median)
    lines += [
        "",
        f"- Time: (e) / ((a) + (b) + (c)) = {results['e'].median:.4f} / {passes:.4f} = **{overhead:.3f}** (goal <= "
        f"1.05); (e*) / ((a) + (b) + (c)) = {results['e*'].median / passes:.3f}; (e**) / ((a) + (b) + (c)) = "
        f"{results['e**'].median / passes:.3f}; KD: "
        f"(d) / ((b) + (c)) = {kd_ratio:.3f}.",
        f"- Memory: ((e) - teacher weights {teacher_bytes / 2**20:,.0f} MiB) / (a) = **{memory_ratio:.3f}** (goal "
        f"<= 1.3); with one backward per model, ((e*) - teacher weights) / (a) = {fixed_ratio:.3f}.",
    ]
    print("\n".join(lines), flush=True)
    if args.out:
        write_section(Path(args.out), f"step_cost --size {args.size} --device {device.type}", "\n".join(lines))
    if args.profile:
        profile([factories["e"]], batches, autocast, device)
        profile([factories["a"], factories["b"], factories["c"]], batches, autocast, device)
    print(f"overhead_ratio={overhead:.3f} memory_ratio={memory_ratio:.3f}", flush=True)
    return {"overhead_ratio": overhead, "memory_ratio": memory_ratio, "results": results}


if __name__ == "__main__":
    main(sys.argv[1:])
