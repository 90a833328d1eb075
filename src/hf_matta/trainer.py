"""`MatTATrainer`: Transformers' Trainer running the MatTA step. It orchestrates; the maths is in `hf_matta.losses`.

One optimizer step, on every micro-batch: the frozen teacher's forward under `no_grad` (or its top-k targets read from
a cache, `hf_matta.teacher_cache`), the TA's at full width, the student's at `config.student_width` and the extra
widths' per `args.extra_widths`, and the backward of `hf_matta.losses.matta_loss`. Every term is a mean over the valid
tokens of the whole optimizer step (Trainer's `num_items_in_batch`, counted over gradient-accumulation micro-batches
and data-parallel processes), so the gradient does not depend on how the step is split.

When the step trains the TA and a student and the distillation target is detached (`detach_ta_targets`, the default),
the TA's terms are differentiated first and its graph freed before the student's forward runs; the student's terms
then see the TA's logits as constants (`ta_backward_first`). The gradient is the one-backward step's (the student's
terms send nothing to the TA's logits), and the peak memory holds one model's autograd graph instead of two. The TA's
backward runs without gradient synchronisation (DDP's `no_sync`, FSDP's deferred reduction, no DeepSpeed optimizer
step), so a step still communicates once, as with gradient accumulation.

Every term is logged on its own (`loss_student`, `loss_ta`, `loss_distill`, `loss_w{w}` for extra widths or
`loss_mixed` for the sampled Mix'n'Match plan, and `distill_weight`, the w_D(t) in force), averaged over the logging
window as Trainer's `loss`; evaluation adds the cross-entropy and perplexity of every granularity (`eval_loss_w{w}`,
`eval_ppl_w{w}`).

A SIGTERM during training (preemption) finishes the current optimizer step, saves a checkpoint and exits the process
with status 143 (128 + SIGTERM); `resume_from_checkpoint` continues bit-exactly.

```python
>>> args = MatTATrainingArguments(output_dir="out", teacher_model_name_or_path="gpt2-xl", max_steps=1000)
>>> trainer = MatTATrainer(model=MatGPT2LMHeadModel.from_gpt2("gpt2-medium", [4096, 8192]), args=args,
...                        train_dataset=train, eval_dataset=valid, data_collator=collator, processing_class=tok)
>>> trainer.train()
```
"""

import contextlib
import copy
import math
import os
import random
import signal
import threading
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
from accelerate.utils.memory import clear_device_cache
from huggingface_hub.utils import HFValidationError, validate_repo_id
from torch import nn
from transformers import AutoModelForCausalLM, PreTrainedModel, Trainer, TrainerCallback
from transformers.distributed.fsdp import is_fsdp_managed_module
from transformers.training_args import OptimizerNames
from transformers.utils import is_sagemaker_mp_enabled, logging
from transformers.utils.peft_utils import find_adapter_config_file

from .data import load_tokenizer
from .diagnostics import FFNSplitProbe, ffn_split_metrics
from .losses import (
    MatTALoss,
    TopKLogProbs,
    compiled_loss_pays,
    count_valid_tokens,
    cross_entropy,
    kl_divergence,
    matta_loss,
)
from .models.matgpt2 import MatGPT2LMHeadModel
from .teacher_cache import BATCH_KEYS, CachedTeacherDataset, TeacherCache, TeacherTargetsCollator
from .training_args import SHAMPOO_OPTIMIZERS, MatTATrainingArguments


logger = logging.get_logger(__name__)

PREEMPTED_EXIT_STATUS = 128 + signal.SIGTERM
_WEIGHT_FILES = (
    "model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json",
)  # fmt: skip


class NonFiniteLossError(FloatingPointError):
    """A loss term became NaN or infinite during training; the run stopped before applying that step."""


def check_teacher_location(name_or_path: str) -> None:
    """Refuse, naming it, a teacher that is neither a saved model's folder nor shaped as a Hub id (Transformers would
    say "Repo id must be in the form ..." of a mistyped path), and a folder without weights (a save that never
    completed)."""
    path = Path(name_or_path)
    if path.is_dir():
        if (path / "adapter_config.json").is_file():
            return  # a PEFT adapter: its base model is named inside
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"the teacher {name_or_path!r} is a folder without config.json: no saved model.")
        if not any((path / name).is_file() for name in _WEIGHT_FILES):
            raise FileNotFoundError(
                f"the teacher {name_or_path!r} holds config.json but no weights ({_WEIGHT_FILES[0]}): a save that "
                "did not complete. Delete the folder (a teacher pre-trained by hf-matta run is then trained again)."
            )
        return
    if path.exists():
        raise FileNotFoundError(f"the teacher {name_or_path!r} is a file: give the folder of a saved model.")
    try:
        validate_repo_id(name_or_path)
        hub_shaped = not (path.is_absolute() or name_or_path.startswith((".", "~")))
    except HFValidationError:
        hub_shaped = False
    if not hub_shaped:
        raise FileNotFoundError(f"the teacher {name_or_path!r} does not exist: give the folder of a saved model.")


def check_output_dir(output_dir: str | os.PathLike, reads: Mapping[str, str | None]) -> None:
    """Refuse an output folder that is, or is inside, a folder the run reads (`reads`: argument name -> its value, a
    folder that may not exist yet): saving there would replace the teacher or the tokenizer with the trained model."""
    output = Path(output_dir).resolve()
    for name, value in reads.items():
        if value is None:
            continue
        folder = Path(value).resolve()
        if output == folder or folder in output.parents:
            raise ValueError(
                f"output_dir={str(output_dir)!r} is {name}={value!r} or inside it: saving the trained model would "
                "write over it; choose another output_dir."
            )


