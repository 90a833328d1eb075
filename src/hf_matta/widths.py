"""Width plans and their cost: parameter and FLOP counts of a MatGPT2 run at any per-layer FFN widths.

Pure arithmetic on the config. A plan is what `forward(ffn_widths=...)` takes: `None` (full width), an int (every
layer) or one width per layer; `MatGPT2Config.resolve_ffn_widths` turns it into one width per layer.
"""

from collections.abc import Sequence

from .models.matgpt2 import MatGPT2Config


Plan = int | Sequence[int] | None


def count_parameters(config: MatGPT2Config, plan: Plan = None) -> int:
    """Parameters of the standalone model that runs `plan`: exactly `sum(p.numel())` of the extracted student.

    The tied `lm_head` shares `wte`'s tensor and counts once, as `model.parameters()` yields it once.
    """
    d, vocab = config.n_embd, config.vocab_size
    embeddings = vocab * d + config.n_positions * d
    attention = (d * 3 * d + 3 * d) + (d * d + d)  # c_attn (d, 3d) + c_proj (d, d), with biases
    layer_norms = 2 * 2 * d  # ln_1, ln_2: weight and bias
    ffn = sum(d * w + w + w * d + d for w in config.resolve_ffn_widths(plan))  # c_fc (d, w) + c_proj (w, d)
    head = 0 if config.tie_word_embeddings else vocab * d
    return embeddings + config.n_layer * (attention + layer_norms) + ffn + 2 * d + head


def count_flops_per_token(config: MatGPT2Config, plan: Plan = None, seq_len: int | None = None) -> int:
    """Forward matmul FLOPs per token at sequence length `seq_len` (default `n_positions`).

    2 per weight of every matmul, the LM head included, plus the attention scores and their weighted sum,
    2 * 2 * seq_len * d per layer over the full (T, T) score matrix as eager attention computes it: exactly what
    `torch.utils.flop_counter.FlopCounterMode` counts for an eager forward. A training step costs about 3x this.
    """
    d = config.n_embd
    seq_len = config.n_positions if seq_len is None else seq_len
    matmul_weights = config.n_layer * (3 * d * d + d * d) + sum(2 * d * w for w in config.resolve_ffn_widths(plan))
    return 2 * matmul_weights + 2 * d * config.vocab_size + config.n_layer * 2 * 2 * seq_len * d


__all__ = ["Plan", "count_flops_per_token", "count_parameters"]
