"""The optimizer factory: `build_optimizer(model, args)` for `adamw` | `shampoo` | `soap` | `distributed_shampoo`.

MatTA is trained with Shampoo in the paper. The backends, chosen by `args.optimizer`:
- `adamw`: `torch.optim.AdamW`, the baseline.
- `shampoo`: pytorch-optimizer's `ScalableShampoo` (a port of Anil et al.'s distributed Shampoo), configured through
  facebookresearch DistributedShampoo's names: `max_preconditioner_dim` (block size), `precondition_frequency`,
  `start_preconditioning_step`, `shampoo_epsilon`, `grafting` (`adam` | `sgd` | `none`).
- `soap`: heavyball's SOAP (Adam in the eigenbasis of Shampoo's preconditioner).
- `distributed_shampoo`: facebookresearch's DistributedShampoo, when its package is installed.

Every backend gets the same explicit parameter groups (nanoGPT's `configure_optimizers`): weight decay on matrices
(every parameter with `dim() >= 2`: attention, FFN, embeddings and the tied head, counted once), none on biases and
LayerNorm parameters.

Building a `shampoo` optimizer registers the Python objects that `ScalableShampoo` keeps in its state with
`torch.serialization.add_safe_globals`, so that Trainer's `torch.load(..., weights_only=True)` resumes it (Trainer
builds the optimizer before it loads the checkpoint's optimizer state).
"""

import functools
import math
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from .models.matgpt2 import NESTED_FFN_DIMS, nested_ffn_parameters
from .training_args import GRAFTINGS, OPTIMIZERS


_SHAMPOO_EXTRA = "pip install hf_matta[shampoo]"
_DISTRIBUTED_SHAMPOO_INSTALL = (
    "pip install git+https://github.com/facebookresearch/optimizers.git (it is not on PyPI and needs Python >= 3.12)"
)


def build_optimizer(model: nn.Module, args: Any) -> torch.optim.Optimizer:
    """The optimizer named by `args.optimizer` over `model`'s trainable parameters, in explicit parameter groups.

    Args:
        model: the model to train; only parameters with `requires_grad` are optimised, each exactly once.
        args: `MatTATrainingArguments` or anything with its fields: `optimizer`, `learning_rate`, `weight_decay`,
            `adam_beta1`, `adam_beta2`, `adam_epsilon`, and for the Shampoo backends `max_preconditioner_dim`,
            `precondition_frequency`, `start_preconditioning_step`, `shampoo_epsilon`, `grafting`, and
            `align_blocks_to_widths` (used by `shampoo` only).

    Raises:
        ValueError: an unknown optimizer or grafting name, or Shampoo settings that never precondition.
        ImportError: the backend's package is not installed; the message says what to install.
    """
    name = args.optimizer
    if name not in OPTIMIZERS:
        raise ValueError(
            f"optimizer={name!r} is not one of {list(OPTIMIZERS)}; leave it None to use Trainer's own `optim`."
        )
    if name in ("shampoo", "distributed_shampoo"):
        _check_shampoo_args(args)
    block_sizes = _aligned_block_sizes(model, args) if name == "shampoo" and args.align_blocks_to_widths else {}
    groups = parameter_groups(model, args.weight_decay, block_sizes)
    if name == "adamw":
        betas = (args.adam_beta1, args.adam_beta2)
        return torch.optim.AdamW(groups, lr=args.learning_rate, betas=betas, eps=args.adam_epsilon)
    if name == "shampoo":
        return _build_shampoo(groups, args)
    if name == "soap":
        return _build_soap(groups, args)
    return _build_distributed_shampoo(groups, args)


def parameter_groups(
    model: nn.Module, weight_decay: float, block_sizes: dict[nn.Parameter, int] | None = None
) -> list[dict[str, Any]]:
    """Trainable parameters split into optimizer groups: decay on matrices, none on biases and norm layers.

    A matrix is the `weight` of a module that is not a normalisation layer (Linear, Conv1D, Embedding). The rule
    reads names and module types, not `dim()`: FSDP v1 hands the optimizer flat 1-D views even with
    `use_orig_params`. `named_parameters()` yields a tied parameter once, so the tied `lm_head`/`wte` matrix is in one
    group once. `block_sizes` gives some matrices their own Shampoo block size (one extra group per size). No group
    is empty.
    """
    block_sizes = block_sizes or {}
    grouped: dict[tuple[bool, int | None], list[nn.Parameter]] = {}
    for name, param in model.named_parameters():
        if param.requires_grad:
            module_name, _, param_name = name.rpartition(".")
            owner = model.get_submodule(module_name)
            is_matrix = param_name == "weight" and "Norm" not in type(owner).__name__
            key = (is_matrix, block_sizes.get(param))
            grouped.setdefault(key, []).append(param)
    groups = []
    for (decay, block_size), params in sorted(grouped.items(), key=lambda item: (not item[0][0], item[0][1] or 0)):
        group = {"params": params, "weight_decay": weight_decay if decay else 0.0}
        if block_size is not None:
            group["block_size"] = block_size
        groups.append(group)
    return groups


