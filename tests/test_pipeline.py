"""hf_matta.pipeline (what `hf-matta run` and recipes/train_gpt2m.py run): one vocabulary for config files and the
command line, `--check` before any work, the stages end to end on a tiny run, resuming after a kill, `--stage`,
the report's numbers against the JSON files beside it, and the distributed launches of the recipe.

Every run is shrunk by a config of its own (vocab 300, 2 x 32 models, blocks of 32 tokens, a few steps), with its
outputs and `datasets` cache in a temporary folder.
"""

import json
import math
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

from hf_matta import MatGPT2LMHeadModel, extract_student
from hf_matta.data import BUILTIN_CORPORA, train_bpe_tokenizer
from hf_matta.pipeline import STAGES, config_from_string, parse_args, pretrain_teacher, run_pipeline
from hf_matta.pipeline import run as run_module
from hf_matta.pipeline import stages as stages_module
from hf_matta.pipeline.run import read_record, stage_arguments


REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "recipes" / "train_gpt2m.py"
NO_DROPOUT = "resid_pdrop=0.0,embd_pdrop=0.0,attn_pdrop=0.0"
# 2-process DDP vs 1 process with the same global batch: fp32, so only the order of the gradient all-reduce differs.
DDP_TOLERANCE = 1e-5  # measured: 1.2e-7 on the train loss, 0 on the evaluation losses


def tiny_config(out: Path, **changes) -> dict:
    """A config that shrinks the tiny_cpu default to seconds: 2 x 32 models, vocab 300, 32-token blocks."""
    return {
        "builtin_corpus": "pydoc_data.topics",
        "validation_split_percentage": 10,
        "block_size": 32,
        "max_train_samples": 64,
        "max_eval_samples": 8,
        "tokenizer_name_or_path": str(out / "tokenizer"),
        "tokenizer_vocab_size": 300,
        "teacher_model_name_or_path": str(out / "teacher"),
        "teacher_pretrain_config": f"n_layer=2,n_embd=32,n_head=2,n_positions=32,{NO_DROPOUT}",
        "teacher_pretrain_steps": 2,
        "config_overrides": f"n_layer=2,n_embd=32,n_head=2,n_positions=32,{NO_DROPOUT}",
        "mat_widths": [32, 64],
        "student_width": 32,
        "output_dir": str(out / "run"),
        "max_steps": 3,
        "learning_rate": 0.01,
        "per_device_train_batch_size": 4,
        "per_device_eval_batch_size": 8,
        "warmup_steps": 0,
        "eval_on_start": True,
        "logging_steps": 1,
        "report_to": "none",
        "disable_tqdm": True,
        "use_cpu": True,
        **changes,
    }


def write_config(path: Path, config: dict) -> Path:
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture
def datasets_cache(tmp_path, monkeypatch):
    cache = tmp_path / "datasets_cache"
    monkeypatch.setenv("HF_DATASETS_CACHE", str(cache))
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", cache)
    return cache


# --- one vocabulary ------------------------------------------------------------------------------------------------


def test_config_file_then_command_line(tmp_path):
    config = write_config(tmp_path / "run.yaml", tiny_config(tmp_path, learning_rate=0.05, block_size=16))
    args = parse_args(["--config", str(config), "--block_size", "24", "--max-steps", "7"])
    assert args.run.config == str(config)
    assert args.model.mat_widths == [32, 64] and args.teacher.teacher_pretrain_steps == 2
    assert args.data.block_size == 24 and args.training.max_steps == 7  # the command line wins, in either spelling
    assert args.training.learning_rate == 0.05  # the file fills what the command line leaves
    json_config = tmp_path / "run.json"
    json_config.write_text(json.dumps(tiny_config(tmp_path)))
    assert parse_args([str(json_config)], config_positional=True).model.mat_widths == [32, 64]


