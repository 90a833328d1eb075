"""MatGPT2LMHeadModel against GPT-2: equivalence, nesting, growth, generation, remote code, dtypes."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel
from transformers.models.gpt2.modeling_gpt2 import GPT2MLP

from hf_matta import MatGPT2Config, MatGPT2LMHeadModel, MatGPT2Model

from .conftest import VOCAB, tiny_kwargs


ATOL = 1e-5


def tiny_matgpt2(**overrides) -> MatGPT2LMHeadModel:
    return MatGPT2LMHeadModel(MatGPT2Config(**tiny_kwargs(**{"mat_widths": [16, 64, 128], **overrides}))).eval()


def hand_built_gpt2(model: MatGPT2LMHeadModel, widths: list[int]) -> GPT2LMHeadModel:
    """A stock GPT2LMHeadModel whose layer-l FFN is built from the first widths[l] neurons of `model`'s."""
    config = GPT2Config(**tiny_kwargs(n_inner=max(widths)))
    gpt2 = GPT2LMHeadModel(config).eval()
    for block, width in zip(gpt2.transformer.h, widths):
        block.mlp = GPT2MLP(width, config)
    state = model.state_dict()
    for layer_idx, width in enumerate(widths):
        prefix = f"transformer.h.{layer_idx}.mlp."
        state[prefix + "c_fc.weight"] = state[prefix + "c_fc.weight"][:, :width]
        state[prefix + "c_fc.bias"] = state[prefix + "c_fc.bias"][:width]
        state[prefix + "c_proj.weight"] = state[prefix + "c_proj.weight"][:width]
    gpt2.load_state_dict(state)
    return gpt2.eval()


def test_initialisation_matches_gpt2():
    config = dict(n_layer=4, n_embd=256, n_head=2)
    gpt2 = GPT2LMHeadModel(GPT2Config(**tiny_kwargs(**config)))
    model = MatGPT2LMHeadModel(MatGPT2Config(**tiny_kwargs(**config)))
    for name, param in gpt2.named_parameters():
        expected, got = param.std().item(), model.get_parameter(name).std().item()
        assert got == pytest.approx(expected, rel=0.1, abs=1e-6), name  # c_proj: 0.02 / sqrt(2 n_layer)


def test_gpt2_state_dict_loads_and_matches(input_ids):
    gpt2 = GPT2LMHeadModel(GPT2Config(**tiny_kwargs())).eval()
    model = tiny_matgpt2()
    assert set(model.state_dict()) == set(gpt2.state_dict())
    model.load_state_dict(gpt2.state_dict())
    torch.testing.assert_close(model(input_ids).logits, gpt2(input_ids).logits, atol=ATOL, rtol=0)
    gpt2.load_state_dict(model.state_dict())  # and back


NESTING_CASES = {
    "uniform-student": 16,
    "uniform-middle": 64,
    "uniform-full": 128,
    "uniform-off-grid": 40,
    "mixed": [16, 128],
    "mixed-reversed": [128, 64],
}


@pytest.mark.parametrize("plan", NESTING_CASES.values(), ids=NESTING_CASES.keys())
def test_width_equals_hand_built_prefix(plan, input_ids):
    model = tiny_matgpt2()
    widths = list(model.config.resolve_ffn_widths(plan))
    reference = hand_built_gpt2(model, widths)
    torch.testing.assert_close(model(input_ids, ffn_widths=plan).logits, reference(input_ids).logits, atol=ATOL, rtol=0)


def test_widths_do_not_leak_between_calls(input_ids):
    model = tiny_matgpt2()
    student, ta = model(input_ids, ffn_widths=16).logits, model(input_ids).logits
    assert (student - ta).abs().max() > 1e-3
    torch.testing.assert_close(model(input_ids, ffn_widths=16).logits, student, atol=0, rtol=0)


def test_gradients_reach_only_the_prefix(input_ids):
    model = tiny_matgpt2()
    model(input_ids, labels=input_ids, ffn_widths=[16, 64]).loss.backward()
    for layer_idx, width in enumerate([16, 64]):
        mlp = model.transformer.h[layer_idx].mlp
        assert mlp.c_fc.weight.grad[:, :width].abs().sum() > 0
        assert mlp.c_fc.weight.grad[:, width:].abs().sum() == 0
        assert mlp.c_proj.weight.grad[width:].abs().sum() == 0


