"""Hostile inputs, PEFT-style: one table per entry point, one line per bad input, so that the next one is a line.

The probe of issue 14 tried 110 bad inputs on main (752a696) and found 12 defects. Each is reproduced below (or, for
those fixed while the pipeline moved into the package, by the test named here) and fails on the code before its fix:

 1. wrong-typed YAML values: test_pipeline.py::test_bad_configuration_is_refused (float-for-int, list-for-scalar);
    `None` unsets a field: test_pipeline.py::test_none_unsets_an_optional_field
 2. NaN / inf weights and temperatures: BAD_TRAINING_ARGUMENTS, BAD_RUNS, test_non_finite_values_on_the_command_line;
    non-finite losses during training: test_non_finite_loss_stops_with_a_checkpoint_of_the_last_good_step
 3. a teacher folder without tokenizer files: test_teacher_without_tokenizer_files_is_compared_by_vocabulary_size
 4. a teacher context shorter than the blocks: test_pipeline.py CHECKS["teacher-context-too-short"] (every run checks
    before its first stage) and test_teacher_context_is_checked_before_the_first_step (the Python API)
 5. a teacher pre-training killed while saving: test_killed_while_saving_the_teacher_leaves_no_teacher,
    test_the_next_run_completes_without_clean_up, BAD_RUNS["teacher-folder-without-weights"] (what such a kill left)
 6. output_dir equal to the teacher's folder: test_pipeline.py CHECKS["output-dir-is-the-teacher"] and
    test_output_dir_inside_the_teacher_is_refused_by_the_trainer
 7. two runs into one folder: test_pipeline.py::test_second_run_into_the_same_folder_is_refused
 8. hub_token in training_args.bin and checkpoints: test_trainer_saves_no_hub_token,
    test_no_file_or_log_holds_the_hub_token
 9. plans of 300 M layers: BAD_COMMAND_LINES["plan-of-300M-layers"], ["plan-of-1e11-layers"]
10. `extract --out PARENT --overwrite` deleting the nested model: BAD_COMMAND_LINES["out-replaces-the-model"],
    ["out-holds-the-model"]
11. `plans --max-blocks 0`, an empty or truncated `.pt`, `--batch-size 0` or `-1`: BAD_COMMAND_LINES
12. `plans --max-blocks -1` silently dropping a block: BAD_COMMAND_LINES["max-blocks-negative"]

The "poor" items: data files that are binary, Latin-1 or malformed (BAD_DATA_FILES); a missing teacher path
(test_missing_teacher_path_says_so); a corrupted or truncated safetensors file and non-finite weights
(BAD_COMMAND_LINES); warm-ups longer than the run and `max_steps 0` (BAD_TRAINING_ARGUMENTS, BAD_RUNS,
test_epoch_run_shorter_than_its_schedule_stops_before_the_first_step); caches relative to the working directory and no
absolute local path in a shared file (the killed-teacher run's tests).
"""

import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import GPT2Config, GPT2LMHeadModel

from hf_matta import MatGPT2Config, MatGPT2LMHeadModel
from hf_matta.cli import main
from hf_matta.data import BUILTIN_CORPORA, DataArguments, load_corpus, train_bpe_tokenizer
from hf_matta.pipeline import parse_args, run_pipeline
from hf_matta.trainer import MatTATrainer, NonFiniteLossError
from hf_matta.training_args import MatTATrainingArguments

from .conftest import tiny_kwargs
from .test_extract import char_tokenizer
from .test_pipeline import NO_DROPOUT, tiny_config, write_config
from .test_trainer import _args, _collate, _sequences, _student, _tokenizer, _trainer


NAN, INF = float("nan"), float("inf")
SECRET = "hf_hardeningTestToken0123456789abcdefXYZ"


# --- the command line: hf-matta plans / extract -------------------------------------------------------------------


