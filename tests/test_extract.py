"""Extraction and Mix'n'Match on a tiny nested model trained in-process: exact students, loadable anywhere."""

import copy
import json
import os
import string
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors import safe_open
from tokenizers import Regex, Tokenizer, models, pre_tokenizers
from transformers import AutoModel, AutoModelForCausalLM, GPT2LMHeadModel, GPT2Model, PreTrainedTokenizerFast

from hf_matta import MatGPT2Config, MatGPT2LMHeadModel, MatGPT2Model
from hf_matta.extract import extract_student, mix_n_match, save_student, search_plans, validation_loss
from hf_matta.widths import (
    block_plans,
    check_plan,
    count_parameters,
    format_plan,
    parse_plan,
    plan_name,
    uniform_plans,
)

from .conftest import VOCAB, tiny_kwargs


ATOL = 1e-5
GRANULARITIES = [16, 32, 64]
N_LAYER = 3
ALPHABET = 8  # the synthetic language uses tokens 0..7


def second_order_stream(n_rows: int, seed: int, length: int = 32) -> torch.LongTensor:
    """(n_rows, length) tokens where each token is a fixed function of the two before it, 10 % of them noise."""
    generator = torch.Generator().manual_seed(seed)
    table = torch.randint(0, ALPHABET, (ALPHABET, ALPHABET), generator=torch.Generator().manual_seed(1))
    columns = list(torch.randint(0, ALPHABET, (2, n_rows), generator=generator))
    for _ in range(length - 2):
        noise = torch.rand(n_rows, generator=generator) < 0.1
        random = torch.randint(0, ALPHABET, (n_rows,), generator=generator)
        columns.append(torch.where(noise, random, table[columns[-2], columns[-1]]))
    return torch.stack(columns, dim=1)


