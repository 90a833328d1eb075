"""Mix'n'Match on a trained nested model: the greedy search curve, uniform and block plans, and where a block helps.

    python benchmarks/mix_n_match.py outputs/demo --data pydoc_data.topics \
        --validation-split-percentage 10 --seed 0 --out benchmarks/mix_n_match.md

(the held-out split flags are the tiny recipe's, so the measured documents are ones training never saw). Prints, and
writes as Markdown to --out: the search path with its cost in forward passes and seconds; the check that its TA end
reproduces the TA's own validation loss (nested forward and extracted student); the uniform and block plans; and,
for every block size, the loss of the wide block at the start, the centre (hf_matta's choice) and the end.
"""

import argparse
import datetime
import platform
import time
from pathlib import Path

import torch

from hf_matta import MatGPT2LMHeadModel
from hf_matta.data import load_heldout_blocks, load_tokenizer
from hf_matta.extract import extract_student, mix_n_match, search_plans, validation_loss
from hf_matta.pipeline.report import source_commit
from hf_matta.widths import count_parameters, format_plan, uniform_plans


def placements(levels: list[tuple[int, ...]], n_layer: int) -> dict[int, dict[str, tuple[int, ...]]]:
    """For each block size k of the first two levels: the wide block at the start, centre and end."""
    lo, hi = levels[0], levels[1]
    result = {}
    for k in range(1, n_layer):
        starts = {"start": 0, "centre": (n_layer - k + 1) // 2, "end": n_layer - k}
        result[k] = {name: lo[:s] + hi[s : s + k] + lo[s + k :] for name, s in starts.items()}
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model_dir", type=Path)
    parser.add_argument("--data", default="pydoc_data.topics")
    parser.add_argument("--validation-split-percentage", type=float, default=10.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--block-size", type=int, default=128)
    parser.add_argument("--max-blocks", type=int, default=32)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()

    model = MatGPT2LMHeadModel.from_pretrained(args.model_dir).float().eval()
    tokenizer = load_tokenizer(args.model_dir)
    input_ids = load_heldout_blocks(
        args.data, tokenizer, args.block_size, args.max_blocks, args.validation_split_percentage, args.seed
    )
    config = model.config
    passes = 0
    forward = model.forward

    def counting_forward(*inputs, **kwargs):
        nonlocal passes
        passes += 1
        return forward(*inputs, **kwargs)

    model.forward = counting_forward
    start = time.perf_counter()
    path = search_plans(model, input_ids, batch_size=len(input_ids))  # one call = one pass over the held-out blocks
    seconds = time.perf_counter() - start
    model.forward = forward

    with torch.no_grad():
        ta_loss = model(input_ids, labels=input_ids).loss.item()
        extracted_loss = extract_student(model, path[-1].widths)(input_ids, labels=input_ids).loss.item()
    params = [point.params for point in path]
    gap = max(abs(path[-1].val_loss - ta_loss), abs(extracted_loss - ta_loss))
    lines = [
        f"# Mix'n'Match on `{args.model_dir}`",
        "",
        f"{datetime.date.today()}, commit {source_commit() or 'unknown'}, "
        f"{platform.processor() or platform.machine()}, "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads. Held-out: {tuple(input_ids.shape)} tokens "
        f"of `{args.data}` (split {args.validation_split_percentage} %, seed {args.seed}). Model: {config.n_layer} "
        f"layers x {config.n_embd}, granularities {config.mat_widths}, student {config.student_width}.",
        "",
        f"## Greedy search: {len(path)} points, {passes} forward passes, {seconds:.1f} s",
        "",
        f"- parameters strictly increasing along the path: {params == sorted(set(params))}",
        f"- TA end: search loss {path[-1].val_loss:.6f}, TA forward {ta_loss:.6f}, extracted student "
        f"{extracted_loss:.6f} (max difference {gap:.1e})",
        "",
        "| plan | params | val loss | ppl |",
        "|---|---:|---:|---:|",
        *[_row(point.widths, point.params, point.val_loss) for point in path],
    ]
    for strategy in ("uniform", "block"):
        lines += ["", f"## {strategy} plans", "", "| plan | params | val loss | ppl |", "|---|---:|---:|---:|"]
        lines += [_row(p.widths, p.params, p.val_loss) for p in mix_n_match(model, strategy, input_ids=input_ids)]
    lines += [
        "",
        "## Where the wide block goes (first two granularities; equal parameters per row)",
        "",
        "| wide layers | params | start | centre (hf_matta) | end |",
        "|---:|---:|---:|---:|---:|",
    ]
    for k, plans in placements(uniform_plans(config), config.n_layer).items():
        losses = [validation_loss(model, input_ids, plan, len(input_ids)) for plan in plans.values()]
        best = min(losses)
        cells = [f"**{loss:.4f}**" if loss == best else f"{loss:.4f}" for loss in losses]
        lines.append(f"| {k} | {count_parameters(config, plans['centre']):,} | " + " | ".join(cells) + " |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out is not None:
        args.out.write_text(text)


def _row(widths, params: int, loss: float) -> str:
    return f"| {format_plan(widths)} | {params:,} | {loss:.4f} | {torch.tensor(loss).exp().item():.1f} |"


if __name__ == "__main__":
    main()