@pytest.fixture(scope="module")
def nested_dir(tmp_path_factory) -> Path:
    """A random tiny nested model (3 layers, FFN widths 16 / 32 / 64), saved with a character tokenizer."""
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("nested") / "model"
    MatGPT2LMHeadModel(MatGPT2Config(**tiny_kwargs(n_layer=3), mat_widths=[16, 32, 64])).save_pretrained(folder)
    char_tokenizer().save_pretrained(folder)
    return folder


def _copy(model: Path, to: Path) -> Path:
    shutil.copytree(model, to)
    return to


def _blocks(tmp: Path, content: torch.Tensor | bytes | None = None, name: str = "heldout.pt") -> Path:
    """A `.pt` file of held-out token ids (a valid (4, 16) block by default), or raw bytes as a broken one."""
    path = tmp / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        torch.save(torch.randint(0, 90, (4, 16)) if content is None else content, path)
    return path


def _truncated_blocks(tmp: Path) -> Path:
    whole = _blocks(tmp, name="whole.pt").read_bytes()
    return _blocks(tmp, whole[: len(whole) // 2], name="truncated.pt")


def _truncated_weights(model: Path, tmp: Path) -> Path:
    folder = _copy(model, tmp / "truncated_model")
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1000])  # a copy cut short (disk full, interrupted download)
    return folder


def _non_finite_weights(model: Path, tmp: Path) -> Path:
    broken = MatGPT2LMHeadModel.from_pretrained(model)
    with torch.no_grad():
        broken.transformer.h[1].mlp.c_fc.weight[0, 0] = NAN  # one NaN in a student neuron: every student has it
    broken.save_pretrained(tmp / "nan_model")
    return tmp / "nan_model"


BAD_COMMAND_LINES = {  # name: (argv from (tmp, nested model folder), fragments the error must hold)
    "plan-of-300M-layers": (
        lambda tmp, model: ["extract", model, "--plan", "256x300000000", "--out", tmp / "out"],
        ["'256x300000000' names 300,000,000 layers"],
    ),
    "plan-of-1e11-layers": (
        lambda tmp, model: ["extract", model, "--plan", "256x99999999999", "--out", tmp / "out"],
        ["99,999,999,999 layers"],
    ),
    "out-replaces-the-model": (  # MODEL_DIR is named like the student folder the plan writes
        lambda tmp, model: ["extract", _copy(model, tmp / "parent" / "ffn64"), "--plan", "64", "--out",
                            tmp / "parent", "--overwrite"],  # fmt: skip
        ["student folder", "ffn64 is MODEL_DIR", "would delete the model"],
    ),
    "out-holds-the-model": (
        lambda tmp, model: ["extract", _copy(model, tmp / "parent" / "ffn64" / "nested"), "--plan", "64", "--out",
                            tmp / "parent", "--overwrite"],  # fmt: skip
        ["or holds it"],
    ),
    "max-blocks-0": (
        lambda tmp, model: ["plans", model, "--data", _blocks(tmp), "--max-blocks", "0"],
        ["--max-blocks", "must be at least 1, got 0"],
    ),
    "max-blocks-negative": (
        lambda tmp, model: ["plans", model, "--data", _blocks(tmp), "--max-blocks", "-1"],
        ["--max-blocks", "must be at least 1, got -1"],
    ),
    "batch-size-0": (
        lambda tmp, model: ["plans", model, "--data", _blocks(tmp), "--batch-size", "0"],
        ["--batch-size", "must be at least 1, got 0"],
    ),
    "batch-size-negative": (
        lambda tmp, model: ["extract", model, "--plan", "16", "--out", tmp / "out", "--batch-size", "-1"],
        ["--batch-size", "must be at least 1, got -1"],
    ),
    "block-size-1": (
        lambda tmp, model: ["plans", model, "--data", "pydoc_data.topics", "--block-size", "1"],
        ["--block-size", "must be at least 2, got 1"],
    ),
    "empty-pt": (
        lambda tmp, model: ["plans", model, "--data", _blocks(tmp, b"", name="empty.pt")],
        ["empty.pt", "not a tensor file written by torch.save"],
    ),
    "truncated-pt": (
        lambda tmp, model: ["plans", model, "--data", _truncated_blocks(tmp)],
        ["truncated.pt", "not a tensor file written by torch.save"],
    ),
    "pt-without-blocks": (
        lambda tmp, model: ["plans", model, "--data", _blocks(tmp, torch.zeros(0, 16, dtype=torch.long))],
        ["holds no tokens", "(0, 16)"],
    ),
    "token-ids-outside-the-vocabulary": (
        lambda tmp, model: ["plans", model, "--data", _blocks(tmp, torch.full((2, 16), 500))],
        ["token ids range from 500 to 500", "vocabulary (0 to 98)"],
    ),
    "truncated-safetensors": (
        lambda tmp, model: ["plans", _truncated_weights(model, tmp), "--data", _blocks(tmp)],
        ["truncated_model/model.safetensors is not a readable safetensors file", "truncated or corrupted"],
    ),
    "non-finite-weights": (
        lambda tmp, model: ["extract", _non_finite_weights(model, tmp), "--plan", "16", "--out", tmp / "out"],
        ["transformer.h.1.mlp.c_fc.weight holds 1 NaN or infinite values"],
    ),
}


