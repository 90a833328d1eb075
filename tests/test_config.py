"""MatGPT2Config: normalisation, defaults and every invalid value (each ValueError names the value)."""

import pytest

from hf_matta import MatGPT2Config

from .conftest import tiny_kwargs


@pytest.mark.parametrize(
    "kwargs, n_inner, mat_widths, student_width",
    [
        (dict(), [128, 128], [128], 128),
        (dict(mat_widths=[32, 64, 128]), [128, 128], [32, 64, 128], 32),
        (dict(n_inner=256, mat_widths=[64, 256], student_width=256), [256, 256], [64, 256], 256),
        (dict(n_inner=[64, 128]), [64, 128], [], None),  # a Mix'n'Match model: fixed, no granularities
        (dict(n_inner=[64, 128], mat_widths=[16, 64]), [64, 128], [16, 64], 16),  # every layer serves them
    ],
)
def test_normalisation(kwargs, n_inner, mat_widths, student_width):
    config = MatGPT2Config(**tiny_kwargs(**kwargs))
    assert (config.n_inner, config.mat_widths, config.student_width) == (n_inner, mat_widths, student_width)


def test_round_trip(tmp_path):
    config = MatGPT2Config(**tiny_kwargs(n_inner=[64, 128], mat_widths=[16, 64]))
    config.save_pretrained(tmp_path)
    loaded = MatGPT2Config.from_pretrained(tmp_path)
    assert (loaded.n_inner, loaded.mat_widths, loaded.student_width) == ([64, 128], [16, 64], 16)


@pytest.mark.parametrize(
    "kwargs, named",
    [
        (dict(mat_widths=[64, 32, 128]), "[64, 32, 128]"),  # not ascending
        (dict(mat_widths=[32, 32, 128]), "[32, 32, 128]"),  # duplicated
        (dict(mat_widths=[0, 128]), "0"),  # zero
        (dict(mat_widths=[-32, 128]), "-32"),  # negative
        (dict(n_inner=128, mat_widths=[32, 256]), "256"),  # larger than n_inner
        (dict(n_inner=[128, 64], mat_widths=[32, 128]), "128"),  # larger than one layer's n_inner
        (dict(n_inner=128, mat_widths=[32, 64]), "n_inner=128"),  # uniform model whose TA is not the full width
        (dict(n_inner=[64, 64, 64]), "[64, 64, 64]"),  # per-layer list of the wrong length
        (dict(n_inner=[64, 0]), "0"),
        (dict(mat_widths=[32, 128], student_width=48), "student_width=48"),  # not a granularity
        (dict(add_cross_attention=True), "add_cross_attention"),
    ],
)
def test_invalid_values_raise(kwargs, named):
    with pytest.raises(ValueError, match=named.replace("[", r"\[").replace("]", r"\]")):
        MatGPT2Config(**tiny_kwargs(**kwargs))


@pytest.mark.parametrize(
    "plan, expected",
    [(None, (64, 128)), (16, (16, 16)), ([16, 100], (16, 100)), ((64, 1), (64, 1))],
)
def test_resolve_ffn_widths(plan, expected):
    config = MatGPT2Config(**tiny_kwargs(n_inner=[64, 128], mat_widths=[16, 64]))
    assert config.resolve_ffn_widths(plan) == expected


@pytest.mark.parametrize("plan, named", [([16], r"\[16\]"), (65, "65"), ([16, 0], "0"), ([16, 129], "129")])
def test_resolve_ffn_widths_rejects(plan, named):
    config = MatGPT2Config(**tiny_kwargs(n_inner=[64, 128], mat_widths=[16, 64]))
    with pytest.raises(ValueError, match=named):
        config.resolve_ffn_widths(plan)
