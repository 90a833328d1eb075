"""MatTATrainingArguments and MatTATrainer on tiny in-process models (CPU, seconds)."""

import contextlib
import copy
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from accelerate.state import AcceleratorState
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from transformers import GPT2Config, GPT2LMHeadModel, HfArgumentParser, PreTrainedTokenizerFast, TrainingArguments
from transformers.integrations.deepspeed import unset_hf_deepspeed_config

from hf_matta import MatGPT2Config, MatGPT2LMHeadModel
from hf_matta.models.matgpt2 import nested_ffn_parameters
from hf_matta.trainer import PREEMPTED_EXIT_STATUS, MatTATrainer
from hf_matta.training_args import MatTATrainingArguments

from .conftest import VOCAB, tiny_kwargs


def _args(tmp_path, **overrides) -> MatTATrainingArguments:
    return MatTATrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none", **overrides)


BAD_ARGS = [  # (field values, text the error must hold)
    (dict(student_weight=-1.0), "student_weight=-1.0"),
    (dict(ta_weight=-0.5), "ta_weight=-0.5"),
    (dict(distill_weight=-2.0), "distill_weight=-2.0"),
    (dict(student_weight=0.0, ta_weight=0.0, distill_weight=0.0), "all 0"),
    (dict(distill_temperature=0.0), "distill_temperature=0.0"),
    (dict(teacher_temperature=-1.0), "teacher_temperature=-1.0"),
    (dict(distill_warmup_steps=-3), "distill_warmup_steps=-3"),
    (dict(ta_first_steps=-1), "ta_first_steps=-1"),
    (dict(student_warmup_steps=-0.5), "student_warmup_steps=-0.5"),
    (dict(teacher_weight=1.5), "teacher_weight=1.5"),
    (dict(extra_widths="some"), "extra_widths='some'"),
    (dict(width_schedule="random"), "width_schedule='random'"),
    (dict(optimizer="lamb"), "optimizer='lamb'"),
    (dict(grafting="adagrad"), "grafting='adagrad'"),
    (dict(loss_chunk_size=-1), "loss_chunk_size=-1"),
    (dict(max_preconditioner_dim=0), "max_preconditioner_dim=0"),
    (dict(precondition_frequency=0), "precondition_frequency=0"),
    (dict(start_preconditioning_step=-1), "start_preconditioning_step=-1"),
    (dict(shampoo_epsilon=0.0), "shampoo_epsilon=0.0"),
    (dict(ta_neuron_lr_scale=0.0), "ta_neuron_lr_scale=0.0"),
    (dict(ta_neuron_lr_scale=float("nan")), "ta_neuron_lr_scale=nan"),
]


