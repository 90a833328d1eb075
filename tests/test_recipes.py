"""recipes/train_gpt2m.py: config + command-line parsing, the tiny run end to end (teacher pre-trained once, then
reused), errors before training, and the distributed launches (2-process DDP equals 1 process; ZeRO-2 completes).

Every run is shrunk by command-line overrides (vocab 300, 2 x 32 models, blocks of 32 tokens, a few steps), with
its outputs and `datasets` cache in a temporary folder.
"""

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

from hf_matta import MatGPT2LMHeadModel
from hf_matta import data
from hf_matta.data import BUILTIN_CORPORA, train_bpe_tokenizer


REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "recipes" / "train_gpt2m.py"
NO_DROPOUT = "resid_pdrop=0.0,embd_pdrop=0.0,attn_pdrop=0.0"
# 2-process DDP vs 1 process with the same global batch: fp32, so only the order of the gradient all-reduce differs.
DDP_TOLERANCE = 1e-5  # measured: 1.2e-7 on the train loss, 0 on the evaluation losses


def load_recipe():
    spec = importlib.util.spec_from_file_location("train_gpt2m", RECIPE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


recipe = load_recipe()


def tiny_overrides(out: Path, **changes) -> list[str]:
    """Command-line overrides that shrink the tiny_cpu config to seconds: 2 x 32 models, vocab 300, 32-token blocks."""
    args = {
        "output_dir": out / "matta",
        "tokenizer_name_or_path": out / "tokenizer",
        "tokenizer_vocab_size": 300,
        "teacher_model_name_or_path": out / "teacher",
        "teacher_pretrain_config": f"n_layer=2,n_embd=32,n_head=2,n_positions=32,{NO_DROPOUT}",
        "teacher_pretrain_steps": 2,
        "config_overrides": f"n_layer=2,n_embd=32,n_head=2,n_positions=32,{NO_DROPOUT}",
        "mat_widths": "32 64",
        "student_width": 32,
        "block_size": 32,
        "max_train_samples": 64,
        "max_eval_samples": 8,
        "max_steps": 3,
        "per_device_train_batch_size": 4,
        "per_device_eval_batch_size": 8,
        "warmup_steps": 0,
        "logging_steps": 1,
        "report_to": "none",
        "disable_tqdm": True,
        **changes,
    }
    return [token for name, value in args.items() for token in (f"--{name}", *str(value).split(" "))]


@pytest.fixture
def datasets_cache(tmp_path, monkeypatch):
    cache = tmp_path / "datasets_cache"
    monkeypatch.setenv("HF_DATASETS_CACHE", str(cache))
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", cache)
    return cache


def test_config_file_then_command_line(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("builtin_corpus: pydoc_data.topics\nconfig_overrides: n_layer=2\nmat_widths: [8, 16]\n"
                      "tokenizer_name_or_path: tok\nblock_size: 64\nlearning_rate: 0.01\n")
    model_args, data_args, training_args, path = recipe.parse_args(["--config", str(config), "--block_size", "32"])
    assert path == config
    assert model_args.mat_widths == [8, 16] and model_args.config_overrides == "n_layer=2"
    assert data_args.block_size == 32  # the command line wins
    assert training_args.learning_rate == 0.01  # the file fills what the command line leaves
    json_config = tmp_path / "run.json"
    json_config.write_text(json.dumps({"builtin_corpus": "pydoc_data.topics", "config_overrides": "n_layer=2",
                                       "mat_widths": [8, 16], "tokenizer_name_or_path": "tok"}))
    assert recipe.parse_args(["--config", str(json_config)])[0].mat_widths == [8, 16]


def test_help_lists_every_field(capsys):
    with pytest.raises(SystemExit) as exit_info:
        recipe.parse_args(["--help"])
    assert exit_info.value.code == 0
    shown = capsys.readouterr().out
    for field in ("--config ", "--teacher_pretrain_config", "--validation_split_percentage", "--distill_weight"):
        assert field in shown


def test_no_arguments_is_the_tiny_cpu_default():
    model_args, data_args, training_args, path = recipe.parse_args([])
    assert path.name == "tiny_cpu.yaml"
    assert data_args.builtin_corpus == "pydoc_data.topics"
    assert training_args.teacher_model_name_or_path == "outputs/tiny_cpu/teacher"
    assert model_args.student_width == model_args.mat_widths[0] < model_args.mat_widths[-1]


@pytest.mark.parametrize(
    "config, argv, error, match",
    [
        ("bogus_field: 1\n", [], ValueError, r"unknown fields \['bogus_field'\]"),
        ("builtin_corpus: pydoc_data.topics\nmat_widths: [8]\ntokenizer_name_or_path: t\n", [], ValueError,
         "Neither model_name_or_path"),
        ("builtin_corpus: pydoc_data.topics\nmodel_name_or_path: gpt2\nconfig_overrides: n_layer=2\nmat_widths: [8]\n",
         [], ValueError, "are both set"),
        ("builtin_corpus: pydoc_data.topics\nconfig_overrides: n_layer=2\ntokenizer_name_or_path: t\n", [],
         ValueError, "mat_widths is not set"),
        (None, ["--config", "nowhere.yaml"], FileNotFoundError, "nowhere.yaml"),
    ],
)
def test_bad_configuration_is_refused(tmp_path, config, argv, error, match):
    path = tmp_path / "run.yaml"
    if config is not None:
        path.write_text(config)
    with pytest.raises(error, match=match):
        recipe.parse_args(argv or ["--config", str(path)])


@pytest.mark.parametrize(
    "overrides, match",
    [
        ({"block_size": 64}, r"block_size=64 is larger than the model's context n_positions=32"),
        ({"config": "local.yaml", "text_column": "body"}, r"text_column='body' is not a column .*\['content'\]"),
        ({"extract_plans": "48"}, "48"),
        ({"config_overrides": "n_layers=2"}, "n_layers"),
    ],
)
def test_errors_come_before_training(tmp_path, datasets_cache, monkeypatch, overrides, match):
    (tmp_path / "corpus.jsonl").write_text('{"content": "some text"}\n')
    (tmp_path / "local.yaml").write_text(f"train_file: {tmp_path / 'corpus.jsonl'}\n")
    if "config" in overrides:
        overrides["config"] = tmp_path / overrides["config"]
    monkeypatch.setattr(recipe, "tokenize_and_pack", lambda *a: pytest.fail("tokenised before the check"))
    with pytest.raises(ValueError, match=match):
        recipe.main(tiny_overrides(tmp_path, **overrides))


def test_tiny_run_learns_saves_and_reuses_its_teacher(tmp_path, datasets_cache, monkeypatch):
    summary = recipe.main(tiny_overrides(tmp_path, max_steps=8, learning_rate=0.01, extract_plans="32"))
    for row in summary["widths"].values():
        assert row["end_ppl"] < row["start_ppl"]
    assert summary["teacher_ppl"] is not None and summary["steps"] == 8
    assert summary["train_tokens"] == 8 * 4 * 32 and summary["tokens_per_second"] > 0
    saved = AutoModelForCausalLM.from_pretrained(summary["checkpoint"])
    assert isinstance(saved, MatGPT2LMHeadModel) and saved.config.mat_widths == [32, 64]
    assert (Path(summary["checkpoint"]) / "tokenizer.json").is_file()
    assert (Path(summary["checkpoint"]) / "students" / "ffn32" / "model.safetensors").is_file()
    assert json.loads((Path(summary["checkpoint"]) / "matta_summary.json").read_text()) == summary

    monkeypatch.setattr(recipe, "pretrain_teacher", lambda *a: pytest.fail("teacher pre-trained again"))
    monkeypatch.setattr(data, "train_bpe_tokenizer", lambda *a: pytest.fail("tokenizer trained again"))
    again = recipe.main(tiny_overrides(tmp_path, max_steps=1))
    assert again["teacher_ppl"] is None  # nothing pre-trained this time


@pytest.fixture
def cached_teacher(tmp_path):
    """The tokenizer and a random tiny teacher, saved where the recipe looks for them (so launches skip both)."""
    tokenizer = train_bpe_tokenizer(BUILTIN_CORPORA["pydoc_data.topics"](), vocab_size=300)
    tokenizer.save_pretrained(tmp_path / "tokenizer")
    teacher = GPT2LMHeadModel(
        GPT2Config(
            n_layer=2,
            n_embd=32,
            n_head=2,
            n_positions=32,
            vocab_size=len(tokenizer),
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
    )
    teacher.save_pretrained(tmp_path / "teacher")
    tokenizer.save_pretrained(tmp_path / "teacher")
    return tmp_path


def launch(launcher: list[str], out: Path, cache: Path, **overrides) -> dict:
    """Run the recipe in fresh processes; returns the summary it wrote."""
    env = {**os.environ, "HF_DATASETS_CACHE": str(cache), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    command = [*launcher, str(RECIPE), *tiny_overrides(out, **overrides)]
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return json.loads((Path(overrides["output_dir"]) / "matta_summary.json").read_text())


ACCELERATE = [sys.executable, "-m", "accelerate.commands.launch"]
TWO_CPU_PROCESSES = ["--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
                     "--dynamo_backend", "no"]


def test_two_process_ddp_matches_one_process(cached_teacher, datasets_cache):
    one = launch([sys.executable], cached_teacher, datasets_cache, output_dir=cached_teacher / "one",
                 per_device_train_batch_size=4, max_steps=4)
    two = launch([*ACCELERATE, *TWO_CPU_PROCESSES], cached_teacher, datasets_cache, output_dir=cached_teacher / "two",
                 per_device_train_batch_size=2, max_steps=4)
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
                "--num_processes", "2", "--mixed_precision", "no"]
    summary = launch(launcher, cached_teacher, datasets_cache, output_dir=cached_teacher / "zero2", max_steps=2)
    assert (summary["steps"], summary["processes"], summary["distributed_type"]) == (2, 2, "DEEPSPEED")
    assert all(row["end_loss"] is not None for row in summary["widths"].values())
    assert MatGPT2LMHeadModel.from_pretrained(summary["checkpoint"]).config.mat_widths == [32, 64]


@pytest.mark.parametrize("name, argv", [("tiny_cpu.yaml", []), ("gpt2m.yaml", ["--bf16", "false"])])  # bf16: GPU
def test_recipe_configs_parse(name, argv):
    config = str(REPO / "recipes/configs" / name)
    model_args, data_args, training_args, _ = recipe.parse_args(["--config", config, *argv])
    assert model_args.mat_widths[-1] == 2 * model_args.student_width
    assert training_args.teacher_model_name_or_path is not None


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
                       config.fsdp_config["fsdp_transformer_layer_cls_to_wrap"])
    if zero_stage is not None:
        deepspeed = json.loads((REPO / config.deepspeed_config["deepspeed_config_file"]).read_text())
        assert deepspeed["zero_optimization"]["stage"] == zero_stage
        assert deepspeed["train_micro_batch_size_per_gpu"] == deepspeed["gradient_accumulation_steps"] == "auto"