@pytest.mark.parametrize("argv, fragments", BAD_COMMAND_LINES.values(), ids=BAD_COMMAND_LINES.keys())
def test_bad_command_lines_exit_2_naming_the_value(nested_dir, tmp_path, argv, fragments, capsys):
    """Refused with status 2 and a message naming the value, before anything is written; the model is untouched."""
    argv = [str(arg) for arg in argv(tmp_path, nested_dir)]
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    for fragment in fragments:
        assert fragment in error
    assert len(error) < 2000  # a message, not a 1.5 GB line
    assert not (tmp_path / "out").exists()
    for folder in (argv[1], *tmp_path.glob("parent/**/nested")):  # the model extracted from is still whole
        assert (Path(folder) / "model.safetensors").is_file()


def test_a_typo_in_a_plan_is_refused_at_once(nested_dir):
    """`256x300000000` took 79 s and 9.5 GB before: now argparse refuses it in the console script's own start-up."""
    script = Path(sys.executable).with_name("hf-matta")
    result = subprocess.run([str(script), "extract", str(nested_dir), "--plan", "256x300000000", "--out", "x"],
                            capture_output=True, text=True, timeout=60)  # fmt: skip
    assert result.returncode == 2 and "300,000,000 layers" in result.stderr


# --- training arguments -------------------------------------------------------------------------------------------


BAD_TRAINING_ARGUMENTS = {  # name: (field values, text the error must hold)
    "student-weight-nan": (dict(student_weight=NAN), "student_weight=nan is not a finite number"),
    "ta-weight-inf": (dict(ta_weight=INF), "ta_weight=inf is not a finite number"),
    "distill-weight-inf": (dict(distill_weight=INF), "distill_weight=inf is not a finite number"),
    "distill-temperature-inf": (dict(distill_temperature=INF), "distill_temperature=inf is not a finite number"),
    "teacher-temperature-nan": (dict(teacher_temperature=NAN), "teacher_temperature=nan is not a finite number"),
    "teacher-weight-nan": (dict(teacher_weight=NAN), "teacher_weight=nan is not a finite number"),
    "warmup-nan": (dict(distill_warmup_steps=NAN), "distill_warmup_steps=nan is not a finite number"),
    "learning-rate-nan": (dict(learning_rate=NAN), "learning_rate=nan is not a finite number"),
    "max-steps-0": (dict(max_steps=0), "max_steps=0 trains nothing"),
    "distill-warmup-longer-than-the-run": (
        dict(max_steps=10, distill_warmup_steps=20),
        "distill_warmup_steps=20 ends after the last of the run's 10 optimizer steps",
    ),
    "ta-first-covers-the-run": (
        dict(max_steps=10, ta_first_steps=10), "ta_first_steps=10 covers all of the run's 10 optimizer steps"
    ),
    "student-warmup-past-the-end": (
        dict(max_steps=10, ta_first_steps=0.5, student_warmup_steps=6),
        "student_warmup_steps=6 (after ta_first_steps=0.5) ends after the last",
    ),
}