@pytest.mark.parametrize("overrides,message", BAD_ARGS)
def test_bad_arguments_name_the_value(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        _args(tmp_path, **overrides)


def test_arguments_parse_from_the_command_line(tmp_path):
    parser = HfArgumentParser(MatTATrainingArguments)
    (args,) = parser.parse_args_into_dataclasses(
        ["--output_dir", str(tmp_path), "--optimizer", "shampoo", "--no_detach_ta_targets", "--teacher_weight",
         "0.3", "--extra_widths", "sample", "--width_schedule", "sample_one", "--loss_chunk_size", "0"]
    )
    assert (args.optimizer, args.detach_ta_targets, args.teacher_weight) == ("shampoo", False, 0.3)
    assert (args.extra_widths, args.width_schedule, args.loss_chunk_size) == ("sample", "sample_one", 0)
    defaults = _args(tmp_path)
    assert defaults.optimizer is None and defaults.detach_ta_targets and defaults.width_schedule == "all"


@pytest.mark.parametrize(
    "warmup,step,expected",
    [(0, 0, 2.0), (10, 0, 0.0), (10, 5, 1.0), (10, 10, 2.0), (10, 50, 2.0), (0.1, 5, 1.0), (0.1, 20, 2.0)],
)
def test_distill_weight_ramps_linearly(tmp_path, warmup, step, expected):
    args = _args(tmp_path, distill_weight=2.0, distill_warmup_steps=warmup)
    assert args.distill_weight_at(step, num_training_steps=100) == pytest.approx(expected)


SCHEDULES = [  # (ta_first_steps, student_warmup_steps, distill_warmup_steps, step, (w_S, w_D)) of 100 steps
    (0, 0, 0, 0, (3.0, 2.0)),
    (10, 0, 0, 9, (0.0, 0.0)),
    (10, 0, 0, 10, (3.0, 2.0)),
    (10, 20, 10, 15, (0.75, 1.0)),
    (10, 20, 10, 30, (3.0, 2.0)),
    (0.2, 0.1, 0.4, 19, (0.0, 0.0)),
    (0.2, 0.1, 0.4, 25, (1.5, 0.25)),
    (0.2, 0, 0.4, 60, (3.0, 2.0)),
]


@pytest.mark.parametrize("ta_first,student_warmup,distill_warmup,step,expected", SCHEDULES)
def test_ta_first_phase_then_student_and_distillation_ramp_in(
    tmp_path, ta_first, student_warmup, distill_warmup, step, expected
):
    args = _args(
        tmp_path, student_weight=3.0, distill_weight=2.0, ta_first_steps=ta_first,
        student_warmup_steps=student_warmup, distill_warmup_steps=distill_warmup,
    )  # fmt: skip
    weights = (args.student_weight_at(step, 100), args.distill_weight_at(step, 100))
    assert weights == pytest.approx(expected)


# ---- MatTATrainer ----

MODULUS = 40  # the toy language: each token is the previous one plus one, modulo MODULUS


def _sequences(n: int, min_len: int = 16, max_len: int = 16, seed: int = 0) -> list[dict]:
    """`n` counting sequences of random start and length: trivially learnable, so losses fall within steps."""
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        length = int(torch.randint(min_len, max_len + 1, (1,), generator=generator))
        start = int(torch.randint(0, MODULUS, (1,), generator=generator))
        rows.append({"input_ids": [(start + i) % MODULUS for i in range(length)]})
    return rows


def _collate(rows: list[dict]) -> dict[str, torch.Tensor]:
    """Right-pad to the longest row: pad id 0, attention mask 0, label -100."""
    width = max(len(row["input_ids"]) for row in rows)
    input_ids = torch.zeros(len(rows), width, dtype=torch.long)
    attention_mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, row in enumerate(rows):
        input_ids[i, : len(row["input_ids"])] = torch.tensor(row["input_ids"])
        attention_mask[i, : len(row["input_ids"])] = 1
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def _student(seed: int = 0, widths=(16, 32, 64)) -> MatGPT2LMHeadModel:
    torch.manual_seed(seed)
    return MatGPT2LMHeadModel(MatGPT2Config(**tiny_kwargs(mat_widths=list(widths))))


@pytest.fixture(scope="module")
def teacher() -> GPT2LMHeadModel:
    """A tiny GPT-2 that has learnt the toy language (40 Adam steps)."""
    torch.manual_seed(1)
    model = GPT2LMHeadModel(GPT2Config(**tiny_kwargs()))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for step in range(40):
        batch = _collate(_sequences(8, seed=100 + step))
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return model.eval()


def _trainer(tmp_path, model=None, teacher=None, data=None, **overrides) -> MatTATrainer:
    defaults = dict(
        per_device_train_batch_size=4, max_steps=30, learning_rate=1e-2, logging_steps=5, save_strategy="no",
        seed=0, disable_tqdm=True, lr_scheduler_type="constant",
    )
    return MatTATrainer(
        model=_student() if model is None else model,
        args=_args(tmp_path, **{**defaults, **overrides}),
        train_dataset=_sequences(32) if data is None else data,
        eval_dataset=_sequences(8, seed=1),
        data_collator=_collate,
        teacher_model=copy.deepcopy(teacher),
    )


TERMS = [
    "loss", "loss_student", "loss_ta", "loss_distill", "loss_w32", "loss_distill_w32", "student_weight",
    "distill_weight",
]


def test_short_run_lowers_student_and_ta_and_logs_every_term(tmp_path, teacher):
    trainer = _trainer(tmp_path, teacher=teacher, extra_widths="all", teacher_weight=0.5, distill_warmup_steps=10)
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert [entry["step"] for entry in logs] == [5, 10, 15, 20, 25, 30]
    for entry in logs:
        assert set(TERMS) <= entry.keys(), entry
    first, last = logs[0], logs[-1]
    assert last["loss_student"] < 0.7 * first["loss_student"]
    assert last["loss_ta"] < 0.7 * first["loss_ta"]
    # w_D ramps over 10 steps: steps 0..4 average 0.2, from step 10 on it is 1
    assert first["distill_weight"] == pytest.approx(0.2) and last["distill_weight"] == 1.0
    metrics = trainer.evaluate()
    for width in (16, 32, 64):
        assert metrics[f"eval_ppl_w{width}"] == pytest.approx(math.exp(metrics[f"eval_loss_w{width}"]))
    assert metrics["eval_loss_w64"] < math.log(VOCAB)
    # the teacher stayed frozen and is saved nowhere
    assert not trainer.teacher.training
    for name, parameter in trainer.teacher.named_parameters():
        assert not parameter.requires_grad and torch.equal(parameter, teacher.state_dict()[name])
    trainer.save_model(str(tmp_path / "final"))
    saved = load_file(str(tmp_path / "final" / "model.safetensors"))
    assert set(saved) <= set(trainer.model.state_dict())


def test_ta_first_phase_skips_the_student_forward(tmp_path):
    """While the TA goes first no forward runs below full width; afterwards the student's terms are back."""
    trainer = _trainer(tmp_path, ta_first_steps=10, extra_widths="all", max_steps=20)
    widths_by_step: dict[int, set] = {}
    trainer.model.transformer.h[0].mlp.c_fc.register_forward_pre_hook(
        lambda module, args: widths_by_step.setdefault(trainer.state.global_step, set()).add(args[1])
    )
    trainer.train()
    assert all(widths_by_step[step] == {64} for step in range(10)), widths_by_step
    assert all(widths_by_step[step] == {16, 32, 64} for step in range(10, 20)), widths_by_step
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert [("loss_student" in entry, entry["student_weight"]) for entry in logs] == [
        (False, 0.0), (False, 0.0), (True, 1.0), (True, 1.0)
    ]


@pytest.mark.parametrize("ta_backward_first", [True, False])
def test_mixed_extra_widths_train_one_mix_n_match_plan_per_step(tmp_path, ta_backward_first):
    """`extra_widths="mixed"`: besides the TA and the student, each step runs one per-layer plan drawn from the
    granularities, never the uniform student or TA, the same plan in every layer's view of the step; its terms are
    logged as `mixed`, and a rerun draws the same plans. With the TA's backward first or one backward of all."""
    plans = []
    for run in range(2):
        trainer = _trainer(
            tmp_path / str(run), extra_widths="mixed", max_steps=20, ta_backward_first=ta_backward_first
        )
        widths_by_layer: dict[int, list[list[int]]] = {}
        for index, block in enumerate(trainer.model.transformer.h):
            block.mlp.c_fc.register_forward_pre_hook(
                lambda module, args, index=index: widths_by_layer.setdefault(index, []).append(args[1])
            )
        trainer.train()
        # per step: the TA's forward, the student's, then the plan's
        steps = [list(zip(*(widths_by_layer[i][k : k + 3] for i in (0, 1)))) for k in range(0, 60, 3)]
        assert all(ta == (64, 64) and student == (16, 16) for ta, student, _ in steps), steps
        plans.append([plan for _, _, plan in steps])
        logs = [entry for entry in trainer.state.log_history if "loss" in entry]
        assert all({"loss_mixed", "loss_distill_mixed"} <= entry.keys() for entry in logs), logs
    assert plans[0] == plans[1]
    assert all(set(plan) <= {16, 32, 64} and plan not in ((16, 16), (64, 64)) for plan in plans[0]), plans[0]
    assert any(plan[0] != plan[1] for plan in plans[0]), plans[0]  # layers of different widths
    assert len(set(plans[0])) > 3, plans[0]


def test_a_single_granularity_model_trains_from_the_first_step_whatever_the_schedule(tmp_path, teacher):
    """A KD baseline trained with a MatTA config (the pipeline's `baseline: true`): with no TA to go first, the
    TA-first phase and the ramps must not stop or shrink its training. Same weights as a run without the schedule."""
    params = []
    schedule = dict(ta_first_steps=0.4, student_warmup_steps=0.3, distill_warmup_steps=0.3, extra_widths="mixed")
    for schedule in (schedule, dict()):  # with no other plan, `mixed` trains none
        trainer = _trainer(tmp_path / str(len(params)), model=_student(widths=(16,)), teacher=teacher,
                           teacher_weight=0.5, max_steps=10, **schedule)  # fmt: skip
        trainer.train()
        logs = [entry for entry in trainer.state.log_history if "loss" in entry]
        assert [entry["student_weight"] for entry in logs] == [1.0, 1.0], logs
        assert all(entry["loss"] > 0 for entry in logs), logs
        params.append(torch.cat([p.detach().flatten() for p in trainer.model.parameters()]))
    torch.testing.assert_close(params[0], params[1])


GA_CASES = [  # MatTA settings that every micro-batch split must leave unchanged
    dict(),
    dict(extra_widths="all", teacher_weight=0.5, distill_temperature=2.0),
    dict(detach_ta_targets=False, teacher_weight=1.0, loss_chunk_size=0),
]


@pytest.mark.parametrize("settings", GA_CASES)
def test_gradient_accumulation_does_not_change_the_step(tmp_path, teacher, settings):
    data = _sequences(8, min_len=3, max_len=16, seed=3)  # padded: micro-batches hold different token counts
    params = {}
    for batch, accumulation in ((8, 1), (4, 2)):
        trainer = _trainer(
            tmp_path / f"ga{accumulation}", teacher=teacher, data=data, optim="sgd", learning_rate=0.5, max_steps=1,
            max_grad_norm=0.0,  # clipping would hide a scale error, as Adam's normalisation would
            per_device_train_batch_size=batch, gradient_accumulation_steps=accumulation, **settings,
        )
        trainer.train()
        params[accumulation] = {name: p.detach().clone() for name, p in trainer.model.named_parameters()}
    initial = dict(_student().named_parameters())
    assert any(not torch.allclose(params[1][name], initial[name]) for name in initial)
    for name in params[1]:
        torch.testing.assert_close(params[2][name], params[1][name], atol=1e-5, rtol=0)


BACKWARD_CASES = [  # (MatTA settings, gradient_accumulation_steps, dropout)
    (dict(), 1, 0.0),
    (dict(extra_widths="all", teacher_weight=0.5, distill_temperature=2.0, distill_weight=0.7), 1, 0.0),
    (dict(extra_widths="all", teacher_weight=0.5, teacher_temperature=2.0), 2, 0.0),
    (dict(loss_chunk_size=0, teacher_weight=1.0, ta_weight=2.0), 2, 0.0),
    (dict(teacher_weight=0.5), 2, 0.1),  # dropout: both steps run the TA first, so they draw the same masks
]


@pytest.mark.parametrize("optimizer", ["adamw", None])  # hf_matta's AdamW, and Trainer's own `optim` (AdamW too)
def test_ta_neuron_lr_scale_multiplies_the_ta_only_neurons_step(tmp_path, teacher, optimizer):
    """A step at ta_neuron_lr_scale=3 against the same step at 1: every parameter outside the TA-only FFN slices
    lands where it did, and the slices move three times as far (AdamW's update is element-wise: a 3x learning rate
    there)."""
    initial = dict(_student().named_parameters())
    moved = {}
    for scale in (1.0, 3.0):
        trainer = _trainer(
            tmp_path / str(scale), teacher=teacher, optimizer=optimizer, max_steps=1, weight_decay=0.1,
            extra_widths="all", ta_neuron_lr_scale=scale,
        )
        trainer.train()
        moved[scale] = {name: p.detach() - initial[name].detach() for name, p in trainer.model.named_parameters()}
    nested = {**nested_ffn_parameters(0), **nested_ffn_parameters(1)}
    student_width, scaled = 16, 0
    for name, step in moved[1.0].items():
        expected = step.clone()
        dim = nested.get(name)
        if dim is not None:
            expected.narrow(dim, student_width, step.shape[dim] - student_width).mul_(3.0)
            scaled += 1
        torch.testing.assert_close(moved[3.0][name], expected, atol=1e-6, rtol=1e-4)
    assert scaled == 6  # three nested tensors in each of the two layers
    assert moved[1.0]["transformer.h.0.mlp.c_fc.weight"][:, student_width:].abs().min() > 0  # the TA-only part moved


@pytest.mark.parametrize("settings,accumulation,dropout", BACKWARD_CASES)
def test_ta_backward_first_takes_the_one_backward_step(tmp_path, teacher, settings, accumulation, dropout):
    """The TA's terms and backward first, then the student's against the TA's detached logits: the step that one
    backward of the whole objective takes (weights after an SGD step, logged loss), with two backwards per
    micro-batch instead of one."""
    data = _sequences(8, min_len=3, max_len=16, seed=3)  # padded: micro-batches hold different token counts
    params, backwards, losses = {}, {}, {}
    for first in (True, False):
        torch.manual_seed(0)
        model = MatGPT2LMHeadModel(MatGPT2Config(**tiny_kwargs(mat_widths=[16, 32, 64], resid_pdrop=dropout)))
        trainer = _trainer(
            tmp_path / str(first), model=model, teacher=teacher, data=data, optim="sgd", learning_rate=0.5,
            max_steps=1, max_grad_norm=0.0, per_device_train_batch_size=8 // accumulation,
            gradient_accumulation_steps=accumulation, ta_backward_first=first, **settings,
        )  # fmt: skip
        calls = []
        backward = trainer.accelerator.backward
        trainer.accelerator.backward = lambda loss, **kwargs: (calls.append(loss.item()), backward(loss, **kwargs))
        trainer.train()
        backwards[first] = len(calls)
        losses[first] = trainer.state.log_history[-1]["train_loss"]
        params[first] = {name: p.detach().clone() for name, p in trainer.model.named_parameters()}
    assert backwards == {True: 2 * accumulation, False: accumulation}
    assert losses[True] == pytest.approx(losses[False], rel=1e-6)
    initial = dict(_student().named_parameters())
    assert any(not torch.allclose(params[True][name], initial[name]) for name in initial)
    for name in params[True]:
        torch.testing.assert_close(params[True][name], params[False][name], atol=1e-6, rtol=0)


def test_the_tas_backward_leaves_trainers_no_sync_in_force(tmp_path, monkeypatch):
    """In a micro-batch before the step's last, Trainer has turned gradient synchronisation off: the TA's backward
    enters no second no_sync, whose exit would turn it back on for the student's backward (as FSDP2's does)."""
    trainer = _trainer(tmp_path)
    syncing = [True]

    @contextlib.contextmanager
    def no_sync(model):  # accelerate's under FSDP2: set_requires_gradient_sync(False), then True at exit
        syncing[0] = False
        try:
            yield
        finally:
            syncing[0] = True

    monkeypatch.setattr(trainer.accelerator, "no_sync", no_sync)
    state = trainer.accelerator.gradient_state
    try:
        state._set_sync_gradients(False)  # a micro-batch before the last: Trainer's loop runs it under no_sync
        with trainer.accelerator.no_sync(trainer.model):
            with trainer._gradients_kept_local(trainer.model):
                assert not syncing[0]
            assert not syncing[0] and not state.sync_gradients  # the student's backward does not synchronise
        state._set_sync_gradients(True)  # the step's last micro-batch: only the TA's backward waits
        with trainer._gradients_kept_local(trainer.model):
            assert not syncing[0] and not state.sync_gradients
        assert syncing[0] and state.sync_gradients
    finally:
        state._set_sync_gradients(True)


DDP_SCRIPT = """
import os, sys
import torch
torch.set_num_threads(1)
sys.path.insert(0, {root!r})
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
from transformers import TrainerCallback
from tests.test_trainer import _data_parallel_trainer

class CountAllReduces(TrainerCallback):
    def __init__(self, trainer):
        self.trainer, self.calls = trainer, 0

    def on_train_begin(self, args, state, control, **kwargs):
        def hook(process_group, bucket):
            self.calls += 1
            return allreduce_hook(process_group, bucket)
        self.trainer.model_wrapped.register_comm_hook(None, hook)

results = {{}}
for first in (True, False):  # 2 processes x 2 micro-batches of 2 sequences
    trainer = _data_parallel_trainer(os.path.join({out!r}, str(first)), batch=2, gradient_accumulation_steps=2,
                                     ta_backward_first=first)
    counter = CountAllReduces(trainer)
    trainer.add_callback(counter)
    trainer.train()
    assert type(trainer.model_wrapped).__name__ == "DistributedDataParallel" and trainer.args.world_size == 2
    results[first] = dict(params=dict(trainer.model.named_parameters()), all_reduces=counter.calls)
if trainer.args.process_index == 0:
    torch.save(results, os.path.join({out!r}, "results.pt"))
sys.stdout.flush()
os._exit(0)  # torch.distributed's CPU teardown sometimes aborts after a clean run
"""


def _data_parallel_trainer(out, batch: int, **overrides) -> MatTATrainer:
    """One SGD step on 8 padded sequences, with every term on: the run of the tests in subprocesses."""
    torch.manual_seed(1)
    teacher = GPT2LMHeadModel(GPT2Config(**tiny_kwargs()))
    settings = dict(optim="sgd", learning_rate=0.5, max_steps=1, max_grad_norm=0.0, extra_widths="all")
    return _trainer(
        out, teacher=teacher, data=_sequences(8, min_len=3, max_len=16, seed=3), per_device_train_batch_size=batch,
        teacher_weight=0.5, **{**settings, **overrides},
    )


@pytest.mark.slow  # about 40 s: two processes start torch and transformers
def test_data_parallelism_does_not_change_the_step(tmp_path):
    """2 processes x 2 micro-batches x 2 sequences (DDP over gloo) take the step that 1 process x 8 sequences takes,
    with the TA's backward first or one backward, and synchronise gradients as often either way (the TA's backward
    runs under no_sync)."""
    root = str(Path(__file__).resolve().parents[1])
    script = tmp_path / "ddp.py"
    script.write_text(DDP_SCRIPT.format(root=root, out=str(tmp_path)))
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", str(script)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=root)
    assert result.returncode == 0, result.stderr[-3000:]
    results = torch.load(tmp_path / "results.pt")
    assert results[True]["all_reduces"] == results[False]["all_reduces"] > 0, results
    trainer = _data_parallel_trainer(tmp_path / "single", batch=8)
    trainer.train()
    for name, value in trainer.model.named_parameters():
        for first in (True, False):
            torch.testing.assert_close(results[first]["params"][name], value.detach(), atol=1e-5, rtol=0)


DEEPSPEED_SCRIPT = """
import os, sys
os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT="29544")
import deepspeed, torch
torch.set_num_threads(1)
sys.path.insert(0, {root!r})
from tests.test_trainer import _data_parallel_trainer
config = {{"zero_optimization": {{"stage": {stage}}}, "train_micro_batch_size_per_gpu": "auto",
          "gradient_accumulation_steps": "auto", "train_batch_size": "auto", "gradient_clipping": "auto",
          "zero_allow_untested_optimizer": True}}
results = {{}}
for first in (True, False):
    trainer = _data_parallel_trainer(os.path.join({out!r}, str(first)), batch=4, gradient_accumulation_steps=2,
                                     logging_steps=1, deepspeed=config, ta_backward_first=first)
    trainer.train()
    with deepspeed.zero.GatheredParameters(list(trainer.model.parameters())):  # ZeRO-3 partitions them
        params = {{name: p.detach().clone() for name, p in trainer.model.named_parameters()}}
    results[first] = dict(params=params, optimizer_steps=trainer.deepspeed.global_steps,
                          teacher=type(trainer.teacher).__name__, logged=sorted(trainer.state.log_history[0]))
torch.save(results, os.path.join({out!r}, "results.pt"))
sys.stdout.flush()
os._exit(0)
"""


@pytest.mark.slow  # about 40 s each: DeepSpeed starts and builds an op on first use
@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_takes_the_one_backward_step_and_runs_the_teacher_as_an_engine(tmp_path, stage):
    """Under ZeRO-2/3 (one process, 2 micro-batches), the TA's backward first takes the one-backward step, and
    DeepSpeed steps its optimizer once (not after the TA's backward); the teacher is a DeepSpeed inference engine."""
    root = str(Path(__file__).resolve().parents[1])
    script = DEEPSPEED_SCRIPT.format(root=root, out=str(tmp_path), stage=stage)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600, cwd=root)
    assert result.returncode == 0, result.stderr[-3000:]
    results = torch.load(tmp_path / "results.pt")
    for first in (True, False):
        assert results[first]["optimizer_steps"] == 1 and results[first]["teacher"] == "DeepSpeedEngine"
        assert {"loss_distill", "loss_student", "loss_ta"} <= set(results[first]["logged"])
    initial = dict(_student().named_parameters())
    assert any(not torch.allclose(results[True]["params"][name], initial[name]) for name in initial)
    for name, value in results[False]["params"].items():
        torch.testing.assert_close(results[True]["params"][name], value, atol=1e-6, rtol=0)


