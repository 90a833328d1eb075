"""MatGPT2 and its students behave like any Transformers model in the tools users bring: GPT-2's forward keywords,
transformers' Trainer, PEFT adapters, pipelines, lm-eval's `hf` backend, assisted generation, saved folders that load
without remote code, and a plain GPT-2 export of a mixed student. (`make test-conformance` runs transformers' own
common model tests and older transformers on top of these.)"""

import copy
import json
import stat
import warnings

import pytest
import torch
from lm_eval.api.instance import Instance
from lm_eval.models.huggingface import HFLM
from peft import LoraConfig, get_peft_model
from transformers import (
    AutoTokenizer,
    DynamicCache,
    GenerationConfig,
    GenerationMixin,
    GPT2Config,
    GPT2LMHeadModel,
    Trainer,
    TrainingArguments,
    pipeline,
)
from transformers.trainer_pt_utils import LabelSmoother

from hf_matta.cli import main
from hf_matta.extract import extract_student, save_student
from hf_matta.models import MatGPT2Config, MatGPT2LMHeadModel, MatGPT2Model

from .conftest import VOCAB, tiny_kwargs
from .test_extract import char_tokenizer


STUDENT, TA = 16, 64
MIXED = [STUDENT, TA]
ATOL = 1e-5


@pytest.fixture(scope="module")
def nested() -> MatGPT2LMHeadModel:
    """A tiny nested model whose widths clearly disagree: FFN weights large enough that the TA-only neurons change
    the greedy tokens (at GPT-2's init scale every width would generate the same text, and no test could fail)."""
    torch.manual_seed(0)
    model = MatGPT2LMHeadModel(MatGPT2Config(**tiny_kwargs(), mat_widths=[STUDENT, TA])).eval()
    with torch.no_grad():
        for block in model.transformer.h:
            for param in (block.mlp.c_fc.weight, block.mlp.c_proj.weight):
                param.normal_(0, 0.5)
    return model


@pytest.fixture(scope="module")
def folders(nested, tmp_path_factory) -> dict:
    """The nested model, its student, its mixed student and that one zero-padded, saved with a tokenizer."""
    root, tokenizer = tmp_path_factory.mktemp("conformance"), char_tokenizer()
    nested_dir = root / "nested"
    nested.save_pretrained(nested_dir)
    tokenizer.save_pretrained(nested_dir)
    out = {"nested": nested_dir}
    for name, plan, zero_pad in (("student", STUDENT, False), ("mixed", MIXED, False), ("padded", MIXED, True)):
        out[name] = save_student(extract_student(nested, plan, zero_pad=zero_pad), root / name, tokenizer)
    return out


def test_past_key_values_is_cache_under_its_old_name(nested, input_ids):
    """GPT-2 maps the deprecated `past_key_values=` to `cache=`; MatGPT2's forwards do the same (with the warning)."""
    for model in (nested, nested.transformer):
        prefix = model(input_ids[:, :6], use_cache=True, ffn_widths=STUDENT).cache
        new = model(input_ids[:, 6:], cache=_copy(prefix), ffn_widths=STUDENT)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            old = model(input_ids[:, 6:], past_key_values=_copy(prefix), ffn_widths=STUDENT)
        assert any("`past_key_values` is deprecated" in str(warning.message) for warning in caught)
        key = "logits" if isinstance(model, MatGPT2LMHeadModel) else "last_hidden_state"
        torch.testing.assert_close(old[key], new[key], atol=0, rtol=0)
        without_prefix = model(input_ids[:, 6:], ffn_widths=STUDENT)
        assert not torch.allclose(old[key], without_prefix[key], atol=1e-3)  # the cache was used


def _copy(cache: DynamicCache) -> DynamicCache:
    copied = DynamicCache()
    for layer_idx, layer in enumerate(cache.layers):
        copied.update(layer.keys.clone(), layer.values.clone(), layer_idx)
    return copied


