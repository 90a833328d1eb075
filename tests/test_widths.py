"""Parameter and FLOP counts of width plans, exact against the models themselves."""

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from hf_matta import MatGPT2Config, MatGPT2LMHeadModel
from hf_matta.widths import count_flops_per_token, count_parameters

from .conftest import tiny_kwargs


CONFIGS = {
    "uniform": dict(mat_widths=[16, 64, 128]),
    "mixed": dict(n_inner=[48, 96]),
    "untied": dict(mat_widths=[16, 128], tie_word_embeddings=False),
    "three-layers": dict(n_layer=3, n_inner=[16, 128, 64]),
}


@pytest.mark.parametrize("overrides", CONFIGS.values(), ids=CONFIGS.keys())
def test_full_model_parameters(overrides):
    config = MatGPT2Config(**tiny_kwargs(**overrides))
    assert count_parameters(config) == sum(p.numel() for p in MatGPT2LMHeadModel(config).parameters())


@pytest.mark.parametrize("plan", [16, 64, [16, 128], [128, 16]])
def test_plan_parameters_equal_a_model_built_at_that_plan(plan):
    config = MatGPT2Config(**tiny_kwargs(mat_widths=[16, 64, 128]))
    widths = list(config.resolve_ffn_widths(plan))
    standalone = MatGPT2LMHeadModel(MatGPT2Config(**tiny_kwargs(n_inner=widths)))
    assert count_parameters(config, plan) == sum(p.numel() for p in standalone.parameters())


@pytest.mark.parametrize("plan", [None, 16, [16, 128]])
@pytest.mark.parametrize("seq_len", [8, 16])
def test_flops_equal_the_flop_counter(plan, seq_len):
    config = MatGPT2Config(**tiny_kwargs(mat_widths=[16, 128], attn_implementation="eager"))
    model = MatGPT2LMHeadModel(config).eval()
    batch = 2
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(torch.zeros(batch, seq_len, dtype=torch.long), ffn_widths=plan)
    assert count_flops_per_token(config, plan, seq_len) * batch * seq_len == counter.get_total_flops()