def test_step_loss_is_gpt2s_own_loss_without_teacher_or_ta(tmp_path):
    """One granularity and no teacher: the objective is GPT-2's loss, normalised by Trainer's token count."""
    model = _student(widths=(64,))
    trainer = _trainer(tmp_path, model=model)
    batch = _collate(_sequences(4, min_len=3, max_len=12, seed=5))
    _, num_items = trainer.get_batch_samples(iter([batch]), 1, trainer.args.device)
    loss = trainer.compute_loss(model, batch, num_items_in_batch=num_items)
    torch.testing.assert_close(loss, model(**batch).loss)


RESUME_CASES = [  # (settings, the optimizer class that must run)
    (dict(), "AdamW"),  # Trainer's own `optim`
    (dict(width_schedule="sample_one", extra_widths="sample", distill_warmup_steps=4), "AdamW"),
    (dict(optimizer="adamw"), "AdamW"),  # hf_matta.optim's
    # preconditioners computed at steps 2 and 4, on both sides of the checkpoint
    (dict(optimizer="shampoo", precondition_frequency=2, start_preconditioning_step=2), "ScalableShampoo"),
    (dict(optimizer="soap"), "SOAP"),
    (dict(ta_neuron_lr_scale=2.0), "AdamW"),  # the TA-only neurons' step hooks hold no state between steps
]