def test_generation_mixin_is_a_direct_base_as_on_gpt2():
    assert GenerationMixin in GPT2LMHeadModel.__bases__ and GenerationMixin in MatGPT2LMHeadModel.__bases__
    assert MatGPT2LMHeadModel.can_generate()


def test_registered_where_transformers_and_peft_look_models_up():
    from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, MODEL_MAPPING_NAMES

    assert MODEL_FOR_CAUSAL_LM_MAPPING_NAMES["matgpt2"] == MatGPT2LMHeadModel.__name__
    assert MODEL_MAPPING_NAMES["matgpt2"] == MatGPT2Model.__name__
    assert TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING["matgpt2"] == ["c_attn"]  # GPT-2's default


def test_stock_trainer_label_smoothing_gives_gpt2s_loss(tmp_path):
    """Trainer shifts the labels before smoothing only for the causal LMs it knows by name: registered, MatGPT2's
    loss equals GPT-2's with the same weights (unregistered it was 4.232 against 4.633: unshifted labels)."""
    torch.manual_seed(0)
    gpt2 = GPT2LMHeadModel(GPT2Config(**tiny_kwargs(), n_inner=TA, initializer_range=0.5))  # confident predictions
    matgpt2 = MatGPT2LMHeadModel(MatGPT2Config(**tiny_kwargs(), n_inner=TA))
    matgpt2.load_state_dict(gpt2.state_dict())
    batch = {"input_ids": torch.randint(0, VOCAB - 1, (4, 12))}
    batch["labels"] = batch["input_ids"].clone()
    losses = {}
    for model in (gpt2, matgpt2):
        args = TrainingArguments(tmp_path / type(model).__name__, label_smoothing_factor=0.1, report_to="none")
        trainer = Trainer(model=model, args=args)
        losses[type(model).__name__] = trainer.compute_loss(model, dict(batch)).item()
    outputs = gpt2(batch["input_ids"])
    shifted, unshifted = (LabelSmoother(0.1)(outputs, batch["labels"], shift_labels=shift) for shift in (True, False))
    assert losses["GPT2LMHeadModel"] == pytest.approx(shifted.item(), abs=1e-5)
    assert losses["MatGPT2LMHeadModel"] == pytest.approx(shifted.item(), abs=1e-5)
    assert shifted.item() != pytest.approx(unshifted.item(), abs=1e-2)  # an unshifted loss would be told apart


@pytest.fixture(scope="module")
def lora_model(nested):
    """LoRA on the attention and both nested FFN modules, its B matrices non-zero (as after training)."""
    torch.manual_seed(1)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_fc", "c_proj"], lora_dropout=0.0)
    model = get_peft_model(copy.deepcopy(nested), config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.3)
    return model


@pytest.mark.parametrize("plan", [STUDENT, 40, TA, MIXED])
def test_lora_runs_at_every_width_and_extraction_equals_the_tuned_model(lora_model, nested, plan, input_ids):
    """The adapter's FFN deltas are nested like the weights: every width runs, the adapter changes it, and the
    student extracted from the PEFT model (merged on a copy) or from the merged model equals the tuned model."""
    tuned = lora_model(input_ids, ffn_widths=plan).logits
    assert not torch.allclose(tuned, nested(input_ids, ffn_widths=plan).logits, atol=1e-3)
    unmerged = extract_student(lora_model, plan) if plan != 40 else None  # 40 is no granularity: not servable
    merged = copy.deepcopy(lora_model).merge_and_unload()
    torch.testing.assert_close(merged(input_ids, ffn_widths=plan).logits, tuned, atol=ATOL, rtol=0)
    if unmerged is not None:
        torch.testing.assert_close(unmerged(input_ids).logits, tuned, atol=ATOL, rtol=0)
        torch.testing.assert_close(extract_student(merged, plan)(input_ids).logits, tuned, atol=ATOL, rtol=0)


