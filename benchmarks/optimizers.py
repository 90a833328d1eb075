"""Optimizer benchmark: AdamW vs Shampoo vs SOAP on a tiny MatGPT2, trained at student and TA width, on real text.

    .venv/bin/python benchmarks/optimizers.py     # lr sweep (1 seed) then 3 seeds at the best lr: ~15 min, 2 cores
    .venv/bin/python benchmarks/optimizers.py --optimizers adamw shampoo --steps 100 --seeds 1   # a quick look

Corpus: `pydoc_data.topics` (ships with Python), split and packed by `hf_matta.data` (10 % of the documents held out,
seed 0), a ByteLevel BPE of 512 tokens trained on the training documents in seconds. Model: 2 layers x 64 wide, 4
heads, FFN widths [64, 256] (student 64, TA 256), sequences of 128 tokens. Each step minimises CE(student) + CE(TA)
on the same batch (the MatTA loss without teacher and distillation terms: the optimizers see the nested gradients of
the real method). Every run sees the same token budget and schedule (linear warm-up over 10 % of the steps, cosine
decay to 10 %, transformers' `get_cosine_with_min_lr_schedule_with_warmup`). The optimizer settings are
`MatTATrainingArguments`' defaults, except weight decay 0.1 and `adam_beta2=0.95` (nanoGPT's, for short runs) for
every optimizer; override any with --set name=value. Results and the tuning notes: benchmarks/optimizers.md.

For each optimizer: one seed per learning rate of its grid, then `--seeds` seeds at the best one (lowest student + TA
validation loss); prints a markdown table of validation loss at student and TA width (mean ± std over seeds), time per
step and the number of Shampoo preconditioner matrices computed by the end. Runs go to `--workers` processes of one
thread each; time per step is measured with them running side by side.
"""

import argparse
import dataclasses
import functools
import statistics
import time
import warnings
from concurrent.futures import ProcessPoolExecutor
from types import SimpleNamespace

import torch
from transformers import get_cosine_with_min_lr_schedule_with_warmup

from hf_matta import MatGPT2Config, MatGPT2LMHeadModel
from hf_matta.data import DataArguments, load_corpus, tokenize_and_pack, train_bpe_tokenizer
from hf_matta.extract import validation_loss
from hf_matta.optim import build_optimizer, preconditioned_blocks
from hf_matta.training_args import MatTATrainingArguments


LR_GRID = {
    "adamw": [1e-3, 2e-3, 4e-3],
    "shampoo": [2e-3, 4e-3, 8e-3],
    "soap": [4e-3, 8e-3, 1.6e-2],
}
OPTIMIZER_FIELDS = (
    "weight_decay", "adam_beta1", "adam_beta2", "adam_epsilon", "max_preconditioner_dim", "precondition_frequency",
    "start_preconditioning_step", "shampoo_epsilon", "grafting", "align_blocks_to_widths",
)  # fmt: skip
_DATA = None  # each worker's (train blocks, val blocks, vocab size, eos id), loaded once by `_init_worker`


def optimizer_settings(overrides: list[str]) -> dict:
    """`MatTATrainingArguments`' optimizer defaults, weight decay 0.1 and beta2 0.95, then the `NAME=VALUE`s."""
    defaults = {field.name: field.default for field in dataclasses.fields(MatTATrainingArguments)}
    settings = {name: defaults[name] for name in OPTIMIZER_FIELDS} | {"weight_decay": 0.1, "adam_beta2": 0.95}
    for item in overrides:
        name, value = item.split("=", 1)
        settings[name] = value == "True" if isinstance(settings[name], bool) else type(settings[name])(value)
    return settings


def load_data(seq_len: int, vocab_size: int) -> tuple[torch.Tensor, torch.Tensor, int, int]:
    """Train and validation token blocks `(N, seq_len)` of the pydoc corpus, split and packed by `hf_matta.data` (10 %
    of the documents held out, seed 0, a BPE trained on the training documents), the vocabulary size and the eos id."""
    data_args = DataArguments(builtin_corpus="pydoc_data.topics", block_size=seq_len, validation_split_percentage=10)
    raw = load_corpus(data_args, seed=0)
    tokenizer = train_bpe_tokenizer(raw["train"][data_args.text_column], vocab_size)
    blocks = tokenize_and_pack(raw, tokenizer, data_args)
    train, val = (torch.tensor(blocks[split]["input_ids"]) for split in ("train", "validation"))
    return train, val, len(tokenizer), tokenizer.eos_token_id


