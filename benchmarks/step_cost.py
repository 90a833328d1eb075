"""Cost of one MatTA training step against the passes it must make: time, memory and model FLOP utilisation.

    .venv/bin/python benchmarks/step_cost.py --size tiny
    .venv/bin/python benchmarks/step_cost.py --size gpt2-small                 # 124M student, batch 1 x 1024 on CPU
    .venv/bin/python benchmarks/step_cost.py --device cuda --out $OUT/step_cost_cuda.md --json $OUT/step_cost_cuda.json
                                                # a GPU day: gpt2-small and gpt2-medium, bf16 autocast, batch 8

In one process, on the same batches (random token ids, fixed seed), the steps ("arms"):
  (a) a plain cross-entropy training step of a stock `GPT2LMHeadModel` of the TA's size (its own loss, AdamW step),
  (b) the same at the student's size,
  (c) the teacher's forward pass alone (`no_grad`, as the trainer runs it),
  (d) a KD step: `MatTATrainer.training_step` on a single-granularity model of the student's size, with the teacher,
  (e0)-(e3) a MatTA step: `MatTATrainer.training_step` on the nested model (TA + student) with the teacher, with and
      without each of the trainer's two cost options: `ta_backward_first` (the TA's terms and backward first, then the
      student's against its detached logits: memory) and `compile_loss` (the chunked loss's closed-form per-chunk
      function through `torch.compile`: time),
  (f) the MatTA step with the teacher's top-k log-probabilities read from a cache (`teacher_cache_dir`, built once on
      these batches by `hf_matta.teacher_cache.build_teacher_cache`) instead of the teacher's forward,
each followed by the optimizer step (`hf_matta.optim.build_optimizer`'s AdamW). (d)-(f) are the trainer's own step on
real batches: no copy of it, nothing patched; the options are the trainer's arguments.

Timing: every arm is built and warmed up (compilation happens there), then the arms run interleaved, one step each per
round, the order rotated every round, for `--repeats` rounds; so slow drifts of a shared machine hit every arm alike.
Reported per arm: the median step time and its spread (min, max); the overhead ratio of each MatTA arm is computed per
round, (e) / ((a) + (b) + (c)) on that round's steps (goal <= 1.05), and reported as its median and range over rounds.
The headline arm is the trainer's defaults (`ta_backward_first` on; `compile_loss="auto"`, on where it measured
faster: `hf_matta.losses.COMPILED_LOSS_MEASURED_FASTER`).

Memory: each arm's peak = what its models hold between steps (weights, optimizer state: measured once the arm is
warmed up, above the memory in use before it was built) + the largest rise above that during one of its timed steps
(gradients, activations, logits, the loss's buffers). The nested model and its optimizer are shared by (e0)-(f), and
the teacher by (c)-(e3), whose weights are added to those arms. CPU: resident set, the rise read from the high-water
mark `VmHWM` (reset through `/proc/self/clear_refs` before each step); glibc's mmap threshold is pinned to 64 KiB
(`mallopt`) so every tensor buffer is its own mapping, returned to the system when freed. CUDA: `memory_allocated` and
`max_memory_allocated`. memory_ratio = ((e) - teacher weights) / (a) (goal <= 1.3).

MFU: model FLOPs per step (`hf_matta.widths.count_flops_per_token`, x3 for a trained forward, x1 for the teacher) over
the step time, against the peak of a square matmul timed in this run (CPU) or the device's nominal bf16 peak (CUDA;
the measured matmul peak is printed beside it).

`--arms a b c e3` times only those arms (a, b, c and the defaults arm are always kept: the headline ratios need
them): a round of the four takes a third of the time of all nine on gpt2-small, so more rounds fit in the same time.
The section it writes is named after the arms, beside the full table.

The last line printed is `overhead_ratio=<x> memory_ratio=<y>` (the defaults arm). Results go into this size and
device's section of `--out` (RESULTS.md by default) and, with `--json`, into a JSON file.
"""

import argparse
import contextlib
import ctypes
import gc
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import GPT2Config, GPT2LMHeadModel, default_data_collator

