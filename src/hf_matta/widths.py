"""Width plans and their cost: parameter and FLOP counts of a MatGPT2 run at any per-layer FFN widths.

Pure arithmetic on the config. A plan is what `forward(ffn_widths=...)` takes: `None` (full width), an int (every
layer) or one width per layer; `MatGPT2Config.resolve_ffn_widths` turns it into one width per layer.

A *servable* plan uses, in every layer, a width the model was trained at: one of the granularities `mat_widths` or the
layer's full `n_inner`. `check_plan` validates one; `uniform_plans` and `block_plans` list the servable plans of a
strategy in ascending size, and `plans_for_budgets` picks the largest that fits each parameter budget.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from decimal import Decimal, InvalidOperation
from typing import TYPE_CHECKING


if TYPE_CHECKING:  # annotations only: importing this module stays light (the command line parses plans with it)
    from .models.matgpt2 import MatGPT2Config


Plan = int | Sequence[int] | None
STRATEGIES = ("uniform", "block", "search")  # how budgets become plans (`hf_matta.extract.mix_n_match`)
_SUFFIXES = {"": 1, "K": 10**3, "M": 10**6, "B": 10**9, "G": 10**9}
MAX_PLAN_LAYERS = 4096  # far above any model's depth (GPT-2 XL has 48 layers): a longer plan is a typo
_MAX_DIGITS = 18  # longer numbers are typos, refused before int() reads them (Python refuses 4300+ digits)


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


def layer_granularities(config: MatGPT2Config) -> list[tuple[int, ...]]:
    """The widths each layer can be served at, ascending: the granularities `mat_widths` and the layer's `n_inner`."""
    return [tuple(sorted({*config.mat_widths, full})) for full in config.n_inner]


def check_plan(config: MatGPT2Config, plan: Plan) -> tuple[int, ...]:
    """One width per layer for a servable plan; `ValueError` naming the plan and the valid widths otherwise.

    Unlike `resolve_ffn_widths` (which runs any prefix width), every width must be a granularity of its layer.
    """
    if plan is None:
        return tuple(config.n_inner)
    widths = [plan] * config.n_layer if isinstance(plan, int) else list(plan)
    shown = widths if len(widths) <= 32 else _shorten(format_plan(widths))  # a long plan as runs (64x300)
    if len(widths) != config.n_layer:
        raise ValueError(
            f"plan {shown} has {len(widths)} widths but the model has n_layer={config.n_layer} layers; "
            "give one width per layer, or a single width for all layers."
        )
    for layer_idx, (width, allowed) in enumerate(zip(widths, layer_granularities(config))):
        if isinstance(width, bool) or width not in allowed:
            raise ValueError(
                f"plan {shown}: width {width!r} of layer {layer_idx} is not a granularity of that layer; "
                f"choose one of {list(allowed)}."
            )
    return tuple(widths)


def uniform_plans(config: MatGPT2Config) -> list[tuple[int, ...]]:
    """Every granularity applied to all layers, ascending; the last is the full model (the TA)."""
    plans = [(width,) * config.n_layer for width in config.mat_widths]
    return list(dict.fromkeys([*plans, tuple(config.n_inner)]))


def block_plans(config: MatGPT2Config) -> list[tuple[int, ...]]:
    """Mix'n'Match plans with one contiguous block of wider layers in the middle of the network, ascending in size.

    Between two consecutive uniform plans `lo` and `hi`, a block of `k` layers takes `hi`'s widths and the others keep
    `lo`'s, for k = 0 .. n_layer - 1. The block is centred (starting at layer ceil((n_layer - k) / 2)), the shape of
    Gemma 3n's block-level Mix'n'Match configs: its E2.49B slice of the 35-layer E4B widens layers 20-24 only, an
    interior block, not the first or last layers. A centred block grows outwards, so each plan contains the previous
    one and a larger budget only widens more layers. `search` measures where width helps instead of assuming it.
    """
    n_layer, levels = config.n_layer, uniform_plans(config)
    plans = []
    for lo, hi in zip(levels, levels[1:]):
        for k in range(n_layer):
            start = (n_layer - k + 1) // 2
            plans.append(lo[:start] + hi[start : start + k] + lo[start + k :])
    return [*plans, levels[-1]]