def _check_shampoo_args(args: Any) -> None:
    """The grafting name (`args` need not be `MatTATrainingArguments`) and DistributedShampoo's rule tying the start
    step to the frequency, which the arguments' own range checks leave to the optimizer."""
    if args.grafting not in GRAFTINGS:
        raise ValueError(f"grafting={args.grafting!r} is not one of {list(GRAFTINGS)}.")
    if args.start_preconditioning_step < args.precondition_frequency:
        # The first preconditioner is computed at step `precondition_frequency`: before it, "Shampoo" steps would
        # use identity preconditioners (a normalised gradient), not the grafted method.
        raise ValueError(
            f"start_preconditioning_step={args.start_preconditioning_step} is below precondition_frequency="
            f"{args.precondition_frequency}, when the first preconditioner is computed; set it to at least "
            f"{args.precondition_frequency}."
        )


def _aligned_block_sizes(model: nn.Module, args: Any) -> dict[nn.Parameter, int]:
    """Per FFN matrix, the largest block size `<= max_preconditioner_dim` that divides every nested width inside it.

    Shampoo blocks a (d, W) `c_fc` weight (and a (W, d) `c_proj` weight) into equal blocks along each dimension;
    when the block size divides the nested widths, every block lies within one granularity, so the student's own
    neurons `[:student_width]` are preconditioned as blocks of their own, untouched by the TA's extra neurons.
    """
    config = getattr(model, "config", None)
    if not getattr(config, "mat_widths", None):
        raise ValueError(
            f"align_blocks_to_widths=True needs a nested model (a config with `mat_widths`), got "
            f"{type(model).__name__}; set align_blocks_to_widths=False."
        )
    block_sizes = {}
    for layer_idx, block in enumerate(model.transformer.h):
        inner_boundaries = [width for width in config.mat_widths if width < config.n_inner[layer_idx]]
        if not inner_boundaries:
            continue
        step = math.gcd(*inner_boundaries)
        block_size = next(size for size in range(min(step, args.max_preconditioner_dim), 0, -1) if step % size == 0)
        for module in NESTED_FFN_DIMS:
            block_sizes[getattr(block.mlp, module).weight] = block_size
    return block_sizes


def scale_ta_neuron_steps(optimizer: torch.optim.Optimizer, model: nn.Module, scale: float) -> None:
    """Multiply every step's update of `model`'s FFN neurons beyond the student's width by `scale`.

    Those neurons (per layer, the `c_fc` columns and biases and the `c_proj` rows from `config.student_width` on) are
    slices of tensors they share with the student's, so no parameter group can give them their own learning rate.
    Instead, hooks on `optimizer.step` keep a copy of the slices before the step and move them to
    `before + scale * (after - before)` after it: for an element-wise optimizer such as AdamW (decoupled weight decay
    included) on fp32 weights exactly the step of a learning rate `scale` times larger, for Shampoo the
    preconditioned update scaled. The copy costs the slices' memory during the step. The hooks read the parameters
    themselves, so they cannot run on the flattened shards of DeepSpeed ZeRO or FSDP (the trainer refuses that
    combination, and the others `hf_matta.trainer.check_ta_neuron_lr_scale` lists).

    Raises:
        ValueError: `model` has no student narrower than its FFN (no `config.student_width` below a layer's width).
    """
    config = getattr(model, "config", None)
    student_width = getattr(config, "student_width", None)
    slices = [
        (param, dim)
        for layer_idx in range(config.n_layer if student_width else 0)
        for name, dim in nested_ffn_parameters(layer_idx).items()
        if (param := model.get_parameter(name)).shape[dim] > student_width
    ]
    if not slices:
        raise ValueError(
            f"ta_neuron_lr_scale={scale} needs a nested model whose FFN is wider than its student, got "
            f"{type(model).__name__} with student_width={student_width}; leave ta_neuron_lr_scale at 1."
        )

    def ta_only(param: nn.Parameter, dim: int) -> torch.Tensor:
        return param.detach().narrow(dim, student_width, param.shape[dim] - student_width)

    before: list[torch.Tensor] = []

    def keep(optimizer, args, kwargs) -> None:
        before[:] = [ta_only(param, dim).clone() for param, dim in slices]

    def rescale(optimizer, args, kwargs) -> None:
        for (param, dim), old in zip(slices, before):
            ta_only(param, dim).sub_(old).mul_(scale).add_(old)
        before.clear()

    optimizer.register_step_pre_hook(keep)
    optimizer.register_step_post_hook(rescale)