def test_lora_default_targets_work_without_target_modules(nested, input_ids):
    model = get_peft_model(copy.deepcopy(nested), LoraConfig(task_type="CAUSAL_LM"))
    assert model(input_ids, ffn_widths=STUDENT).logits.shape == (*input_ids.shape, VOCAB)
    assert {name.split(".")[-2] for name, _ in model.named_modules() if name.endswith("lora_A")} == {"c_attn"}


def test_default_plan_in_the_config_is_used_by_generate(nested, input_ids):
    prompt = input_ids[:1, :4]
    kwargs = {"max_new_tokens": 8, "do_sample": False}
    student = nested.generate(prompt, ffn_widths=STUDENT, **kwargs)
    assert not torch.equal(student, nested.generate(prompt, **kwargs))  # the widths generate different text
    from_generation_config = nested.generate(prompt, generation_config=GenerationConfig(ffn_widths=STUDENT, **kwargs))
    assert torch.equal(from_generation_config, student)
    served = copy.deepcopy(nested)
    served.config.ffn_widths = STUDENT
    assert torch.equal(served.generate(prompt, **kwargs), student)


def test_default_plan_with_an_assistant_model(nested, folders, input_ids):
    """Self-speculative decoding: the full model assisted by its own student (a stock GPT-2) gives the full model's
    greedy text; a nested model loaded at the student's width assists as well. A width passed to `generate` with an
    assistant would reach the assistant too: refused with the way to do it."""
    prompt, kwargs = input_ids[:1, :4], {"max_new_tokens": 8, "do_sample": False}
    expected = nested.generate(prompt, **kwargs)
    draft = GPT2LMHeadModel.from_pretrained(folders["student"]).eval()
    assert torch.equal(nested.generate(prompt, assistant_model=draft, **kwargs), expected)
    nested_draft = MatGPT2LMHeadModel.from_pretrained(folders["nested"], ffn_widths=STUDENT).eval()
    assert torch.equal(nested.generate(prompt, assistant_model=nested_draft, **kwargs), expected)
    at_student = MatGPT2LMHeadModel.from_pretrained(folders["nested"], ffn_widths=STUDENT).eval()
    assert torch.equal(
        at_student.generate(prompt, assistant_model=draft, **kwargs), nested.generate(prompt, ffn_widths=16, **kwargs)
    )
    with pytest.raises(ValueError, match=r"ffn_widths=16 with an assistant_model.*config\.ffn_widths"):
        nested.generate(prompt, ffn_widths=STUDENT, assistant_model=draft, **kwargs)


def test_default_plan_is_used_by_pipeline(folders):
    text = "Hello"
    kwargs = {"max_new_tokens": 8, "do_sample": False}
    student = pipeline("text-generation", model=str(folders["student"]), device="cpu")(text, **kwargs)
    at_student = pipeline("text-generation", model=str(folders["nested"]), model_kwargs={"ffn_widths": STUDENT})
    full = pipeline("text-generation", model=str(folders["nested"]))
    assert at_student.model.config.ffn_widths == STUDENT
    assert at_student(text, **kwargs) == student
    assert full(text, **kwargs) != student


def test_default_plan_is_used_by_lm_evals_hf_backend(folders):
    """`model_args="pretrained=DIR,ffn_widths=16"` on the command line: HFLM passes it to `from_pretrained`."""
    requests = [Instance("loglikelihood", {}, ("Hello wor", "ld"), 0), Instance("loglikelihood", {}, ("ab", "cd"), 1)]

    def loglikelihoods(**model_args) -> list[float]:
        return [ll for ll, _ in HFLM(batch_size=2, device="cpu", **model_args).loglikelihood(requests)]

    student = loglikelihoods(pretrained=str(folders["student"]))
    assert loglikelihoods(pretrained=str(folders["nested"]), ffn_widths=STUDENT) == pytest.approx(student, abs=1e-4)
    assert loglikelihoods(pretrained=str(folders["nested"])) != pytest.approx(student, abs=1e-3)