@pytest.mark.parametrize("source", ["model", "path"])
def test_from_gpt2_growth_keeps_the_pretrained_function(source, tmp_path, input_ids):
    gpt2 = GPT2LMHeadModel(GPT2Config(**tiny_kwargs(n_inner=64))).eval()
    gpt2.save_pretrained(tmp_path)
    model_or_name = gpt2 if source == "model" else str(tmp_path)
    model = MatGPT2LMHeadModel.from_gpt2(model_or_name, mat_widths=[64, 256], student_width=64).eval()
    assert model.config.n_inner == [256, 256] and model.config.student_width == 64
    expected = gpt2(input_ids).logits
    torch.testing.assert_close(model(input_ids, ffn_widths=64).logits, expected, atol=ATOL, rtol=0)
    torch.testing.assert_close(model(input_ids).logits, expected, atol=ATOL, rtol=0)
    new_columns = model.transformer.h[0].mlp.c_fc.weight[:, 64:]
    assert new_columns.std() > 0  # the grown neurons are initialised, not dead
    assert model.transformer.h[0].mlp.c_proj.weight[64:].abs().sum() == 0


def test_from_gpt2_calibration_puts_important_neurons_first(input_ids):
    gpt2 = GPT2LMHeadModel(GPT2Config(**tiny_kwargs(n_inner=64))).eval()
    with torch.no_grad():
        for block in gpt2.transformer.h:
            block.mlp.c_proj.weight[:32] = 0  # the first half of every FFN contributes nothing
    expected = gpt2(input_ids).logits
    plain = MatGPT2LMHeadModel.from_gpt2(gpt2, mat_widths=[32, 64]).eval()
    ranked = MatGPT2LMHeadModel.from_gpt2(gpt2, mat_widths=[32, 64], calibration_input_ids=input_ids).eval()
    torch.testing.assert_close(ranked(input_ids).logits, expected, atol=ATOL, rtol=0)  # a permutation
    torch.testing.assert_close(ranked(input_ids, ffn_widths=32).logits, expected, atol=ATOL, rtol=0)
    assert (plain(input_ids, ffn_widths=32).logits - expected).abs().max() > 1e-3


def test_reordering_the_ta_neurons_keeps_student_and_ta_and_fills_the_widths_between(input_ids):
    model = tiny_matgpt2(mat_widths=[16, 64, 128])
    with torch.no_grad():
        for block in model.transformer.h:
            block.mlp.c_proj.weight[16:72] = 0  # TA-only neurons 16..72 contribute nothing, 72..128 do
    student, ta = model(input_ids, ffn_widths=16).logits, model(input_ids).logits
    before = model(input_ids, ffn_widths=64).logits
    model.reorder_neurons_by_importance(input_ids)
    torch.testing.assert_close(model(input_ids, ffn_widths=16).logits, student, atol=ATOL, rtol=0)
    torch.testing.assert_close(model(input_ids).logits, ta, atol=ATOL, rtol=0)  # a permutation of neurons 16..128
    for block in model.transformer.h:  # the 56 neurons that matter now come right after the student's
        assert block.mlp.c_proj.weight[16:72].abs().sum(dim=1).min() > 0
        assert block.mlp.c_proj.weight[72:].abs().sum() == 0
    after = model(input_ids, ffn_widths=64).logits
    assert (after - ta).abs().max() < (before - ta).abs().max()


GENERATION_PLANS = {"narrow": 16, "mixed": [16, 128], "full": None}


@pytest.mark.parametrize("plan", GENERATION_PLANS.values(), ids=GENERATION_PLANS.keys())
def test_generation_with_cache_equals_without(plan):
    model = tiny_matgpt2(initializer_range=0.2)  # a larger init so that every width predicts differently
    prompt = torch.randint(0, VOCAB - 1, (2, 5))
    kwargs = dict(
        ffn_widths=plan,
        max_new_tokens=8,
        do_sample=False,
        attention_mask=torch.ones_like(prompt),
        return_dict_in_generate=True,
        output_logits=True,
    )
    with_cache = model.generate(prompt, use_cache=True, **kwargs)
    without_cache = model.generate(prompt, use_cache=False, **kwargs)
    assert with_cache.sequences.shape == (2, 13)
    assert torch.equal(with_cache.sequences, without_cache.sequences)
    torch.testing.assert_close(torch.stack(with_cache.logits), torch.stack(without_cache.logits), atol=ATOL, rtol=0)
    full_width = model.generate(prompt, use_cache=True, **{**kwargs, "ffn_widths": None})
    assert (plan is None) == torch.equal(torch.stack(full_width.logits), torch.stack(with_cache.logits))