@pytest.mark.parametrize("settings,optimizer", RESUME_CASES)
def test_resume_is_bit_exact(tmp_path, teacher, settings, optimizer):
    n = 3
    common = dict(teacher=teacher, max_steps=2 * n, save_strategy="steps", save_steps=n, **settings)
    trainers = {"uninterrupted": _trainer(tmp_path / "a", **common), "resumed": _trainer(tmp_path / "b", **common)}
    checkpoint = tmp_path / "a" / f"checkpoint-{n}"
    trainers["uninterrupted"].train()
    trainers["resumed"].train(resume_from_checkpoint=str(checkpoint))
    resumed = dict(trainers["resumed"].model.named_parameters())
    for name, value in trainers["uninterrupted"].model.named_parameters():
        assert torch.equal(resumed[name], value), name
    built = trainers["resumed"].optimizer.optimizer  # inside accelerate's wrapper
    assert optimizer in [cls.__name__ for cls in type(built).__mro__]
    assert set(load_file(str(checkpoint / "model.safetensors"))) <= set(resumed)  # no teacher inside


SIGTERM_SCRIPT = """
import os, signal, sys
import torch
torch.set_num_threads(1)
sys.path.insert(0, {root!r})
from tests.test_trainer import _trainer
from transformers import TrainerCallback

class Preempt(TrainerCallback):
    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step == 3:
            os.kill(os.getpid(), signal.SIGTERM)

trainer = _trainer({out!r}, max_steps=1000)
trainer.add_callback(Preempt())
trainer.train()
print("training went on after SIGTERM")
"""