def char_tokenizer() -> PreTrainedTokenizerFast:
    """A character-level tokenizer whose ids fit the tiny vocabulary (0..95 characters, eos = VOCAB - 1)."""
    chars = sorted(set(string.ascii_letters + string.digits + string.punctuation + " \n"))  # 96 characters
    vocab = {char: idx for idx, char in enumerate(chars)}
    vocab.update({"<unk>": len(chars), "<|endoftext|>": VOCAB - 1})
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", eos_token="<|endoftext|>")


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models run fastest on one thread (and share the machine's cores with other processes best)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def trained(one_thread) -> MatGPT2LMHeadModel:
    """A 3-layer nested model trained for 60 AdamW steps at every granularity, so that widths differ."""
    torch.manual_seed(0)
    config = MatGPT2Config(**tiny_kwargs(n_layer=N_LAYER), mat_widths=GRANULARITIES)
    model = MatGPT2LMHeadModel(config)
    stream = second_order_stream(512, seed=2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(60):
        batch = stream[torch.randint(0, len(stream), (16,))]
        loss = sum(model(batch, labels=batch, ffn_widths=width).loss for width in GRANULARITIES)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


@pytest.fixture(scope="module")
def heldout() -> torch.LongTensor:
    return second_order_stream(32, seed=3)


PLANS = {
    "uniform16": 16,
    "uniform32": 32,
    "uniform64": 64,
    "mixed": [16, 64, 32],
    "block": [16, 32, 32],
}


def is_uniform(plan) -> bool:
    return isinstance(plan, int)


@pytest.fixture(scope="module")
def saved_students(trained, tmp_path_factory) -> dict:
    """Every plan of PLANS extracted and saved with a tokenizer: {case: folder}."""
    root = tmp_path_factory.mktemp("students")
    tokenizer = char_tokenizer()
    return {case: save_student(extract_student(trained, plan), root / case, tokenizer) for case, plan in PLANS.items()}


def test_block_case_is_a_block_plan(trained):
    assert tuple(PLANS["block"]) in block_plans(trained.config)


@pytest.mark.parametrize("plan", PLANS.values(), ids=PLANS.keys())
def test_student_equals_nested_model_at_plan(trained, plan, input_ids):
    student = extract_student(trained, plan)
    assert type(student) is (GPT2LMHeadModel if is_uniform(plan) else MatGPT2LMHeadModel)
    if is_uniform(plan):
        assert student.config.model_type == "gpt2" and student.config.n_inner == plan
        assert getattr(student.config, "auto_map", None) is None
    else:
        assert student.config.n_inner == plan and student.config.mat_widths == []
    expected = trained(input_ids, ffn_widths=plan).logits
    torch.testing.assert_close(student(input_ids).logits, expected, atol=ATOL, rtol=0)
    # exactly the plan's parameters, as predicted; the head tied to the embedding; copies, not views of the TA
    assert sum(p.numel() for p in student.parameters()) == count_parameters(trained.config, plan)
    assert student.lm_head.weight.data_ptr() == student.transformer.wte.weight.data_ptr()
    ta_pointers = {p.data_ptr() for p in trained.parameters()}
    assert not ta_pointers & {p.data_ptr() for p in student.parameters()}


@pytest.mark.parametrize("plan", [PLANS["uniform32"], PLANS["mixed"]], ids=["uniform32", "mixed"])
def test_student_generates_as_the_nested_model(trained, plan, input_ids):
    student = extract_student(trained, plan)
    kwargs = dict(max_new_tokens=6, do_sample=False, pad_token_id=VOCAB - 1)
    expected = trained.generate(input_ids, ffn_widths=plan, **kwargs)
    assert torch.equal(student.generate(input_ids, **kwargs), expected)
    assert student.generation_config.eos_token_id == trained.generation_config.eos_token_id


def test_extraction_follows_the_model_dtype(trained):
    student = extract_student(copy.deepcopy(trained).to(torch.bfloat16), [16, 64, 32])
    assert student.dtype == torch.bfloat16
    assert all(p.dtype == torch.bfloat16 for p in student.parameters())


@pytest.mark.parametrize("case", PLANS)
def test_save_load_round_trip(trained, saved_students, case, input_ids):
    folder, plan = saved_students[case], PLANS[case]
    files = set(os.listdir(folder))
    assert {"model.safetensors", "config.json", "generation_config.json", "tokenizer.json"} <= files
    assert ({"modeling_matgpt2.py", "configuration_matgpt2.py"} <= files) is not is_uniform(plan)
    config = json.loads((folder / "config.json").read_text())
    if is_uniform(plan):
        assert config["model_type"] == "gpt2" and "auto_map" not in config and "mat_widths" not in config
    else:
        assert config["model_type"] == "matgpt2" and config["mat_widths"] == []
        assert set(config["auto_map"]) == {"AutoConfig", "AutoModel", "AutoModelForCausalLM"}
    with safe_open(folder / "model.safetensors", "pt") as weights:  # nothing beyond the student's own parameters
        student = extract_student(trained, plan)
        assert set(weights.keys()) == {name for name, _ in student.named_parameters()}
        stored = sum(weights.get_tensor(name).numel() for name in weights.keys())
        assert stored == count_parameters(trained.config, plan)

    # hf_matta is imported here, so plain from_pretrained loads a mixed student through the registered classes
    causal_lm = AutoModelForCausalLM.from_pretrained(folder)
    assert type(causal_lm) is (GPT2LMHeadModel if is_uniform(plan) else MatGPT2LMHeadModel)
    expected = trained(input_ids, ffn_widths=plan)
    torch.testing.assert_close(causal_lm(input_ids).logits, expected.logits, atol=ATOL, rtol=0)
    bare = AutoModel.from_pretrained(folder)
    assert type(bare) is (GPT2Model if is_uniform(plan) else MatGPT2Model)
    hidden = trained.transformer(input_ids, ffn_widths=plan).last_hidden_state
    torch.testing.assert_close(bare(input_ids).last_hidden_state, hidden, atol=ATOL, rtol=0)
    assert PreTrainedTokenizerFast.from_pretrained(folder).eos_token_id == VOCAB - 1


LOAD_WITHOUT_HF_MATTA = textwrap.dedent(
    """
    import json, sys, torch
    from transformers import AutoModel, AutoModelForCausalLM
    input_ids = torch.tensor(json.loads(sys.argv[1]))
    results = {}
    for folder, remote in json.loads(sys.argv[2]):
        kwargs = {"trust_remote_code": True} if remote else {}
        causal_lm = AutoModelForCausalLM.from_pretrained(folder, **kwargs).eval()
        bare = AutoModel.from_pretrained(folder, **kwargs).eval()
        results[folder] = {
            "classes": [type(causal_lm).__name__, type(bare).__name__],
            "modules": [type(causal_lm).__module__, type(bare).__module__],
            "logits": causal_lm(input_ids).logits.tolist(),
            "hidden": bare(input_ids).last_hidden_state.tolist(),
        }
    results["hf_matta_imported"] = any(name.split(".")[0] == "hf_matta" for name in sys.modules)
    print(json.dumps(results))
    """
)


def test_students_load_where_hf_matta_is_not_imported(trained, saved_students, input_ids, tmp_path):
    """Uniform students through transformers' own GPT-2 (no remote code), mixed ones through their modeling files."""
    folders = [[str(saved_students[case]), not is_uniform(plan)] for case, plan in PLANS.items()]
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules"), "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(
        [sys.executable, "-c", LOAD_WITHOUT_HF_MATTA, json.dumps(input_ids.tolist()), json.dumps(folders)],
        capture_output=True, text=True, env=env, cwd=tmp_path, check=True,
    )  # fmt: skip
    loaded = json.loads(result.stdout.strip().splitlines()[-1])
    assert loaded.pop("hf_matta_imported") is False
    for case, plan in PLANS.items():
        got = loaded[str(saved_students[case])]
        if is_uniform(plan):
            assert got["classes"] == ["GPT2LMHeadModel", "GPT2Model"]
            assert all(module.startswith("transformers.models.gpt2") for module in got["modules"])
        else:
            assert got["classes"] == ["MatGPT2LMHeadModel", "MatGPT2Model"]
            assert all(module.startswith("transformers_modules") for module in got["modules"])
        expected = trained(input_ids, ffn_widths=plan).logits
        torch.testing.assert_close(torch.tensor(got["logits"]), expected, atol=ATOL, rtol=0)
        hidden = trained.transformer(input_ids, ffn_widths=plan).last_hidden_state
        torch.testing.assert_close(torch.tensor(got["hidden"]), hidden, atol=ATOL, rtol=0)


def test_save_refuses_a_non_empty_folder_unless_overwrite(trained, tmp_path):
    save_student(extract_student(trained, [16, 64, 32]), tmp_path / "student")
    with pytest.raises(FileExistsError, match="overwrite"):
        save_student(extract_student(trained, 16), tmp_path / "student")
    save_student(extract_student(trained, 16), tmp_path / "student", overwrite=True)
    assert not (tmp_path / "student" / "modeling_matgpt2.py").exists()  # no stale remote code of the old student
    assert json.loads((tmp_path / "student" / "config.json").read_text())["model_type"] == "gpt2"


def test_an_interrupted_save_leaves_the_old_student(trained, tmp_path, monkeypatch):
    """The folder is written under a temporary name and renamed when complete: a failure mid-write keeps the old one."""
    save_student(extract_student(trained, 16), tmp_path / "student")
    before = (tmp_path / "student" / "model.safetensors").read_bytes()
    monkeypatch.setattr(GPT2LMHeadModel, "save_pretrained", lambda self, folder: (folder / "partial").touch() or 1 / 0)
    with pytest.raises(ZeroDivisionError):
        save_student(extract_student(trained, 32), tmp_path / "student", overwrite=True)
    assert (tmp_path / "student" / "model.safetensors").read_bytes() == before
    assert sorted(path.name for path in tmp_path.iterdir()) == ["student"]  # no temporary folder left


@pytest.mark.parametrize("plan", [16, [16, 64, 32], None])
def test_validation_loss_of_any_causal_lm(trained, heldout, plan):
    """The nested model at a plan, its extracted student (stock GPT-2 or MatGPT2) and a hand-computed mean of
    next-token cross-entropies agree."""
    nested = validation_loss(trained, heldout, plan, batch_size=5)
    student = extract_student(trained, plan if plan is not None else 64)
    assert validation_loss(student, heldout, batch_size=7) == pytest.approx(nested, abs=1e-6)
    with torch.no_grad():
        logits = trained(heldout, ffn_widths=plan).logits[:, :-1]  # (N, T-1, V)
    by_hand = torch.nn.functional.cross_entropy(logits.flatten(0, 1), heldout[:, 1:].flatten()).item()
    assert nested == pytest.approx(by_hand, abs=1e-5)


def test_validation_loss_refuses_a_plan_for_a_model_of_one_width(trained, heldout):
    with pytest.raises(ValueError, match="needs a nested MatGPT2LMHeadModel; GPT2LMHeadModel has one width"):
        validation_loss(extract_student(trained, 16), heldout, plan=32)


def test_uniform_plans_are_every_granularity(trained):
    config = trained.config
    assert uniform_plans(config) == [(width,) * N_LAYER for width in GRANULARITIES]
    counts = [point.params for point in mix_n_match(config, "uniform")]
    assert counts == [count_parameters(config, width) for width in GRANULARITIES]
    budgets = [counts[0], counts[1] - 1, counts[1], counts[2]]
    chosen = [point.widths for point in mix_n_match(config, "uniform", budgets)]
    assert chosen == [(16,) * 3, (16,) * 3, (32,) * 3, (64,) * 3]


BLOCKS = {  # n_layer: the block plans between granularities 1 and 2 (1 = narrow, 2 = wide), then the full model
    3: [(1, 1, 1), (1, 2, 1), (1, 2, 2)],
    4: [(1, 1, 1, 1), (1, 1, 2, 1), (1, 2, 2, 1), (1, 2, 2, 2)],
    5: [(1, 1, 1, 1, 1), (1, 1, 2, 1, 1), (1, 1, 2, 2, 1), (1, 2, 2, 2, 1), (1, 2, 2, 2, 2)],
}


@pytest.mark.parametrize("n_layer, expected", BLOCKS.items())
def test_block_plans_widen_a_centred_block(n_layer, expected):
    config = MatGPT2Config(**tiny_kwargs(n_layer=n_layer), mat_widths=[1, 2])
    assert block_plans(config) == [*expected, (2,) * n_layer]


def test_block_plans_fit_budgets(trained):
    config = trained.config
    plans = block_plans(config)
    assert plans == [
        (16, 16, 16), (16, 32, 16), (16, 32, 32), (32, 32, 32), (32, 64, 32), (32, 64, 64), (64, 64, 64),
    ]  # fmt: skip
    counts = [count_parameters(config, plan) for plan in plans]
    assert counts == sorted(counts) and len(set(counts)) == len(counts)
    for budget in range(counts[0], counts[-1] + 1, 997):  # each budget gets the largest block plan within it
        (point,) = mix_n_match(config, "block", [budget])
        assert point.params <= budget
        assert all(count <= point.params or count > budget for count in counts)


@pytest.fixture(scope="module")
def search_path(trained, heldout) -> list:
    return search_plans(trained, heldout)


def test_search_path_from_student_to_ta(trained, heldout, search_path):
    config, path = trained.config, search_path
    assert path[0].widths == (16,) * N_LAYER and path[-1].widths == tuple(config.n_inner)
    assert len(path) == 1 + N_LAYER * (len(GRANULARITIES) - 1)
    params = [point.params for point in path]
    assert params == sorted(params) and len(set(params)) == len(params)  # strictly increasing in parameters
    for before, after in zip(path, path[1:]):  # each step widens one layer by one granularity
        changed = [(a, b) for a, b in zip(before.widths, after.widths) if a != b]
        assert len(changed) == 1 and GRANULARITIES.index(changed[0][1]) == GRANULARITIES.index(changed[0][0]) + 1
        assert after.params == count_parameters(config, after.widths)
    # the TA end reproduces the TA's own validation loss, and so does the student extracted at that size
    with torch.no_grad():
        ta_loss = trained(heldout, labels=heldout).loss.item()
        extracted = extract_student(trained, path[-1].widths)
        extracted_loss = extracted(heldout, labels=heldout).loss.item()
    assert path[-1].val_loss == pytest.approx(ta_loss, abs=1e-5)
    assert extracted_loss == pytest.approx(ta_loss, abs=1e-5)
    assert path[0].val_loss == pytest.approx(validation_loss(trained, heldout, 16), abs=1e-6)
    assert path[0].val_loss != pytest.approx(path[-1].val_loss, abs=1e-4)  # training made the widths differ


def test_search_greedy_step_is_the_best_gain_per_parameter(trained, heldout, search_path):
    start, chosen = search_path[0], search_path[1]
    gains = []
    for layer_idx in range(N_LAYER):
        widened = list(start.widths)
        widened[layer_idx] = 32
        added = count_parameters(trained.config, widened) - start.params
        gains.append((start.val_loss - validation_loss(trained, heldout, widened)) / added)
    assert chosen.widths[gains.index(max(gains))] == 32


def test_search_for_budgets_stops_at_the_largest_budget(trained, heldout, search_path):
    full_path = search_path
    budget = full_path[2].params + 1
    (point,) = mix_n_match(trained, "search", [budget], heldout)
    assert point == full_path[2]
    assert len(search_plans(trained, heldout, max_params=budget)) == 4  # one point beyond the budget, then stop


BAD_INPUTS = {
    "plan-too-short": (lambda m, ids: extract_student(m, [16, 32]), ["[16, 32]", "2 widths", "n_layer=3"]),
    "plan-too-long": (lambda m, ids: check_plan(m.config, [16, 32, 64, 64]), ["[16, 32, 64, 64]", "n_layer=3"]),
    "not-a-granularity": (
        lambda m, ids: extract_student(m, [16, 24, 64]),
        ["width 24 of layer 1", "[16, 32, 64]"],
    ),
    "beyond-full-width": (lambda m, ids: extract_student(m, 128), ["width 128 of layer 0", "[16, 32, 64]"]),
    "fixed-student-layer": (
        lambda m, ids: extract_student(extract_student(m, [16, 64, 32]), [16, 32, 32]),
        ["width 32 of layer 1", "[64]"],
    ),
    "budget-below-student": (
        lambda m, ids: mix_n_match(m.config, "uniform", [1000]),
        ["budget 1,000", "below the smallest student", "21,552", "30,912"],
    ),
    "budget-above-ta": (
        lambda m, ids: mix_n_match(m.config, "block", [10**6]),
        ["budget 1,000,000", "above the TA", "30,912"],
    ),
    "search-budget-above-ta": (
        lambda m, ids: mix_n_match(m, "search", [30_913], ids),
        ["budget 30,913", "above the TA", "21,552 to 30,912"],
    ),
    "search-without-data": (lambda m, ids: mix_n_match(m, "search"), ["input_ids"]),
    "unknown-strategy": (lambda m, ids: mix_n_match(m.config, "greedy"), ["'greedy'", "search"]),
    "unparsable-plan": (lambda m, ids: parse_plan("16,abc"), ["'16,abc'", "'abc'"]),
}


@pytest.mark.parametrize("call, fragments", BAD_INPUTS.values(), ids=BAD_INPUTS.keys())
def test_bad_input_is_named_with_the_valid_range(trained, heldout, call, fragments):
    with pytest.raises(ValueError) as error:
        call(trained, heldout)
    for fragment in fragments:
        assert fragment in str(error.value)


PLAN_TEXTS = {  # text: (parsed plan, folder name of its widths)
    "64": (64, "ffn64"),
    "16,64,32": ([16, 64, 32], "ffn16-64-32"),
    "64x2,128x3": ([64, 64, 128, 128, 128], "ffn64x2-128x3"),
    "16x1, 32": ([16, 32], "ffn16-32"),
}


@pytest.mark.parametrize("text, expected", PLAN_TEXTS.items(), ids=PLAN_TEXTS.keys())
def test_plan_text_round_trip(text, expected):
    plan, name = expected
    assert parse_plan(text) == plan
    widths = [plan] * 3 if isinstance(plan, int) else plan
    assert plan_name(widths) == name
    assert parse_plan(format_plan(widths)) == plan