@pytest.mark.parametrize("overrides, message", BAD_TRAINING_ARGUMENTS.values(), ids=BAD_TRAINING_ARGUMENTS.keys())
def test_bad_training_arguments_name_the_value(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        _args(tmp_path, **overrides)


@pytest.mark.parametrize("schedule", [dict(ta_first_steps=4, distill_warmup_steps=6), dict(ta_first_steps=0.4,
                                       student_warmup_steps=0.6, distill_warmup_steps=6)])  # fmt: skip
def test_a_schedule_that_ends_with_the_run_is_accepted(tmp_path, schedule):
    assert _args(tmp_path, max_steps=10, **schedule).max_steps == 10


def test_epoch_run_shorter_than_its_schedule_stops_before_the_first_step(tmp_path):
    """With num_train_epochs the length of the run is known once training starts: checked then, before any step."""
    trainer = _trainer(tmp_path, max_steps=-1, num_train_epochs=1, distill_warmup_steps=100)  # 32 rows, 8 steps
    with pytest.raises(ValueError, match=r"distill_warmup_steps=100 ends after the last of the run's 8 optimizer"):
        trainer.train()
    assert trainer.state.global_step == 0


# --- the trainer --------------------------------------------------------------------------------------------------


def test_non_finite_loss_stops_with_a_checkpoint_of_the_last_good_step(tmp_path):
    """A teacher whose logits turn NaN at the third step: training stops before applying it, naming the terms and the
    step, and checkpoint-2 holds the weights of step 2 (finite, equal to the model's)."""
    torch.manual_seed(1)
    teacher = GPT2LMHeadModel(GPT2Config(**tiny_kwargs()))
    trainer = _trainer(tmp_path, teacher=teacher, teacher_weight=0.5, save_strategy="no", max_steps=10)
    trainer.teacher.lm_head.register_forward_hook(
        lambda module, inputs, output: output * NAN if trainer.state.global_step == 2 else output
    )
    with pytest.raises(NonFiniteLossError, match=r"non-finite loss at optimizer step 3 of 10: the .*student") as error:
        trainer.train()
    assert "checkpoint-2 holds step 2, the last good one" in str(error.value)
    saved = load_file(tmp_path / "checkpoint-2" / "model.safetensors")
    for name, value in trainer.model.state_dict().items():
        if name in saved:
            assert torch.isfinite(saved[name]).all() and torch.equal(saved[name], value), name
    assert (tmp_path / "checkpoint-2" / "optimizer.pt").is_file()


def test_teacher_without_tokenizer_files_is_compared_by_vocabulary_size(tmp_path):
    """A teacher folder with weights and config only: its tokenizer is unknown, not '1 token' (a false mismatch)."""
    GPT2LMHeadModel(GPT2Config(**tiny_kwargs())).save_pretrained(tmp_path / "teacher")
    trainer = MatTATrainer(
        model=_student(), args=_args(tmp_path / "out", teacher_model_name_or_path=str(tmp_path / "teacher")),
        train_dataset=_sequences(4), data_collator=_collate, processing_class=_tokenizer(list(range(99))),
    )  # fmt: skip
    assert isinstance(trainer.teacher, GPT2LMHeadModel)


def test_teacher_context_is_checked_before_the_first_step(tmp_path):
    """Sequences of 16 tokens and a teacher of 8 positions: refused when training starts, not an IndexError."""
    teacher = GPT2LMHeadModel(GPT2Config(**tiny_kwargs(n_positions=8)))
    trainer = _trainer(tmp_path, teacher=teacher, teacher_weight=0.5)
    with pytest.raises(ValueError, match=r"sequences of 16 tokens are longer than the teacher's context \(8 posit"):
        trainer.train()
    assert trainer.state.global_step == 0


def test_output_dir_inside_the_teacher_is_refused_by_the_trainer(tmp_path):
    GPT2LMHeadModel(GPT2Config(**tiny_kwargs())).save_pretrained(tmp_path / "teacher")
    for output_dir in (tmp_path / "teacher", tmp_path / "teacher" / "run"):
        with pytest.raises(ValueError, match="is teacher_model_name_or_path=.* or inside it"):
            MatTATrainer(model=_student(), train_dataset=_sequences(4), data_collator=_collate,
                         args=_args(output_dir, teacher_model_name_or_path=str(tmp_path / "teacher")))  # fmt: skip
    assert (tmp_path / "teacher" / "model.safetensors").is_file()


@pytest.mark.parametrize("path", ["/nonexistent/teacher", "./teacher", "outputs/teacher/folder"])
def test_missing_teacher_path_says_so(tmp_path, path):
    """Not "Repo id must be in the form 'repo_name' or 'namespace/repo_name'"."""
    with pytest.raises(FileNotFoundError, match=f"the teacher '{re.escape(path)}' does not exist"):
        MatTATrainer(model=_student(), args=_args(tmp_path, teacher_model_name_or_path=path),
                     train_dataset=_sequences(4), data_collator=_collate)  # fmt: skip


def test_trainer_saves_no_hub_token(tmp_path):
    """training_args.bin of the model and of every checkpoint is written without the token; the arguments keep it."""
    trainer = _trainer(tmp_path, max_steps=2, save_strategy="steps", save_steps=1, hub_token=SECRET)
    trainer.train()
    trainer.save_model(tmp_path)
    saved = list(tmp_path.rglob("training_args.bin"))
    assert len(saved) == 3  # checkpoint-1, checkpoint-2, the model
    assert trainer.args.hub_token == SECRET
    assert not [path for path in tmp_path.rglob("*") if path.is_file() and SECRET.encode() in path.read_bytes()]
    assert torch.load(saved[0], weights_only=False).hub_token is None


# --- data files ---------------------------------------------------------------------------------------------------


BAD_DATA_FILES = {  # name: (file suffix, content, fragments the error must hold)
    "binary": (".txt", b"some text\n" + bytes(range(256)), ["corpus.txt' is binary (line 2 holds NUL bytes)"]),
    "latin-1": (".txt", "hello\nun caf\xe9 cr\xe8me\n".encode("latin-1"),
                ["corpus.txt'", "line 2 is not UTF-8 text", "column 7", "iconv"]),  # fmt: skip
    "malformed-json": (".jsonl", b'{"text": "a"}\n{"text": "b"\n{"text": "c"}\n', ["line 2 is not JSON"]),
    "json-not-an-object": (".jsonl", b'{"text": "a"}\n["b"]\n', ["line 2 has no 'text' field (a JSON list)"]),
    "text-is-a-number": (".jsonl", b'{"text": "a"}\n{"text": 5}\n', ["line 2: 'text' is 5, not a string"]),
    "every-text-a-number": (".jsonl", b'{"text": 1}\n{"text": 2}\n', ["line 1: 'text' is 1, not a string"]),
}


@pytest.mark.parametrize("suffix, content, fragments", BAD_DATA_FILES.values(), ids=BAD_DATA_FILES.keys())
def test_bad_data_files_are_named_with_the_line(tmp_path, monkeypatch, suffix, content, fragments):
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "datasets_cache")
    path = tmp_path / f"corpus{suffix}"
    path.write_bytes(content)
    with pytest.raises(ValueError) as error:
        load_corpus(DataArguments(train_file=str(path), validation_split_percentage=0))
    assert f"train_file='{path}" in str(error.value)
    for fragment in fragments:
        assert fragment in str(error.value)


