"""transformers' common model tests (`ModelTesterMixin` of the installed version) on MatGPT2, through the project's own
tester: run by `make test-conformance`, after `python -m tests.conformance.prepare $CONFORMANCE_DIR`.

Four test classes share one tester, shaped as transformers' `GPT2ModelTester` (batch 14 x 7 tokens, hidden 32, 2
layers, 4 heads, FFN 37, vocab 99) and differing only in the model they build:

- `GPT2CommonTest`: stock `GPT2Model` / `GPT2LMHeadModel`, the reference every MatGPT2 class is held to;
- `MatGPT2FullCommonTest`: a nested MatGPT2 (granularities 16 and 37) at full width;
- `MatGPT2StudentCommonTest`: the same model with its student width (16) as the default plan (`config.ffn_widths`), so
  every forward, generate and save/load of the common tests runs the student;
- `MatGPT2MixedCommonTest`: a per-layer (Mix'n'Match) model, FFN widths 37 and 16, as `hf-matta extract` writes one.
"""

import os
import sys
import unittest
from pathlib import Path

import torch
from transformers import GPT2Config, GPT2LMHeadModel, GPT2Model

import hf_matta.models  # noqa: F401 (registers matgpt2 with transformers and PEFT)
from hf_matta.models import MatGPT2Config, MatGPT2LMHeadModel, MatGPT2Model


sys.path.insert(0, str(Path(os.environ.get("CONFORMANCE_DIR", ".conformance")).resolve()))
from transformers_tests.generation.test_utils import GenerationTesterMixin  # noqa: E402
from transformers_tests.test_modeling_common import ModelTesterMixin, ids_tensor, random_attention_mask  # noqa: E402


class MatGPT2ModelTester:
    """transformers' GPT-2 tester, with the config class and FFN widths of the model under test as arguments."""

    def __init__(self, parent: unittest.TestCase, config_class: type[GPT2Config], **config_overrides):
        self.parent = parent
        self.config_class, self.config_overrides = config_class, config_overrides
        self.batch_size, self.seq_length = 14, 7
        self.is_training = True
        self.vocab_size, self.hidden_size, self.num_hidden_layers, self.num_attention_heads = 99, 32, 2, 4
        self.intermediate_size, self.type_vocab_size = 37, 16
        self.max_position_embeddings = 512

    def get_config(self) -> GPT2Config:
        return self.config_class(
            vocab_size=self.vocab_size,
            n_embd=self.hidden_size,
            n_layer=self.num_hidden_layers,
            n_head=self.num_attention_heads,
            n_positions=self.max_position_embeddings,
            activation_function="gelu",
            resid_pdrop=0.1,
            attn_pdrop=0.1,
            embd_pdrop=0.1,
            initializer_range=0.02,
            use_cache=True,
            bos_token_id=self.vocab_size - 1,
            eos_token_id=self.vocab_size - 1,
            pad_token_id=self.vocab_size - 1,
            **{"n_inner": self.intermediate_size, **self.config_overrides},
        )

    def prepare_config_and_inputs_for_common(self) -> tuple[GPT2Config, dict]:
        input_ids = ids_tensor([self.batch_size, self.seq_length], self.vocab_size)
        inputs = {
            "input_ids": input_ids,
            "token_type_ids": ids_tensor([self.batch_size, self.seq_length], self.type_vocab_size),
            "attention_mask": random_attention_mask([self.batch_size, self.seq_length]),
        }
        return self.get_config(), inputs


class _CommonTest(ModelTesterMixin, GenerationTesterMixin):
    """The common tests on one model family; subclasses name the classes and the config."""

    config_class: type[GPT2Config]
    config_overrides: dict = {}
    test_missing_keys = False  # as transformers' GPT-2 test: the tied `lm_head.weight` is not stored
    test_resize_embeddings = True

    def setUp(self):
        self.model_tester = MatGPT2ModelTester(self, self.config_class, **self.config_overrides)


class GPT2CommonTest(_CommonTest, unittest.TestCase):
    all_model_classes = (GPT2Model, GPT2LMHeadModel)
    config_class = GPT2Config


class MatGPT2FullCommonTest(_CommonTest, unittest.TestCase):
    all_model_classes = (MatGPT2Model, MatGPT2LMHeadModel)
    config_class = MatGPT2Config
    config_overrides = {"mat_widths": [16, 37]}


class MatGPT2StudentCommonTest(_CommonTest, unittest.TestCase):
    all_model_classes = (MatGPT2Model, MatGPT2LMHeadModel)
    config_class = MatGPT2Config
    config_overrides = {"mat_widths": [16, 37], "ffn_widths": 16}


class MatGPT2MixedCommonTest(_CommonTest, unittest.TestCase):
    all_model_classes = (MatGPT2Model, MatGPT2LMHeadModel)
    config_class = MatGPT2Config
    config_overrides = {"n_inner": [37, 16], "mat_widths": []}


def test_the_student_and_mixed_testers_run_narrower_models():
    """The four classes differ where they should: the student tester's forward is the width-16 sub-network."""
    torch.manual_seed(0)
    tester = MatGPT2ModelTester(None, MatGPT2Config, mat_widths=[16, 37], ffn_widths=16)
    config, inputs = tester.prepare_config_and_inputs_for_common()
    model = MatGPT2LMHeadModel(config).eval()
    student = model(**inputs).logits
    torch.testing.assert_close(student, model(**inputs, ffn_widths=16).logits)
    assert not torch.allclose(student, model(**inputs, ffn_widths=37).logits)
    mixed = MatGPT2ModelTester(None, MatGPT2Config, n_inner=[37, 16], mat_widths=[]).get_config()
    assert [block.mlp.c_fc.nf for block in MatGPT2Model(mixed).h] == [37, 16]