def test_none_unsets_an_optional_field(tmp_path):
    config = write_config(tmp_path / "run.yaml", tiny_config(tmp_path, teacher_pretrain_config=None))
    args = parse_args(["--config", str(config), "--teacher_model_name_or_path", "None"])
    assert args.training.teacher_model_name_or_path is None and args.teacher.teacher_pretrain_config is None


def test_help_lists_every_stage_and_field(capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_args(["--help"], prog="hf-matta run", config_positional=True)
    assert exit_info.value.code == 0
    shown = capsys.readouterr().out
    for text in ("CONFIG", "--check", "--stage", "--push", "--stop_after", "--teacher_pretrain_config",
                 "--validation_split_percentage", "--distill_weight", "--extract_plans", "--eval_data_dir",
                 "--publish_namespace"):  # fmt: skip
        assert text in shown


def test_no_arguments_is_the_tiny_cpu_default():
    args = parse_args([], default_config=REPO / "recipes/configs/tiny_cpu.yaml")
    assert Path(args.run.config).name == "tiny_cpu.yaml"
    assert args.data.builtin_corpus == "pydoc_data.topics"
    assert args.model.student_width == args.model.mat_widths[0] < args.model.mat_widths[-1]


BAD_CONFIGS = {
    "unknown-field": ({"max_step": 3}, ValueError, r"unknown field 'max_step' \(did you mean max_steps"),
    "float-for-int": ({"max_steps": 3.5}, ValueError, r"run.yaml: max_steps: '3.5' is not a valid int"),
    "list-for-scalar": ({"distill_weight": [1, 2]}, ValueError, r"distill_weight is a list \(\[1, 2\]\)"),
    "bad-choice": ({"extract_strategy": "random"}, ValueError, r"extract_strategy: 'random' is not one of"),
    "null-for-required": ({"teacher_weight": None}, ValueError, "teacher_weight is null"),
    "two-model-sources": ({"model_name_or_path": "gpt2"}, ValueError, "are both set"),
    "no-widths": ({"mat_widths": None}, ValueError, "mat_widths is not set"),
}


@pytest.mark.parametrize("changes, error, match", BAD_CONFIGS.values(), ids=BAD_CONFIGS.keys())
def test_bad_configuration_is_refused(tmp_path, changes, error, match):
    config = write_config(tmp_path / "run.yaml", tiny_config(tmp_path, **changes))
    with pytest.raises(error, match=match):
        parse_args(["--config", str(config)])


def test_missing_config_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere.yaml"):
        parse_args(["--config", str(tmp_path / "nowhere.yaml")])


@pytest.mark.parametrize("name, argv", [("tiny_cpu.yaml", []), ("gpt2m.yaml", ["--bf16", "false"])])  # bf16: GPU
def test_recipe_configs_parse(name, argv):
    args = parse_args(["--config", str(REPO / "recipes/configs" / name), *argv])
    assert args.model.mat_widths[-1] == 2 * args.model.student_width
    assert args.training.teacher_model_name_or_path is not None


# --- --check -------------------------------------------------------------------------------------------------------


def _teacher_folder(folder: Path, vocab_size: int, n_positions: int = 32) -> Path:
    """A random tiny GPT-2 saved as a teacher (no tokenizer)."""
    config = GPT2Config(n_layer=1, n_embd=16, n_head=2, n_positions=n_positions, vocab_size=vocab_size)
    GPT2LMHeadModel(config).save_pretrained(folder)
    return folder


CHECKS = {
    "bad-plan": (lambda tmp: {"extract_plans": ["48"]}, ["width 48 of layer 0", "[32, 64]"]),
    "plan-wrong-length": (lambda tmp: {"extract_plans": ["32,64,64"]}, ["plan [32, 64, 64] has 3 widths"]),
    "budget-below-student": (lambda tmp: {"extract_budgets": ["1K"]}, ["budget 1,000 parameters is below"]),
    "missing-data-file": (
        lambda tmp: {"builtin_corpus": None, "train_file": str(tmp / "absent.txt")},
        ["train_file=", "absent.txt' does not exist"],
    ),
    "binary-data-file": (
        lambda tmp: {"builtin_corpus": None, "train_file": _write_bytes(tmp / "data.txt", b"\x00\x01\x02 text")},
        ["data.txt' is binary"],
    ),
    "teacher-vocabulary-differs": (
        lambda tmp: {"teacher_model_name_or_path": str(_teacher_folder(tmp / "other_teacher", 500))},
        ["vocab_size=500", "300 tokens"],
    ),
    "teacher-context-too-short": (
        lambda tmp: {"teacher_model_name_or_path": str(_teacher_folder(tmp / "short_teacher", 300, n_positions=16))},
        ["the teacher", "block_size=32 is larger than the model's context n_positions=16"],
    ),
    "output-dir-is-the-teacher": (lambda tmp: {"output_dir": str(tmp / "teacher")}, ["output_dir=", "would write"]),
    "block-size-above-context": (lambda tmp: {"block_size": 64}, ["block_size=64 is larger", "n_positions=32"]),
    "invalid-repo-name": (lambda tmp: {"publish_namespace": "not a namespace!"}, ["repo id", "is not valid"]),
    "push-without-namespace": (lambda tmp: {"push": True}, ["push needs publish_namespace"]),
    "push-while-offline": (lambda tmp: {"push": True, "publish_namespace": "someone"}, ["HF_HUB_OFFLINE"]),
    "step-scale-without-ta": (
        lambda tmp: {"mat_widths": [64], "student_width": 64, "ta_neuron_lr_scale": 2.0},
        ["ta_neuron_lr_scale=2.0 scales the steps", "student_width=64 is its full width"],
    ),
    "step-scale-with-lomo": (
        lambda tmp: {"ta_neuron_lr_scale": 2.0, "optim": "adalomo"}, ["ta_neuron_lr_scale=2.0", "optim='adalomo'"]
    ),
}


def _write_bytes(path: Path, content: bytes) -> str:
    path.write_bytes(content)
    return str(path)


@pytest.mark.parametrize("changes, fragments", CHECKS.values(), ids=CHECKS.keys())
def test_check_fails_fast_naming_the_problem(tmp_path, changes, fragments, monkeypatch):
    """`--check` (and every run, before its first stage) finds the mistake without training anything."""
    train_vocab = train_bpe_tokenizer(BUILTIN_CORPORA["pydoc_data.topics"](), vocab_size=300)
    train_vocab.save_pretrained(tmp_path / "tokenizer")  # so that the teacher's vocabulary is compared with 300
    config = write_config(tmp_path / "run.yaml", tiny_config(tmp_path, **changes(tmp_path)))
    monkeypatch.setattr(stages_module, "pretrain_teacher", lambda *a, **k: pytest.fail("trained before the check"))
    for extra in (["--check"], []):
        with pytest.raises(ValueError) as error:
            run_pipeline(parse_args([str(config), *extra], config_positional=True), log=lambda line: None)
        for fragment in fragments:
            assert fragment in str(error.value)
    assert not (tmp_path / "run").exists()


def test_check_passes_and_says_what_a_run_would_do(tmp_path):
    config = write_config(tmp_path / "run.yaml", tiny_config(tmp_path))
    lines = []
    outputs = run_pipeline(parse_args([str(config), "--check"], config_positional=True), log=lines.append)
    assert outputs == {"check": {"stages": dict.fromkeys(STAGES, "run")}}
    assert "check passed" in lines[0] and not (tmp_path / "run").exists()


# --- the stages, end to end ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """One whole tiny run (with a baseline and a mixed plan), and its log."""
    tmp = tmp_path_factory.mktemp("pipeline")
    cache = tmp / "datasets_cache"
    import datasets

    previous = datasets.config.HF_DATASETS_CACHE
    datasets.config.HF_DATASETS_CACHE = cache
    config = write_config(
        tmp / "run.yaml",
        tiny_config(tmp, baseline=True, extract_plans=["32,64"], max_steps=8, ta_neuron_lr_scale=2.0),
    )  # the baseline (one width) trains at one step for every neuron
    lines = []
    try:
        outputs = run_pipeline(parse_args([str(config)], config_positional=True), log=lines.append)
    finally:
        datasets.config.HF_DATASETS_CACHE = previous
    return {"tmp": tmp, "config": config, "outputs": outputs, "log": lines, "out": tmp / "run", "cache": cache}


def test_run_completes_every_stage_with_a_record(tiny_run):
    out = tiny_run["out"]
    for stage in STAGES:
        record = read_record(out, stage)
        assert record["stage"] == stage and record["seconds"] >= 0
        assert f"stage {stage}: done in" in "\n".join(tiny_run["log"])
    summary = json.loads((out / "matta_summary.json").read_text())
    for row in summary["widths"].values():
        assert row["end_ppl"] < row["start_ppl"]  # it trained
    assert summary["steps"] == 8 and summary["train_tokens"] == 8 * 4 * 32
    assert summary["diagnostics"]["kl_ta_student"] >= 0 and "ffn_centered_cos_l1" in summary["diagnostics"]
    assert "is the TA teaching? KL(TA || student)" in "\n".join(tiny_run["log"])


def test_students_are_the_nested_model_at_their_plans(tiny_run, input_ids):
    out = tiny_run["out"]
    nested = MatGPT2LMHeadModel.from_pretrained(out).eval()
    students = read_record(out, "extract")["outputs"]["students"]
    roles = [(student["name"], student["role"]) for student in students]
    assert roles == [("ffn32", "student"), ("ffn32-64", "member"), ("ffn64", "ta")]
    ids = input_ids.clamp(max=nested.config.vocab_size - 1)
    for student in students:
        loaded = AutoModelForCausalLM.from_pretrained(out / student["folder"]).eval()
        assert sum(p.numel() for p in loaded.parameters()) == student["parameters"]
        torch.testing.assert_close(loaded(ids).logits, nested(ids, ffn_widths=student["plan"]).logits)
    baseline = AutoModelForCausalLM.from_pretrained(out / "baseline")
    assert type(baseline) is GPT2LMHeadModel  # one width: a plain GPT-2


def test_report_numbers_are_the_json_files(tiny_run):
    """report.md's table holds exactly the numbers of eval/validation.json and eval/results.json."""
    out = tiny_run["out"]
    report = (out / "report.md").read_text()
    assert (out / "elastic_curve.png").stat().st_size > 0
    models = report.split("## Models")[1].split("## Training")[0]
    rows = {line.split("|")[1].strip(): [cell.strip() for cell in line.split("|")[1:-1]]
            for line in models.splitlines() if re.match(r"\| (ffn|baseline |teacher )", line)}  # fmt: skip
    validation = json.loads((out / "eval/validation.json").read_text())
    assert sorted(rows) == sorted(model["name"] for model in validation["models"])
    assert {"student", "member", "ta", "baseline", "teacher"} == {model["role"] for model in validation["models"]}
    for model in validation["models"]:
        assert rows[model["name"]][4] == f"{model['perplexity']:.2f}"
        assert model["perplexity"] == pytest.approx(math.exp(model["loss"]))
    results = json.loads((out / "eval/results.json").read_text())
    assert results["tasks"] == ["lambada_heldout"]
    for student in results["students"]:
        acc = student["results"]["lambada_heldout"]["acc"]
        assert rows[student["name"]][6].startswith(f"{acc:.4f} ± ")
    for stage in STAGES[:-1]:
        assert f"| {stage} | {read_record(out, stage)['completed']} |" in report
    kl = json.loads((out / "matta_summary.json").read_text())["diagnostics"]["kl_ta_student"]
    assert f"Is the TA teaching? KL(TA || student) {kl:.4f} nats/token" in report


def test_dry_run_writes_one_repo_per_student_whose_card_holds_its_results(tiny_run):
    from huggingface_hub import ModelCard

    out = tiny_run["out"]
    lineage = json.loads((out / "matta_lineage.json").read_text())  # written by the train stage, read by the cards
    assert lineage["teacher"] == "local" and lineage["teacher_pretraining"]["steps"] == 2
    assert str(tiny_run["tmp"]) not in json.dumps(lineage)  # no local path in what is published
    published = read_record(out, "publish")["outputs"]["published"]
    students = read_record(out, "extract")["outputs"]["students"]
    assert [item["name"] for item in published] == [student["name"] for student in students]
    for student in students:  # each extracted folder carries the record, so `hf-matta publish` can card it alone
        assert json.loads((out / student["folder"] / "matta_lineage.json").read_text()) == lineage
    results = {s["name"]: s["results"] for s in json.loads((out / "eval/results.json").read_text())["students"]}
    report = (out / "report.md").read_text()
    for item in published:
        folder = out / item["location"]
        assert item["status"] == "written" and item["repo_id"].startswith("your-namespace/")
        assert (folder / "model.safetensors").is_file() and (folder / "tokenizer.json").is_file()
        card = ModelCard.load(folder / "README.md")
        reported = {(entry.dataset_name, entry.metric_type): entry.metric_value for entry in card.data.eval_results}
        assert reported[("lambada_heldout", "acc")] == results[item["name"]]["lambada_heldout"]["acc"]
        assert f"[{item['repo_id']}]({item['location']})" in report


def test_rerun_skips_every_stage_and_changed_training_is_refused(tiny_run, monkeypatch):
    config = tiny_run["config"]
    monkeypatch.setitem(run_module.STAGE_FUNCTIONS, "train", lambda run: pytest.fail("trained again"))
    lines = []
    run_pipeline(parse_args([str(config)], config_positional=True), log=lines.append)
    assert [line.split(":")[0] for line in lines if "skipped" in line] == [f"stage {stage}" for stage in STAGES]
    with pytest.raises(ValueError, match=r"other arguments \(training.max_steps: 8 -> 9\).*--stage train"):
        run_pipeline(parse_args([str(config), "--max_steps", "9"], config_positional=True), log=lines.append)
    with pytest.raises(ValueError, match=r"other arguments \(training.ta_neuron_lr_scale: 2.0 -> 1.0\)"):
        run_pipeline(parse_args([str(config), "--ta_neuron_lr_scale", "1"], config_positional=True), log=lines.append)


def test_a_field_added_later_is_recorded_only_away_from_its_old_value(tmp_path):
    """So that a stage recorded before `ta_neuron_lr_scale` existed (the value it had: 1) still matches."""
    config = write_config(tmp_path / "run.yaml", tiny_config(tmp_path))
    for extra, recorded in (([], None), (["--ta_neuron_lr_scale", "1"], None), (["--ta_neuron_lr_scale", "2"], 2.0)):
        training = stage_arguments(parse_args([str(config), *extra], config_positional=True), "train")["training"]
        assert training.get("ta_neuron_lr_scale") == recorded


def test_stage_reruns_one_stage_and_drops_the_later_records(tiny_run, monkeypatch):
    out, config = tiny_run["out"], tiny_run["config"]
    weights = (out / "students/ffn32/model.safetensors").read_bytes()
    monkeypatch.setitem(run_module.STAGE_FUNCTIONS, "train", lambda run: pytest.fail("trained again"))
    lines = []
    run_pipeline(parse_args([str(config), "--stage", "extract"], config_positional=True), log=lines.append)
    assert "stage extract: done in" in "\n".join(lines)
    assert (out / "students/ffn32/model.safetensors").read_bytes() == weights  # the same student again
    assert read_record(out, "evaluate") is None and read_record(out, "report") is None
    lines.clear()
    run_pipeline(parse_args([str(config), "--check"], config_positional=True), log=lines.append)
    assert "  train     would skip" in lines and "  evaluate  would run (not completed yet)" in lines


def test_plans_measure_on_the_runs_own_validation_split(tiny_run, datasets_cache, capsys):
    """`hf-matta plans RUN_DIR` needs no --data: the run recorded its split, so the documents are the held-out ones."""
    from hf_matta.cli import main
    from hf_matta.data import load_heldout_blocks, load_tokenizer
    from hf_matta.extract import mix_n_match

    out = tiny_run["out"]
    assert main(["plans", str(out), "--strategy", "search", "--max-blocks", "6"]) == 0
    printed = [line.split()[-1] for line in capsys.readouterr().out.strip().splitlines()[1:]]
    held_out = load_heldout_blocks("pydoc_data.topics", load_tokenizer(out), 32, 6, validation_split_percentage=10)
    expected = mix_n_match(MatGPT2LMHeadModel.from_pretrained(out), "search", input_ids=held_out)
    assert printed == [f"{point.val_loss:.4f}" for point in expected]


def test_second_run_into_the_same_folder_is_refused(tiny_run):
    import fcntl

    lock = os.open(tiny_run["out"] / ".hf_matta.lock", os.O_RDWR)
    fcntl.flock(lock, fcntl.LOCK_EX)  # as a running pipeline holds it
    try:
        with pytest.raises(ValueError, match="another run .* is writing to"):
            run_pipeline(parse_args([str(tiny_run["config"])], config_positional=True), log=lambda line: None)
    finally:
        os.close(lock)


# --- killed in a stage, run again --------------------------------------------------------------------------------

KILL_DURING_EXTRACTION = """
import contextlib, os, signal, sys
import hf_matta.extract as extract

atomic_folder, calls = extract.atomic_folder, []

@contextlib.contextmanager
def killed_while_writing(path, replace=False):
    calls.append(path)
    with atomic_folder(path, replace) as folder:
        yield folder  # the student's files are written here, then the second one's process dies (SIGKILL: no clean-up)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGKILL)

extract.atomic_folder = killed_while_writing
from hf_matta.cli import main
sys.exit(main(["run", sys.argv[1]]))
"""


def test_killed_during_extraction_completes_without_retraining(tmp_path, datasets_cache):
    config = write_config(tmp_path / "run.yaml", tiny_config(tmp_path, extract_plans=["32,64"]))
    env = {**os.environ, "HF_DATASETS_CACHE": str(datasets_cache), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    killed = subprocess.run([sys.executable, "-c", KILL_DURING_EXTRACTION, str(config)], env=env, cwd=tmp_path,
                            capture_output=True, text=True, timeout=600)  # fmt: skip
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    out = tmp_path / "run"
    assert read_record(out, "train") is not None and read_record(out, "extract") is None
    nested = (out / "model.safetensors").read_bytes()
    assert (out / "students/ffn32").is_dir() and not (out / "students/ffn32-64").exists()  # never half a folder
    assert [path.name.split("-")[0] for path in (out / "students").glob(".*")] == [".ffn32"]  # .ffn32-64.tmp-PID

    hf_matta = Path(sys.executable).with_name("hf-matta")
    again = subprocess.run([str(hf_matta), "run", str(config)], env=env, cwd=tmp_path, capture_output=True,
                           text=True, timeout=600)  # fmt: skip
    assert again.returncode == 0, again.stderr[-3000:]
    for stage in ("teacher", "train"):
        assert re.search(rf"stage {stage}: completed .* skipped", again.stdout)
    assert "stage extract: running" in again.stdout and "stage report: done" in again.stdout
    assert (out / "model.safetensors").read_bytes() == nested  # not retrained
    assert sorted(path.name for path in (out / "students").iterdir()) == ["ffn32", "ffn32-64", "ffn64"]  # no leftovers
    model = MatGPT2LMHeadModel.from_pretrained(out)
    for student in read_record(out, "extract")["outputs"]["students"]:
        expected = extract_student(model, student["plan"]).state_dict()
        saved = load_file(out / student["folder"] / "model.safetensors")
        assert all(torch.equal(saved[name], expected[name]) for name in saved)


# --- the teacher, usable on its own --------------------------------------------------------------------------------


def test_pretrain_teacher_outside_the_pipeline(tmp_path, datasets_cache):
    """As the benchmarks call it: a config string, training arguments, blocks; the folder appears complete."""
    from hf_matta.training_args import MatTATrainingArguments

    tokenizer = train_bpe_tokenizer(BUILTIN_CORPORA["pydoc_data.topics"]()[:20], vocab_size=300)
    blocks = [{"input_ids": row, "labels": row} for row in torch.randint(0, 300, (16, 32))]
    config = config_from_string(f"n_layer=1,n_embd=16,n_head=2,n_positions=32,{NO_DROPOUT}", tokenizer)
    assert (config.vocab_size, config.n_layer, config.eos_token_id) == (len(tokenizer), 1, tokenizer.eos_token_id)
    args = MatTATrainingArguments(output_dir=str(tmp_path / "ignored"), use_cpu=True, report_to="none",
                                  per_device_train_batch_size=4, disable_tqdm=True)  # fmt: skip
    metrics = pretrain_teacher(config, args, tokenizer, blocks, tmp_path / "teacher", max_steps=2, learning_rate=1e-3)
    assert metrics["train_loss"] > 0
    teacher = AutoModelForCausalLM.from_pretrained(tmp_path / "teacher")
    assert type(teacher) is GPT2LMHeadModel and (tmp_path / "teacher" / "tokenizer.json").is_file()
    assert not list(tmp_path.glob(".*"))  # no temporary folder left
    with pytest.raises(FileExistsError, match="not empty"):  # an existing teacher is never overwritten (nor trained)
        pretrain_teacher(config, args, tokenizer, None, tmp_path / "teacher", max_steps=1)
    torch.rand(7)  # whatever drew random numbers before, the same seed gives the same teacher
    pretrain_teacher(config, args, tokenizer, blocks, tmp_path / "again", max_steps=2, learning_rate=1e-3)
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "again")
    for name, tensor in teacher.state_dict().items():
        torch.testing.assert_close(again.state_dict()[name], tensor, rtol=0, atol=0)


# --- distributed launches of the recipe ----------------------------------------------------------------------------


@pytest.fixture
def cached_teacher(tmp_path):
    """The tokenizer and a random tiny teacher, saved where the recipe looks for them (so launches skip both)."""
    tokenizer = train_bpe_tokenizer(BUILTIN_CORPORA["pydoc_data.topics"](), vocab_size=300)
    tokenizer.save_pretrained(tmp_path / "tokenizer")
    teacher = GPT2LMHeadModel(
        GPT2Config(n_layer=2, n_embd=32, n_head=2, n_positions=32, vocab_size=len(tokenizer),
                   bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    )  # fmt: skip
    teacher.save_pretrained(tmp_path / "teacher")
    tokenizer.save_pretrained(tmp_path / "teacher")
    return tmp_path


def launch(launcher: list[str], out: Path, cache: Path, **changes) -> dict:
    """Run the recipe's training in fresh processes (`--stop_after train`); returns the summary it wrote."""
    env = {**os.environ, "HF_DATASETS_CACHE": str(cache), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    config = write_config(out / f"{Path(changes['output_dir']).name}.yaml", tiny_config(out, **changes))
    command = [*launcher, str(RECIPE), "--config", str(config), "--stop_after", "train"]
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return json.loads((Path(changes["output_dir"]) / "matta_summary.json").read_text())


ACCELERATE = [sys.executable, "-m", "accelerate.commands.launch"]
TWO_CPU_PROCESSES = ["--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
                     "--dynamo_backend", "no"]  # fmt: skip


def test_two_process_ddp_matches_one_process(cached_teacher, datasets_cache):
    one = launch([sys.executable], cached_teacher, datasets_cache, output_dir=str(cached_teacher / "one"),
                 per_device_train_batch_size=4, max_steps=4)  # fmt: skip
    two = launch([*ACCELERATE, *TWO_CPU_PROCESSES], cached_teacher, datasets_cache,
                 output_dir=str(cached_teacher / "two"), per_device_train_batch_size=2, max_steps=4)  # fmt: skip
    assert (one["processes"], two["processes"], two["distributed_type"]) == (1, 2, "MULTI_CPU")
    assert one["train_tokens"] == two["train_tokens"] == 4 * 4 * 32  # same global batch
    assert two["train_loss"] == pytest.approx(one["train_loss"], abs=DDP_TOLERANCE)
    for name, row in one["widths"].items():
        assert two["widths"][name]["start_ppl"] == pytest.approx(row["start_ppl"], rel=DDP_TOLERANCE)
        assert two["widths"][name]["end_loss"] == pytest.approx(row["end_loss"], abs=DDP_TOLERANCE)
        assert row["end_loss"] < math.log(row["start_ppl"]) - 0.01  # the runs did train


@pytest.mark.slow  # DeepSpeed's import and engine set-up in 2 processes: 95 s on the shared 2 cores (30 s of CPU)
def test_two_process_deepspeed_zero2_completes(cached_teacher, datasets_cache):
    launcher = [*ACCELERATE, "--config_file", str(REPO / "recipes/accelerate/deepspeed_zero2.yaml"),
                "--num_processes", "2", "--mixed_precision", "no"]  # fmt: skip
    summary = launch(launcher, cached_teacher, datasets_cache, output_dir=str(cached_teacher / "zero2"), max_steps=2)
    assert (summary["steps"], summary["processes"], summary["distributed_type"]) == (2, 2, "DEEPSPEED")
    assert all(row["end_loss"] is not None for row in summary["widths"].values())
    assert summary["checkpoint"] == "zero2"  # the output folder, without the machine's absolute path
    assert MatGPT2LMHeadModel.from_pretrained(cached_teacher / "zero2").config.mat_widths == [32, 64]


@pytest.mark.parametrize(
    "name, distributed_type, zero_stage",
    [
        ("single_gpu.yaml", "NO", None),
        ("multi_gpu.yaml", "MULTI_GPU", None),
        ("fsdp.yaml", "FSDP", None),
        ("deepspeed_zero2.yaml", "DEEPSPEED", 2),
        ("deepspeed_zero3.yaml", "DEEPSPEED", 3),
    ],
)
def test_accelerate_configs_load(name, distributed_type, zero_stage):
    from accelerate.commands.config.config_args import load_config_from_file

    config = load_config_from_file(str(REPO / "recipes/accelerate" / name))
    assert config.distributed_type.value == distributed_type
    if distributed_type == "FSDP":
        assert config.fsdp_config["fsdp_use_orig_params"] is True
        assert hasattr(sys.modules["hf_matta.models.matgpt2.modeling_matgpt2"],
                       config.fsdp_config["fsdp_transformer_layer_cls_to_wrap"])  # fmt: skip
    if zero_stage is not None:
        deepspeed = json.loads((REPO / config.deepspeed_config["deepspeed_config_file"]).read_text())
        assert deepspeed["zero_optimization"]["stage"] == zero_stage
        assert deepspeed["train_micro_batch_size_per_gpu"] == deepspeed["gradient_accumulation_steps"] == "auto"
