"""lm-eval-harness on students: the default tasks offline from fixture files in the real schemas, checked against
hand-computed scores; the in-memory nested path; the held-out task; the outputs; and every bad input named."""

import inspect
import json
import math
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import lm_eval
import numpy as np
import pytest
import torch
from lm_eval.tasks._yaml_loader import load_yaml
from transformers import AutoModelForCausalLM

from hf_matta.cli import main
from hf_matta.data import DataArguments, load_corpus
from hf_matta.evaluation import (
    DEFAULT_TASKS,
    HELDOUT_DEFAULTS,
    TASKS_DIR,
    agieval_zero_shot,
    evaluate_students,
    heldout_documents,
    last_word_passages,
    load_lambada_heldout,
    load_results,
    primary_metric,
    relative_improvement,
    results_for_plan,
)
from hf_matta.extract import extract_student, save_student
from hf_matta.models import MatGPT2Config, MatGPT2LMHeadModel
from hf_matta.widths import count_parameters

from .conftest import tiny_kwargs
from .test_extract import char_tokenizer


# Text the tiny model learns by heart: LAMBADA passages taken from it can be completed; the others mostly cannot.
MEMORISED = [
    "the quick brown fox jumps over the lazy dog and the dog sleeps in the sun",
    "a small bird sings in the green tree every morning before the rain",
    "she opened the old wooden door and found a box full of gold",
    "we walked along the river until the road turned into a narrow path",
    "the baker puts fresh bread on the shelf each day at dawn",
    "my brother reads a long book about ships and the open sea",
]
NOVEL = [
    "the teacher wrote a question on the board and waited for an answer",
    "they painted the fence blue before the guests arrived for dinner",
    "an owl watched the field while the farmer counted his sheep",
    "the children built a castle of sand near the cold water",
]
SAT_MATH = [  # AGIEval's raw schema, as in data/v1/sat-math.jsonl
    {"passage": "", "question": "If x+1=3, what is x?", "options": ["(A)1", "(B)2", "(C)3", "(D)4"], "label": "B"},
    {"passage": "", "question": "What is 2*3?", "options": ["(A)5", "(B)6", "(C)8", "(D)9"], "label": "B"},
    {"passage": "", "question": "Which is even?", "options": ["(A)3", "(B)5", "(C)7", "(D)8"], "label": "D"},
    {"passage": "A=5. ", "question": "What is A-1?", "options": ["(A)4", "(B)6", "(C)1", "(D)0"], "label": "A"},
    {"passage": "", "question": "What is 9/3?", "options": ["(A)2", "(B)1", "(C)3", "(D)6"], "label": "C"},
    {"passage": "", "question": "Solve 2y=10.", "options": ["(A)20", "(B)8", "(C)12", "(D)5"], "label": "D"},
    {"passage": "", "question": "What is 7-7?", "options": ["(A)0", "(B)7", "(C)14", "(D)1"], "label": "A"},
    {"passage": "", "question": "Half of 8?", "options": ["(A)2", "(B)16", "(C)4", "(D)6"], "label": "C"},
]
WIDTHS = [32, 64]
PLANS = {"ffn32": [32, 32], "ffn32-64": [32, 64]}  # a uniform student (stock GPT-2) and a mixed one (MatGPT2)


@pytest.fixture(scope="module")
def tokenizer():
    return char_tokenizer()


@pytest.fixture(scope="module")
def nested(tokenizer) -> MatGPT2LMHeadModel:
    """A 2-layer nested model (FFN 32 inside 64) that has learnt MEMORISED by heart at both widths."""
    torch.manual_seed(0)
    config = MatGPT2Config(**tiny_kwargs(n_positions=128), mat_widths=WIDTHS, student_width=32)
    model = MatGPT2LMHeadModel(config)
    documents = [tokenizer.encode(text) + [tokenizer.eos_token_id] for text in MEMORISED]
    stream = torch.tensor([token for document in documents * 2 for token in document])
    starts = torch.tensor([0] + [len(document) for document in documents[:-1]]).cumsum(0)  # each passage's start
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(60):  # windows start where passages start: positions as at evaluation, where each is alone
        batch = torch.stack([stream[start : start + 96] for start in starts[torch.randint(0, len(starts), (16,))]])
        loss = sum(model(batch, labels=batch, ffn_widths=width).loss for width in WIDTHS)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


