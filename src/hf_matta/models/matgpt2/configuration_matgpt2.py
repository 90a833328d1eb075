"""MatGPT2 configuration: GPT-2 plus nested FFN widths (the MatTA student inside its teaching assistant).

This file travels to the Hub as remote code next to `modeling_matgpt2.py`: it imports only torch, transformers
and huggingface_hub's `strict` decorator (the one transformers' own configs use).
"""

from collections.abc import Sequence

import transformers


# The oldest transformers MatGPT2 runs on (measured by `make test-conformance`): configs as strict dataclasses and the
# `cache=` keyword of GPT-2's forwards. Checked before anything else, so that remote code on an older version fails
# with this message rather than deep inside a dataclass decorator.
MIN_TRANSFORMERS_VERSION = "5.24"
if tuple(map(int, transformers.__version__.split(".")[:2])) < tuple(map(int, MIN_TRANSFORMERS_VERSION.split("."))):
    raise ImportError(
        f"MatGPT2 needs transformers>={MIN_TRANSFORMERS_VERSION}, found {transformers.__version__}: `pip install -U "
        f"'transformers>={MIN_TRANSFORMERS_VERSION}'`. Students with one FFN width for all layers are plain GPT-2 "
        "checkpoints and load on transformers 4.x and 5.x."
    )

from huggingface_hub.dataclasses import strict  # noqa: E402 (after the version check)
from transformers import GPT2Config  # noqa: E402