# --- hf-matta run: bad runs refused before any work ----------------------------------------------------------------


def _teacher_without_weights(tmp: Path) -> str:
    """What a pre-training killed while saving left before writes were atomic: config.json, no weights."""
    GPT2Config(n_layer=1, n_embd=16, n_head=2, n_positions=32, vocab_size=300).save_pretrained(tmp / "broken")
    return str(tmp / "broken")


BAD_RUNS = {  # name: (config changes from tmp, fragments the error must hold)
    "teacher-folder-without-weights": (
        lambda tmp: {"teacher_model_name_or_path": _teacher_without_weights(tmp)},
        ["holds config.json but no weights", "Delete the folder"],
    ),
    "missing-teacher-path": (
        lambda tmp: {"teacher_model_name_or_path": str(tmp / "missing" / "teacher"), "teacher_pretrain_config": None},
        ["missing/teacher' does not exist", "set teacher_pretrain_config"],
    ),
    "distill-weight-nan-in-yaml": (lambda tmp: {"distill_weight": NAN}, ["distill_weight=nan is not a finite number"]),
    "temperature-inf-in-yaml": (lambda tmp: {"distill_temperature": INF}, ["distill_temperature=inf is not a finite"]),
    "warmup-longer-than-the-run": (lambda tmp: {"distill_warmup_steps": 5}, ["distill_warmup_steps=5.0 ends after"]),
    "max-steps-0": (lambda tmp: {"max_steps": 0}, ["max_steps=0 trains nothing"]),
}