def check_ta_neuron_lr_scale(args: MatTATrainingArguments, config, sharded: bool = False, given: bool = False) -> None:
    """Refuse `args.ta_neuron_lr_scale` != 1 where it would not scale the TA-only neurons' step: a model without
    them (`config`: one granularity), flattened shards (DeepSpeed or FSDP: in `args`, or `sharded` when launched so),
    an optimizer the trainer did not build (`given`), or a Trainer `optim` whose step does not move the weights
    itself (LOMO, layer-wise GaLore/APOLLO) or keeps a second copy of them (schedule-free)."""
    scale = args.ta_neuron_lr_scale
    if scale == 1:
        return
    if config.student_width == config.mat_widths[-1]:
        raise ValueError(
            f"ta_neuron_lr_scale={scale} scales the steps of the FFN neurons beyond the student's width, and this "
            f"model has none (student_width={config.student_width} is its full width): leave ta_neuron_lr_scale at "
            "1, or train a nested model with a TA."
        )
    if sharded or args.deepspeed or args.fsdp:
        raise ValueError(
            f"ta_neuron_lr_scale={scale} cannot run under DeepSpeed or FSDP, whose optimizers step flattened shards "
            "where the TA-only neurons' slices cannot be found: use DDP, or leave ta_neuron_lr_scale at 1."
        )
    if given:
        raise ValueError(
            f"ta_neuron_lr_scale={scale} scales the steps of the optimizer the trainer builds, but one was given "
            "(optimizers=...): scale it yourself with hf_matta.optim.scale_ta_neuron_steps and leave "
            "ta_neuron_lr_scale at 1, or let the trainer build it."
        )
    optim = str(getattr(args.optim, "value", args.optim))
    if args.optimizer is None and ("lomo" in optim or "layerwise" in optim or optim.startswith("schedule_free")):
        raise ValueError(
            f"ta_neuron_lr_scale={scale} cannot scale the steps of optim={optim!r}, which updates the weights outside "
            "the optimizer's step or keeps a second copy of them: use optimizer='adamw' (or another hf_matta "
            "optimizer), or leave ta_neuron_lr_scale at 1."
        )


def load_teacher(name_or_path: str) -> PreTrainedModel:
    """The teacher named by a path or Hub id; a PEFT adapter is loaded onto its base model and merged into it."""
    check_teacher_location(name_or_path)
    try:
        if find_adapter_config_file(name_or_path) is not None:
            from peft import AutoPeftModelForCausalLM

            return AutoPeftModelForCausalLM.from_pretrained(name_or_path).merge_and_unload()
        return AutoModelForCausalLM.from_pretrained(name_or_path)
    except OSError as error:  # not on the Hub, offline, or a folder without weights
        raise OSError(f"the teacher {name_or_path!r} could not be loaded: {error}") from error


class _TermWindow:
    """Sums of the logged terms over the optimizer steps since the last log, and in how many steps each appeared."""

    def __init__(self):
        self.sums: dict[str, torch.Tensor] = {}
        self.steps: dict[str, int] = {}
        self.last_step: dict[str, int] = {}

    def add(self, step: int, name: str, value: torch.Tensor, once_per_step: bool = False) -> None:
        """Add a micro-batch's share of a term (`once_per_step`: a per-step value, added at its first micro-batch)."""
        new_step = self.last_step.get(name) != step
        if new_step or not once_per_step:
            self.sums[name] = self.sums.get(name, 0.0) + value.detach().float()
        if new_step:
            self.steps[name] = self.steps.get(name, 0) + 1
            self.last_step[name] = step

    def pop_means(self, reduce: Callable[[torch.Tensor], torch.Tensor]) -> dict[str, float]:
        """Each term's mean per optimizer step, `reduce`d (averaged) over processes; the window starts again."""
        if not self.sums:
            return {}
        names = sorted(self.sums)
        sums = reduce(torch.stack([self.sums[name] for name in names])).tolist()
        means = {name: total / self.steps[name] for name, total in zip(names, sums)}
        self.sums, self.steps, self.last_step = {}, {}, {}
        return means


class _PreemptionCallback(TrainerCallback):
    """On SIGTERM during training: finish the optimizer step, save a checkpoint and stop (all processes agree)."""

    def __init__(self, any_process: Callable[[bool], bool]):
        self.any_process = any_process
        self.received = False
        self.preempted = False
        self._previous_handler = None

    def _handle(self, signum, frame) -> None:
        self.received = True

    def on_train_begin(self, args, state, control, **kwargs):
        self.received = self.preempted = False
        if threading.current_thread() is threading.main_thread():  # Python handles signals there only
            self._previous_handler = signal.signal(signal.SIGTERM, self._handle)

    def on_step_end(self, args, state, control, **kwargs):
        if self.any_process(self.received):
            logger.warning(f"SIGTERM received: saving a checkpoint at step {state.global_step} and stopping.")
            self.preempted = True
            control.should_save = True
            control.should_training_stop = True

    def on_train_end(self, args, state, control, **kwargs):
        self.release()

    def release(self) -> None:
        """Give SIGTERM back to the handler it had before training."""
        if self._previous_handler is not None:
            signal.signal(signal.SIGTERM, self._previous_handler)
            self._previous_handler = None