@strict
class MatGPT2Config(GPT2Config):
    r"""
    Configuration of a [`MatGPT2LMHeadModel`]: a GPT-2 whose FFN hidden units are nested, so that the first `w`
    neurons of every FFN form a smaller model that shares all other weights with the full one.

    Args (on top of [`GPT2Config`]'s):
        n_inner (`int` or `list[int]`, *optional*):
            FFN hidden width, one for all layers or one per layer (a Mix'n'Match model). Defaults to
            `mat_widths[-1]` when granularities are given, else to `4 * n_embd`. Normalised to one entry per layer.
        mat_widths (`list[int]`, *optional*):
            The nested granularities, ascending FFN widths that every layer can run at. In a uniform model the last
            one is the full width, the teaching assistant's (TA). Defaults to `[n_inner]` for a uniform model and to
            `[]` (a fixed model with no nested granularities) for a per-layer one.
        student_width (`int`, *optional*):
            The granularity that is served as the student. Must be one of `mat_widths`; defaults to the smallest.
        ffn_widths (`int` or `list[int]`, *optional*):
            The default plan: the FFN widths a forward call without `ffn_widths` runs (one for all layers, or one per
            layer), so that `generate`, pipelines and lm-eval serve a smaller member of the family without code:
            `AutoModelForCausalLM.from_pretrained(path, ffn_widths=256)`, or `ffn_widths` in `config.json`.
            Defaults to `None`, the full width.

    Example:

    ```python
    >>> from hf_matta import MatGPT2Config, MatGPT2LMHeadModel
    >>> config = MatGPT2Config(n_layer=4, n_embd=128, n_head=4, mat_widths=[256, 512, 1024])
    >>> model = MatGPT2LMHeadModel(config)
    >>> student_logits = model(input_ids, ffn_widths=config.student_width).logits
    ```
    """

    model_type = "matgpt2"

    n_inner: int | list[int] | None = None
    mat_widths: list[int] | None = None
    student_width: int | None = None
    ffn_widths: int | list[int] | None = None

    def __post_init__(self, **kwargs):
        if self.add_cross_attention:
            raise ValueError("add_cross_attention=True is not supported by MatGPT2: it is a decoder-only model.")
        self.n_inner = self._normalise_n_inner()
        self.mat_widths = self._normalise_mat_widths()
        if self.student_width is None:
            self.student_width = self.mat_widths[0] if self.mat_widths else None
        elif self.student_width not in self.mat_widths:
            raise ValueError(
                f"student_width={self.student_width} is not one of the granularities mat_widths={self.mat_widths}; "
                "pick one of them (or leave student_width unset for the smallest)."
            )
        self.resolve_ffn_widths(self.ffn_widths)  # a default plan that does not fit is refused here, not at serving
        super().__post_init__(**kwargs)

    def _normalise_n_inner(self) -> list[int]:
        """`n_inner` as one positive int per layer (Gemma 3n's `int | list[int]` pattern)."""
        n_inner = self.n_inner
        if n_inner is None:
            n_inner = self.mat_widths[-1] if self.mat_widths else 4 * self.n_embd
        if isinstance(n_inner, Sequence):
            if len(n_inner) != self.n_layer:
                raise ValueError(
                    f"n_inner={list(n_inner)} has {len(n_inner)} entries but the model has n_layer={self.n_layer} "
                    "layers: give one FFN width per layer, or a single int for all layers."
                )
            n_inner = list(n_inner)
        else:
            n_inner = [n_inner] * self.n_layer
        for width in n_inner:
            if isinstance(width, bool) or not isinstance(width, int) or width <= 0:
                raise ValueError(f"n_inner={n_inner} holds {width!r}; every FFN width must be a positive int.")
        return n_inner

    def _normalise_mat_widths(self) -> list[int]:
        """Check the granularities against `n_inner`; default them to the full width of a uniform model."""
        uniform = len(set(self.n_inner)) == 1
        if self.mat_widths is None:
            return [self.n_inner[0]] if uniform else []
        widths = list(self.mat_widths)
        for width in widths:
            if isinstance(width, bool) or not isinstance(width, int) or width <= 0:
                raise ValueError(f"mat_widths={widths} holds {width!r}; every granularity must be a positive int.")
        if len(set(widths)) != len(widths):
            raise ValueError(f"mat_widths={widths} has duplicated widths; list each granularity once.")
        if widths != sorted(widths):
            raise ValueError(f"mat_widths={widths} is not ascending; list the granularities from small to large.")
        if widths and widths[-1] > min(self.n_inner):
            raise ValueError(
                f"mat_widths={widths} has width {widths[-1]}, larger than a layer's n_inner={min(self.n_inner)}; "
                f"every granularity must fit in every layer (n_inner={self.n_inner})."
            )
        if widths and uniform and widths[-1] != self.n_inner[0]:
            raise ValueError(
                f"mat_widths={widths} must end with the full FFN width n_inner={self.n_inner[0]} (the TA's width); "
                f"append {self.n_inner[0]} or set n_inner={widths[-1]}."
            )
        return widths

    @property
    def is_uniform(self) -> bool:
        """Whether every layer has the same FFN width."""
        return len(set(self.n_inner)) == 1

    def resolve_ffn_widths(self, ffn_widths: int | Sequence[int] | None) -> tuple[int, ...]:
        """One FFN width per layer for a plan: `None` is the full model, an int applies to every layer.

        Any width from 1 to the layer's `n_inner` runs; the granularities in `mat_widths` are the ones trained. (A
        forward call without `ffn_widths` runs the default plan, `self.ffn_widths`.)
        """
        if ffn_widths is None:
            return tuple(self.n_inner)
        if isinstance(ffn_widths, int) and not isinstance(ffn_widths, bool):
            widths = (ffn_widths,) * self.n_layer
        else:
            widths = tuple(ffn_widths)
            if len(widths) != self.n_layer:
                raise ValueError(
                    f"ffn_widths={list(widths)} has {len(widths)} entries but the model has n_layer={self.n_layer} "
                    "layers: give one width per layer, a single int, or None for the full model."
                )
        for layer_idx, (width, full) in enumerate(zip(widths, self.n_inner)):
            if isinstance(width, bool) or not isinstance(width, int) or not 1 <= width <= full:
                raise ValueError(
                    f"ffn_widths={ffn_widths!r}: layer {layer_idx} asks for width {width!r}, outside 1..{full} "
                    f"(that layer's n_inner)."
                )
        return widths


__all__ = ["MatGPT2Config"]