@pytest.mark.parametrize("changes, fragments", BAD_RUNS.values(), ids=BAD_RUNS.keys())
def test_bad_runs_are_refused_before_any_work(tmp_path, changes, fragments):
    train_bpe_tokenizer(BUILTIN_CORPORA["pydoc_data.topics"](), vocab_size=300).save_pretrained(tmp_path / "tokenizer")
    config = write_config(tmp_path / "run.yaml", tiny_config(tmp_path, **changes(tmp_path)))
    with pytest.raises(ValueError) as error:
        run_pipeline(parse_args([str(config), "--check"], config_positional=True), log=lambda line: None)
    for fragment in fragments:
        assert fragment in str(error.value)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("flag, value", [("--student_weight", "nan"), ("--distill_temperature", "inf")])
def test_non_finite_values_on_the_command_line_are_refused(tmp_path, flag, value):
    config = write_config(tmp_path / "run.yaml", tiny_config(tmp_path))
    with pytest.raises(ValueError, match=f"{flag[2:]}={value} is not a finite number"):
        parse_args([str(config), flag, value], config_positional=True)


# --- killed while saving the teacher; the next run completes -------------------------------------------------------

KILL_WHILE_SAVING_THE_TEACHER = """
import contextlib, os, signal, sys
import hf_matta.pipeline.stages as stages

atomic_folder = stages.atomic_folder

@contextlib.contextmanager
def killed_while_writing(path, replace=False):
    with atomic_folder(path, replace) as folder:
        yield folder  # the teacher's files are written here, then the process dies (SIGKILL: no clean-up at all)
        os.kill(os.getpid(), signal.SIGKILL)

stages.atomic_folder = killed_while_writing
from hf_matta.cli import main
sys.exit(main(["run", *sys.argv[1:]]))
"""


@pytest.fixture(scope="module")
def killed_teacher_run(tmp_path_factory) -> dict:
    """A run killed while its teacher's files were being written, then the same run again, unchanged but for a Hub
    token, per-step checkpoints and TensorBoard logs. The config lives in `configs/` and names its caches and output
    with relative paths; both runs start in `work/` and are given the config by its absolute path."""
    tmp = tmp_path_factory.mktemp("killed_teacher")
    (tmp / "configs").mkdir()
    (work := tmp / "work").mkdir()
    relative = {"tokenizer_name_or_path": "tokenizer", "teacher_model_name_or_path": "teacher", "output_dir": "run"}
    config = write_config(tmp / "configs" / "run.yaml", {**tiny_config(tmp), **relative})
    env = {**os.environ, "HF_DATASETS_CACHE": str(tmp / "datasets_cache"), "HF_HUB_OFFLINE": "1",
           "OMP_NUM_THREADS": "1"}  # fmt: skip
    killed = subprocess.run([sys.executable, "-c", KILL_WHILE_SAVING_THE_TEACHER, str(config)], cwd=work, env=env,
                            capture_output=True, text=True, timeout=600)  # fmt: skip
    after_kill = {path.name: sorted(p.name for p in path.iterdir()) for path in work.iterdir() if path.is_dir()}
    leftover = [path for path in work.glob(".teacher.tmp-*") if (path / "config.json").is_file()]
    again = [str(Path(sys.executable).with_name("hf-matta")), "run", str(config), "--hub_token", SECRET,
             "--save_strategy", "steps", "--save_steps", "1", "--report_to", "tensorboard"]  # fmt: skip
    rerun = subprocess.run(again, cwd=work, env=env, capture_output=True, text=True, timeout=600)
    return {"tmp": tmp, "work": work, "killed": killed, "after_kill": after_kill, "leftover": leftover, "rerun": rerun}