def check_budgets(config: MatGPT2Config, budgets: Sequence[int], smallest: Plan) -> None:
    """`ValueError` naming any budget outside [parameters of the `smallest` plan, parameters of the full model]."""
    low, high = count_parameters(config, smallest), count_parameters(config)
    for budget in budgets:
        if budget < low:
            raise ValueError(
                f"budget {budget:,} parameters is below the smallest student ({low:,} parameters, plan "
                f"{format_plan(config.resolve_ffn_widths(smallest))}); give budgets from {low:,} to {high:,} (the TA)."
            )
        if budget > high:
            raise ValueError(
                f"budget {budget:,} parameters is above the TA ({high:,} parameters, the full model); "
                f"give budgets from {low:,} to {high:,}."
            )


def plans_for_budgets(
    config: MatGPT2Config, plans: Sequence[Sequence[int]], budgets: Sequence[int]
) -> list[tuple[int, ...]]:
    """For each budget, the plan with the most parameters that fits it, from `plans` (checked against the budget
    range first: the smallest of `plans` is the lower bound, the full model the upper)."""
    counted = sorted((count_parameters(config, plan), tuple(plan)) for plan in plans)
    check_budgets(config, budgets, counted[0][1])
    return [max((item for item in counted if item[0] <= budget), key=lambda item: item[0])[1] for budget in budgets]


def format_plan(widths: Sequence[int]) -> str:
    """A plan as text that `parse_plan` reads back: `64` (uniform), `32,128,64`, runs as `64x3,128x2`."""
    if len(set(widths)) == 1:
        return str(widths[0])
    runs: list[list[int]] = []
    for width in widths:
        if runs and runs[-1][0] == width:
            runs[-1][1] += 1
        else:
            runs.append([width, 1])
    return ",".join(f"{width}x{count}" if count > 1 else str(width) for width, count in runs)


def parse_plan(text: str) -> int | list[int]:
    """Read `64` (an int, uniform), `32,128,64` or `64x3,128x2` (one width per layer) as written by `format_plan`.

    A plan naming more than `MAX_PLAN_LAYERS` layers is refused before its list is built, so that a typo such as
    `256x300000000` costs nothing.
    """
    if text.strip().isdigit() and len(text.strip()) <= _MAX_DIGITS:
        return int(text)
    runs = []
    for part in text.split(","):
        width, _, count = part.strip().partition("x")
        count = count or "1"
        if not (width.isdigit() and count.isdigit()) or max(len(width), len(count)) > _MAX_DIGITS:
            raise ValueError(
                f"plan {_shorten(text)!r}: {_shorten(part)!r} is not a width; write one int for all layers (64), one "
                "per layer (32,128,64) or runs (64x3,128x2)."
            )
        runs.append((int(width), int(count)))
    layers = sum(count for _, count in runs)
    if layers > MAX_PLAN_LAYERS:
        raise ValueError(
            f"plan {_shorten(text)!r} names {layers:,} layers, more than any model has (at most {MAX_PLAN_LAYERS:,} "
            "here); give one width per layer of the model, e.g. 64x24 for 24 layers."
        )
    return [width for width, count in runs for _ in range(count)]


def _shorten(text: str, limit: int = 80) -> str:
    """`text`, cut to `limit` characters for an error message."""
    return text if len(text) <= limit else f"{text[:limit]}..."


def parse_budget(text: str) -> int:
    """A parameter count written as `20000`, `1.5K`, `10M` or `1.3B` (decimal: K = 1e3, M = 1e6, B = G = 1e9)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d*)?)\s*([kKmMbBgG]?)\s*", text)
    try:
        count = Decimal(match[1]) * _SUFFIXES[match[2].upper()] if match else None
    except InvalidOperation:
        count = None
    if count is None or count != count.to_integral_value():
        raise ValueError(f"budget {text!r} is not a whole parameter count; write e.g. 20000, 1.5K, 10M or 1.3B.")
    return int(count)


def plan_name(widths: Sequence[int]) -> str:
    """A folder-safe name for a plan: `ffn64`, `ffn32-128-64`, `ffn64x3-128x2`."""
    return "ffn" + format_plan(widths).replace(",", "-")


__all__ = [
    "MAX_PLAN_LAYERS",
    "STRATEGIES",
    "Plan",
    "block_plans",
    "check_budgets",
    "check_plan",
    "count_flops_per_token",
    "count_parameters",
    "format_plan",
    "layer_granularities",
    "parse_budget",
    "parse_plan",
    "plan_name",
    "plans_for_budgets",
    "uniform_plans",
]