@pytest.mark.parametrize("plan", [16, [16, 128], None])
def test_sdpa_equals_eager(plan, input_ids):
    eager = tiny_matgpt2(attn_implementation="eager")
    sdpa = tiny_matgpt2(attn_implementation="sdpa")
    sdpa.load_state_dict(eager.state_dict())
    mask = torch.ones_like(input_ids)
    mask[0, :3] = 0  # left padding goes through the attention mask; padded positions have no defined output
    torch.testing.assert_close(
        sdpa(input_ids, attention_mask=mask, ffn_widths=plan).logits[mask.bool()],
        eager(input_ids, attention_mask=mask, ffn_widths=plan).logits[mask.bool()],
        atol=ATOL,
        rtol=0,
    )


@pytest.mark.parametrize("plan", [16, [16, 128]])
def test_gradient_checkpointing_gives_the_same_gradients(plan, input_ids):
    model = tiny_matgpt2().train()
    model(input_ids, labels=input_ids, ffn_widths=plan).loss.backward()
    expected = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad()
    model.gradient_checkpointing_enable()
    model(input_ids, labels=input_ids, ffn_widths=plan).loss.backward()
    for name, param in model.named_parameters():
        torch.testing.assert_close(param.grad, expected[name], atol=1e-6, rtol=0, msg=name)


def test_bf16_at_every_width(tmp_path, input_ids):
    model = tiny_matgpt2()
    model.save_pretrained(tmp_path)
    bf16 = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16).eval()
    assert bf16.dtype == torch.bfloat16 and isinstance(bf16, MatGPT2LMHeadModel)
    for plan in [16, 64, [16, 128], None]:
        logits = bf16(input_ids, ffn_widths=plan).logits
        assert logits.dtype == torch.bfloat16
        torch.testing.assert_close(logits.float(), model(input_ids, ffn_widths=plan).logits, atol=0.05, rtol=0.05)


def test_auto_classes_round_trip(tmp_path, input_ids):
    model = tiny_matgpt2()
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["model_type"] == "matgpt2"
    assert set(saved["auto_map"]) == {"AutoConfig", "AutoModel", "AutoModelForCausalLM"}
    assert (tmp_path / "modeling_matgpt2.py").exists() and (tmp_path / "configuration_matgpt2.py").exists()
    assert isinstance(AutoConfig.from_pretrained(tmp_path), MatGPT2Config)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert type(loaded) is MatGPT2LMHeadModel
    torch.testing.assert_close(loaded(input_ids, ffn_widths=16).logits, model(input_ids, ffn_widths=16).logits)
    bare = AutoModel.from_pretrained(tmp_path)
    assert type(bare) is MatGPT2Model
    torch.testing.assert_close(
        bare(input_ids, ffn_widths=16).last_hidden_state,
        model.transformer(input_ids, ffn_widths=16).last_hidden_state,
    )


REMOTE_LOAD = textwrap.dedent(
    """
    import json, sys, torch
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True).eval()
    input_ids = torch.tensor(json.loads(sys.argv[2]))
    logits = model(input_ids).logits
    print(json.dumps({
        "hf_matta_imported": any(name.split(".")[0] == "hf_matta" for name in sys.modules),
        "class": type(model).__name__,
        "n_inner": model.config.n_inner,
        "logits": logits.tolist(),
    }))
    """
)


def test_mixed_model_loads_as_remote_code_without_hf_matta(tmp_path, input_ids):
    model = MatGPT2LMHeadModel(MatGPT2Config(**tiny_kwargs(n_inner=[48, 96]))).eval()
    model.save_pretrained(tmp_path / "mixed")
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules"), "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(
        [sys.executable, "-c", REMOTE_LOAD, str(tmp_path / "mixed"), json.dumps(input_ids.tolist())],
        capture_output=True, text=True, env=env, cwd=tmp_path, check=True,
    )
    loaded = json.loads(result.stdout.strip().splitlines()[-1])
    assert loaded["hf_matta_imported"] is False
    assert loaded["class"] == "MatGPT2LMHeadModel" and loaded["n_inner"] == [48, 96]
    torch.testing.assert_close(torch.tensor(loaded["logits"]), model(input_ids).logits, atol=ATOL, rtol=0)