def _import_optional(module: str, install: str) -> Any:
    """Import an optional backend's module, or raise an ImportError that says how to install it."""
    try:
        return __import__(module, fromlist=["_"])
    except ImportError as error:
        raise ImportError(f"optimizer backend needs `{module}`, which is not installed: {install}") from error


def _build_shampoo(groups: list[dict[str, Any]], args: Any) -> torch.optim.Optimizer:
    """pytorch-optimizer's ScalableShampoo with DistributedShampoo's settings and an Adam graft."""
    _import_optional("pytorch_optimizer", _SHAMPOO_EXTRA)
    from pytorch_optimizer.optimizer.utils.graft import LayerWiseGrafting

    graft_type = {
        "adam": LayerWiseGrafting.RMSPROP,  # made Adam by `_Shampoo` (bias correction)
        "sgd": LayerWiseGrafting.SGD,
        "none": LayerWiseGrafting.NONE,
    }[args.grafting]
    return _shampoo_classes()["Shampoo"](
        groups,
        lr=args.learning_rate,
        betas=(args.adam_beta1, args.adam_beta2),
        # beta1 as an EMA of the update, as Adam's: the learning rate then means what it means for AdamW.
        moving_average_for_momentum=True,
        decoupled_weight_decay=True,
        start_preconditioning_step=args.start_preconditioning_step,
        preconditioning_compute_steps=args.precondition_frequency,
        block_size=args.max_preconditioner_dim,
        # Blocking bounds the preconditioner size; the library's default would leave a GPT-2 vocabulary (50257 rows)
        # unpreconditioned.
        no_preconditioning_for_layers_with_dim_gt=2**62,
        # Keep each parameter's true shape: merging a small matrix's dims into one vector of at most `block_size`
        # would turn its Shampoo preconditioner off.
        shape_interpretation=False,
        graft_type=graft_type,
        diagonal_eps=args.adam_epsilon,
        # A ridge relative to each statistic's largest eigenvalue (DistributedShampoo's epsilon is absolute), found
        # by a power iteration that draws from the global torch RNG (Trainer saves and restores it on resume).
        matrix_eps=args.shampoo_epsilon,
    )


def _build_soap(groups: list[dict[str, Any]], args: Any) -> torch.optim.Optimizer:
    """heavyball's SOAP; torch.compile is turned off when the parameters are on CPU (minutes to compile, no gain)."""
    heavyball = _import_optional("heavyball", _SHAMPOO_EXTRA)
    if all(param.device.type == "cpu" for group in groups for param in group["params"]):
        heavyball.utils.compile_mode = None
    return heavyball.SOAP(
        groups,
        lr=args.learning_rate,
        betas=(args.adam_beta1, args.adam_beta2),
        eps=args.adam_epsilon,
        precondition_frequency=args.precondition_frequency,
        max_precond_dim=args.max_preconditioner_dim,
    )


