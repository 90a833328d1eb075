"""Peak memory of the MatTA loss (forward and backward), chunked over tokens vs computed in one piece.

    .venv/bin/python benchmarks/loss_memory.py --batch 2 --seq 1024 --vocab 50257 --chunks 0 256 1024 4096

The full objective of `hf_matta.losses.matta_loss` on three models' logits (student and TA trained, teacher frozen;
gamma = 0.5, tau_T = 2, tau_D = 1, so two temperatures are in play). Each setting runs in a fresh process, and its
peak is the process's resident-set high-water mark (CPU) or `torch.cuda.max_memory_allocated` (GPU), less the memory
held once the logits exist. That extra includes the gradients of the two trained logits tensors, which any method
must produce (2 x the size of one logits tensor). Chunk 0 is the plain autograd computation. Prints a Markdown table.
"""

import argparse
import json
import resource
import subprocess
import sys
import time

import torch

from hf_matta.losses import matta_loss


def _resident_bytes() -> int:
    """This process's current resident set size."""
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * resource.getpagesize()


def measure(batch: int, seq: int, vocab: int, chunk: int, device: str) -> dict:
    """Run the loss once, forward and backward, and return its peak memory above the logits' own, in bytes."""
    torch.manual_seed(0)
    student, ta = (torch.randn(batch, seq, vocab, device=device, requires_grad=True) for _ in range(2))
    teacher = torch.randn(batch, seq, vocab, device=device)
    labels = torch.randint(0, vocab, (batch, seq), device=device)
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = _resident_bytes()
    start = time.perf_counter()
    loss = matta_loss(
        student, labels, ta_logits=ta, teacher_logits=teacher, teacher_weight=0.5, teacher_temperature=2.0,
        distill_temperature=1.0, chunk_size=chunk or None,
    )
    loss.total.backward()
    if cuda:
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
    return {"extra": peak - base, "seconds": time.perf_counter() - start, "total": loss.total.item()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--vocab", type=int, default=50257)
    parser.add_argument("--chunks", type=int, nargs="+", default=[0, 256, 1024, 4096], help="0: no chunking")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)  # internal: measure this chunk size, print JSON
    args = parser.parse_args()
    if args.one is not None:
        print(json.dumps(measure(args.batch, args.seq, args.vocab, args.one, args.device)))
        return
    logits_gb = args.batch * args.seq * args.vocab * 4 / 1e9
    print(f"{args.batch} x {args.seq} tokens x {args.vocab} vocab, fp32, {args.device}: one logits tensor is "
          f"{logits_gb:.2f} GB; the two trained ones' gradients are {2 * logits_gb:.2f} GB.\n")
    print("| chunk (tokens) | peak above the logits (GB) | of which not gradients (GB) | time (s) | loss |")
    print("|---|---|---|---|---|")
    for chunk in args.chunks:
        command = [sys.executable, __file__, "--one", str(chunk), "--batch", str(args.batch), "--seq", str(args.seq),
                   "--vocab", str(args.vocab), "--device", args.device]
        result = json.loads(subprocess.run(command, capture_output=True, text=True, check=True).stdout)
        extra = result["extra"] / 1e9
        print(f"| {chunk or 'none (naive)'} | {extra:.2f} | {extra - 2 * logits_gb:.2f} | {result['seconds']:.1f} | "
              f"{result['total']:.6f} |")


if __name__ == "__main__":
    main()
