"""Extraction and Mix'n'Match: plans (per-layer FFN widths) of a trained nested model become standalone students.

- `extract_student(model, plan)` copies exactly the plan's slices into a model of its own: a uniform plan gives a
  stock `GPT2LMHeadModel` (loads anywhere, no custom code), a mixed plan a fixed-width `MatGPT2LMHeadModel` whose
  config lists one `n_inner` per layer (loads with `trust_remote_code=True` where hf_matta is not installed), or with
  `zero_pad=True` a stock `GPT2LMHeadModel` whose narrower FFNs are padded with zero neurons (for engines that run no
  custom code). A PEFT model is merged first (on a copy).
- `save_student` writes it with safetensors, its generation config and the tokenizer, ready to serve
  (`set_serving_defaults`, `finish_saved_folder`: the policy every saved model and tokenizer of hf_matta follows).
- `mix_n_match(model, strategy, budgets)` chooses plans from parameter budgets: `uniform`, `block` (pure arithmetic,
  see `hf_matta.widths`) or `search`, a greedy walk from the student to the TA measured on held-out tokens.
"""

import copy
import json
import shutil
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from peft import PeftModel
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedModel, PreTrainedTokenizerBase

from .data import save_tokenizer
from .files import atomic_folder, is_empty_folder
from .models.matgpt2 import MatGPT2Config, MatGPT2LMHeadModel, nested_ffn_parameters
from .widths import (
    STRATEGIES,
    Plan,
    block_plans,
    check_budgets,
    check_plan,
    count_parameters,
    layer_granularities,
    plans_for_budgets,
    uniform_plans,
)


LINEAGE_FILE = "matta_lineage.json"  # where a model or student folder keeps the record of its training run

# Config entries that describe the nested source model, not a student (the student's class sets its own type).
_SOURCE_ONLY_CONFIG_KEYS = (
    "model_type", "architectures", "auto_map", "transformers_version", "_name_or_path", "n_inner", "mat_widths",
    "student_width", "ffn_widths", "dtype",
)  # fmt: skip


@dataclass(frozen=True)
class PlanPoint:
    """A servable plan: one FFN width per layer, its parameter count, and its validation loss when measured."""

    widths: tuple[int, ...]
    params: int
    val_loss: float | None = None


def load_nested_model(model_dir: str | Path) -> MatGPT2LMHeadModel:
    """The trained nested model saved in `model_dir`, in eval mode. A weights file that is truncated or corrupted is
    named as such before anything loads, and weights that are NaN or infinite are refused (`check_finite`)."""
    model_dir = Path(model_dir)
    for weights in sorted(model_dir.glob("*.safetensors")):
        try:
            with safe_open(weights, "pt"):  # reads and validates the header against the file's size
                pass
        except SafetensorError as error:
            raise ValueError(
                f"{weights} is not a readable safetensors file ({error}): it is truncated or corrupted; copy or save "
                "the model again."
            ) from None
    model = MatGPT2LMHeadModel.from_pretrained(model_dir).eval()
    check_finite(model.state_dict().items(), str(model_dir))
    return model


def check_finite(tensors: Iterable[tuple[str, torch.Tensor]], source: str) -> None:
    """Raise `ValueError` naming the first floating-point tensor of `source` that holds NaN or infinite values."""
    for name, tensor in tensors:
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            count = int((~torch.isfinite(tensor)).sum())
            raise ValueError(
                f"{source}: {name} holds {count:,} NaN or infinite values (of {tensor.numel():,}): the weights are "
                "corrupted, or training diverged; students of it would be too. Use an earlier checkpoint."
            )


