"""What a cached top-k teacher costs and changes: MatTA trained from the teacher's cached top-k log-probabilities
(`hf_matta.teacher_cache`, `teacher_cache_dir`) against the same runs with the live teacher, on the same seeds.

    .venv/bin/python benchmarks/teacher_cache.py                   # about 10 min on 2 cores
    .venv/bin/python benchmarks/teacher_cache.py --seeds 1 --epochs 1 --out ''   # a quick look

Setting (the `tiny_cpu` recipe's scale): `pydoc_data.topics` with a ByteLevel BPE of `--vocab` tokens (2048), blocks
of 128 tokens, 10 % of the documents held out; a 4 x 128 GPT-2 teacher pre-trained on the training blocks
(`hf_matta.pipeline.pretrain_teacher`); a nested 2 x 128 model, student FFN 256 in a TA of FFN 512, trained by
`MatTATrainer` for `--epochs` epochs (the cache pays from the second: its one pass replaces one teacher forward per
epoch) with the recipe's schedule (TA first for 40 % of the steps, student and distillation ramped in over 30 %),
gamma 0.5, tau 1, AdamW.

Arms, each over `--seeds` seeds (paired: the same seed draws the same initial weights and batches in both):
  live:   the teacher runs in every step (its full distribution),
  cached: the teacher's top-`--top-k` log-probabilities are built once (`build_teacher_cache`, timed) and read by
          every step; the KL keeps the rest of the vocabulary as one bucket (`hf_matta.losses`).
Reported: the student's and the TA's perplexity on the held-out blocks (mean ± std, and the paired difference), the
training time of each arm, the cache's one-time build time and size, and how much of the teacher's probability its
top-k tokens hold on held-out text. The tables go into RESULTS.md (`--out`) between this script's markers.
"""

import argparse
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import default_data_collator

from hf_matta import MatGPT2Config
from hf_matta.data import BUILTIN_CORPORA, DataArguments, load_corpus, tokenize_and_pack, train_bpe_tokenizer
from hf_matta.extract import validation_loss
from hf_matta.losses import TopKLogProbs
from hf_matta.models import MatGPT2LMHeadModel
from hf_matta.pipeline import config_from_string, pretrain_teacher
from hf_matta.pipeline.report import provenance, write_section
from hf_matta.teacher_cache import build_teacher_cache
from hf_matta.trainer import MatTATrainer, load_teacher
from hf_matta.training_args import MatTATrainingArguments


NO_DROPOUT = "resid_pdrop=0.0,embd_pdrop=0.0,attn_pdrop=0.0"
TEACHER_SHAPE = f"n_layer=4,n_embd=128,n_head=4,n_positions=128,{NO_DROPOUT}"
STUDENT_SHAPE = f"n_layer=2,n_embd=128,n_head=4,n_positions=128,{NO_DROPOUT}"
WIDTHS = [256, 512]  # student FFN, TA FFN
BATCH = 8


def _args(out: Path, seed: int, max_steps: int, **extra) -> MatTATrainingArguments:
    """The MatTA run's arguments (tiny_cpu's schedule), for either arm."""
    return MatTATrainingArguments(
        output_dir=str(out), use_cpu=True, report_to="none", seed=seed, max_steps=max_steps,
        per_device_train_batch_size=BATCH, learning_rate=2e-3, lr_scheduler_type="cosine", warmup_steps=max_steps // 10,
        weight_decay=0.1, ta_first_steps=0.4, student_warmup_steps=0.3, distill_warmup_steps=0.3,
        teacher_weight=0.5, save_strategy="no", logging_strategy="no", disable_tqdm=True, dataloader_num_workers=0,
        **extra,
    )  # fmt: skip


def run_arm(arm: str, seed: int, work: Path, tokenizer, blocks, teacher_dir: Path, cache_dir: Path, steps: int,
            heldout: torch.Tensor) -> dict:  # fmt: skip
    """One MatTA run with the live teacher or the cache; its held-out perplexities and training time."""
    torch.manual_seed(seed)
    config = config_from_string(STUDENT_SHAPE, tokenizer, MatGPT2Config, mat_widths=WIDTHS, student_width=WIDTHS[0])
    model = MatGPT2LMHeadModel(config)
    if arm == "live":
        args = _args(work / f"{arm}-{seed}", seed, steps, teacher_model_name_or_path=str(teacher_dir))
    else:
        args = _args(work / f"{arm}-{seed}", seed, steps, teacher_cache_dir=str(cache_dir))
    trainer = MatTATrainer(model=model, args=args, train_dataset=blocks["train"], data_collator=default_data_collator,
                           processing_class=tokenizer)  # fmt: skip
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    ppl = {width: math.exp(validation_loss(model, heldout, plan=width)) for width in WIDTHS}
    print(f"{arm} seed {seed}: student ppl {ppl[WIDTHS[0]]:.2f}, TA {ppl[WIDTHS[1]]:.2f}, {seconds:.1f} s",
          file=sys.stderr, flush=True)  # fmt: skip
    return {"ppl": ppl, "seconds": seconds}


def top_k_mass(teacher, heldout: torch.Tensor, k: int) -> float:
    """The mean probability the teacher's top-k tokens hold per position of the held-out blocks."""
    with torch.no_grad():
        top = TopKLogProbs.from_logits(teacher(input_ids=heldout).logits, k)
    return top.log_probs.exp().sum(-1).mean().item()