@pytest.fixture(scope="module")
def folders(nested, tokenizer, tmp_path_factory) -> dict[str, Path]:
    """The nested model and the two students, saved as the recipe and `hf-matta extract` save them."""
    root = tmp_path_factory.mktemp("models")
    saved = {name: save_student(extract_student(nested, plan), root / name, tokenizer) for name, plan in PLANS.items()}
    nested.save_pretrained(root / "nested")
    tokenizer.save_pretrained(root / "nested")
    return {**saved, "nested": root / "nested"}


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows))
    return path


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    """`lambada_test.jsonl` and a raw AGIEval `sat-math.jsonl`, named and shaped as the real files."""
    folder = tmp_path_factory.mktemp("benchmarks")
    write_jsonl(folder / "lambada_test.jsonl", [{"text": text} for text in MEMORISED + NOVEL])
    write_jsonl(folder / "sat-math.jsonl", [{**row, "other": {"solution": "..."}} for row in SAT_MATH])
    return folder


@pytest.fixture(scope="module")
def cli_run(folders, data_dir, tmp_path_factory) -> Path:
    """`hf-matta eval` on both students, both default tasks, offline from `data_dir`, the uniform one the baseline."""
    out = tmp_path_factory.mktemp("eval") / "results"
    argv = ["eval", str(folders["ffn32"]), str(folders["ffn32-64"]), "--data-dir", str(data_dir)]
    assert main([*argv, "--output-dir", str(out), "--batch-size", "4", "--baseline", "ffn32"]) == 0
    return out


def loglikelihood(model, tokenizer, context: str, continuation: str) -> tuple[float, bool]:
    """log p(continuation | context) and whether greedy decoding gives exactly it, computed by hand."""
    whole = tokenizer.encode(context + continuation)
    n_context = len(tokenizer.encode(context))
    with torch.no_grad():
        logprobs = torch.log_softmax(model(torch.tensor([whole[:-1]])).logits[0].double(), dim=-1)  # (T - 1, V)
    targets = torch.tensor(whole[n_context:])
    rows = logprobs[n_context - 1 :]
    return rows.gather(1, targets[:, None]).sum().item(), bool((rows.argmax(-1) == targets).all())


def table(path: Path) -> dict[str, list[str]]:
    """The first Markdown table of results.md: {student: cells}."""
    rows = [line for line in path.read_text().splitlines() if line.startswith("| ")]
    header = [cell.strip() for cell in rows[0].strip("|").split("|")]
    body = {}
    for row in rows[1:]:
        cells = [cell.strip() for cell in row.strip("|").split("|")]
        if len(cells) != len(header) or cells[0] in body:
            break
        body[cells[0]] = dict(zip(header, cells))
    return body