def test_sigterm_saves_a_checkpoint_then_exits(tmp_path):
    root = str(Path(__file__).resolve().parents[1])
    script = SIGTERM_SCRIPT.format(root=root, out=str(tmp_path))
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, cwd=root)
    assert result.returncode == PREEMPTED_EXIT_STATUS, result.stderr[-2000:]
    assert "training went on" not in result.stdout
    checkpoint = tmp_path / "checkpoint-4"  # the step in flight when the signal came finishes first
    assert (checkpoint / "model.safetensors").is_file() and (checkpoint / "optimizer.pt").is_file()
    assert json.loads((checkpoint / "trainer_state.json").read_text())["global_step"] == 4


def _tokenizer(order: list[int]) -> PreTrainedTokenizerFast:
    vocab = {f"t{i}": rank for rank, i in enumerate(order)}
    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer(WordLevel(vocab, unk_token="t0")))


BAD_INPUTS = [  # (builder of MatTATrainer kwargs, exception, text the error must hold)
    (lambda tmp_path: dict(model=GPT2LMHeadModel(GPT2Config(**tiny_kwargs())), args=_args(tmp_path)),
     TypeError, "MatTATrainer trains a MatGPT2LMHeadModel, got GPT2LMHeadModel"),
    (lambda tmp_path: dict(model=_student(), args=TrainingArguments(str(tmp_path))),
     TypeError, "needs MatTATrainingArguments"),
    (lambda tmp_path: dict(model=_with(_student(), student_width=24), args=_args(tmp_path)),
     ValueError, r"student_width=24 is not one of the model's granularities mat_widths=\[16, 32, 64\]"),
    (lambda tmp_path: dict(model=MatGPT2LMHeadModel(MatGPT2Config(**tiny_kwargs(n_inner=[64, 32]))),
                               args=_args(tmp_path)),
     ValueError, r"n_inner=\[64, 32\] differs between layers"),
    (lambda tmp_path: dict(model=_student(), args=_args(tmp_path),
                               teacher_model=GPT2LMHeadModel(GPT2Config(**tiny_kwargs(vocab_size=100)))),
     ValueError, "teacher's vocab_size=100 differs from the student's vocab_size=99"),
    (lambda tmp_path: dict(model=_student(), args=_args(tmp_path), processing_class=_tokenizer(list(range(99))),
                               teacher_model=GPT2LMHeadModel(GPT2Config(**tiny_kwargs())),
                               teacher_processing_class=_tokenizer([1, 0, *range(2, 99)])),
     ValueError, "teacher's tokenizer differs from the student's"),
    (lambda tmp_path: dict(model=_student(widths=(64,)), args=_args(tmp_path, ta_neuron_lr_scale=2.0)),
     ValueError, r"ta_neuron_lr_scale=2.0 scales the steps .* this model has none \(student_width=64"),
    (lambda tmp_path: dict(model=(model := _student()), args=_args(tmp_path, ta_neuron_lr_scale=2.0),
                           optimizers=(torch.optim.SGD(model.parameters(), lr=0.1), None)),
     ValueError, r"ta_neuron_lr_scale=2.0 scales the steps of the optimizer the trainer builds, but one was given"),
    (lambda tmp_path: dict(model=_student(),
                           args=_args(tmp_path, ta_neuron_lr_scale=2.0, optim="schedule_free_adamw")),
     ValueError, r"cannot scale the steps of optim='schedule_free_adamw'"),
]


