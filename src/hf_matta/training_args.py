"""`MatTATrainingArguments`: Transformers' `TrainingArguments` plus the MatTA fields, and nothing else.

Every field is documented below, carries `metadata={"help": ...}` for `HfArgumentParser`, and is range-checked in
`__post_init__` with an error that names the value (TRL's `GKDConfig` pattern).
"""

import math
from dataclasses import dataclass, field

from transformers import TrainingArguments

from .losses import DEFAULT_CHUNK_SIZE


EXTRA_WIDTHS = ("none", "all", "sample", "mixed")
COMPILE_LOSS = ("auto", "on", "off")
WIDTH_SCHEDULES = ("all", "sample_one")
OPTIMIZERS = ("adamw", "shampoo", "soap", "distributed_shampoo")
SHAMPOO_OPTIMIZERS = ("shampoo", "soap", "distributed_shampoo")  # need each parameter's true shape: no ZeRO
GRAFTINGS = ("adam", "sgd", "none")
# MatTA fields added after runs were recorded, each with the value that reproduces those runs: at it, the field is
# left out of what identifies a run (the pipeline's stage records, the benchmarks' run caches), so that a record made
# before the field existed still matches.
ADDED_FIELDS = {"ta_neuron_lr_scale": 1.0}


def without_added_fields(values: dict) -> dict:
    """`values` (field name -> value) less the `ADDED_FIELDS` that hold the value runs had before them."""
    return {name: value for name, value in values.items() if name not in ADDED_FIELDS or value != ADDED_FIELDS[name]}