def _init_worker(seq_len: int, vocab_size: int) -> None:
    """One thread per worker: on 2 shared cores, two threads per process wait on each other (8x slower steps)."""
    global _DATA
    torch.set_num_threads(1)
    # heavyball warns at every lr change of the schedule; it supports them (multi_tensor=True, its default).
    warnings.filterwarnings("ignore", message="Learning rate changed between steps")
    _DATA = load_data(seq_len, vocab_size)


def train(name: str, lr: float, seed: int, settings: dict, opts: argparse.Namespace) -> dict:
    """One run; validation losses at student and TA width, seconds per step, Shampoo preconditioners computed."""
    train_blocks, val_blocks, vocab_size, eos_token_id = _DATA
    torch.manual_seed(seed)
    config = MatGPT2Config(
        n_layer=opts.layers, n_embd=opts.width, n_head=4, vocab_size=vocab_size, n_positions=opts.seq_len,
        mat_widths=[opts.width, 4 * opts.width], resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        bos_token_id=eos_token_id, eos_token_id=eos_token_id,
    )  # fmt: skip
    model = MatGPT2LMHeadModel(config)
    optimizer = build_optimizer(model, SimpleNamespace(optimizer=name, learning_rate=lr, **settings))
    # Linear warm-up over 10 % of the steps, then cosine decay to 10 % of the peak.
    schedule = get_cosine_with_min_lr_schedule_with_warmup(
        optimizer, num_warmup_steps=max(1, opts.steps // 10), num_training_steps=opts.steps, min_lr_rate=0.1
    )
    generator = torch.Generator().manual_seed(seed)
    start = time.perf_counter()
    for _ in range(opts.steps):
        batch = train_blocks[torch.randint(len(train_blocks), (opts.batch_size,), generator=generator)]  # (B, T)
        loss = model(batch, labels=batch, ffn_widths=config.student_width).loss + model(batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
    return {
        "student": validation_loss(model, val_blocks, config.student_width, opts.batch_size),
        "ta": validation_loss(model, val_blocks, None, opts.batch_size),
        "seconds_per_step": (time.perf_counter() - start) / opts.steps,
        "preconditioned": sum(1 for _ in preconditioned_blocks(optimizer)) if name == "shampoo" else "-",
    }


def mean_std(values: list[float]) -> str:
    """`mean ± std` (sample std; 0 for one value)."""
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.3f} ± {std:.3f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--optimizers", nargs="+", default=list(LR_GRID), choices=list(LR_GRID))
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--vocab-size", type=int, default=512)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--lrs", type=float, nargs="+", help="one lr grid for every optimizer (default: LR_GRID)")
    parser.add_argument("--set", nargs="*", default=[], metavar="NAME=VALUE", help="override an optimizer setting")
    opts = parser.parse_args()
    settings = optimizer_settings(opts.set)
    print(f"settings: {settings}")
    print(f"{opts.steps} steps x {opts.batch_size} x {opts.seq_len} = {opts.steps * opts.batch_size * opts.seq_len} "
          f"training tokens per run")  # fmt: skip
    run = functools.partial(train, settings=settings, opts=opts)
    with ProcessPoolExecutor(opts.workers, initializer=_init_worker, initargs=(opts.seq_len, opts.vocab_size)) as pool:
        grid = {name: opts.lrs or LR_GRID[name] for name in opts.optimizers}
        sweep = {(name, lr): pool.submit(run, name, lr, 0) for name, lrs in grid.items() for lr in lrs}
        for (name, lr), future in sweep.items():
            result = future.result()
            print(f"  {name} lr={lr:g} seed 0: student {result['student']:.4f} ta {result['ta']:.4f} "
                  f"({result['seconds_per_step'] * 1e3:.0f} ms/step)", flush=True)  # fmt: skip
        best = {
            name: min(lrs, key=lambda lr: sweep[name, lr].result()["student"] + sweep[name, lr].result()["ta"])
            for name, lrs in grid.items()
        }
        extra_seeds = range(1, opts.seeds)
        seeds = {(name, seed): pool.submit(run, name, best[name], seed) for name in grid for seed in extra_seeds}
        runs = {
            name: [sweep[name, best[name]].result()] + [seeds[name, seed].result() for seed in extra_seeds]
            for name in grid
        }
    print()
    print("| optimizer | best lr | val loss, student (w=64) | val loss, TA (w=256) | ms / step | preconditioners |")
    print("|---|---|---|---|---|---|")
    for name, results in runs.items():
        ms = statistics.mean(result["seconds_per_step"] for result in results) * 1e3
        print(f"| {name} | {best[name]:g} | {mean_std([r['student'] for r in results])} | "
              f"{mean_std([r['ta'] for r in results])} | {ms:.0f} | {results[0]['preconditioned']} |")  # fmt: skip


if __name__ == "__main__":
    main()