def _with(model, **config):
    for key, value in config.items():
        setattr(model.config, key, value)
    return model


@pytest.mark.parametrize("build,exception,message", BAD_INPUTS)
def test_bad_inputs_fail_at_construction(tmp_path, build, exception, message):
    with pytest.raises(exception, match=message):
        MatTATrainer(train_dataset=_sequences(4), data_collator=_collate, **build(tmp_path))


@pytest.mark.parametrize("overrides,message", [
    (dict(optimizer="shampoo"), "optimizer='shampoo' cannot run under DeepSpeed ZeRO"),
    (dict(optimizer="adamw", ta_neuron_lr_scale=2.0), "ta_neuron_lr_scale=2.0 cannot run under DeepSpeed or FSDP"),
])  # fmt: skip
def test_optimizer_settings_that_need_whole_parameters_fail_under_deepspeed(tmp_path, monkeypatch, overrides, message):
    # TrainingArguments(deepspeed=...) sets ACCELERATE_USE_DEEPSPEED: registering it here makes monkeypatch undo it
    env = dict(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT="29533",
               ACCELERATE_USE_DEEPSPEED="false")
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    deepspeed = {"zero_optimization": {"stage": 2}, "train_micro_batch_size_per_gpu": "auto"}
    try:
        with pytest.raises(ValueError, match=message):
            args = _args(tmp_path, deepspeed=deepspeed, **overrides)
            MatTATrainer(model=_student(), args=args, train_dataset=_sequences(4), data_collator=_collate)
    finally:  # DeepSpeed's process group and accelerate's state are process-wide: later trainers must not see them
        unset_hf_deepspeed_config()
        AcceleratorState._reset_state(reset_partial_state=True)
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def test_teacher_from_a_path_or_a_peft_adapter(tmp_path, teacher):
    teacher.save_pretrained(tmp_path / "base")
    lora = get_peft_model(
        GPT2LMHeadModel.from_pretrained(tmp_path / "base"),
        LoraConfig(r=4, target_modules=["c_attn"], init_lora_weights=False, fan_in_fan_out=True),
    )
    lora.save_pretrained(tmp_path / "adapter")
    input_ids = torch.randint(0, VOCAB, (2, 8))
    expected = {"base": teacher(input_ids).logits, "adapter": lora.eval()(input_ids).logits}
    assert not torch.allclose(expected["base"], expected["adapter"], atol=1e-4)
    for source in ("base", "adapter"):
        trainer = MatTATrainer(
            model=_student(), args=_args(tmp_path, teacher_model_name_or_path=str(tmp_path / source)),
            train_dataset=_sequences(4), data_collator=_collate,
        )
        assert isinstance(trainer.teacher, GPT2LMHeadModel)  # the adapter is merged
        torch.testing.assert_close(trainer._teacher_logits({"input_ids": input_ids}), expected[source])


def test_the_ta_runs_at_full_width_whatever_the_default_plan(tmp_path):
    """A nested checkpoint may serve a narrower plan by default (config.ffn_widths); training still runs its TA."""
    model = _student()
    model.config.ffn_widths = 16
    trainer = _trainer(tmp_path, model=model)
    batch = _collate(_sequences(4))
    _, logits = trainer.matta_loss(trainer.model, batch)
    with torch.no_grad():
        full = model(batch["input_ids"], attention_mask=batch["attention_mask"], ffn_widths=64).logits
        served = model(batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    torch.testing.assert_close(logits[64].detach(), full)
    assert (served - full).abs().max() > 1e-4
