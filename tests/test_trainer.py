"""MatTATrainingArguments and MatTATrainer on tiny in-process models (CPU, seconds)."""

import pytest
from transformers import HfArgumentParser

from hf_matta.training_args import MatTATrainingArguments


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
