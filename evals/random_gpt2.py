"""Save a randomly initialised GPT-2 of GPT-2 small's shape (124M parameters) with a tokenizer: a stand-in to time
`hf-matta eval` on a model of that size where the real weights cannot be downloaded. Its scores mean nothing.

    python evals/random_gpt2.py outputs/eval_demo/gpt2_random --tokenizer outputs/eval_demo/gpt2_tokenizer
    hf-matta eval outputs/eval_demo/gpt2_random --data-dir ../shared/data/benchmarks --limit 300

The tokenizer folder is any one `AutoTokenizer` reads whose ids fit GPT-2's 50257 (evals/README.md says how to get
GPT-2's own offline); the model keeps GPT-2 small's vocabulary size either way, so its cost is GPT-2 small's.
"""

import argparse
from pathlib import Path

import torch
from transformers import GPT2Config, GPT2LMHeadModel

from hf_matta.data import load_tokenizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path, help="Folder to write the model and tokenizer to (must not hold files).")
    parser.add_argument("--tokenizer", required=True, help="Tokenizer folder or Hub id.")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.out.exists() and any(args.out.iterdir()):
        parser.error(f"{args.out} is not empty; give a new folder.")
    tokenizer = load_tokenizer(args.tokenizer)
    if tokenizer is None:
        parser.error(f"--tokenizer {args.tokenizer!r} holds no tokenizer.")
    config = GPT2Config()  # GPT-2 small: 12 layers, 768 wide, 12 heads, FFN 3072, 1024 positions, 50257 tokens
    if len(tokenizer) > config.vocab_size:
        parser.error(f"--tokenizer has {len(tokenizer)} tokens, more than GPT-2's {config.vocab_size}.")
    torch.manual_seed(args.seed)
    model = GPT2LMHeadModel(config)
    model.save_pretrained(args.out)
    tokenizer.save_pretrained(args.out)
    print(f"{args.out}: random GPT-2 small, {model.num_parameters():,} parameters, tokenizer of {len(tokenizer)}")


if __name__ == "__main__":
    main()