@dataclass
class MatTATrainingArguments(TrainingArguments):
    r"""
    [`TrainingArguments`] for [`MatTATrainer`], with the MatTA loss, teacher, width policy and optimizer fields.

    With z_T, z_A, z_S the teacher, TA (full width) and student logits (DESIGN.md):
    `target(z) = (1 - teacher_weight) CE(y, z) + teacher_weight KL_teacher_temperature(z_T || z)` and
    `L = w_S(t) target(z_S) + ta_weight target(z_A) + w_D(t) KL_distill_temperature(sg(z_A) || z_S)`.

    The schedule: for the first `ta_first_steps` optimizer steps only the TA trains (w_S(t) = w_D(t) = 0, and the
    student's forward is skipped), so that the TA leads; then w_S(t) ramps linearly from 0 to `student_weight` over
    `student_warmup_steps` and w_D(t) from 0 to `distill_weight` over `distill_warmup_steps`. With both step counts
    at 0 (the default) every term is on from the first step.

    Parameters:
        student_weight (`float`, defaults to 1.0): w_S, the weight of the student's `target(z_S)` once warm; also
            the weight of every extra width's `target(z_w)`.
        ta_weight (`float`, defaults to 1.0): w_A, the weight of the TA's `target(z_A)`.
        distill_weight (`float`, defaults to 1.0): w_D, the weight of the TA -> student distillation term once warm.
        distill_temperature (`float`, defaults to 1.0): tau_D of the TA -> student KL (scaled by tau_D^2).
        distill_warmup_steps (`float`, defaults to 0): optimizer steps over which `w_D` ramps linearly from 0, counted
            from the end of the TA-first phase; a float in (0, 1) is a fraction of the total training steps, as
            Transformers' `warmup_steps`.
        ta_first_steps (`float`, defaults to 0): optimizer steps at the start of training during which only the TA's
            term trains (the student's and extra widths' terms and the distillation term are off, their forwards
            skipped); int steps or a fraction of training, as `distill_warmup_steps`.
        student_warmup_steps (`float`, defaults to 0): optimizer steps over which w_S (the student's and the extra
            widths' target weight) ramps linearly from 0 after the TA-first phase; int steps or a fraction.
        detach_ta_targets (`bool`, defaults to `True`): stop the distillation gradient at the TA (its logits are a
            fixed target for the student); `False` lets it flow into the TA too.
        ta_neuron_lr_scale (`float`, defaults to 1.0): the step of the FFN neurons beyond the student's width (those
            only the TA and the wider students run), as a multiple of the step every other parameter takes: each
            optimizer step's update of those slices is multiplied by it (`hf_matta.optim.scale_ta_neuron_steps`),
            which for AdamW on fp32 weights is exactly a learning rate `ta_neuron_lr_scale` times larger for them. A
            wide model alone prefers a larger step than a narrow one (benchmarks/RESULTS.md, narrow setting). Refused
            under DeepSpeed or FSDP (flattened shards), with an optimizer passed to the trainer, and with Trainer
            `optim`s that step outside the optimizer (LOMO, layer-wise) or keep a second copy (schedule-free).
        teacher_model_name_or_path (`str`, *optional*): the frozen teacher: a model path or Hub id, or a PEFT
            adapter directory whose base model is loaded and the adapter merged. Unused when the trainer is given
            `teacher_model`. Without a teacher, `teacher_weight` is 0.
        teacher_weight (`float`, defaults to 0.5): gamma, the teacher's share in `target(z)`, in [0, 1].
        teacher_temperature (`float`, defaults to 1.0): tau_T of the teacher KL (scaled by tau_T^2).
        extra_widths (`str`, defaults to `"none"`): the granularities strictly between student and TA, each trained
            as a student of the TA: `"none"`, `"all"` of them every step, or one `"sample"`d per step. `"mixed"`
            trains one Mix'n'Match plan per step instead, each layer's width drawn from the granularities from the
            student's to the TA's (redrawn when every layer is at the student's or at the TA's width): mostly plans
            that mix widths across layers, which uniform training never runs. Evaluation reports every uniform width.
        width_schedule (`str`, defaults to `"all"`): `"all"` runs every term every step; `"sample_one"` is
            MatFormer's schedule: one granularity (student, TA or a trained extra width) sampled per step, with
            only its own terms.
        loss_chunk_size (`int`, defaults to 512): tokens per chunk of the loss computation (memory: see
            `hf_matta.losses`); 0 computes the loss in one piece.
        compile_loss (`str`, defaults to `"auto"`): run the chunked loss's closed-form per-chunk function through
            `torch.compile` (same values and gradients, its vocabulary-sized passes fused): `"on"`, `"off"` (the eager
            function, the reference), or `"auto"`: on where it measured faster (`hf_matta.losses.
            COMPILED_LOSS_MEASURED_FASTER`: CPU with a vocabulary of 4096 or more), off elsewhere. Where compilation
            is unavailable the eager function runs, with a warning. Compiling costs seconds to a minute at the first
            steps.
        ta_backward_first (`bool`, defaults to `True`): with `detach_ta_targets`, differentiate the TA's terms first
            and free its graph before the student's forward, whose terms then see the TA's logits as constants: the
            same gradient, with one model's autograd graph in memory instead of two, and still one gradient
            synchronisation per step. `False`: one backward of the whole objective.
        teacher_cache_dir (`str`, *optional*): a folder built by `hf_matta.teacher_cache.build_teacher_cache` on this
            training set: training reads the teacher's cached top-k log-probabilities instead of running the teacher,
            and `teacher_model_name_or_path` is not loaded (evaluation's objective then has no teacher term unless the
            trainer is given `teacher_model`). Its temperature must be `teacher_temperature`. `hf-matta run` builds it
            there first when it is not finished (`teacher_cache_top_k`).
        optimizer (`str`, *optional*): `"adamw"`, `"shampoo"`, `"soap"` or `"distributed_shampoo"`, built by
            `hf_matta.optim.build_optimizer`; `None` uses Trainer's own `optim`, as in Transformers.
        max_preconditioner_dim (`int`, defaults to 1024): Shampoo's block size (larger dimensions are blocked).
        precondition_frequency (`int`, defaults to 10): steps between preconditioner updates.
        start_preconditioning_step (`int`, defaults to 10): the step from which Shampoo preconditions (grafting
            only before it).
        shampoo_epsilon (`float`, defaults to 1e-6): Shampoo's epsilon for the preconditioner roots.
        grafting (`str`, defaults to `"adam"`): Shampoo's step-size grafting, `"adam"`, `"sgd"` or `"none"`.
        align_blocks_to_widths (`bool`, defaults to `False`): split Shampoo's blocks at the nested width boundaries,
            so the student's own neurons are preconditioned as blocks of their own.
    """

    student_weight: float = field(default=1.0, metadata={"help": "w_S: weight of the student's target(z_S) (>= 0)."})
    ta_weight: float = field(default=1.0, metadata={"help": "w_A: weight of the TA's target(z_A) (>= 0)."})
    distill_weight: float = field(
        default=1.0, metadata={"help": "w_D: weight of the TA -> student distillation KL once warm (>= 0)."}
    )
    distill_temperature: float = field(
        default=1.0, metadata={"help": "tau_D of the TA -> student KL, which is scaled by tau_D^2 (> 0)."}
    )
    distill_warmup_steps: float = field(
        default=0,
        metadata={
            "help": "Optimizer steps over which w_D ramps linearly from 0: an int, or a float in (0, 1) as a "
            "fraction of the total training steps (>= 0)."
        },
    )
    ta_first_steps: float = field(
        default=0,
        metadata={
            "help": "Steps at the start during which only the TA trains (student and distillation terms off, the "
            "student's forward skipped): an int, or a float in (0, 1) as a fraction of training (>= 0)."
        },
    )
    student_warmup_steps: float = field(
        default=0,
        metadata={
            "help": "Steps over which w_S ramps linearly from 0 after the TA-first phase: an int, or a float in "
            "(0, 1) as a fraction of training (>= 0)."
        },
    )
    detach_ta_targets: bool = field(
        default=True, metadata={"help": "Stop the distillation gradient at the TA (False: it reaches the TA too)."}
    )
    ta_neuron_lr_scale: float = field(
        default=1.0,
        metadata={
            "help": "Step of the FFN neurons beyond the student's width, as a multiple of the others' step (> 0)."
        },
    )
    teacher_model_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "The frozen teacher: a model path or Hub id, or a PEFT adapter directory (its base is loaded "
            "and the adapter merged). None: no teacher, teacher_weight counts as 0."
        },
    )
    teacher_weight: float = field(
        default=0.5, metadata={"help": "gamma: the teacher's share in target(z) = (1-gamma) CE + gamma KL (0..1)."}
    )
    teacher_temperature: float = field(
        default=1.0, metadata={"help": "tau_T of the teacher KL, which is scaled by tau_T^2 (> 0)."}
    )
    extra_widths: str = field(
        default="none",
        metadata={
            "help": "Granularities between student and TA, trained as students of the TA: 'none', 'all' every "
            "step, one 'sample'd per step, or one 'mixed' plan per step (each layer's width drawn from the "
            "granularities).",
            "choices": list(EXTRA_WIDTHS),
        },
    )
    width_schedule: str = field(
        default="all",
        metadata={
            "help": "'all': every term every step; 'sample_one': MatFormer's one sampled granularity per step.",
            "choices": list(WIDTH_SCHEDULES),
        },
    )
    loss_chunk_size: int = field(
        default=DEFAULT_CHUNK_SIZE,
        metadata={"help": "Tokens per chunk of the loss computation (bounds its memory); 0: one piece (>= 0)."},
    )
    compile_loss: str = field(
        default="auto",
        metadata={
            "help": "Compile the chunked loss with torch.compile: 'on', 'off' (eager, the reference) or 'auto' (on "
            "where it measured faster: CPU with a vocabulary >= 4096).",
            "choices": list(COMPILE_LOSS),
        },
    )
    ta_backward_first: bool = field(
        default=True,
        metadata={
            "help": "With detach_ta_targets: the TA's terms and backward first, then the student's against the TA's "
            "detached logits (same gradient, one graph in memory at a time). False: one backward."
        },
    )
    teacher_cache_dir: str | None = field(
        default=None,
        metadata={
            "help": "A folder of cached teacher top-k log-probabilities (hf_matta.teacher_cache) built on this "
            "training set: training reads it instead of running the teacher."
        },
    )
    optimizer: str | None = field(
        default=None,
        metadata={
            "help": "hf_matta's optimizer: 'adamw', 'shampoo', 'soap' or 'distributed_shampoo'; None uses the "
            "Trainer's own `optim`.",
            "choices": list(OPTIMIZERS),
        },
    )
    max_preconditioner_dim: int = field(
        default=1024, metadata={"help": "Shampoo's block size: larger dimensions are split into blocks (>= 1)."}
    )
    precondition_frequency: int = field(
        default=10, metadata={"help": "Steps between Shampoo preconditioner updates (>= 1)."}
    )
    start_preconditioning_step: int = field(
        default=10, metadata={"help": "Step from which Shampoo preconditions; grafting alone before it (>= 0)."}
    )
    shampoo_epsilon: float = field(
        default=1e-6, metadata={"help": "Shampoo's epsilon for the preconditioner roots (> 0)."}
    )
    grafting: str = field(
        default="adam",
        metadata={"help": "Shampoo's step-size grafting: 'adam', 'sgd' or 'none'.", "choices": list(GRAFTINGS)},
    )
    align_blocks_to_widths: bool = field(
        default=False,
        metadata={"help": "Split Shampoo's blocks at the nested width boundaries (student neurons as own blocks)."},
    )

    def __post_init__(self):
        self._check_matta_fields()
        super().__post_init__()

    def __getstate__(self) -> dict:
        """What pickling keeps: everything but `hub_token`, so that no `training_args.bin` (saved with every model and
        checkpoint, and uploaded by `push_to_hub`) holds the secret; the object in memory keeps it."""
        return {**self.__dict__, "hub_token": None}

    def _check_matta_fields(self) -> None:
        """Range-check the MatTA fields before Transformers' own (cheap) checks and set-up."""
        for name, value in vars(self).items():  # NaN passes every comparison, and inf weights or temperatures
            if isinstance(value, float) and not math.isfinite(value):  # train an all-NaN model
                raise ValueError(f"{name}={value} is not a finite number; give a finite value.")
        if self.max_steps == 0:
            raise ValueError(
                "max_steps=0 trains nothing: give a positive number of optimizer steps, or -1 (the default) to train "
                f"for num_train_epochs={self.num_train_epochs}."
            )
        if self.max_steps < 0 and self.num_train_epochs <= 0:
            raise ValueError(f"num_train_epochs={self.num_train_epochs} trains nothing: give a positive number.")
        for name in (
            "student_weight", "ta_weight", "distill_weight", "distill_warmup_steps", "ta_first_steps",
            "student_warmup_steps",
        ):  # fmt: skip
            if getattr(self, name) < 0:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 0.")
        if self.student_weight == self.ta_weight == self.distill_weight == 0:
            raise ValueError(
                "student_weight, ta_weight and distill_weight are all 0: nothing would be trained; set one above 0."
            )
        for name in ("distill_temperature", "teacher_temperature", "shampoo_epsilon", "ta_neuron_lr_scale"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name}={getattr(self, name)} must be > 0.")
        if not 0 <= self.teacher_weight <= 1:
            raise ValueError(f"teacher_weight={self.teacher_weight} must be in [0, 1] (it is gamma, a share).")
        choices = {
            "extra_widths": EXTRA_WIDTHS,
            "width_schedule": WIDTH_SCHEDULES,
            "compile_loss": COMPILE_LOSS,
            "optimizer": (None, *OPTIMIZERS),
            "grafting": GRAFTINGS,
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name}={getattr(self, name)!r} is not one of {list(allowed)}.")
        lows = {
            "loss_chunk_size": 0,
            "max_preconditioner_dim": 1,
            "precondition_frequency": 1,
            "start_preconditioning_step": 0,
        }
        for name, low in lows.items():
            if getattr(self, name) < low:
                raise ValueError(f"{name}={getattr(self, name)} must be >= {low}.")
        if self.max_steps > 0:
            self.check_schedule(self.max_steps)

    def check_schedule(self, num_training_steps: int) -> None:
        """Refuse a schedule longer than the run: a TA-first phase that leaves the student no step, or a warm-up
        that ends after the last step (its weight would never be reached). The trainer calls it again once it knows
        the number of steps of an epoch-based run."""

        def share(value: float) -> float:  # a schedule length as a share of the run (ints are steps)
            return value / num_training_steps if value >= 1 else value

        run = f"the run's {num_training_steps} optimizer steps"
        if self.ta_first_steps > 0 and share(self.ta_first_steps) >= 1:
            raise ValueError(
                f"ta_first_steps={self.ta_first_steps} covers all of {run}: the student would never train; give "
                "fewer steps, a fraction below 1, or train longer."
            )
        for name in ("student_warmup_steps", "distill_warmup_steps"):
            value = getattr(self, name)
            if share(self.ta_first_steps) + share(value) > 1 + 1e-9:
                after = f" (after ta_first_steps={self.ta_first_steps})" if self.ta_first_steps else ""
                raise ValueError(
                    f"{name}={value}{after} ends after the last of {run}: the weight it ramps would never be "
                    "reached; shorten it or train longer."
                )

    def schedule_steps(self, value: float, num_training_steps: int) -> int:
        """A schedule length given as int steps (>= 1) or as a fraction in (0, 1) of `num_training_steps`."""
        if value >= 1:
            return int(value)
        return math.ceil(num_training_steps * value)

    def _ramp(self, step: int, num_training_steps: int, warmup: float) -> float:
        """0 during the TA-first phase, then a linear ramp from 0 to 1 over `warmup` steps (1 at once if 0)."""
        elapsed = step - self.schedule_steps(self.ta_first_steps, num_training_steps)
        length = self.schedule_steps(warmup, num_training_steps)
        if elapsed < 0:
            return 0.0
        return min(1.0, elapsed / length) if length > 0 else 1.0

    def student_weight_at(self, step: int, num_training_steps: int) -> float:
        """w_S(t) at optimizer step `step` (0-based): 0 while the TA goes first, then ramped to `student_weight`."""
        return self.student_weight * self._ramp(step, num_training_steps, self.student_warmup_steps)

    def distill_weight_at(self, step: int, num_training_steps: int) -> float:
        """w_D(t) at optimizer step `step` (0-based): 0 while the TA goes first, then ramped to `distill_weight`."""
        return self.distill_weight * self._ramp(step, num_training_steps, self.distill_warmup_steps)


__all__ = ["MatTATrainingArguments"]