class _TrainingChecks(TrainerCallback):
    """Runs the trainer's checks once training starts (the number of steps is known then) and before every optimizer
    step (the step's gradients are accumulated, not yet applied)."""

    def __init__(self, at_start: Callable[[], None], before_step: Callable[[], None]):
        self.at_start = at_start
        self.before_step = before_step

    def on_train_begin(self, args, state, control, **kwargs):
        self.at_start()

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self.before_step()


class MatTATrainer(Trainer):
    """Trainer for a nested `MatGPT2LMHeadModel`: TA, student and extra widths in one step, with an optional
    frozen teacher (`teacher_model`, or `args.teacher_model_name_or_path`).

    Args (besides [`Trainer`]'s):
        args: a [`MatTATrainingArguments`].
        teacher_model: the teacher, an instance; it is frozen, put in eval mode, placed and (under DeepSpeed or
            FSDP) prepared by the trainer, and never saved with the student.
        teacher_processing_class: the teacher's tokenizer, checked against `processing_class` at start (loaded
            from `args.teacher_model_name_or_path` when the teacher is loaded from there).

    A model with a single granularity (student width = full width) has no TA: the trainer then trains the student
    alone, or distils the teacher into it, the baselines MatTA is compared with.
    """

    # The loss is already a mean over the tokens of the whole optimizer step: Trainer must not divide it again.
    loss_is_scaled_for_ga = True

    def __init__(
        self,
        model: MatGPT2LMHeadModel | None = None,
        args: MatTATrainingArguments | None = None,
        data_collator=None,
        train_dataset=None,
        eval_dataset=None,
        processing_class=None,
        teacher_model: PreTrainedModel | None = None,
        teacher_processing_class=None,
        **kwargs,
    ):
        if not isinstance(args, MatTATrainingArguments):
            raise TypeError(f"MatTATrainer needs MatTATrainingArguments, got {type(args).__name__}.")
        self._check_model(model)
        self._config = model.config
        super().__init__(
            model=model,
            args=args,
            data_collator=data_collator,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=processing_class,
            **kwargs,
        )
        if args.optimizer in SHAMPOO_OPTIMIZERS and self.is_deepspeed_enabled:
            raise ValueError(
                f"optimizer={args.optimizer!r} cannot run under DeepSpeed ZeRO, which flattens parameters while "
                "Shampoo needs each parameter's shape: use DDP (FSDP v1 also hands the optimizer flat 1-D shards, even "
                "with use_orig_params, and FSDP2's DTensors break ScalableShampoo), or optimizer='adamw'."
            )
        check_ta_neuron_lr_scale(
            args, self._config, sharded=self.is_deepspeed_enabled or self.is_fsdp_enabled,
            given=self.optimizer is not None,
        )  # fmt: skip
        if args.n_gpu > 1:
            raise ValueError(
                f"n_gpu={args.n_gpu}: MatTATrainer does not run under torch.nn.DataParallel; launch one process per "
                "device with `accelerate launch` or `torchrun` (DDP)."
            )
        check_output_dir(
            args.output_dir,
            {
                "teacher_model_name_or_path": args.teacher_model_name_or_path,
                "teacher_cache_dir": args.teacher_cache_dir,
            },
        )
        # With a teacher cache the teacher is not loaded: training reads the cache (a teacher_model given still serves
        # evaluation's teacher term).
        if teacher_model is None and args.teacher_model_name_or_path is not None and args.teacher_cache_dir is None:
            teacher_model = load_teacher(args.teacher_model_name_or_path)
            if teacher_processing_class is None:
                teacher_processing_class = load_tokenizer(args.teacher_model_name_or_path)
        if teacher_model is not None:
            self._check_teacher(teacher_model, teacher_processing_class)
            teacher_model.eval().requires_grad_(False)
            if args.teacher_weight == 0:
                logger.warning("teacher_weight=0: the teacher is never run; set teacher_weight > 0 to distil it.")
        self.teacher = teacher_model
        self.teacher_cache = self._open_teacher_cache() if args.teacher_cache_dir is not None else None
        # compile_loss="auto" compiles where it measured faster (hf_matta.losses.compiled_loss_pays)
        self.compiled_loss = args.compile_loss == "on" or (
            args.compile_loss == "auto" and compiled_loss_pays(args.device.type, self._config.vocab_size)
        )
        self._one_backward_reason: str | None = None  # why ta_backward_first cannot run here (None: it can)
        self._checked_backward = False
        self._teacher_prepared = False
        self._window = _TermWindow()
        self._eval_sums: dict[int | str, torch.Tensor] = {}  # width or diagnostic -> sums
        self._non_finite: dict[str, torch.Tensor] = {}  # loss term -> whether it was NaN/inf in this step
        self.add_callback(_TrainingChecks(self._check_training_start, self._stop_if_non_finite))
        self._preemption = _PreemptionCallback(self._any_process)
        self.add_callback(self._preemption)

    # ---- start-up checks (before any step) ----

    @staticmethod
    def _check_model(model) -> None:
        """The student must be a uniform nested MatGPT2 whose student width is one of its granularities."""
        if not isinstance(model, MatGPT2LMHeadModel):
            raise TypeError(
                f"MatTATrainer trains a MatGPT2LMHeadModel, got {type(model).__name__}: build one with "
                "MatGPT2LMHeadModel(MatGPT2Config(...)) or MatGPT2LMHeadModel.from_gpt2(...)."
            )
        config = model.config
        if not config.is_uniform:
            raise ValueError(
                f"n_inner={config.n_inner} differs between layers (an extracted Mix'n'Match model): MatTATrainer "
                "trains a uniform nested model, whose full width is the TA's."
            )
        if config.student_width not in config.mat_widths:
            raise ValueError(
                f"student_width={config.student_width} is not one of the model's granularities "
                f"mat_widths={config.mat_widths}; set config.student_width to one of them."
            )

    def _check_teacher(self, teacher: nn.Module, teacher_tokenizer) -> None:
        """Teacher and student must share the vocabulary: same size, and the same tokens when both tokenizers are
        known."""
        student_vocab, teacher_vocab = self._config.vocab_size, teacher.config.vocab_size
        if student_vocab != teacher_vocab:
            raise ValueError(
                f"The teacher's vocab_size={teacher_vocab} differs from the student's vocab_size={student_vocab}: "
                "distillation compares their distributions token by token, so both must use the same tokenizer."
            )
        if teacher_tokenizer is None or self.processing_class is None:
            return
        student_tokens = self.processing_class.get_vocab()
        teacher_tokens = teacher_tokenizer.get_vocab()
        if student_tokens != teacher_tokens:
            differing = sorted(set(student_tokens.items()) ^ set(teacher_tokens.items()))[:3]
            raise ValueError(
                f"The teacher's tokenizer differs from the student's (processing_class): ({len(teacher_tokens)} vs "
                f"{len(student_tokens)} tokens; e.g. (token, id) {differing} are in one only). Use the same tokenizer "
                "for both."
            )

    def _open_teacher_cache(self) -> TeacherCache:
        """`args.teacher_cache_dir`, checked against this run (teacher temperature, vocabulary, training rows); the
        training rows then carry their cached targets into every batch."""
        args = self.args
        cache = TeacherCache(args.teacher_cache_dir)
        if cache.temperature != args.teacher_temperature:
            raise ValueError(
                f"the teacher cache at {args.teacher_cache_dir} holds log-probabilities at temperature "
                f"{cache.temperature}, but teacher_temperature={args.teacher_temperature}: the tail bucket's mass is "
                "only known at the temperature it was built at; use that temperature or rebuild the cache."
            )
        if cache.manifest["vocab_size"] != self._config.vocab_size:
            raise ValueError(
                f"the teacher cache at {args.teacher_cache_dir} was built by a teacher of vocab_size="
                f"{cache.manifest['vocab_size']}, the student's is {self._config.vocab_size}: both must use the same "
                "tokenizer."
            )
        if args.teacher_weight == 0:
            logger.warning("teacher_weight=0: the teacher cache is never read; set teacher_weight > 0 to distil it.")
        if self.train_dataset is not None:
            if not hasattr(self.train_dataset, "__len__"):
                raise TypeError(
                    "a teacher cache is read by row index: give a map-style train_dataset (a datasets.Dataset or a "
                    f"list of rows), not a {type(self.train_dataset).__name__}."
                )
            cache.check_dataset(self.train_dataset)
            self.train_dataset = CachedTeacherDataset(self.train_dataset, cache)
        self.data_collator = TeacherTargetsCollator(self.data_collator)
        return cache

    def _set_signature_columns_if_needed(self) -> None:
        """The model's inputs, and the cached teacher targets (the trainer takes them out before the forward)."""
        super()._set_signature_columns_if_needed()
        self._signature_columns += [key for key in BATCH_KEYS if key not in self._signature_columns]

    def _check_training_start(self) -> None:
        """Before the first step: the schedule fits the run, and the training sequences fit the models' contexts."""
        self.args.check_schedule(self.state.max_steps)
        dataset = self.train_dataset
        if hasattr(dataset, "__getitem__") and hasattr(dataset, "__len__") and len(dataset) > 0:
            row = dataset[0]
            if isinstance(row, Mapping) and "input_ids" in row:
                self._check_context(torch.as_tensor(row["input_ids"]).shape[-1])

    def _check_context(self, length: int) -> None:
        """Sequences of `length` tokens must fit the student's and the (running) teacher's position embeddings."""
        models = {"the student": self._config}
        if self.teacher is not None and self.args.teacher_weight > 0:
            models["the teacher"] = self.teacher.config
        for name, config in models.items():
            context = getattr(config, "max_position_embeddings", None)  # GPT-2's n_positions
            if context is not None and length > context:
                raise ValueError(
                    f"training sequences of {length} tokens are longer than {name}'s context ({context} positions): "
                    f"use sequences (block_size) of at most {context} tokens, or {name.replace('the ', 'a ')} with "
                    "a longer context."
                )

    def _stop_if_non_finite(self) -> None:
        """Before the optimizer applies a step in which a loss term was NaN or infinite (on any process): save a
        checkpoint of the last good step (the weights, optimizer and schedule are still its own) and stop, naming the
        terms and the step."""
        if not self._non_finite:
            return
        names = sorted(self._non_finite)
        flags = torch.stack([self._non_finite[name] for name in names]).float()
        self._non_finite = {}
        if self.accelerator.num_processes > 1:
            flags = self.accelerator.reduce(flags, "sum")
        bad = [name for name, flag in zip(names, flags.tolist()) if flag > 0]
        if not bad:
            return
        good = self.state.global_step
        kept = "nothing was trained yet"
        if good > 0:
            self._save_checkpoint(self.model, trial=None)
            kept = (
                f"{os.path.join(self.args.output_dir, f'checkpoint-{good}')} holds step {good}, the last good one "
                "(resume_from_checkpoint continues from it)"
            )
        raise NonFiniteLossError(
            f"non-finite loss at optimizer step {good + 1} of {self.state.max_steps}: the {', '.join(bad)} term(s) "
            f"became NaN or infinite, so training stopped before applying it; {kept}. Lower learning_rate, check the "
            "training data and the teacher, or set max_grad_norm."
        )

    # ---- the step ----

    def create_optimizer(self, model=None) -> torch.optim.Optimizer:
        """`hf_matta.optim.build_optimizer` when `args.optimizer` is set, else Trainer's own `optim`; with
        `args.ta_neuron_lr_scale` != 1, the TA-only neurons' steps scaled (`hf_matta.optim.scale_ta_neuron_steps`)."""
        if self.optimizer is not None:
            return self.optimizer
        from .optim import build_optimizer, scale_ta_neuron_steps

        model = self.model if model is None else model
        if self.args.optimizer is None:
            super().create_optimizer(model)
        else:
            self.optimizer = build_optimizer(model, self.args)
        if self.args.ta_neuron_lr_scale != 1:
            # on the nested model itself, whose parameters the optimizer steps (a wrapper has no config)
            scale_ta_neuron_steps(self.optimizer, self.model, self.args.ta_neuron_lr_scale)
        return self.optimizer

    def _teacher_logits(self, inputs: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Teacher logits `(B, T, V)` under `no_grad`. The teacher is prepared at its first use, once the student's
        own DeepSpeed/FSDP preparation has run (DeepSpeed's "auto" values are then filled in)."""
        if not self._teacher_prepared:
            self.teacher = self._prepare_teacher(self.teacher)
            self._teacher_prepared = True
        with torch.no_grad():
            return self.teacher(**inputs, use_cache=False).logits

    def _prepare_teacher(self, teacher: nn.Module) -> nn.Module:
        """Place the teacher: a DeepSpeed inference engine (sharded under ZeRO-3, else replicated), sharded under
        FSDP1, else moved to the training device."""
        if self.is_deepspeed_enabled:
            import deepspeed

            config = copy.deepcopy(self.accelerator.state.deepspeed_plugin.deepspeed_config)
            if config.get("zero_optimization", {}).get("stage") != 3:
                config["zero_optimization"] = {"stage": 0}
            config.pop("optimizer", None)
            config.pop("scheduler", None)
            engine, *_ = deepspeed.initialize(model=teacher, config=config)
            engine.eval()  # DeepSpeedEngine.eval returns None, not the module
            return engine
        if self.is_fsdp_enabled and not self.accelerator.is_fsdp2:
            # FSDP1 shards it like the student (TRL does the same for its reference models)
            return self.accelerator.prepare_model(teacher).eval()
        # Placed, replicated on every process; under FSDP2 too, which accelerate prepares only with an optimizer.
        return self.accelerator.prepare_model(teacher, evaluation_mode=True)

    def _granularities(self, evaluating: bool) -> tuple[list[int | tuple[int, ...]], bool]:
        """The widths trained this step (student and extra widths, ascending; with `extra_widths="mixed"`, the
        student and a per-layer plan) and whether the TA is trained.

        Sampling is seeded by (seed, global step): every micro-batch and every process of a step draws the same
        widths, and a resumed run draws what the uninterrupted one drew.
        """
        args, config = self.args, self._config
        ta_width = config.mat_widths[-1]
        extras = [width for width in config.mat_widths if config.student_width < width < ta_width]
        if args.extra_widths == "none":
            extras = []
        rng = random.Random(f"{args.seed}:{self.state.global_step}")
        if args.extra_widths == "sample" and extras and not evaluating:
            extras = [rng.choice(extras)]
        if args.extra_widths == "mixed" and not evaluating:
            extras = self._mixed_plan(rng)
        students = [config.student_width, *extras]
        ta_trained = config.student_width != ta_width and args.ta_weight > 0
        step, total = self.state.global_step, self.state.max_steps
        student_off = args.student_weight_at(step, total) == args.distill_weight_at(step, total) == 0
        if student_off and ta_trained and not evaluating:
            students = []  # the TA goes first: no student or distillation term, so no student forward at all
        if args.width_schedule == "sample_one" and not evaluating:
            chosen = rng.choice([*students, *([ta_width] if ta_trained else [])])
            return ([] if chosen == ta_width else [chosen]), chosen == ta_width
        return students, ta_trained

    def _mixed_plan(self, rng: random.Random) -> list[tuple[int, ...]]:
        """`extra_widths="mixed"`: this step's Mix'n'Match plan, one width per layer drawn from the granularities
        from the student's to the TA's, redrawn while it is the uniform student or TA (both trained anyway); none
        where no other plan exists (a single granularity, or one layer and no width in between)."""
        config = self._config
        widths = [width for width in config.mat_widths if width >= config.student_width]
        ends = {(config.student_width,) * config.n_layer, (widths[-1],) * config.n_layer}
        if len(widths) ** config.n_layer <= len(ends):
            return []  # otherwise at least a third of the draws are kept
        while (plan := tuple(rng.choice(widths) for _ in range(config.n_layer))) in ends:
            pass
        return [plan]

    def _term_weights(self, evaluating: bool) -> tuple[float, float]:
        """(w_S(t), w_D(t)) at this step; every term at its full weight when evaluating, whatever the schedule, and
        for a model with a single granularity: with no TA to go first, the schedule (TA-first phase, ramps) would
        only stop or shrink the training of the one model there is (a KD baseline trained with a MatTA config)."""
        args, config = self.args, self._config
        if evaluating or config.student_width == config.mat_widths[-1]:
            return args.student_weight, args.distill_weight
        step, total = self.state.global_step, self.state.max_steps
        return args.student_weight_at(step, total), args.distill_weight_at(step, total)

    def _prepare_inputs(self, inputs: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Trainer's, except that the cached teacher targets only move to the device: under DeepSpeed, Trainer casts
        every floating tensor of a batch to the engine's dtype, and bf16 log-probabilities would bias the tail mass
        1 - sum p that the top-k KL reads."""
        cached = {key: inputs[key].to(self.args.device) for key in BATCH_KEYS if key in inputs}
        rest = {key: value for key, value in inputs.items() if key not in cached}
        return {**super()._prepare_inputs(rest), **cached}

    def _split_batch(self, inputs: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """`(labels, the model's inputs)`: the batch less its labels and its cached teacher targets."""
        labels = inputs.get("labels")
        if labels is None:
            raise ValueError(
                f"The batch has no `labels` (keys: {sorted(inputs)}): MatTATrainer needs them, e.g. from "
                "DataCollatorForLanguageModeling(tokenizer, mlm=False), or labels = input_ids."
            )
        self._check_context(labels.shape[-1])
        return labels, {key: value for key, value in inputs.items() if key != "labels" and key not in BATCH_KEYS}

    def _teacher_targets(
        self, inputs: Mapping[str, torch.Tensor], model_inputs: Mapping[str, torch.Tensor], evaluating: bool
    ) -> torch.Tensor | TopKLogProbs | None:
        """What the teacher teaches on this batch: its cached top-k targets when the batch carries them, else its
        logits `(B, T, V)`, or None without a teacher (or at teacher_weight 0)."""
        if self.args.teacher_weight == 0:
            return None
        if self.teacher_cache is not None:
            cached = self.teacher_cache.targets(inputs)
            if cached is not None:
                return cached
            if not evaluating:
                raise ValueError(
                    f"teacher_cache_dir={self.args.teacher_cache_dir!r} is set but a training batch carries no cached "
                    f"targets (keys: {sorted(inputs)}): train on the train_dataset the trainer was given, whose rows "
                    "it pairs with the cache."
                )
        if self.teacher is None:
            return None
        return self._teacher_logits(model_inputs)

    def _objective(
        self,
        labels: torch.Tensor,
        students: Mapping[int | tuple[int, ...], torch.Tensor],
        ta_logits: torch.Tensor | None,
        teacher: torch.Tensor | TopKLogProbs | None,
        num_items: torch.Tensor | int | None,
        weights: tuple[float, float, float],
        ta_term: bool = True,
    ) -> MatTALoss:
        """`hf_matta.losses.matta_loss` of the student and extra widths' logits (`students`, by width) and the TA's,
        with the run's settings; `weights` are (w_S, w_A, w_D) in force."""
        args, config = self.args, self._config
        student_weight, ta_weight, distill_weight = weights
        return matta_loss(
            students.get(config.student_width),
            labels,
            ta_logits=ta_logits,
            teacher_logits=teacher,
            extra_logits={
                width if isinstance(width, int) else "mixed": logits
                for width, logits in students.items()
                if width != config.student_width
            },
            student_weight=student_weight,
            ta_weight=ta_weight,
            distill_weight=distill_weight,
            distill_temperature=args.distill_temperature,
            teacher_weight=args.teacher_weight,
            teacher_temperature=args.teacher_temperature,
            detach_ta_targets=args.detach_ta_targets,
            num_items=num_items,
            chunk_size=args.loss_chunk_size or None,
            ta_term=ta_term,
            compiled=self.compiled_loss,
        )

    def matta_loss(
        self,
        model: nn.Module,
        inputs: Mapping[str, torch.Tensor],
        num_items: torch.Tensor | int | None = None,
        evaluating: bool = False,
    ) -> tuple[MatTALoss, dict[int | tuple[int, ...], torch.Tensor]]:
        """Run this step's forwards and return `(MatTALoss, logits (B, T, V) by width)`; `num_items` defaults to
        this batch's valid-token count. `evaluating` runs every granularity and term, with no sampling."""
        args, config = self.args, self._config
        labels, model_inputs = self._split_batch(inputs)
        students, ta_trained = self._granularities(evaluating)
        ta_width = config.mat_widths[-1]
        has_ta = config.student_width != ta_width  # with a single granularity the student is the whole model
        student_weight, distill_weight = self._term_weights(evaluating)
        teacher = self._teacher_targets(inputs, model_inputs, evaluating)
        logits: dict[int | tuple[int, ...], torch.Tensor] = {}
        # The TA runs first, as in `training_step`'s two backwards: with dropout, both draw the same masks.
        run_ta = ta_trained or (has_ta and students and (args.distill_weight > 0 or evaluating))
        if run_ta:
            # A TA that is only a detached distillation target needs no graph.
            with torch.set_grad_enabled(torch.is_grad_enabled() and (ta_trained or not args.detach_ta_targets)):
                logits[ta_width] = model(**model_inputs, ffn_widths=ta_width, use_cache=False).logits
        for width in students:
            logits[width] = model(**model_inputs, ffn_widths=width, use_cache=False).logits  # (B, T, V)
        loss = self._objective(
            labels,
            {width: logits[width] for width in students},
            logits.get(ta_width) if run_ta else None,
            teacher,
            num_items,
            (student_weight, args.ta_weight if ta_trained else 0.0, distill_weight),
        )
        return loss, logits

    def _backward_ta_first(self, students: list[int | tuple[int, ...]], ta_trained: bool) -> bool:
        """Whether this step takes the TA's backward first (module docstring): it trains the TA and a student,
        `ta_backward_first` and `detach_ta_targets` are on, and nothing in the run needs a single backward."""
        args = self.args
        if not (students and ta_trained and args.ta_backward_first and args.detach_ta_targets):
            return False
        if not self._checked_backward:
            self._checked_backward = True
            parallelism = getattr(self.accelerator, "parallelism_config", None)
            if args.optim in (OptimizerNames.LOMO, OptimizerNames.ADALOMO):
                self._one_backward_reason = f"optim={args.optim}, which updates the weights during the backward"
            elif is_sagemaker_mp_enabled():
                self._one_backward_reason = "SageMaker model parallelism runs its own forward-backward"
            elif parallelism is not None and parallelism.cp_enabled:
                self._one_backward_reason = "context parallelism prepares one forward-backward per batch"
            if self._one_backward_reason is not None:
                logger.warning(
                    f"ta_backward_first: {self._one_backward_reason}, so each step takes one backward of the whole "
                    "objective (the same gradient; the TA's and the student's graphs are alive together)."
                )
        return self._one_backward_reason is None

    @contextlib.contextmanager
    def _gradients_kept_local(self, model: nn.Module):
        """The first of a step's two backwards accumulates its gradients locally, as a gradient-accumulation
        micro-batch does: DDP's all-reduce and FSDP's reduce-scatter wait for the second (unless
        `sync_each_batch` asks for one per backward), and DeepSpeed takes no optimizer step after it. Both the
        forward and the backward run inside (DDP decides at the forward whether its backward synchronises).
        In a micro-batch before the step's last, Trainer's own context already keeps the gradients local: no second
        one is entered (FSDP2's would turn synchronisation back on at its exit, for the student's backward too)."""
        state = self.accelerator.gradient_state
        synced = state.sync_gradients
        state._set_sync_gradients(False)  # read by accelerator.backward: DeepSpeed's accumulation boundary
        try:
            if not synced or state.plugin_kwargs.get("sync_each_batch", False):
                context = contextlib.nullcontext()
            elif self.is_distributed_loading_by_transformers and is_fsdp_managed_module(self.model):
                context = self._defer_fsdp_gradient_reduction()  # Trainer's own rule for such models
            else:
                context = self.accelerator.no_sync(model)
            with context:
                yield
        finally:
            state._set_sync_gradients(synced)

    def training_step(self, model, inputs, num_items_in_batch=None) -> torch.Tensor:
        """Trainer's step (one backward of the whole objective), except in a step that trains the TA and a student
        with `ta_backward_first` and `detach_ta_targets`: then the TA's forward, terms and backward come first, the
        TA's graph is freed, and the student's (and extra widths') forwards, terms and backward follow against the
        TA's detached logits. The same gradient; one model's graph alive at a time; one synchronisation."""
        students, ta_trained = self._granularities(evaluating=False)
        if not self._backward_ta_first(students, ta_trained):
            return super().training_step(model, inputs, num_items_in_batch)
        model.train()
        if hasattr(self.optimizer, "train") and callable(self.optimizer.train):
            self.optimizer.train()
        inputs = self._prepare_inputs(inputs)
        labels, model_inputs = self._split_batch(inputs)
        ta_width = self._config.mat_widths[-1]
        student_weight, distill_weight = self._term_weights(evaluating=False)
        weights = (student_weight, self.args.ta_weight, distill_weight)
        # DeepSpeed scales by its accumulation steps unless told not to; the loss is already a mean over the step
        backward_kwargs = {"scale_wrt_gas": False} if self.is_deepspeed_enabled else {}
        teacher = self._teacher_targets(inputs, model_inputs, evaluating=False)
        with self._gradients_kept_local(model):
            with self.compute_loss_context_manager():
                ta_logits = model(**model_inputs, ffn_widths=ta_width, use_cache=False).logits  # (B, T, V)
                ta_loss = self._objective(labels, {}, ta_logits, teacher, num_items_in_batch, weights)
            ta_total, ta_terms = self._scaled(ta_loss, num_items_in_batch)
            self.accelerator.backward(ta_total, **backward_kwargs)
        ta_logits = ta_logits.detach()  # the TA's graph is gone; its logits stay, as the distillation target
        with self.compute_loss_context_manager():
            logits = {width: model(**model_inputs, ffn_widths=width, use_cache=False).logits for width in students}
            student_loss = self._objective(
                labels, logits, ta_logits, teacher, num_items_in_batch, weights, ta_term=False
            )
        student_total, student_terms = self._scaled(student_loss, num_items_in_batch)
        del inputs, model_inputs, logits, ta_logits, teacher  # the loss holds its gradient buffers, not the logits
        empty_cache_steps = self.args.torch_empty_cache_steps
        if empty_cache_steps is not None and self.state.global_step % empty_cache_steps == 0:
            clear_device_cache()
        self.accelerator.backward(student_total, **backward_kwargs)
        total = ta_total.detach() + student_total.detach()
        self._record(total, {**ta_terms, **student_terms})
        return total

    def _scaled(
        self, loss: MatTALoss, num_items_in_batch: torch.Tensor | int | None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The total and terms of `loss` as this process differentiates and logs them: `num_items_in_batch` counts
        the tokens of every process, and DDP averages gradients over processes, so they are multiplied back."""
        if not (self.args.average_tokens_across_devices and num_items_in_batch is not None):
            return loss.total, loss.terms
        scale = self.accelerator.num_processes
        return loss.total * scale, {name: value * scale for name, value in loss.terms.items()}

    def _record(self, total: torch.Tensor, terms: Mapping[str, torch.Tensor]) -> None:
        """Note a training micro-batch's terms: for the logs, and for the non-finite check before the step."""
        step = self.state.global_step
        for name, value in {"total": total, **terms}.items():  # checked before the optimizer step, one sync
            bad = ~torch.isfinite(value.detach())
            self._non_finite[name] = self._non_finite[name] | bad if name in self._non_finite else bad
        for name, value in terms.items():
            self._window.add(step, f"loss_{name}", value)
        for name, weight in zip(("student_weight", "distill_weight"), self._term_weights(evaluating=False)):
            self._window.add(step, name, torch.tensor(weight, device=total.device), True)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """The MatTA objective of this micro-batch, normalised by the valid tokens of the whole optimizer step
        (`num_items_in_batch`) and recorded term by term for logging."""
        loss, logits = self.matta_loss(model, inputs, num_items=num_items_in_batch)
        total, terms = self._scaled(loss, num_items_in_batch)
        if model.training:
            self._record(total, terms)
        if return_outputs:
            return total, {"loss": total, "logits": logits.get(self._config.student_width)}
        return total

    # ---- logging and evaluation ----

    def _any_process(self, flag: bool) -> bool:
        """Whether `flag` is set on any process (a collective: every process calls it)."""
        if self.accelerator.num_processes == 1:
            return flag
        return bool(self.accelerator.reduce(torch.tensor(float(flag), device=self.args.device), "sum") > 0)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Trainer's log; a training log (one with `loss`) also gets every term's mean over the logging window."""
        if "loss" in logs:
            logs = {**logs, **self._window.pop_means(lambda sums: self.accelerator.reduce(sums, "mean"))}
        super().log(logs, start_time)

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        """The objective on an evaluation batch (every term at once), plus the cross-entropy sum and token count of
        every granularity, accumulated for `eval_loss_w{w}` and `eval_ppl_w{w}`, and the collapse diagnostics
        (`hf_matta.diagnostics`): KL(TA || student) and the split of the TA's FFN outputs by neuron."""
        inputs = self._prepare_inputs(inputs)
        config, chunk_size = self._config, self.args.loss_chunk_size or None
        with torch.no_grad(), self.compute_loss_context_manager():
            with FFNSplitProbe(self.accelerator.unwrap_model(model), config.student_width) as probe:
                loss, logits = self.matta_loss(model, inputs, evaluating=True)
            labels, model_inputs = self._split_batch(inputs)
            ta_width = config.mat_widths[-1]
            if config.student_width != ta_width:  # is the TA teaching anything? (hf_matta.diagnostics)
                student_logits = logits[config.student_width]
                kl_sum = kl_divergence(
                    logits[ta_width], student_logits, labels, 1, chunk_size=chunk_size, compiled=self.compiled_loss
                )
                self._eval_sums["kl_ta_student"] = self._eval_sums.get("kl_ta_student", 0.0) + kl_sum
                self._eval_sums["ffn_split"] = self._eval_sums.get("ffn_split", 0.0) + probe.sums
            for width in config.mat_widths:
                width_logits = logits.get(width)
                if width_logits is None:
                    width_logits = model(**model_inputs, ffn_widths=width, use_cache=False).logits
                ce_sum = cross_entropy(
                    width_logits, labels, num_items=1, chunk_size=chunk_size, compiled=self.compiled_loss
                )
                sums = torch.stack([ce_sum, count_valid_tokens(labels).to(ce_sum)])
                self._eval_sums[width] = self._eval_sums.get(width, 0.0) + sums
        if prediction_loss_only:
            return loss.total, None, None
        return loss.total, logits[config.student_width], labels

    def evaluation_loop(
        self, dataloader, description, prediction_loss_only=None, ignore_keys=None, metric_key_prefix="eval"
    ):
        """Trainer's loop, whose metrics also hold the loss and perplexity of every granularity (token-weighted
        over all processes)."""
        self._eval_sums = {}
        output = super().evaluation_loop(dataloader, description, prediction_loss_only, ignore_keys, metric_key_prefix)
        sums = {key: self.accelerator.reduce(value, "sum") for key, value in sorted(self._eval_sums.items(), key=str)}
        self._eval_sums = {}
        tokens = max(sums[self._config.student_width][1].item(), 1)
        for width in self._config.mat_widths:
            loss = sums[width][0].item() / tokens
            output.metrics[f"{metric_key_prefix}_loss_w{width}"] = loss
            output.metrics[f"{metric_key_prefix}_ppl_w{width}"] = math.exp(min(loss, 100.0))
        if "kl_ta_student" in sums:
            output.metrics[f"{metric_key_prefix}_kl_ta_student"] = sums["kl_ta_student"].item() / tokens
            output.metrics.update(ffn_split_metrics(sums["ffn_split"], prefix=f"{metric_key_prefix}_"))
        return output

    def train(self, *args, **kwargs):
        """Trainer's train; after a SIGTERM it has saved a checkpoint, and the process exits with status 143."""
        try:
            output = super().train(*args, **kwargs)
        finally:  # a training that raised skipped on_train_end: SIGTERM must not stay caught (processes forked later
            self._preemption.release()  # would ignore it, and Pool.terminate would wait for them forever)
        if self._preemption.preempted:
            raise SystemExit(PREEMPTED_EXIT_STATUS)
        return output


__all__ = [
    "MatTATrainer", "NonFiniteLossError", "check_output_dir", "check_ta_neuron_lr_scale", "check_teacher_location",
    "load_teacher",
]