def _build_distributed_shampoo(groups: list[dict[str, Any]], args: Any) -> torch.optim.Optimizer:
    """facebookresearch's DistributedShampoo. Its `state_dict()` raises by design (it checkpoints through
    `distributed_state_dict(key_to_param=model.named_parameters())`), so Trainer's own checkpoints cannot save it."""
    distributed_shampoo = _import_optional("distributed_shampoo", _DISTRIBUTED_SHAMPOO_INSTALL)
    grafting_config = {
        "adam": lambda: distributed_shampoo.AdamGraftingConfig(beta2=args.adam_beta2, epsilon=args.adam_epsilon),
        "sgd": lambda: distributed_shampoo.SGDGraftingConfig(),
        "none": lambda: None,
    }[args.grafting]()
    return distributed_shampoo.DistributedShampoo(
        groups,
        lr=args.learning_rate,
        betas=(args.adam_beta1, args.adam_beta2),
        epsilon=args.shampoo_epsilon,
        max_preconditioner_dim=args.max_preconditioner_dim,
        precondition_frequency=args.precondition_frequency,
        start_preconditioning_step=args.start_preconditioning_step,
        use_decoupled_weight_decay=True,
        grafting_config=grafting_config,
    )


@functools.cache
def _shampoo_classes() -> dict[str, type]:
    """Define `Shampoo` (ScalableShampoo's subclass) and its `AdamGraft`, and register every class its state holds
    with `add_safe_globals`; done on first use so that pytorch-optimizer stays an optional import."""
    from pytorch_optimizer import ScalableShampoo
    from pytorch_optimizer.optimizer.utils.graft import Graft, LayerWiseGrafting, RMSPropGraft, SGDGraft
    from pytorch_optimizer.optimizer.utils.partition import BlockPartitioner, PreConditionerType
    from pytorch_optimizer.optimizer.utils.preconditioner import PreConditioner

    class AdamGraft(RMSPropGraft):
        """Adam's step size as Shampoo's graft: RMSProp with Adam's bias correction `1 - beta2^t`.

        ScalableShampoo's RMSProp graft has none, so its first steps are up to `(1 - beta2)^-1/2` times larger than
        Adam's (32x at beta2 = 0.999), and a learning rate tuned for AdamW would not carry over.
        """

        def __init__(self, var: torch.Tensor, diagonal_eps: float):
            super().__init__(var, diagonal_eps)
            self.beta2_power = 1.0  # beta2^t, t = statistics added so far

        def add_statistics(self, grad: torch.Tensor, beta2: float) -> None:
            super().add_statistics(grad, beta2)
            self.beta2_power *= beta2

        def precondition_gradient(self, grad: torch.Tensor) -> torch.Tensor:
            second_moment = self.statistics / (1.0 - self.beta2_power)
            return grad / (second_moment.sqrt() + self.diagonal_eps)

    class Shampoo(ScalableShampoo):
        """ScalableShampoo with an Adam graft (see `AdamGraft`) and an optional `block_size` per parameter group."""

        def init_group(self, group: dict[str, Any], **kwargs) -> None:
            fresh = [param for param in group["params"] if param.grad is not None and not self.state[param]]
            block_size = self.block_size
            self.block_size = group.get("block_size", block_size)  # read by the PreConditioners built now
            try:
                super().init_group(group, **kwargs)
            finally:
                self.block_size = block_size
            if self.graft_type == LayerWiseGrafting.RMSPROP:
                for param in fresh:
                    self.state[param]["graft"] = AdamGraft(param, self.diagonal_eps)

    # Pickled state names a class by module and qualified name: make them `hf_matta.optim.AdamGraft` (etc.),
    # which this module's `__getattr__` resolves.
    for cls in (AdamGraft, Shampoo):
        cls.__qualname__ = cls.__name__
    torch.serialization.add_safe_globals(
        [AdamGraft, BlockPartitioner, Graft, PreConditioner, PreConditionerType, SGDGraft]
    )
    return {"AdamGraft": AdamGraft, "Shampoo": Shampoo}


def __getattr__(name: str) -> type:
    """`hf_matta.optim.Shampoo` and `hf_matta.optim.AdamGraft`, defined on first access (see `_shampoo_classes`)."""
    if name in ("AdamGraft", "Shampoo"):
        return _shampoo_classes()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def preconditioned_blocks(optimizer: torch.optim.Optimizer) -> Iterator[torch.Tensor]:
    """The Shampoo preconditioner matrices that have been computed (differ from the identity they start as)."""
    for state in optimizer.state.values():
        conditioner = state.get("pre_conditioner")
        for matrix in getattr(conditioner, "pre_conditioners", []):
            if not torch.equal(matrix, torch.eye(matrix.size(-1), dtype=matrix.dtype, device=matrix.device)):
                yield matrix


__all__ = ["build_optimizer", "parameter_groups", "preconditioned_blocks", "scale_ta_neuron_steps"]