def extract_student(
    model: MatGPT2LMHeadModel | PeftModel, plan: Plan, zero_pad: bool = False
) -> GPT2LMHeadModel | MatGPT2LMHeadModel:
    """The standalone model that runs `plan`: its logits equal `model(input_ids, ffn_widths=plan).logits`.

    Every FFN keeps the plan's prefix of neurons along the dimensions that `nested_ffn_parameters` names; all other
    parameters are copied whole. The copies share no memory with `model`, and `lm_head` stays tied to `wte`,
    so `sum(p.numel())` equals `hf_matta.widths.count_parameters(model.config, plan)` (without `zero_pad`).

    Args:
        model: a trained nested model, or a PEFT model around one (LoRA or any adapter PEFT can merge): the adapter
            is merged into a copy first, so the student equals the adapted model at `plan`.
        plan: one width for all layers, or one per layer; each must be a granularity of its layer (`mat_widths`) or
            the layer's full `n_inner`.
        zero_pad: write a mixed plan as a stock `GPT2LMHeadModel` for engines that run no custom code: every FFN is
            as wide as the plan's widest layer, the neurons beyond a layer's width zero (they add exactly nothing,
            so the logits are equal), at the cost of the widest layer's FFN parameters and compute in every layer
            (`hf_matta.widths.count_flops_per_token(config, [max(plan)] * n_layer)` against the plan's).

    Returns:
        For a uniform plan (or `zero_pad`), a stock `GPT2LMHeadModel`. For a mixed plan, a `MatGPT2LMHeadModel`
        with one `n_inner` per layer and no granularities of its own (`mat_widths=[]`). In eval mode, on `model`'s
        device and dtype, with a copy of `model`'s generation config, ready to serve (`set_serving_defaults`).
    """
    if isinstance(model, PeftModel):
        model = copy.deepcopy(model).merge_and_unload()
    widths = check_plan(model.config, plan)
    padded = max(widths) if zero_pad else None
    shared = {key: value for key, value in model.config.to_dict().items() if key not in _SOURCE_ONLY_CONFIG_KEYS}
    if padded is not None or len(set(widths)) == 1:
        student_class, config = GPT2LMHeadModel, GPT2Config(**shared, n_inner=padded or widths[0])
    else:
        student_class, config = MatGPT2LMHeadModel, MatGPT2Config(**shared, n_inner=list(widths), mat_widths=[])
    state = {name: tensor.detach() for name, tensor in model.state_dict().items()}
    check_finite(state.items(), "the nested model")
    for layer_idx, width in enumerate(widths):
        for name, dim in nested_ffn_parameters(layer_idx).items():
            state[name] = state[name].narrow(dim, 0, width)
            if padded is not None and width < padded:  # zero neurons: c_fc columns and bias 0, c_proj rows 0
                shape = list(state[name].shape)
                shape[dim] = padded - width
                state[name] = torch.cat([state[name], state[name].new_zeros(shape)], dim=dim)
    # The tied head is re-tied to the new `wte` below; loading it too would give it a storage of its own.
    state = {
        name: tensor.clone(memory_format=torch.contiguous_format)
        for name, tensor in state.items()
        if not (config.tie_word_embeddings and name == "lm_head.weight")
    }
    with torch.device("meta"):  # no random init of weights that are overwritten at once
        student = student_class(config)
    missing, unexpected = student.load_state_dict(state, strict=False, assign=True)
    if unexpected or set(missing) - {"lm_head.weight"}:
        raise RuntimeError(f"extraction left parameters unmatched: missing {missing}, unexpected {unexpected}")
    student.tie_weights()
    student.generation_config = copy.deepcopy(model.generation_config)
    set_serving_defaults(student)
    return student.eval()


def set_serving_defaults(model: PreTrainedModel) -> None:
    """What a saved model's config tells its users, set before saving: the KV cache on (`Trainer` leaves
    `use_cache=False`, which every student would copy and which transformers' ExecuTorch export refuses), and a pad
    token: GPT-2 has none, so padding uses the eos token (GPT-2's convention, what `generate` falls back to with a
    warning), in the config and the generation config. The attention mask tells padding from a real eos."""
    model.config.use_cache = True
    eos = model.config.eos_token_id
    eos = eos[0] if isinstance(eos, list) else eos
    if model.config.pad_token_id is None:
        model.config.pad_token_id = eos
    if model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = eos


def finish_saved_folder(
    folder: str | Path, tokenizer: PreTrainedTokenizerBase | None = None, model_max_length: int | None = None
) -> None:
    """Complete a folder that `save_pretrained` (or `Trainer.save_model`) wrote: the weights readable like their
    siblings (safetensors writes them with mode 0600, the other files get the usual 0644), and `tokenizer` saved
    with the project's policy (`hf_matta.data.save_tokenizer`) and the model's context as `model_max_length`."""
    folder = Path(folder)
    for weights in folder.glob("*.safetensors"):
        shutil.copymode(folder / "config.json", weights)
    if tokenizer is not None:
        save_tokenizer(tokenizer, folder, model_max_length)