def test_killed_while_saving_the_teacher_leaves_no_teacher(killed_teacher_run):
    killed, after_kill = killed_teacher_run["killed"], killed_teacher_run["after_kill"]
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert after_kill.get("teacher", []) == []  # no teacher to take for a finished one (at most the Trainer's mkdir)
    assert killed_teacher_run["leftover"]  # its files were written, under the temporary name
    assert "tokenizer.json" in after_kill["tokenizer"]  # the stage before it completed


def test_the_next_run_completes_without_clean_up(killed_teacher_run):
    rerun, work = killed_teacher_run["rerun"], killed_teacher_run["work"]
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "stage teacher: running" in rerun.stdout and "stage report: done" in rerun.stdout
    teacher = GPT2LMHeadModel.from_pretrained(work / "teacher")
    assert all(torch.isfinite(p).all() for p in teacher.parameters())
    assert not list(work.glob(".teacher.*"))  # the killed run's temporary folder is gone


def test_caches_are_relative_to_the_working_directory(killed_teacher_run):
    """Relative paths mean the same in a config file as on the command line: the working directory's (README)."""
    work, configs = killed_teacher_run["work"], killed_teacher_run["tmp"] / "configs"
    assert (work / "tokenizer" / "tokenizer.json").is_file() and (work / "teacher" / "config.json").is_file()
    assert (work / "run" / "model.safetensors").is_file()
    assert sorted(path.name for path in configs.iterdir()) == ["run.yaml"]


def test_no_file_or_log_holds_the_hub_token(killed_teacher_run):
    """Not training_args.bin, the checkpoints, the summary, the records, the TensorBoard logs, the students, the
    cards or the printed log."""
    work, rerun = killed_teacher_run["work"], killed_teacher_run["rerun"]
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    files = [path for path in work.rglob("*") if path.is_file()]
    assert len(list(work.glob("run/checkpoint-*/training_args.bin"))) == 3 and list(work.glob("run/runs/*/events*"))
    assert [path for path in files if SECRET.encode() in path.read_bytes()] == []
    assert SECRET not in rerun.stdout + rerun.stderr


def test_no_shared_file_holds_an_absolute_local_path(killed_teacher_run):
    """The config was given by its absolute path: the summary, report, lineage, students and Hub folders name none."""
    tmp, run = str(killed_teacher_run["tmp"]), killed_teacher_run["work"] / "run"
    shared = [run / "matta_summary.json", run / "report.md", run / "matta_lineage.json"]
    shared += [path for folder in ("students", "hub") for path in (run / folder).rglob("*") if path.is_file()]
    assert len(shared) > 10
    assert [path for path in shared if tmp.encode() in path.read_bytes()] == []


# --- hf-matta run: --help and bad options answer from the saved options, without torch ------------------------------

QUICK_CHECK = """
import sys
from hf_matta.cli import main
try:
    code = main(sys.argv[1:])
except SystemExit as exit:
    code = exit.code
print("STATUS", code, sorted(name for name in ("torch", "datasets", "peft") if name in sys.modules))
"""  # (a boolean value is read by Transformers' own string_to_bool: transformers, without torch, then loads)