def _mean_std(values: list[float]) -> str:
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}" if len(values) > 1 else f"{values[0]:.2f}"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--top-k", type=int, default=64)
    parser.add_argument("--vocab", type=int, default=2048)
    parser.add_argument("--teacher-steps", type=int, default=240)
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    parser.add_argument("--work", help="folder for the teacher, the cache and the runs (default: a temporary one)")
    parser.add_argument("--out", default=str(Path(__file__).parent / "RESULTS.md"),
                        help="markdown file whose teacher_cache section gets the tables ('' for none)")  # fmt: skip
    args = parser.parse_args(argv)
    for name in ("seeds", "epochs", "top_k", "teacher_steps"):
        if getattr(args, name) < 1:
            raise SystemExit(f"--{name.replace('_', '-')} {getattr(args, name)} must be at least 1.")
    if args.threads:
        torch.set_num_threads(args.threads)
    started, load_start = time.perf_counter(), os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="teacher_cache_") as tmp:
        work = Path(args.work or tmp)
        data_args = DataArguments(builtin_corpus="pydoc_data.topics", block_size=128, validation_split_percentage=10)
        tokenizer = train_bpe_tokenizer(BUILTIN_CORPORA["pydoc_data.topics"](), vocab_size=args.vocab)
        blocks = tokenize_and_pack(load_corpus(data_args), tokenizer, data_args)
        heldout = torch.tensor(blocks["validation"]["input_ids"])
        teacher_dir, cache_dir = work / "teacher", work / "cache"
        if not (teacher_dir / "config.json").is_file():
            pretrain_teacher(
                config_from_string(TEACHER_SHAPE, tokenizer), _args(work / "teacher-run", 0, args.teacher_steps),
                tokenizer, blocks["train"], teacher_dir, learning_rate=2e-3,
            )  # fmt: skip
        teacher = load_teacher(str(teacher_dir)).eval()
        teacher_ppl = math.exp(validation_loss(teacher, heldout))
        mass = top_k_mass(teacher, heldout, args.top_k)
        start = time.perf_counter()
        cache = build_teacher_cache(teacher, blocks["train"], cache_dir, top_k=args.top_k, batch_size=32)
        build_seconds = time.perf_counter() - start
        cache_bytes = sum(path.stat().st_size for path in cache_dir.glob("shard-*"))
        steps = args.epochs * math.ceil(len(blocks["train"]) / BATCH)
        results = {arm: [run_arm(arm, seed, work, tokenizer, blocks, teacher_dir, cache_dir, steps, heldout)
                         for seed in range(args.seeds)] for arm in ("live", "cached")}  # fmt: skip

    tokens = len(blocks["train"]) * 128
    lines = [
        "## Teacher cache: `teacher_cache.py`",
        "",
        *provenance("benchmarks/teacher_cache.py", time.perf_counter() - started, f"{torch.get_num_threads()} threads"),
        f"- Load average at the start {load_start:.1f} (1 min).",
        f"- `pydoc_data.topics`, BPE of {args.vocab} tokens, {len(blocks['train'])} training blocks of 128 "
        f"({tokens:,} tokens), {len(heldout)} held-out blocks; teacher {TEACHER_SHAPE.split(',resid')[0]} pre-trained "
        f"for {args.teacher_steps} steps: held-out ppl {teacher_ppl:.2f}; its top-{args.top_k} tokens hold "
        f"{mass:.1%} of its probability on held-out text. MatTA: {STUDENT_SHAPE.split(',resid')[0]}, FFN "
        f"{WIDTHS[0]} in a TA of {WIDTHS[1]}, {steps} steps of {BATCH} x 128 ({args.epochs} epochs), {args.seeds} "
        "seeds, paired.",
        f"- The cache: built once in {build_seconds:.1f} s ({len(cache)} rows, {cache_bytes / 2**20:.1f} MiB on disk, "
        f"{cache_bytes / tokens:.0f} bytes per token).",
        "",
        "| teacher | student ppl | TA ppl | training s (mean) | per seed (student) |",
        "|---|---|---|---|---|",
    ]
    for arm, label in (("live", "live (full distribution)"), ("cached", f"cached top-{args.top_k} + tail bucket")):
        runs = results[arm]
        lines.append(
            f"| {label} | {_mean_std([r['ppl'][WIDTHS[0]] for r in runs])} | "
            f"{_mean_std([r['ppl'][WIDTHS[1]] for r in runs])} | {statistics.mean(r['seconds'] for r in runs):.1f} | "
            + ", ".join(f"{r['ppl'][WIDTHS[0]]:.2f}" for r in runs) + " |"
        )
    differences = [c["ppl"][WIDTHS[0]] - live["ppl"][WIDTHS[0]] for c, live in zip(results["cached"], results["live"])]
    live_seconds = statistics.mean(r["seconds"] for r in results["live"])
    cached_seconds = statistics.mean(r["seconds"] for r in results["cached"])
    lines += [
        "",
        f"- Quality: cached - live student ppl, paired by seed: {', '.join(f'{d:+.2f}' for d in differences)} "
        f"(mean {statistics.mean(differences):+.2f}, "
        f"{statistics.mean(differences) / statistics.mean(r['ppl'][WIDTHS[0]] for r in results['live']):+.1%}).",
        f"- Cost: a run reading the cache trains in {cached_seconds:.1f} s against {live_seconds:.1f} s with the live "
        f"teacher ({1 - cached_seconds / live_seconds:.1%} less); with its one-time build, "
        f"{cached_seconds + build_seconds:.1f} s for the first run, and every later run or epoch on the same blocks "
        "reuses it.",
    ]
    print("\n".join(lines), flush=True)
    if args.out:
        write_section(Path(args.out), "teacher_cache", "\n".join(lines))
    return {"results": results, "build_seconds": build_seconds, "differences": differences}


if __name__ == "__main__":
    main(sys.argv[1:])