def save_student(
    student: PreTrainedModel,
    out_dir: str | Path,
    tokenizer: PreTrainedTokenizerBase | None = None,
    overwrite: bool = False,
    lineage: dict | None = None,
) -> Path:
    """Write `student` to `out_dir`: `model.safetensors`, `config.json`, `generation_config.json`, the tokenizer's
    files, and for a `MatGPT2LMHeadModel` the modeling files that `auto_map` names (remote code). `lineage`, the
    nested model's record of its training run (`hf_matta.hub.read_lineage`), travels with it as `matta_lineage.json`,
    so that a model card can be built from the student folder alone. The folder is ready to serve: KV cache on, a pad
    token, a tokenizer that loads without remote code and knows the model's context (`set_serving_defaults`,
    `finish_saved_folder`).

    Raises `FileExistsError` if `out_dir` holds files, unless `overwrite`, which replaces the folder (atomically).
    """
    out_dir = Path(out_dir)
    if not overwrite and not is_empty_folder(out_dir):
        raise FileExistsError(f"{out_dir} is not empty; pass overwrite=True (--overwrite) to replace it.")
    # Written under a temporary name and renamed when complete: an interruption leaves the old folder or none, and
    # stale files of another plan (modeling code, shards) never survive a replacement.
    with atomic_folder(out_dir, replace=True) as folder:
        set_serving_defaults(student)
        student.save_pretrained(folder)
        finish_saved_folder(folder, tokenizer, student.config.n_positions)
        if lineage is not None:
            (folder / LINEAGE_FILE).write_text(json.dumps(lineage, indent=2) + "\n")
    return out_dir


@torch.no_grad()
def validation_loss(
    model: PreTrainedModel, input_ids: torch.LongTensor, plan: Plan = None, batch_size: int = 8
) -> float:
    """Mean next-token cross-entropy of a causal LM over held-out blocks `input_ids` (N, T), in eval mode.

    Args:
        model: any causal LM that takes `labels` (a stock `GPT2LMHeadModel`, an extracted student, a teacher), or a
            nested `MatGPT2LMHeadModel`, which runs at `plan`.
        input_ids: held-out token blocks (N, T); every row has T - 1 predictions, so rows weigh equally.
        plan: FFN widths of a nested model (`None`: its full width); only a `MatGPT2LMHeadModel` takes one.
        batch_size: rows per forward pass.
    """
    if plan is not None and not isinstance(model, MatGPT2LMHeadModel):
        raise ValueError(f"plan={plan!r} needs a nested MatGPT2LMHeadModel; {type(model).__name__} has one width.")
    widths = {} if plan is None else {"ffn_widths": plan}
    was_training = model.training
    model.eval()
    try:
        total = 0.0
        for batch in input_ids.split(batch_size):  # (b, T)
            batch = batch.to(model.device)
            total += model(batch, labels=batch, **widths).loss.item() * len(batch)
    finally:
        model.train(was_training)
    return total / len(input_ids)


def search_plans(
    model: MatGPT2LMHeadModel, input_ids: torch.LongTensor, max_params: int | None = None, batch_size: int = 8
) -> list[PlanPoint]:
    """Greedy Mix'n'Match search: the path from the student (every layer at `student_width`) to the TA.

    Each step widens, by one granularity, the layer whose widening lowers the validation loss on `input_ids` the most
    per added parameter (or, where none lowers it, raises it the least); ties go to the earlier layer. Every point of
    the path is a servable plan with its measured loss, so the path is a loss-against-parameters curve whose first
    point is the student and last the TA (unless `max_params` stops it at the first point beyond that many).

    Cost: one forward pass over `input_ids` per layer that can still widen, per step (at most `n_layer`), plus one for
    the student. With L layers and G granularities the path has L * (G - 1) steps and costs at most
    1 + L * L * (G - 1) passes; with two granularities exactly 1 + L * (L + 1) / 2 (11 for the tiny default's 4
    layers, under a minute on 2 busy CPU cores for 32 blocks of 128 tokens). The candidates run through the nested
    model's own `forward(ffn_widths=plan)`; nothing is extracted.
    """
    config = model.config
    ladders = _search_ladders(config)
    widths = smallest_plan(config, "search")
    path = [PlanPoint(widths, count_parameters(config, widths), validation_loss(model, input_ids, widths, batch_size))]
    while max_params is None or path[-1].params <= max_params:
        current = path[-1]
        candidates = {}  # layer index -> the plan with that layer one granularity wider
        for layer_idx, (width, ladder) in enumerate(zip(current.widths, ladders)):
            if width != ladder[-1]:
                widened = list(current.widths)
                widened[layer_idx] = ladder[ladder.index(width) + 1]
                loss = validation_loss(model, input_ids, widened, batch_size)
                candidates[layer_idx] = PlanPoint(tuple(widened), count_parameters(config, widened), loss)
        if not candidates:  # every layer is at full width: the TA
            break

        def gain(layer_idx: int) -> tuple[float, int]:
            """Loss lowered per added parameter; on a tie the earlier layer."""
            point = candidates[layer_idx]
            return (current.val_loss - point.val_loss) / (point.params - current.params), -layer_idx

        path.append(candidates[max(candidates, key=gain)])
    return path