from hf_matta import MatGPT2Config, MatGPT2LMHeadModel
from hf_matta.losses import compiled_loss_pays, count_valid_tokens
from hf_matta.optim import build_optimizer
from hf_matta.pipeline.report import provenance, write_section
from hf_matta.teacher_cache import build_teacher_cache
from hf_matta.trainer import MatTATrainer
from hf_matta.training_args import MatTATrainingArguments
from hf_matta.widths import count_flops_per_token, count_parameters


# Shapes. tiny is recipes/configs/tiny_cpu.yaml's scale: 4 x 128 student (FFN 256) in a TA with FFN 1024, a 4 x 192
# teacher, a 4096-token vocabulary, 16 x 128 tokens. gpt2-small is GPT-2 small (124 M) in a TA with twice its FFN
# (6144), taught by a GPT-2-medium-shaped teacher (24 x 1024, 355 M); gpt2-medium is GPT-2 medium (355 M) in a TA with
# twice its FFN, taught by a GPT-2-XL-shaped teacher (48 x 1600, 1.56 B), the paper's recipe; full 50257 vocabulary,
# 1024-token sequences.
SIZES = {
    "tiny": dict(
        n_layer=4, n_embd=128, n_head=4, vocab_size=4096, seq=128, student_ffn=256, ta_ffn=1024,
        teacher=dict(n_layer=4, n_embd=192, n_head=4), batch={"cpu": 16, "cuda": 16}, repeats={"cpu": 15, "cuda": 20},
    ),
    "gpt2-small": dict(
        n_layer=12, n_embd=768, n_head=12, vocab_size=50257, seq=1024, student_ffn=3072, ta_ffn=6144,
        teacher=dict(n_layer=24, n_embd=1024, n_head=16), batch={"cpu": 1, "cuda": 8}, repeats={"cpu": 3, "cuda": 10},
    ),
    "gpt2-medium": dict(
        n_layer=24, n_embd=1024, n_head=16, vocab_size=50257, seq=1024, student_ffn=4096, ta_ffn=8192,
        teacher=dict(n_layer=48, n_embd=1600, n_head=25), batch={"cpu": 1, "cuda": 8}, repeats={"cpu": 2, "cuda": 8},
    ),
}  # fmt: skip
DEFAULT_SIZES = {"cpu": ["tiny"], "cuda": ["gpt2-small", "gpt2-medium"]}
NESTED_ARMS = ("e0", "e1", "e2", "e3", "f")  # the arms sharing the nested model and its optimizer
ARMS = ("a", "b", "c", "d", *NESTED_ARMS)
REQUIRED_ARMS = ("a", "b", "c")  # the passes every ratio is measured against
# Nominal dense bf16 tensor-core peaks (FLOP/s) from the vendors' data sheets, by device-name substring, most specific
# first; a device not listed is measured against its timed matmul peak only.
BF16_PEAKS = [("H100 PCIe", 756e12), ("H100", 989e12), ("H200", 989e12), ("A100", 312e12), ("L40S", 362e12),
              ("L40", 181e12), ("L4", 121e12), ("B200", 2250e12)]  # fmt: skip
TOP_K = 64  # the cached teacher's tokens per position in arm (f)
_NO_DROPOUT = dict(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
_M_MMAP_THRESHOLD = -3  # glibc mallopt parameter number


@dataclass
class Arm:
    """One measured step: `step(batch)` runs it; `flops` are model FLOPs per step; `group` names the models it holds
    (arms of one group share them); `teacher` says whether its step runs the teacher."""

    key: str
    name: str
    step: Callable[[dict], None]
    flops: float
    group: str
    teacher: bool
    batches: list[dict] | None = None  # its own batches (the cached-teacher arm's carry the cached targets)
    seconds: list[float] = field(default_factory=list)
    rise: int = 0  # the largest memory rise during one timed step

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)


class _Memory:
    """Memory in use now and the high-water mark of a step, on the CPU (resident set) or on CUDA (allocated)."""

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
    def _status(name: str) -> int:
        with open("/proc/self/status") as f:
            line = next(line for line in f if line.startswith(name + ":"))
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
    config = GPT2Config(**{key: getattr(config, key) for key in keys}, n_inner=config.n_inner[0])
    with device:  # initialised where it runs (a 1.5 B teacher takes a minute to initialise on the CPU)
        return GPT2LMHeadModel(config)


