"""The `hf-matta` command line: `plans` and `extract` in-process through main([...]), once as the console script."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from hf_matta.cli import main, parse_budget
from hf_matta.data import load_heldout_blocks
from hf_matta.extract import mix_n_match
from hf_matta.widths import count_parameters, format_plan, plan_name

from .test_extract import char_tokenizer, heldout, one_thread, trained  # noqa: F401 (fixtures)


@pytest.fixture(scope="module")
def model_dir(trained, tmp_path_factory) -> Path:
    """The trained nested model saved as the training recipe leaves it: weights, config and tokenizer."""
    folder = tmp_path_factory.mktemp("nested")
    trained.save_pretrained(folder)
    char_tokenizer().save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def heldout_file(heldout, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "heldout.pt"
    torch.save(heldout, path)
    return path


def table_rows(text: str) -> list[list[str]]:
    """The rows of a printed plans table, header dropped, split into cells."""
    return [line.split() for line in text.strip().splitlines()[1:]]


@pytest.mark.parametrize("strategy", ["uniform", "block", "search"])
def test_plans_prints_the_plans_for_each_budget(trained, heldout, model_dir, heldout_file, strategy, capsys):
    budgets = [22_000, 27_000, 30_912]
    argv = ["plans", str(model_dir), "--budgets", "22K,27000,30.912k", "--strategy", strategy]
    assert main([*argv, "--data", str(heldout_file)]) == 0
    expected = mix_n_match(trained, strategy, budgets, heldout)
    rows = table_rows(capsys.readouterr().out)
    assert len(rows) == len(budgets)
    for row, budget, point in zip(rows, budgets, expected):
        assert row == [f"{budget:,}", format_plan(point.widths), f"{point.params:,}", f"{point.val_loss:.4f}"]


def test_plans_without_budgets_or_data_lists_every_granularity(trained, model_dir, capsys):
    assert main(["plans", str(model_dir)]) == 0
    rows = table_rows(capsys.readouterr().out)
    assert rows == [[str(width), f"{count_parameters(trained.config, width):,}", "-"] for width in (16, 32, 64)]


def test_extract_writes_one_loadable_folder_per_plan(trained, model_dir, tmp_path, input_ids, capsys):
    out = tmp_path / "students"
    assert main(["extract", str(model_dir), "--plan", "16", "--plan", "16,64,32", "--out", str(out)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert sorted(os.listdir(out)) == ["ffn16", "ffn16-64-32"]
    assert lines[0].startswith(f"{out / 'ffn16'}: GPT2LMHeadModel (stock GPT-2), plan 16, 21,552 parameters")
    assert lines[1].startswith(f"{out / 'ffn16-64-32'}: MatGPT2LMHeadModel (needs trust_remote_code=True)")
    for folder, plan in {"ffn16": 16, "ffn16-64-32": [16, 64, 32]}.items():
        student = AutoModelForCausalLM.from_pretrained(out / folder)
        expected = trained(input_ids, ffn_widths=plan).logits
        torch.testing.assert_close(student(input_ids).logits, expected, atol=1e-5, rtol=0)
        assert (out / folder / "tokenizer.json").is_file()


def test_extract_never_overwrites_without_overwrite(model_dir, tmp_path, capsys):
    out = tmp_path / "students"
    assert main(["extract", str(model_dir), "--plan", "16,64,32", "--out", str(out)]) == 0
    weights = out / "ffn16-64-32" / "model.safetensors"
    written = weights.stat().st_mtime_ns
    with pytest.raises(SystemExit) as exit_info:  # the second plan is new, yet nothing is written: checked first
        main(["extract", str(model_dir), "--plan", "32", "--plan", "16,64,32", "--out", str(out)])
    assert exit_info.value.code == 2
    assert "ffn16-64-32" in capsys.readouterr().err and not (out / "ffn32").exists()
    assert weights.stat().st_mtime_ns == written
    assert main(["extract", str(model_dir), "--plan", "16,64,32", "--out", str(out), "--overwrite"]) == 0
    assert weights.stat().st_mtime_ns != written


def test_extract_one_student_per_budget(trained, heldout, model_dir, heldout_file, tmp_path, capsys):
    out = tmp_path / "students"
    argv = ["extract", str(model_dir), "--budgets", "25K,28K", "--strategy", "search", "--data", str(heldout_file)]
    assert main([*argv, "--out", str(out)]) == 0
    points = mix_n_match(trained, "search", [25_000, 28_000], heldout)
    assert sorted(os.listdir(out)) == sorted(plan_name(point.widths) for point in points)
    summary = capsys.readouterr().out
    for point in points:
        assert f"{point.params:,} parameters, val loss {point.val_loss:.4f}" in summary


BAD_ARGUMENTS = {
    "plan-wrong-length": (["extract", "{model}", "--plan", "16,32", "--out", "{out}"], ["[16, 32]", "n_layer=3"]),
    "plan-not-a-granularity": (
        ["extract", "{model}", "--plan", "16,48,64", "--out", "{out}"],
        ["width 48 of layer 1", "[16, 32, 64]"],
    ),
    "plan-unparsable": (["extract", "{model}", "--plan", "16,x", "--out", "{out}"], ["'16,x'", "'x'"]),
    "budget-below-student": (
        ["extract", "{model}", "--budgets", "10K", "--out", "{out}"],
        ["budget 10,000", "below the smallest student", "21,552 to 30,912"],
    ),
    "budget-above-ta": (
        ["plans", "{model}", "--budgets", "1M", "--strategy", "block"],
        ["budget 1,000,000", "above the TA", "30,912"],
    ),
    "budget-unparsable": (["plans", "{model}", "--budgets", "10Q"], ["'10Q'", "10M"]),
    "search-without-data": (["plans", "{model}", "--strategy", "search"], ["--data"]),
    "not-a-folder": (["plans", "{out}/missing"], ["missing", "not a folder"]),
    "plan-and-budgets": (["extract", "{model}", "--plan", "16", "--budgets", "25K", "--out", "{out}"], ["--plan"]),
}


@pytest.mark.parametrize("argv, fragments", BAD_ARGUMENTS.values(), ids=BAD_ARGUMENTS.keys())
def test_bad_arguments_exit_2_naming_the_value(model_dir, tmp_path, argv, fragments, capsys):
    out = tmp_path / "students"
    with pytest.raises(SystemExit) as exit_info:
        main([arg.format(model=model_dir, out=out) for arg in argv])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    for fragment in fragments:
        assert fragment in error
    assert not out.exists()  # refused before anything was written


BUDGETS = {"20000": 20_000, "1.5K": 1_500, "10M": 10_000_000, "1.3B": 1_300_000_000, "2g": 2_000_000_000}


@pytest.mark.parametrize("text, count", BUDGETS.items())
def test_parse_budget(text, count):
    assert parse_budget(text) == count


@pytest.mark.parametrize("text", ["1.25K0", "1.2345K", "-5", "M", ""])
def test_parse_budget_refuses(text):
    with pytest.raises(ValueError, match="not a whole parameter count"):
        parse_budget(text)


def test_console_script(model_dir):
    script = Path(sys.executable).with_name("hf-matta")
    result = subprocess.run(
        [str(script), "plans", str(model_dir), "--budgets", "27K", "--strategy", "block"],
        capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}, check=True,
    )  # fmt: skip
    assert table_rows(result.stdout) == [["27,000", "32,64,32", "26,752", "-"]]


@pytest.mark.parametrize(
    "argv, status",
    [(["--help"], 0), (["extract", "MODEL", "--plan", "abc", "--out", "x"], 2), (["plans", "M", "--budgets", "1Q"], 2)],
)
def test_help_and_argument_errors_answer_without_torch(argv, status):
    """The command line starts light: torch and transformers load only for the command that runs."""
    code = (
        "import sys\nfrom hf_matta.cli import main\n"
        f"try:\n    main({argv!r})\nexcept SystemExit as exit:\n    code = exit.code\n"
        "print(code, sorted(name for name in ('torch', 'transformers', 'datasets') if name in sys.modules))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip().splitlines()[-1] == f"{status} []"


def test_plans_measure_on_text_through_the_data_pipeline(trained, model_dir, tmp_path, capsys):
    """A text file is tokenised with MODEL_DIR's tokenizer and packed as hf_matta.data packs training text."""
    lines = ["the quick brown fox jumps over the lazy dog.", "pack my box with five dozen liquor jugs!"] * 4
    path = tmp_path / "heldout.txt"
    path.write_text("\n".join(lines) + "\n")
    tokenizer = char_tokenizer()
    blocks = load_heldout_blocks(str(path), tokenizer, block_size=16, max_blocks=4)
    stream = [token for line in lines for token in [*tokenizer(line)["input_ids"], tokenizer.eos_token_id]]
    assert blocks.tolist() == [stream[i : i + 16] for i in range(0, 4 * 16, 16)]

    argv = ["plans", str(model_dir), "--data", str(path), "--block-size", "16", "--max-blocks", "4"]
    assert main([*argv, "--strategy", "block"]) == 0
    expected = mix_n_match(trained, "block", input_ids=blocks)
    rows = table_rows(capsys.readouterr().out)
    assert [row[-1] for row in rows] == [f"{point.val_loss:.4f}" for point in expected]