def _search_ladders(config: MatGPT2Config) -> list[tuple[int, ...]]:
    """Per layer, the widths `search` walks through: its granularities from the student's width up."""
    start = config.student_width if config.student_width is not None else min(config.n_inner)
    return [tuple(width for width in allowed if width >= start) for allowed in layer_granularities(config)]


def smallest_plan(config: MatGPT2Config, strategy: str) -> tuple[int, ...]:
    """The smallest plan a strategy offers: the lower end of its budget range (the upper end is the TA)."""
    if strategy == "search":
        return tuple(ladder[0] for ladder in _search_ladders(config))
    return uniform_plans(config)[0]


def mix_n_match(
    model: MatGPT2LMHeadModel | MatGPT2Config,
    strategy: str = "uniform",
    budgets: Sequence[int] | None = None,
    input_ids: torch.LongTensor | None = None,
    batch_size: int = 8,
) -> list[PlanPoint]:
    """Plans of a nested model for parameter budgets, with parameter counts and (given `input_ids`) validation loss.

    Args:
        model: the nested model; a config is enough for `uniform` and `block` without `input_ids`.
        strategy: `uniform` (every granularity in all layers), `block` (a centred block of layers one granularity
            wider, see `hf_matta.widths.block_plans`) or `search` (see `search_plans`; needs `input_ids`).
        budgets: parameter budgets; each gets the strategy's largest plan that fits. Without budgets, every plan of
            the strategy is returned, ascending in parameters (for `search`, its whole path).
        input_ids: held-out token blocks (N, T) to measure the validation loss on.

    Raises:
        ValueError: an unknown strategy, `search` without `input_ids`, or a budget below the strategy's smallest
            plan or above the TA (checked before any forward pass).
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy={strategy!r} is not one of {list(STRATEGIES)}.")
    if strategy == "search" and input_ids is None:
        raise ValueError("strategy='search' measures validation loss: give held-out input_ids (--data).")
    if isinstance(model, MatGPT2Config) and input_ids is not None:
        raise ValueError("measuring validation loss needs the model's weights, not only its config.")
    config = model if isinstance(model, MatGPT2Config) else model.config
    if strategy == "search":
        check_budgets(config, budgets or [], smallest_plan(config, strategy))  # before the first forward pass
        path = search_plans(model, input_ids, max(budgets) if budgets else None, batch_size)
        points = {point.widths: point for point in path}
        return [points[widths] for widths in plans_for_budgets(config, list(points), budgets)] if budgets else path
    family = uniform_plans(config) if strategy == "uniform" else block_plans(config)
    chosen = plans_for_budgets(config, family, budgets) if budgets else family
    return [
        PlanPoint(
            widths,
            count_parameters(config, widths),
            None if input_ids is None else validation_loss(model, input_ids, widths, batch_size),
        )
        for widths in chosen
    ]


__all__ = [
    "STRATEGIES",
    "PlanPoint",
    "check_finite",
    "extract_student",
    "finish_saved_folder",
    "load_nested_model",
    "mix_n_match",
    "save_student",
    "search_plans",
    "set_serving_defaults",
    "smallest_plan",
    "validation_loss",
]