def training_args(device: torch.device, out_dir: str, **options) -> MatTATrainingArguments:
    """The trainer's arguments for every trainer arm: hf_matta's AdamW, untuned MatTA weights (gamma 0.5, all terms
    on), and the arm's cost `options`."""
    return MatTATrainingArguments(
        output_dir=out_dir, use_cpu=device.type == "cpu", report_to="none", optimizer="adamw", learning_rate=1e-4,
        weight_decay=0.1, teacher_weight=0.5, distill_weight=1.0, save_strategy="no", logging_strategy="no",
        **options,
    )  # fmt: skip


class Bench:
    """The models, batches and arms of one size on one device."""

    def __init__(self, size_name: str, device: torch.device, dtype: torch.dtype, batch_size: int, repeats: int,
                 warmup: int, work: Path, arms: set[str]):  # fmt: skip
        self.size_name, self.device, self.dtype, self.work, self.selected = size_name, device, dtype, work, arms
        size = SIZES[size_name]
        self.size, self.seq, self.batch_size = size, size["seq"], batch_size
        self.repeats, self.warmup = repeats, warmup
        self.configs = shapes(size)
        self.memory = _Memory(device)
        generator = torch.Generator().manual_seed(0)
        self.rows = []  # one dict per sequence: what a dataset holds
        for _ in range((warmup + repeats) * batch_size):
            ids = torch.randint(0, size["vocab_size"], (self.seq,), generator=generator)
            self.rows.append({"input_ids": ids, "labels": ids})
        self.batches = [self._to_device(default_data_collator(self.rows[i : i + batch_size]))
                        for i in range(0, len(self.rows), batch_size)]  # fmt: skip
        self.tokens = batch_size * self.seq
        self.groups: dict[str, dict] = {}  # group -> {"held": bytes its models hold between steps}
        self.teacher = None
        self.teacher_bytes = 0

    def _to_device(self, batch: dict) -> dict:
        return {key: value.to(self.device) for key, value in batch.items()}

    def autocast(self):
        if self.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def _flops(self, config: MatGPT2Config, trained_widths: list[int], teacher: bool) -> float:
        flops = sum(3 * count_flops_per_token(config, width, self.seq) for width in trained_widths)
        if teacher:
            flops += count_flops_per_token(self.configs["teacher"], None, self.seq)
        return flops * self.tokens

    def build(self) -> dict[str, Arm]:
        """Every arm, group by group; each group's models are built, warmed up and their held memory measured."""
        configs, device = self.configs, self.device
        self.teacher = _gpt2(configs["teacher"], device).eval().requires_grad_(False)
        self.teacher_bytes = sum(p.numel() * p.element_size() for p in self.teacher.parameters())
        self.cache_build_seconds = self._build_cache() if "f" in self.selected else None
        student_width, ta_width = configs["nested"].student_width, configs["ta"].n_inner[0]
        arms = [
            *self._group("a", ("a",), lambda: [self._plain_arm("a", "(a) CE step, TA size", configs["ta"])]),
            *self._group("b", ("b",), lambda: [self._plain_arm("b", "(b) CE step, student size", configs["student"])]),
            *self._group("teacher", ("c",), lambda: [Arm("c", "(c) teacher forward", self._teacher_step,
                                                 self._flops(configs["teacher"], [], True), "teacher", True)]),
            *self._group("d", ("d",), lambda: [self._trainer_arm("d", "(d) KD step (student + teacher)",
                                                                 configs["student"], [student_width])]),
            *self._group("nested", NESTED_ARMS, lambda: self._nested_arms([student_width, ta_width])),
        ]  # fmt: skip
        return {arm.key: arm for arm in arms}

    def _group(self, group: str, keys: tuple[str, ...], make: Callable[[], list[Arm]]) -> list[Arm]:
        """Build a group's arms (their step closures hold the models), warm them up, and record what the group's
        models hold once warm; nothing when none of its arms (`keys`) is selected. `make` builds the selected ones."""
        if not self.selected.intersection(keys):
            return []
        before = self.memory.current()
        arms = make()
        for arm in arms:
            for batch in (arm.batches or self.batches)[: self.warmup]:
                with self.autocast():
                    arm.step(batch)
            print(f"{arm.name}: warmed up", file=sys.stderr, flush=True)
        self.groups[group] = {"held": self.memory.current() - before}
        return arms

    def _teacher_step(self, batch: dict) -> None:
        """(c): the teacher's forward alone, as `MatTATrainer._teacher_logits` runs it."""
        with torch.no_grad():
            self.teacher(input_ids=batch["input_ids"], use_cache=False).logits

    def _plain_arm(self, key: str, name: str, config: MatGPT2Config) -> Arm:
        """(a) / (b): stock GPT-2, its own cross-entropy loss, backward, AdamW step."""
        model = _gpt2(config, self.device).train()
        optimizer = build_optimizer(model, training_args(self.device, str(self.work)))

        def step(batch: dict) -> None:
            model(input_ids=batch["input_ids"], labels=batch["labels"], use_cache=False).loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        return Arm(key, name, step, self._flops(config, [None], False), key, False)

    def _trainer_step(self, trainer: MatTATrainer, optimizer) -> Callable[[dict], None]:
        """`MatTATrainer.training_step` (its forwards, loss and backward), then the optimizer step."""

        def step(batch: dict) -> None:
            trainer.training_step(trainer.model, batch, num_items_in_batch=count_valid_tokens(batch["labels"]))
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        return step

    def _trainer_arm(self, key: str, name: str, config: MatGPT2Config, widths: list[int]) -> Arm:
        """(d): the trainer's step, with the teacher, on a model of its own."""
        with self.device:
            model = MatGPT2LMHeadModel(config)
        args = training_args(self.device, str(self.work))
        trainer = MatTATrainer(model=model, args=args, teacher_model=self.teacher)
        optimizer = trainer.create_optimizer()
        return Arm(key, name, self._trainer_step(trainer, optimizer), self._flops(config, widths, True), key, True)

    def _nested_arms(self, widths: list[int]) -> list[Arm]:
        """(e0)-(e3) and (f): trainers with different options on one nested model and one optimizer."""
        config = self.configs["nested"]
        with self.device:
            model = MatGPT2LMHeadModel(config)
        optimizer = build_optimizer(model, training_args(self.device, str(self.work)))
        variants = [  # (key, name, options)
            ("e0", "(e0) MatTA step, one backward, eager loss", dict(ta_backward_first=False, compile_loss="off")),
            ("e1", "(e1) MatTA step, TA backward first, eager loss", dict(ta_backward_first=True, compile_loss="off")),
            ("e2", "(e2) MatTA step, one backward, compiled loss", dict(ta_backward_first=False, compile_loss="on")),
            ("e3", "(e3) MatTA step, TA backward first, compiled loss", dict(ta_backward_first=True,
                                                                               compile_loss="on")),
        ]  # fmt: skip
        arms = []
        for key, name, options in variants:
            if key not in self.selected:
                continue
            trainer = MatTATrainer(model=model, args=training_args(self.device, str(self.work), **options),
                                   teacher_model=self.teacher, optimizers=(optimizer, None))  # fmt: skip
            arms.append(Arm(key, name, self._trainer_step(trainer, optimizer), self._flops(config, widths, True),
                            "nested", True))  # fmt: skip
        if "f" not in self.selected:
            return arms
        options = dict(teacher_cache_dir=str(self.work / "teacher_cache"))  # and the defaults
        trainer = MatTATrainer(model=model, args=training_args(self.device, str(self.work), **options),
                               train_dataset=self.rows, optimizers=(optimizer, None))  # fmt: skip
        rows = [trainer.train_dataset[i] for i in range(len(self.rows))]  # each row with its cached targets
        batches = [self._to_device(trainer.data_collator(rows[i : i + self.batch_size]))
                   for i in range(0, len(rows), self.batch_size)]  # fmt: skip
        arms.append(Arm("f", f"(f) MatTA step, cached top-{TOP_K} teacher (no teacher forward)",
                        self._trainer_step(trainer, optimizer), self._flops(config, widths, False), "nested", False,
                        batches))  # fmt: skip
        return arms

    def _build_cache(self) -> float:
        """Build the teacher cache of arm (f) on this run's rows; the seconds it took (a one-time cost)."""
        start = _now(self.device)
        with self.autocast():
            build_teacher_cache(self.teacher, self.rows, self.work / "teacher_cache", top_k=TOP_K,
                                batch_size=self.batch_size)  # fmt: skip
        return _now(self.device) - start

    def run(self, arms: dict[str, Arm]) -> list[dict[str, float]]:
        """The timed rounds: one step of every arm per round, the order rotated each round; returns each round's
        step times by arm."""
        order = list(arms)
        rounds = []
        for r in range(self.repeats):
            times = {}
            rotation = order[r % len(order) :] + order[: r % len(order)]
            for key in rotation:
                arm = arms[key]
                batch = (arm.batches or self.batches)[self.warmup + r]
                before = self.memory.current()
                self.memory.reset_peak()
                start = _now(self.device)
                with self.autocast():
                    arm.step(batch)
                times[key] = _now(self.device) - start
                arm.seconds.append(times[key])
                arm.rise = max(arm.rise, self.memory.peak() - before)
            rounds.append(times)
            print(f"round {r + 1}/{self.repeats}: " + ", ".join(f"{key} {t:.3f}" for key, t in times.items()),
                  file=sys.stderr, flush=True)  # fmt: skip
        return rounds

    def peak(self, arm: Arm) -> int:
        """The arm's peak memory: its models' held memory, its largest step rise, and the teacher's weights if used."""
        return self.groups[arm.group]["held"] + arm.rise + (self.teacher_bytes if arm.teacher else 0)