def test_cli_writes_three_outputs_that_agree(cli_run, nested):
    results = load_results(cli_run)
    assert results["tasks"] == ["agieval_sat_math", "lambada_openai"]
    assert results["lm_eval_version"] == lm_eval.__version__
    assert [(s["name"], s["role"], s["plan"]) for s in results["students"]] == [
        ("ffn32", "baseline", [32, 32]),
        ("ffn32-64", "student", [32, 64]),
    ]
    for student in results["students"]:
        assert student["parameters"] == count_parameters(nested.config, student["plan"])
        assert set(student["results"]["lambada_openai"]) == {"acc", "acc_stderr", "perplexity", "perplexity_stderr"}
        assert set(student["results"]["agieval_sat_math"]) == {"acc", "acc_stderr", "acc_norm", "acc_norm_stderr"}
    assert results["task_info"]["lambada_openai"]["n_samples"] == len(MEMORISED + NOVEL)
    assert results["task_info"]["agieval_sat_math"]["n_samples"] == len(SAT_MATH)
    assert results["students"][0]["truncated_requests"] == {"agieval_sat_math": 0, "lambada_openai": 0}

    rows = table(cli_run / "results.md")
    for student in results["students"]:
        row = rows[student["name"]]
        assert row["parameters"] == f"{student['parameters']:,}" and row["role"] == student["role"]
        for task, metrics in student["results"].items():
            for metric in ("acc", "perplexity", "acc_norm"):
                if metric in metrics:
                    value, stderr = (float(part.replace(",", "")) for part in row[f"{task} {metric}"].split(" ± "))
                    assert value == pytest.approx(metrics[metric], abs=0.006)
                    assert stderr == pytest.approx(metrics[f"{metric}_stderr"], abs=0.006)
    png = (cli_run / "elastic_curve.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 10_000


def test_lambada_accuracy_equals_a_greedy_last_word_check(cli_run, folders, tokenizer):
    results = load_results(cli_run)
    greedy = {}
    for name in PLANS:
        model = AutoModelForCausalLM.from_pretrained(folders[name]).eval()
        scores = [loglikelihood(model, tokenizer, *text.rsplit(" ", 1)[0:1], " " + text.rsplit(" ", 1)[1])
                  for text in MEMORISED + NOVEL]  # fmt: skip
        greedy[name] = np.array([is_greedy for _, is_greedy in scores], dtype=float)
        lambada = results_for_plan(results, PLANS[name])["results"]["lambada_openai"]
        assert lambada["acc"] == greedy[name].mean()
        assert lambada["perplexity"] == pytest.approx(math.exp(-np.mean([ll for ll, _ in scores])), rel=1e-5)
    assert 0 < greedy["ffn32-64"].mean() < 1  # the check can tell right from wrong
    # the paired relative improvement over the baseline, from the same per-passage results
    x, y = greedy["ffn32-64"], greedy["ffn32"]
    ratio = x.mean() / y.mean()
    relative = results["relative"]["ffn32-64"]["lambada_openai"]
    assert relative["acc"] == pytest.approx(ratio - 1)
    assert relative["acc_stderr"] == pytest.approx((x - ratio * y).std(ddof=1) / (math.sqrt(len(x)) * y.mean()))


def test_sat_math_accuracy_equals_an_argmax_over_the_choices(cli_run, folders, tokenizer):
    results = load_results(cli_run)
    for name in PLANS:
        model = AutoModelForCausalLM.from_pretrained(folders[name]).eval()
        right, right_norm = [], []
        for row in SAT_MATH:
            query = (
                f"{row['passage']}Q: {row['question']} Answer Choices: {' '.join(row['options'])}\n"
                "A: Among A through D, the answer is"
            )
            scores = np.array([loglikelihood(model, tokenizer, query, " " + option)[0] for option in row["options"]])
            gold = "ABCD".index(row["label"])
            right.append(scores.argmax() == gold)
            right_norm.append((scores / [len(option) for option in row["options"]]).argmax() == gold)
        sat = results_for_plan(results, PLANS[name])["results"]["agieval_sat_math"]
        assert sat["acc"] == pytest.approx(np.mean(right), abs=1e-12)
        assert sat["acc_norm"] == pytest.approx(np.mean(right_norm), abs=1e-12)


def test_nested_model_in_memory_equals_the_saved_students(cli_run, nested, tokenizer, data_dir, tmp_path):
    results = evaluate_students(
        nested_model=nested,
        tokenizer=tokenizer,
        plans=[32, [32, 64], 64],
        nested_name="runs/matta",
        data_dir=data_dir,
        batch_size=4,
        output_dir=tmp_path,
        progress=False,
    )
    assert [(s["name"], s["role"], s["source"]) for s in results["students"]] == [
        ("ffn32", "student", "nested:runs/matta"),
        ("ffn32-64", "member", "nested:runs/matta"),
        ("ffn64", "ta", "nested:runs/matta"),
    ]
    saved = load_results(cli_run)
    for plan in PLANS.values():
        in_memory, from_folder = results_for_plan(results, plan)["results"], results_for_plan(saved, plan)["results"]
        for task in DEFAULT_TASKS:
            assert in_memory[task] == pytest.approx(from_folder[task], rel=1e-6)
    assert results_for_plan(results, 64)["parameters"] == count_parameters(nested.config, 64)
    assert results_for_plan(results, [64, 32]) is None
    assert load_results(tmp_path / "results.json") == json.loads(json.dumps(results))


def test_a_nested_folder_stands_for_its_granularities(folders, tmp_path):
    results = evaluate_students(
        [folders["nested"]], ["lambada_heldout"], limit=2, output_dir=tmp_path, progress=False, batch_size=2
    )
    assert [(s["name"], s["role"]) for s in results["students"]] == [("ffn32", "student"), ("ffn64", "ta")]
    assert results["task_info"]["lambada_heldout"]["n_samples"] == 2
    assert set(results["students"][0]["results"]["lambada_heldout"]) == {
        "acc", "acc_stderr", "perplexity", "perplexity_stderr"
    }  # fmt: skip
    assert results["config"]["heldout_data"] == HELDOUT_DEFAULTS
    assert results["students"][0]["truncated_requests"] == {"lambada_heldout": 2}  # 50+ words, 128 characters
    table = (tmp_path / "results.md").read_text()
    assert "| ffn64 | ta |" in table and "cut from the left as lm-eval does (per model): lambada_heldout 2." in table


def test_heldout_task_reads_the_training_runs_held_out_documents_only():
    raw = load_corpus(DataArguments(builtin_corpus="pydoc_data.topics", validation_split_percentage=10), seed=0)
    documents = heldout_documents()
    assert documents == {split: list(raw[split]["text"]) for split in ("train", "validation")}
    assert len(documents["validation"]) == 8
    passages = [passage["text"] for passage in load_lambada_heldout()["test"]]
    assert len(passages) >= 50
    for text in passages:
        context, target = text.rsplit(" ", 1)
        assert " ".join(text.split(" ")[:-1]) == context and text.split(" ")[-1] == target  # lambada_openai's split
        assert re.fullmatch(r"[A-Za-z]{3,}", target) and len(context.split()) >= 50
        assert any(text + end in document for document in documents["validation"] for end in ".!?")
        assert not any(text in document for document in documents["train"])


def test_last_word_passages_end_sentences_and_do_not_overlap():
    document = "one two three four five six.\nseven eight nine ten end.\nmore words here now ok\nfinal words stop."
    assert last_word_passages([document], context_words=3) == [
        {"text": "one two three four five six"},
        {"text": "seven eight nine ten end"},
        {"text": "more words here now ok\nfinal words stop"},
    ]
    assert last_word_passages(["one two  end."], context_words=1) == []  # split(" ") would give "" before "end"


def test_agieval_zero_shot_prompt():
    row = {"passage": "P. ", "question": "What?", "options": ["(A)1", "(B)2", "(C)3"], "label": "C"}
    assert agieval_zero_shot(row) == {
        "query": "P. Q: What? Answer Choices: (A)1 (B)2 (C)3\nA: Among A through C, the answer is",
        "choices": ["(A)1", "(B)2", "(C)3"],
        "gold": [2],
    }


@pytest.mark.parametrize("task", ["lambada_openai", "agieval_sat_math"])
def test_local_task_definitions_match_lm_evals_own(task):
    builtin_dir = Path(lm_eval.__file__).parent / "tasks"
    builtin = load_yaml(builtin_dir / {"lambada_openai": "lambada/lambada_openai.yaml",
                                       "agieval_sat_math": "agieval/sat-math.yaml"}[task])  # fmt: skip
    ours = load_yaml(TASKS_DIR / "local_files" / f"{task}.yaml")
    data_keys = {"dataset_path", "dataset_name", "dataset_kwargs", "custom_dataset", "tag"}
    assert set(builtin) - data_keys == set(ours) - data_keys
    for key in set(builtin) - data_keys:
        if callable(builtin[key]):  # the same function of lm-eval's, imported by name instead of by path
            assert inspect.getsource(ours[key]) == inspect.getsource(builtin[key])
        else:
            assert ours[key] == builtin[key], key


def test_the_wheel_ships_the_task_definitions(tmp_path):
    # `hf-matta eval` reads them from inside the package: a wheel install (not only a clone) must have them. Built
    # from a copy of the project, so that the build leaves nothing in the checkout.
    root = Path(__file__).resolve().parents[1]
    project = tmp_path / "project"
    shutil.copytree(root / "src", project / "src", ignore=shutil.ignore_patterns("*.egg-info", "__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(root / name, project / name)
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-w",
         tmp_path / "dist", project], capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert built.returncode == 0, built.stderr[-2000:]
    (wheel,) = (tmp_path / "dist").glob("hf_matta-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    shipped = {path.relative_to(root / "src").as_posix() for path in TASKS_DIR.rglob("*.yaml")}
    assert len(shipped) == 3 and shipped <= names, sorted(shipped - names)


def test_the_curve_shows_accuracy_unless_it_tells_no_model_apart():
    def results(*rows: dict) -> dict:
        return {"students": [{"results": {"lambada_openai": row}} for row in rows]}

    differ = results({"perplexity": 9.0, "acc": 0.1}, {"perplexity": 8.0, "acc": 0.2})
    all_zero = results({"perplexity": 9.0, "acc": 0.0}, {"perplexity": 8.0, "acc": 0.0})
    assert primary_metric(differ, "lambada_openai") == "acc"
    assert primary_metric(all_zero, "lambada_openai") == "perplexity"
    assert primary_metric(results({"perplexity": 9.0, "acc": 0.0}), "lambada_openai") == "acc"  # one model


def test_relative_improvement_of_perplexity_is_paired():
    student = {"doc_id": np.arange(4), "perplexity": np.array([-1.0, -2.0, -1.5, -0.5])}
    baseline = {"doc_id": np.arange(4), "perplexity": np.array([-1.2, -2.1, -1.9, -0.6])}
    value, stderr = relative_improvement(0, 1, None, None, False, "perplexity", student, baseline, "perplexity")
    differences = student["perplexity"] - baseline["perplexity"]
    assert value == pytest.approx(1 - math.exp(-differences.mean()))  # lower perplexity: a positive improvement
    assert stderr == pytest.approx(math.exp(-differences.mean()) * differences.std(ddof=1) / 2)
    assert relative_improvement(0.3, 0.0, 0.1, 0.0, True) == (None, None)
    independent = relative_improvement(0.3, 0.2, 0.03, 0.04, True)  # no per-document values: errors combined
    assert independent == pytest.approx((0.5, math.sqrt(0.03**2 + 1.5**2 * 0.04**2) / 0.2))


def test_existing_results_are_never_overwritten(folders, tmp_path, capsys):
    (tmp_path / "results.md").write_text("mine")
    with pytest.raises(SystemExit) as exit_info:
        main(["eval", str(folders["ffn32"]), "--tasks", "lambada_heldout", "--output-dir", str(tmp_path)])
    assert exit_info.value.code == 2
    assert "already holds ['results.md']" in capsys.readouterr().err
    assert (tmp_path / "results.md").read_text() == "mine"


def bad_data_dir(tmp_path: Path, lambada: list | None = None, sat: list | None = None, sat_name="sat-math.jsonl"):
    folder = tmp_path / "data"
    folder.mkdir()
    if lambada is not None:
        write_jsonl(folder / "lambada_test.jsonl", lambada)
    if sat is not None:
        write_jsonl(folder / sat_name, sat)
    return folder


GOOD_LAMBADA = [{"text": "a passage and its last word"}]
BAD_INPUTS = {
    "unknown task": (
        lambda tmp, folders: [folders["ffn32"], "--tasks", "lambada_opena"],
        ["unknown task 'lambada_opena'", "did you mean lambada_openai", "lm-eval ls tasks"],
    ),
    "task needing the network while offline": (
        lambda tmp, folders: [folders["ffn32"], "--tasks", "lambada_openai"],
        [
            "'lambada_openai' needs its data from the Hub",
            "--data-dir DIR holding lambada_test.jsonl",
            "--tasks lambada_heldout",
        ],
    ),
    "missing data file": (
        lambda tmp, folders: [folders["ffn32"], "--data-dir", bad_data_dir(tmp, lambada=GOOD_LAMBADA)],
        ["has no sat-math.lm-eval.jsonl or sat-math.jsonl for task 'agieval_sat_math'"],
    ),
    "data dir that does not exist": (
        lambda tmp, folders: [folders["ffn32"], "--data-dir", tmp / "nowhere"],
        ["--data-dir", "nowhere' is not a folder"],
    ),
    "malformed JSON line": (
        lambda tmp, folders: [
            folders["ffn32"], "--tasks", "lambada_openai", "--data-dir",
            bad_data_dir(tmp, lambada=[*GOOD_LAMBADA, *GOOD_LAMBADA, "{not json"]),
        ],  # fmt: skip
        ["lambada_test.jsonl, line 3: not valid JSON", '{"text": '],
    ),
    "missing field": (
        lambda tmp, folders: [
            folders["ffn32"], "--data-dir",
            bad_data_dir(tmp, lambada=GOOD_LAMBADA, sat=[{k: v for k, v in SAT_MATH[0].items() if k != "label"}]),
        ],  # fmt: skip
        ["sat-math.jsonl, line 1", "'label'"],
    ),
    "bad gold index": (
        lambda tmp, folders: [
            folders["ffn32"], "--data-dir",
            bad_data_dir(tmp, lambada=GOOD_LAMBADA, sat=[{"query": "Q", "choices": ["a", "b"], "gold": [2]}],
                         sat_name="sat-math.lm-eval.jsonl"),
        ],  # fmt: skip
        ["sat-math.lm-eval.jsonl, line 1: gold [2] is not an index into its 2 choices"],
    ),
    "folder that is not a model": (
        lambda tmp, folders: [tmp],
        ["is a folder without config.json, not a saved model"],
    ),
    "path that does not exist": (
        lambda tmp, folders: [tmp / "students" / "ffn256", "--tasks", "lambada_heldout"],
        ["ffn256' does not exist"],
    ),
    "Hub id while offline": (
        lambda tmp, folders: ["hf-matta-tests/no-such-model", "--tasks", "lambada_heldout"],
        ["'hf-matta-tests/no-such-model' is not a local folder", "HF_HUB_OFFLINE=1"],
    ),
    "dtype that is not a float": (
        lambda tmp, folders: [folders["ffn32"], "--dtype", "int8", "--tasks", "lambada_heldout"],
        ["dtype 'int8' is not a floating torch dtype; use auto, float32, bfloat16 or float16"],
    ),
    "batch size that is not one": (
        lambda tmp, folders: [folders["ffn32"], "--batch-size", "some", "--tasks", "lambada_heldout"],
        ["batch_size 'some' must be a positive int, or 'auto'"],
    ),
    "limit of zero": (
        lambda tmp, folders: [folders["ffn32"], "--limit", "0", "--tasks", "lambada_heldout"],
        ["limit=0.0 must be a whole number of documents, or a fraction between 0 and 1"],
    ),
    "plan without a nested model": (
        lambda tmp, folders: [folders["ffn32"], "--plan", "32", "--tasks", "lambada_heldout"],
        ["are widths of a nested model"],
    ),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_named_with_what_to_do(case, folders, tmp_path, capsys):
    arguments, fragments = BAD_INPUTS[case]
    argv = ["eval", *(str(argument) for argument in arguments(tmp_path, folders))]
    with pytest.raises(SystemExit) as exit_info:
        main([*argv, "--output-dir", str(tmp_path / "out")])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    for fragment in fragments:
        assert fragment in error
    assert not (tmp_path / "out").exists()  # nothing was written