def test_zero_padded_export_equals_the_mixed_student(nested, folders, input_ids):
    padded = GPT2LMHeadModel.from_pretrained(folders["padded"]).eval()
    assert type(padded) is GPT2LMHeadModel and padded.config.n_inner == TA
    torch.testing.assert_close(padded(input_ids).logits, nested(input_ids, ffn_widths=MIXED).logits, atol=ATOL, rtol=0)


def test_extract_zero_pad_states_the_extra_cost(folders, tmp_path, capsys):
    assert main(["extract", str(folders["nested"]), "--plan", "16,64", "--zero-pad", "--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    assert "GPT2LMHeadModel (stock GPT-2)" in printed and "zero-padded to FFN 64" in printed
    assert "FLOPs per token" in printed and "+" in printed.split("zero-padded")[1]


@pytest.mark.parametrize("name", ["nested", "student", "mixed", "padded"])
def test_saved_folders_are_ready_to_serve(folders, name):
    folder = folders[name]
    config, generation = (json.loads((folder / f).read_text()) for f in ("config.json", "generation_config.json"))
    tokenizer_config = json.loads((folder / "tokenizer_config.json").read_text())
    if name != "nested":  # saved by hf_matta (the nested folder here by plain save_pretrained)
        assert config["use_cache"] is True
        assert config["pad_token_id"] == generation["pad_token_id"] == VOCAB - 1
        assert tokenizer_config["tokenizer_class"] == "PreTrainedTokenizerFast"
        assert tokenizer_config["model_max_length"] == config["n_positions"]
        assert tokenizer_config["pad_token"] == "<|endoftext|>"
        assert not {"is_local", "local_files_only"} & set(tokenizer_config)
        modes = {path.name: stat.S_IMODE(path.stat().st_mode) for path in folder.iterdir()}
        assert modes["model.safetensors"] == modes["config.json"], modes
    # A stock tokenizer: no code of the folder runs (without hf_matta: tests/conformance/old_transformers.py).
    assert AutoTokenizer.from_pretrained(folder, trust_remote_code=False).eos_token_id == VOCAB - 1


def test_a_model_saved_after_trainer_is_ready_to_serve(tmp_path):
    """`Trainer` sets `use_cache=False` in the config it saves; the pipeline's saves (here the teacher's, which runs
    through the same `set_serving_defaults` / `finish_saved_folder` as the train stage) turn it back on."""
    from hf_matta.data import train_bpe_tokenizer
    from hf_matta.pipeline.stages import config_from_string, pretrain_teacher

    tokenizer = train_bpe_tokenizer(["some text to learn a few merges from"] * 8, vocab_size=300)
    blocks = [{"input_ids": row, "labels": row} for row in torch.randint(0, 259, (8, 16))]
    config = config_from_string("n_layer=1,n_embd=16,n_head=2,n_positions=16", tokenizer)
    args = TrainingArguments(tmp_path / "ignored", use_cpu=True, report_to="none", per_device_train_batch_size=4)
    pretrain_teacher(config, args, tokenizer, blocks, tmp_path / "teacher", max_steps=1)
    saved = json.loads((tmp_path / "teacher" / "config.json").read_text())
    tokenizer_config = json.loads((tmp_path / "teacher" / "tokenizer_config.json").read_text())
    assert saved["use_cache"] is True and saved["pad_token_id"] == tokenizer.eos_token_id
    assert tokenizer_config["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert tokenizer_config["model_max_length"] == 16 and "local_files_only" not in tokenizer_config
    modes = {path.name: stat.S_IMODE(path.stat().st_mode) for path in (tmp_path / "teacher").iterdir()}
    assert modes["model.safetensors"] == modes["config.json"], modes


def test_printed_model_shows_the_nested_widths(nested):
    printed = repr(nested)
    assert f"MatGPT2MLP(\n          n_inner={TA}, granularities=[{STUDENT}, {TA}]" in printed
    assert "MatConv1D(nf=64, nx=32, nested=out)" in printed and "MatConv1D(nf=32, nx=64, nested=in)" in printed