def matmul_peak(device: torch.device, dtype: torch.dtype, seconds: float = 1.0) -> float:
    """FLOP/s of a square matmul in `dtype`: the best of repeated timings."""
    n = 4096 if device.type == "cuda" else 2048
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    best, deadline = float("inf"), time.perf_counter() + seconds
    torch.mm(a, b)
    while time.perf_counter() < deadline:
        start = _now(device)
        torch.mm(a, b)
        best = min(best, _now(device) - start)
    return 2 * n**3 / best


def nominal_peak(device: torch.device) -> tuple[float | None, str]:
    """The device's nominal dense bf16 peak and its name (None off the table, and on CPUs)."""
    if device.type != "cuda":
        return None, "cpu"
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in BF16_PEAKS if key in name), None), name


def _now(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter()


def _ratio_summary(values: list[float]) -> str:
    return f"{statistics.median(values):.3f} [{min(values):.3f}-{max(values):.3f}]"


def default_arm(device: torch.device, vocab_size: int) -> str:
    """The MatTA arm that runs the trainer's defaults: (e3) where the compiled loss is on by default, else (e1)."""
    return "e3" if compiled_loss_pays(device.type, vocab_size) else "e1"


def measure(size_name: str, device: torch.device, dtype_name: str, batch_size: int | None, repeats: int | None,
            warmup: int, selected: list[str]) -> dict:  # fmt: skip
    """Build, warm up and time the `selected` arms of one size (with (a)-(c) and the defaults arm); returns the report
    lines and the figures."""
    started = time.perf_counter()
    load_start = os.getloadavg()[0]
    size = SIZES[size_name]
    dtype = torch.bfloat16 if dtype_name == "bf16" else torch.float32
    batch_size = batch_size or size["batch"][device.type]
    repeats = repeats or size["repeats"][device.type]
    torch.manual_seed(0)
    peak_measured = matmul_peak(device, dtype)
    peak_nominal, device_name = nominal_peak(device)
    peak_flops = peak_nominal or peak_measured
    default_key = default_arm(device, size["vocab_size"])
    chosen = {*REQUIRED_ARMS, default_key, *selected}
    with tempfile.TemporaryDirectory(prefix="step_cost_") as work:
        bench = Bench(size_name, device, dtype, batch_size, repeats, warmup, Path(work), chosen)
        arms = bench.build()
        rounds = bench.run(arms)
    passes = [times["a"] + times["b"] + times["c"] for times in rounds]
    matta_keys = [key for key in ("e0", "e1", "e2", "e3") if key in arms]
    ratios = {key: [times[key] / total for times, total in zip(rounds, passes)] for key in matta_keys}
    configs = bench.configs
    nested, teacher_config = configs["nested"], configs["teacher"]
    memory = {key: (bench.peak(arms[key]) - bench.teacher_bytes) / bench.peak(arms["a"]) for key in matta_keys}
    extra_ratios, extra_memory, cache_line = "", "", []
    if "f" in arms:
        ratios["f"] = [times["f"] / (times["a"] + times["b"]) for times in rounds]
        memory["f"] = bench.peak(arms["f"]) / bench.peak(arms["a"])
        extra_ratios += f" Cached teacher: (f) / ((a) + (b)) = {_ratio_summary(ratios['f'])};"
        extra_memory = f" Cached teacher (no teacher weights): (f) / (a) = {memory['f']:.3f}."
        cache_line = [
            f"- Teacher cache: building it (the teacher's forward and top-{TOP_K} over the {len(bench.rows)} "
            f"sequences of this run, written to disk) took {bench.cache_build_seconds:.2f} s, "
            f"{bench.cache_build_seconds / (warmup + repeats):.4f} s per batch, once; a step reading it saves "
            f"{arms[default_key].median - arms['f'].median:.4f} s against ({default_key}) "
            f"({1 - arms['f'].median / arms[default_key].median:.1%}) on every epoch, and "
            f"{(bench.peak(arms[default_key]) - bench.peak(arms['f'])) / 2**20:,.0f} MiB of peak memory."
        ]
    kd_ratios = [times["d"] / (times["b"] + times["c"]) for times in rounds] if "d" in arms else []
    if kd_ratios:
        extra_ratios += f" KD: (d) / ((b) + (c)) = {_ratio_summary(kd_ratios)};"
    medians_ratio = arms[default_key].median / (arms["a"].median + arms["b"].median + arms["c"].median)
    overhead = statistics.median(ratios[default_key])
    peak_text = (f"{device_name}'s nominal bf16 peak {peak_nominal / 1e12:.0f} TFLOP/s (a timed matmul reached "
                 f"{peak_measured / 1e12:.0f})" if peak_nominal else
                 f"a timed {dtype_name} matmul, {peak_measured / 1e9:.1f} GFLOP/s")  # fmt: skip
    section = f"step_cost --size {size_name} --device {device.type}"  # with the arms timed, when not all
    section += f" --arms {' '.join(sorted(arms))}" if len(arms) < len(ARMS) else ""
    lines = [
        f"## Step cost: `{section.replace('step_cost', 'step_cost.py', 1)}`",
        "",
        *provenance("benchmarks/step_cost.py", time.perf_counter() - started, f"{torch.get_num_threads()} threads"),
        f"- Load average at the start {load_start:.1f} (1 min; other jobs share the machine's cores).",
        f"- {device}, {dtype_name}; student {count_parameters(nested, nested.student_width) / 1e6:.1f} M parameters "
        f"(FFN {nested.student_width}), TA {count_parameters(nested) / 1e6:.1f} M (FFN {nested.mat_widths[-1]}), "
        f"teacher {count_parameters(teacher_config) / 1e6:.1f} M ({teacher_config.n_layer} x {teacher_config.n_embd}),"
        f" vocabulary {size['vocab_size']}, batch {batch_size} x {size['seq']} tokens; {warmup} warm-up steps per arm,"
        " "
        f"then {repeats} rounds of one step per arm, interleaved; MFU against {peak_text}.",
        "",
        "| step | median s | min s | max s | tokens/s | peak memory MiB | model GFLOP | MFU |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for arm in arms.values():
        lines.append(
            f"| {arm.name} | {arm.median:.4f} | {min(arm.seconds):.4f} | {max(arm.seconds):.4f} | "
            f"{bench.tokens / arm.median:,.0f} | {bench.peak(arm) / 2**20:,.0f} | {arm.flops / 1e9:.1f} | "
            f"{arm.flops / arm.median / peak_flops:.1%} |"
        )
    lines += [
        "",
        f"- Time, per round (median [min-max] over {repeats} rounds), MatTA step / ((a) + (b) + (c)), goal <= 1.05: "
        + "; ".join(f"({key}) {_ratio_summary(ratios[key])}" for key in matta_keys)
        + f". The trainer's defaults here are ({default_key}): **{overhead:.3f}** (the ratio of the arms' medians: "
        f"{medians_ratio:.3f}).{extra_ratios.rstrip(';')}{'.' if extra_ratios else ''}",
        "- Memory, (MatTA step - teacher weights " f"{bench.teacher_bytes / 2**20:,.0f} MiB) / (a), goal <= 1.3: "
        + "; ".join(f"({key}) {memory[key]:.3f}" for key in matta_keys)
        + f"; the defaults ({default_key}): **{memory[default_key]:.3f}**.{extra_memory}",
        *cache_line,
    ]
    figures = {
        "size": size_name, "device": str(device), "dtype": dtype_name, "batch": batch_size, "repeats": repeats,
        "section": section, "arms_timed": sorted(arms), "default_arm": default_key, "overhead_ratio": overhead,
        "overhead_ratio_of_medians": medians_ratio, "memory_ratio": memory[default_key],
        "ratios": ratios, "kd_ratios": kd_ratios, "memory_ratios": memory, "rounds": rounds,
        "arms": {key: {"name": arm.name, "seconds": arm.seconds, "peak_bytes": bench.peak(arm), "flops": arm.flops}
                 for key, arm in arms.items()},
        "cache_build_seconds": bench.cache_build_seconds, "peak_flops": peak_flops, "load_start": load_start,
        "load_end": os.getloadavg()[0],
    }  # fmt: skip
    return {"lines": lines, "figures": figures}


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", nargs="+", choices=sorted(SIZES),
                        help="shapes (default: tiny on cpu; gpt2-small and gpt2-medium on cuda)")  # fmt: skip
    parser.add_argument("--device", default="cpu", help="cpu or cuda (cuda:N)")
    parser.add_argument("--dtype", choices=["fp32", "bf16"], help="default: bf16 autocast on cuda, fp32 on cpu")
    parser.add_argument("--batch", type=int, help="sequences per step (default: the size's, per device type)")
    parser.add_argument("--warmup", type=int, default=2, help="warm-up steps per arm (compilation happens there)")
    parser.add_argument("--repeats", type=int, help="timed rounds (default: the size's, per device type)")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    parser.add_argument("--arms", nargs="+", choices=ARMS, default=list(ARMS),
                        help="arms to time (default: all; (a), (b), (c) and the defaults arm are always timed)")
    parser.add_argument("--out", default=str(Path(__file__).parent / "RESULTS.md"),
                        help="markdown file whose section for each size and device gets the table ('' for none)")
    parser.add_argument("--json", help="also write every figure to this JSON file")  # fmt: skip
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device {args.device}: CUDA is not available here; use --device cpu.")
    if device.type not in DEFAULT_SIZES:
        raise SystemExit(f"--device {args.device}: give cpu or cuda.")
    for name in ("batch", "repeats", "threads"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise SystemExit(f"--{name} {value} must be at least 1.")
    if args.warmup < 1:
        raise SystemExit(f"--warmup {args.warmup} must be at least 1 (the first step builds optimizer state).")
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype_name = args.dtype or ("bf16" if device.type == "cuda" else "fp32")
    results = []
    for size_name in args.size or DEFAULT_SIZES[device.type]:
        result = measure(size_name, device, dtype_name, args.batch, args.repeats, args.warmup, args.arms)
        print("\n".join(result["lines"]), flush=True)
        if args.out:
            write_section(Path(args.out), result["figures"]["section"], "\n".join(result["lines"]))
        results.append(result["figures"])
        if args.json:
            Path(args.json).write_text(json.dumps(results, indent=1) + "\n")
    last = results[-1]
    print(f"overhead_ratio={last['overhead_ratio']:.3f} memory_ratio={last['memory_ratio']:.3f}", flush=True)
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