@pytest.fixture
def saved_options(tmp_path, monkeypatch, capsys) -> str:
    """The real parser's help text, printed once: building that parser saves the options the next runs check with."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setenv("COLUMNS", "100")  # the help text is wrapped to the terminal's width, part of the file's key
    with pytest.raises(SystemExit):
        parse_args(["--help"], prog="hf-matta run", config_positional=True)
    return capsys.readouterr().out


QUICK_REFUSALS = {  # name: (arguments after `hf-matta run CONFIG`, text of the error)
    "int": (["--max_steps", "abc"], "argument --max_steps/--max-steps: invalid int value: 'abc'"),
    "choice": (["--optimizer", "lamb"], "argument --optimizer: invalid choice: 'lamb'"),
    "bool": (["--use_cpu", "maybe"], "argument --use_cpu/--use-cpu: Truthy value expected: got maybe"),
    "unknown": (["--max_stepz", "3"], "unrecognized arguments: --max_stepz 3"),
    "config-value": (["--config_value"], "max_steps: '3.5' is not a valid int"),
}


@pytest.mark.parametrize("extra, message", QUICK_REFUSALS.values(), ids=QUICK_REFUSALS.keys())
def test_run_refuses_a_bad_option_without_importing_torch(saved_options, tmp_path, extra, message):
    changes = {"max_steps": 3.5} if extra == ["--config_value"] else {}
    config = write_config(tmp_path / "run.yaml", tiny_config(tmp_path, **changes))
    extra = [] if changes else extra
    result = subprocess.run([sys.executable, "-c", QUICK_CHECK, "run", str(config), *extra], capture_output=True,
                            text=True, env={**os.environ}, timeout=120)  # fmt: skip
    assert result.stdout.strip().splitlines()[-1] == "STATUS 2 []"
    assert message in result.stderr


def test_run_help_is_the_real_parsers_without_importing_torch(saved_options):
    result = subprocess.run([sys.executable, "-c", QUICK_CHECK, "run", "--help"], capture_output=True, text=True,
                            env={**os.environ}, timeout=120)  # fmt: skip
    help_text, status = result.stdout.rsplit("STATUS", 1)
    assert status.strip() == "0 []"
    assert help_text == saved_options and "--distill_warmup_steps" in help_text


QUICK_ACCEPTS = [  # what the quick check must let through to the real parser (it only refuses)
    ["--max_steps", "7", "--learning_rate", "1e-3", "--bf16", "false", "--use_cpu"],
    ["--no_detach_ta_targets", "--optimizer", "shampoo", "--teacher_model_name_or_path", "None"],
    ["--mat_widths", "32", "64", "--extract_plans", "32,64", "64", "--report_to", "none"],
    ["--lr_scheduler_kwargs", '{"num_cycles": 2}', "--stage", "train", "--max-steps", "5"],
]


@pytest.mark.parametrize("extra", QUICK_ACCEPTS)
def test_quick_check_lets_through_what_the_real_parser_accepts(saved_options, tmp_path, extra):
    from hf_matta.pipeline.options import check_quickly

    config = write_config(tmp_path / "run.yaml", tiny_config(tmp_path))
    check_quickly([str(config), *extra], "hf-matta run", True)
    assert parse_args([str(config), *extra], prog="hf-matta run", config_positional=True).run.config == str(config)


def test_a_training_that_raises_gives_sigterm_back(tmp_path):
    """The non-finite stop raises out of train(): the SIGTERM handler of the preemption checkpoint must not stay
    installed (processes forked later, such as lm-eval's bootstrap pool, would ignore SIGTERM and never end)."""
    before = signal.getsignal(signal.SIGTERM)
    trainer = _trainer(tmp_path, max_steps=3)
    trainer.model.transformer.wte.register_forward_hook(lambda module, inputs, output: output * NAN)
    with pytest.raises(NonFiniteLossError):
        trainer.train()
    assert signal.getsignal(signal.SIGTERM) is before
