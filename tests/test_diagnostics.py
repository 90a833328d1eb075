"""Collapse diagnostics (`hf_matta.diagnostics`) against closed forms and through `MatTATrainer.evaluate`."""

import math

import pytest
import torch
import torch.nn.functional as F
from transformers import default_data_collator

from hf_matta import MatGPT2Config, MatGPT2LMHeadModel
from hf_matta.diagnostics import ffn_split_metrics, ffn_split_sums
from hf_matta.trainer import MatTATrainer
from hf_matta.training_args import MatTATrainingArguments

from .conftest import VOCAB, tiny_kwargs


STUDENT, TA = 16, 64


def test_split_sums_match_the_closed_form():
    hidden = torch.tensor([[[1.0, 2.0, 3.0, 4.0]], [[0.5, 0.0, 0.0, -1.0]]])  # (B=2, T=1, W=4)
    weight = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [2.0, -1.0]])  # (W=4, d=2)
    sums = ffn_split_sums(hidden, weight, split=2)
    student = torch.tensor([[1.0, 2.0], [0.5, 0.0]])  # h[:, :2] @ W[:2]
    extra = torch.tensor([[3.0 + 8.0, 3.0 - 4.0], [-2.0, 1.0]])  # h[:, 2:] @ W[2:]
    cosine = F.cosine_similarity(student, extra, dim=-1).sum()
    scalars = [cosine, extra.pow(2).sum(), student.pow(2).sum(), torch.tensor(2.0), (student * extra).sum()]
    torch.testing.assert_close(sums, torch.cat([torch.stack(scalars), student.sum(0), extra.sum(0)]))
    metrics = ffn_split_metrics(torch.stack([sums, sums]))
    assert metrics["ffn_cos_l1"] == pytest.approx(cosine.item() / 2)
    assert metrics["ffn_norm_ratio"] == pytest.approx(math.sqrt(extra.pow(2).sum() / student.pow(2).sum()))
    centered_student, centered_extra = student - student.mean(0), extra - extra.mean(0)
    pooled = (centered_student * centered_extra).sum() / (centered_student.norm() * centered_extra.norm())
    assert metrics["ffn_centered_cos_l0"] == pytest.approx(pooled.item())


def test_a_shared_offset_is_parallel_but_not_aligned_once_centered():
    """Two parts whose token-dependent halves are orthogonal but which share a large constant offset."""
    tokens = torch.randn(256, 2)
    offset = torch.tensor([10.0, 0.0, 0.0])
    student = torch.cat([tokens[:, :1], torch.zeros(256, 2)], dim=1) + offset  # (N, d=3)
    extra = torch.cat([torch.zeros(256, 2), tokens[:, 1:]], dim=1) + offset
    hidden = torch.cat([student, extra], dim=1)  # (N, W=6): the identity c_proj below gives back the parts
    weight = torch.cat([torch.eye(3), torch.eye(3)])  # (6, 3)
    metrics = ffn_split_metrics(ffn_split_sums(hidden, weight, split=3)[None])
    assert metrics["ffn_cos"] > 0.95
    assert abs(metrics["ffn_centered_cos"]) < 0.05


def _model(kind: str) -> MatGPT2LMHeadModel:
    """A tiny nested model whose TA-only neurons (16..64) are independent, collapsed or silent."""
    torch.manual_seed(0)
    model = MatGPT2LMHeadModel(MatGPT2Config(**tiny_kwargs(mat_widths=[STUDENT, TA])))
    with torch.no_grad():
        for block in model.transformer.h:
            fc, proj = block.mlp.c_fc, block.mlp.c_proj
            if kind == "collapsed":  # three copies of the student's neurons, each at 0.3 of its output
                fc.weight[:, STUDENT:] = fc.weight[:, :STUDENT].repeat(1, 3)
                fc.bias[STUDENT:] = fc.bias[:STUDENT].repeat(3)
                proj.weight[STUDENT:] = 0.3 * proj.weight[:STUDENT].repeat(3, 1)
            elif kind == "silent":  # the TA computes exactly its student's function
                proj.weight[STUDENT:] = 0.0
            else:
                proj.weight.normal_(0.0, 0.1)
    return model


def _evaluate(tmp_path, model: MatGPT2LMHeadModel) -> dict[str, float]:
    args = MatTATrainingArguments(
        output_dir=str(tmp_path), use_cpu=True, report_to="none", per_device_eval_batch_size=4
    )
    generator = torch.Generator().manual_seed(1)
    rows = [{"input_ids": ids, "labels": ids} for ids in torch.randint(0, VOCAB, (8, 12), generator=generator)]
    trainer = MatTATrainer(model=model, args=args, eval_dataset=rows, data_collator=default_data_collator)
    return trainer.evaluate()


def test_evaluation_tells_a_collapsed_ta_from_an_independent_one(tmp_path):
    kinds = ("collapsed", "independent", "silent")
    collapsed, independent, silent = (_evaluate(tmp_path, _model(kind)) for kind in kinds)
    layers = range(tiny_kwargs()["n_layer"])
    for layer_idx in layers:
        assert collapsed[f"eval_ffn_cos_l{layer_idx}"] == pytest.approx(1.0, abs=1e-5)
        assert collapsed[f"eval_ffn_centered_cos_l{layer_idx}"] == pytest.approx(1.0, abs=1e-5)
        assert abs(independent[f"eval_ffn_centered_cos_l{layer_idx}"]) < 0.3
        assert collapsed[f"eval_ffn_norm_ratio_l{layer_idx}"] == pytest.approx(0.9, rel=1e-4)
        assert abs(independent[f"eval_ffn_cos_l{layer_idx}"]) < 0.3
        assert independent[f"eval_ffn_norm_ratio_l{layer_idx}"] > 0.5
        assert silent[f"eval_ffn_norm_ratio_l{layer_idx}"] == 0.0
    assert silent["eval_kl_ta_student"] == pytest.approx(0.0, abs=1e-6)
    assert silent["eval_loss_w16"] == pytest.approx(silent["eval_loss_w64"], abs=1e-6)
    assert independent["eval_kl_ta_student"] > 1e-3
