"""MatGPT2: GPT-2 whose FFN layers have nested widths (MatTA's student nested inside its teaching assistant).

Only the difference from GPT-2 is written here. Parameter names and the Conv1D (in, out) layout are GPT-2's, so a
`GPT2LMHeadModel` state dict loads as is. The width of every FFN is an argument of each forward call
(`ffn_widths`), never module state, so DDP, FSDP, generation and several widths in one training step are safe.

This file travels to the Hub as remote code: it imports only torch and transformers.
"""

import copy
from collections.abc import Sequence

import torch
from torch import nn
from transformers import GenerationConfig, GenerationMixin, GPT2LMHeadModel, GPT2Model
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache
from transformers.generation.utils import GenerateOutput
from transformers.modeling_outputs import BaseModelOutputWithPastAndCrossAttentions, CausalLMOutputWithCrossAttentions
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, MODEL_MAPPING_NAMES
from transformers.models.gpt2.modeling_gpt2 import GPT2MLP, GPT2Attention, GPT2Block, GPT2PreTrainedModel
from transformers.pytorch_utils import Conv1D
from transformers.utils.deprecation import deprecate_kwarg

from .configuration_matgpt2 import MatGPT2Config


FFNWidths = int | Sequence[int] | None

# The one description of what is nested: for each FFN module of a block, its parameters that hold the hidden units and
# the dimension they lie along (GPT-2's Conv1D stores weights as (in, out)). The width-`w` sub-network keeps the first
# `w` entries along that dimension; every other parameter (attention, layer norms, embeddings, `c_proj.bias`) is whole.
NESTED_FFN_DIMS: dict[str, dict[str, int]] = {
    "c_fc": {"weight": 1, "bias": 0},  # (d, W), (W,): one column and one bias per hidden unit
    "c_proj": {"weight": 0},  # (W, d): one row per hidden unit
}


def nested_ffn_parameters(layer_idx: int) -> dict[str, int]:
    """The nested parameters of layer `layer_idx` by their full name in a `MatGPT2LMHeadModel` (or GPT-2) state dict,
    each with the dimension its hidden units lie along: `{"transformer.h.0.mlp.c_fc.weight": 1, ...}`."""
    return {
        f"transformer.h.{layer_idx}.mlp.{module}.{param}": dim
        for module, params in NESTED_FFN_DIMS.items()
        for param, dim in params.items()
    }


class MatConv1D(Conv1D):
    """GPT-2's Conv1D (weight stored (in, out)) that can run on a prefix of its FFN hidden units.

    `nested` maps its parameter names to the dimension that holds the hidden units (an entry of `NESTED_FFN_DIMS`):
    `c_fc` keeps its first `width` output features, `c_proj` reads only its first `width` input features. The slice is
    taken inside this module's own forward, where ZeRO-3 and FSDP have gathered its parameters; it is a view, so no
    weight is copied and gradients reach the prefix only.
    """

    __repr__ = nn.Module.__repr__  # Conv1D's own repr would hide `extra_repr`

    def __init__(self, nf: int, nx: int, nested: dict[str, int]):
        super().__init__(nf, nx)
        self.nested = nested

    def extra_repr(self) -> str:
        side = "out" if self.nested["weight"] == 1 else "in"  # which features are the FFN's hidden units
        return f"nf={self.nf}, nx={self.nx}, nested={side}"

    def forward(self, x: torch.Tensor, width: int | None = None) -> torch.Tensor:
        if width is None:
            return super().forward(x)
        weight = self.weight.narrow(self.nested["weight"], 0, width)  # c_fc: (nx, w); c_proj: (w, nf)
        bias = self.bias.narrow(self.nested["bias"], 0, width) if "bias" in self.nested else self.bias  # (w,); (nf,)
        return torch.addmm(bias, x.reshape(-1, x.size(-1)), weight).view(*x.shape[:-1], weight.size(-1))


class MatGPT2MLP(GPT2MLP):
    """GPT-2's MLP whose hidden width is chosen per call: `c_fc` columns and `c_proj` rows `[:width]`.

    When an adapter (PEFT's LoRA, IA3, ...) or a quantizer has replaced `c_fc` or `c_proj`, that module runs at its
    full width and the MLP nests its result: the first `width` outputs of `c_fc`, and `c_proj` fed zeros beyond the
    first `width` inputs. That is exactly the width-`width` slice of the module's merged weights, so an adapter's
    deltas are nested like the weights themselves: every width of an adapted model works, and a student extracted
    after merging equals the adapted model at its plan. The cost: the full FFN's compute at every width until the
    adapter is merged.
    """

    def __init__(self, config: MatGPT2Config, layer_idx: int):
        nn.Module.__init__(self)  # GPT2MLP.__init__ would allocate plain Conv1Ds first
        self.n_inner = config.n_inner[layer_idx]
        # The widths this layer was built to run at: the trained granularities that fit it, and its full width.
        self.granularities = sorted({*(width for width in config.mat_widths if width <= self.n_inner), self.n_inner})
        self.c_fc = MatConv1D(self.n_inner, config.hidden_size, nested=NESTED_FFN_DIMS["c_fc"])
        self.c_proj = MatConv1D(config.hidden_size, self.n_inner, nested=NESTED_FFN_DIMS["c_proj"])
        self.act = ACT2FN[config.activation_function]
        self.dropout = nn.Dropout(config.resid_pdrop)

    def extra_repr(self) -> str:
        return f"n_inner={self.n_inner}, granularities={self.granularities}"

    def forward(self, hidden_states: torch.Tensor, width: int | None = None) -> torch.Tensor:
        narrower = width is not None and width < self.n_inner
        if isinstance(self.c_fc, MatConv1D):
            hidden_states = self.c_fc(hidden_states, width)  # (B, T, w): only the first w hidden units are computed
        else:
            hidden_states = self.c_fc(hidden_states)  # (B, T, W)
            hidden_states = hidden_states[..., :width] if narrower else hidden_states  # (B, T, w)
        hidden_states = self.act(hidden_states)
        if isinstance(self.c_proj, MatConv1D):
            hidden_states = self.c_proj(hidden_states, width)  # (B, T, d)
        else:
            if narrower:  # hidden units beyond the width are zero: they add nothing through the merged c_proj rows
                hidden_states = nn.functional.pad(hidden_states, (0, self.n_inner - width))  # (B, T, W)
            hidden_states = self.c_proj(hidden_states)  # (B, T, d)
        return self.dropout(hidden_states)


class MatGPT2Block(GPT2Block):
    """GPT-2's block with a nested MLP; reads its own width from the per-layer `ffn_widths` of the call."""

    def __init__(self, config: MatGPT2Config, layer_idx: int):
        nn.Module.__init__(self)
        self.layer_idx = layer_idx
        self.ln_1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_epsilon)
        self.attn = GPT2Attention(config=config, layer_idx=layer_idx)
        self.ln_2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_epsilon)
        self.mlp = MatGPT2MLP(config, layer_idx)

    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    def forward(
        self,
        hidden_states: torch.Tensor,
        cache: Cache | None = None,
        attention_mask: torch.Tensor | None = None,
        encoder_hidden_states: torch.Tensor | None = None,
        encoder_attention_mask: torch.Tensor | None = None,
        use_cache: bool | None = False,
        ffn_widths: tuple[int, ...] | None = None,
        **kwargs,
    ) -> torch.Tensor:
        if encoder_hidden_states is not None:  # GPT-2's answer for a block built without cross-attention
            raise ValueError(
                f"`encoder_hidden_states` were passed, but MatGPT2 has no cross-attention layers (decoder-only); "
                "drop `encoder_hidden_states` and `encoder_attention_mask`."
            )
        width = None if ffn_widths is None else ffn_widths[self.layer_idx]
        attn_output, _ = self.attn(
            self.ln_1(hidden_states), cache=cache, attention_mask=attention_mask, use_cache=use_cache, **kwargs
        )
        hidden_states = hidden_states + attn_output
        return hidden_states + self.mlp(self.ln_2(hidden_states), width)


class MatGPT2PreTrainedModel(GPT2PreTrainedModel):
    config: MatGPT2Config
    config_class = MatGPT2Config
    _no_split_modules = ["MatGPT2Block"]

    def _initialize_weights(self, module, is_custom_code: bool = False):
        # Transformers treats classes outside its package as remote code and skips modules without parameters of
        # their own, which would drop GPT-2's scaled residual init (c_proj std / sqrt(2 n_layer)). GPT-2's
        # `_init_weights` uses `transformers.initialization`, which tracks what is initialised, so take the normal path.
        super()._initialize_weights(module, is_custom_code=False)

    def save_pretrained(self, save_directory, *args, **kwargs):
        """`PreTrainedModel.save_pretrained`; a model registered for an auto class also names the bare model in
        `auto_map`, so both `AutoModel` and `AutoModelForCausalLM` load it with `trust_remote_code=True`."""
        if self._auto_class is not None:
            auto_map = getattr(self.config, "auto_map", None) or {}
            self.config.auto_map = {**auto_map, "AutoModel": "modeling_matgpt2.MatGPT2Model"}
        return super().save_pretrained(save_directory, *args, **kwargs)


class MatGPT2Model(MatGPT2PreTrainedModel, GPT2Model):
    """The bare MatGPT2 transformer: GPT2Model with nested-width blocks and an `ffn_widths` argument."""

    def __init__(self, config: MatGPT2Config):
        GPT2PreTrainedModel.__init__(self, config)  # GPT2Model.__init__ would build fixed-width blocks
        self.embed_dim = config.hidden_size
        self.wte = nn.Embedding(config.vocab_size, self.embed_dim)
        self.wpe = nn.Embedding(config.max_position_embeddings, self.embed_dim)
        self.drop = nn.Dropout(config.embd_pdrop)
        self.h = nn.ModuleList([MatGPT2Block(config, layer_idx=i) for i in range(config.num_hidden_layers)])
        self.ln_f = nn.LayerNorm(self.embed_dim, eps=config.layer_norm_epsilon)
        self.gradient_checkpointing = False
        self._attn_implementation = config._attn_implementation
        self.post_init()

    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.LongTensor | None = None,
        position_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        encoder_hidden_states: torch.Tensor | None = None,
        encoder_attention_mask: torch.Tensor | None = None,
        use_cache: bool | None = None,
        ffn_widths: FFNWidths = None,
        **kwargs,
    ) -> BaseModelOutputWithPastAndCrossAttentions:
        r"""GPT2Model's forward, with `ffn_widths`: an int runs every layer at that width, a list gives one width per
        layer (a Mix'n'Match model); `None` runs the config's default plan (`config.ffn_widths`; unset: full width)."""
        if ffn_widths is None:
            ffn_widths = self.config.ffn_widths
        return super().forward(
            input_ids,
            cache=cache,
            attention_mask=attention_mask,
            token_type_ids=token_type_ids,
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
            encoder_hidden_states=encoder_hidden_states,
            encoder_attention_mask=encoder_attention_mask,
            use_cache=use_cache,
            ffn_widths=self.config.resolve_ffn_widths(ffn_widths),
            **kwargs,
        )


class MatGPT2LMHeadModel(MatGPT2PreTrainedModel, GPT2LMHeadModel, GenerationMixin):
    """MatGPT2 with GPT-2's tied language-modelling head. Every nested width is a causal LM of its own:

    ```python
    >>> ta_logits = model(input_ids).logits  # full width: the teaching assistant
    >>> student_logits = model(input_ids, ffn_widths=model.config.student_width).logits
    >>> mixed = model.generate(input_ids, ffn_widths=[256, 1024, 1024, 256])  # Mix'n'Match
    ```
    """

    def __init__(self, config: MatGPT2Config):
        GPT2PreTrainedModel.__init__(self, config)  # GPT2LMHeadModel.__init__ would build a GPT2Model
        self.transformer = MatGPT2Model(config)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        # The class name matches no loss in transformers' LOSS_MAPPING (GPT-2's neither). Naming it tells Trainer
        # that the loss shifts labels, so `num_items_in_batch` counts `labels[..., 1:]`, one token fewer per row.
        self.loss_type = "ForCausalLM"
        self.post_init()

    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.LongTensor | None = None,
        position_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        encoder_hidden_states: torch.Tensor | None = None,
        encoder_attention_mask: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        ffn_widths: FFNWidths = None,
        **kwargs,
    ) -> CausalLMOutputWithCrossAttentions:
        r"""GPT2LMHeadModel's forward, with `ffn_widths` (see [`MatGPT2Model.forward`])."""
        return super().forward(
            input_ids,
            cache=cache,
            attention_mask=attention_mask,
            token_type_ids=token_type_ids,
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
            encoder_hidden_states=encoder_hidden_states,
            encoder_attention_mask=encoder_attention_mask,
            labels=labels,
            use_cache=use_cache,
            logits_to_keep=logits_to_keep,
            ffn_widths=ffn_widths,
            **kwargs,
        )

    def generate(
        self, inputs: torch.Tensor | None = None, generation_config: GenerationConfig | None = None, **kwargs
    ) -> GenerateOutput | torch.LongTensor:
        r"""[`~GenerationMixin.generate`] at a plan: `ffn_widths=` as in `forward`, else `generation_config.ffn_widths`
        when set, else the config's default plan (`config.ffn_widths`; unset: full width).

        With an `assistant_model`, choose this model's plan with `config.ffn_widths` (or `from_pretrained(...,
        ffn_widths=...)`): generate hands its keyword arguments to the assistant as well, and the assistant runs at
        its own default plan.
        """
        widths = kwargs.pop("ffn_widths", None)
        if hasattr(generation_config or self.generation_config, "ffn_widths"):
            # generate would take `ffn_widths` for a generation setting and keep it from the forward: moved over.
            generation_config = copy.deepcopy(generation_config or self.generation_config)
            from_generation_config = generation_config.ffn_widths
            del generation_config.ffn_widths
            widths = from_generation_config if widths is None else widths
        if widths is not None:
            self.config.resolve_ffn_widths(widths)  # a width that does not fit fails before the first token
            if kwargs.get("assistant_model") is not None:
                raise ValueError(
                    f"ffn_widths={widths!r} with an assistant_model: generate would send the width to the assistant "
                    f"too. Set it as this model's default plan instead (`model.config.ffn_widths = {widths!r}`, or "
                    f"`from_pretrained(..., ffn_widths={widths!r})`); the assistant keeps its own."
                )
            kwargs["ffn_widths"] = widths
        return super().generate(inputs, generation_config, **kwargs)

    @torch.no_grad()
    def reorder_neurons_by_importance(self, calibration_input_ids: torch.LongTensor, start: int | None = None) -> None:
        """Sort every layer's FFN neurons from `start` on (default: the student's width), most important first, in
        place: importance is a neuron's mean |activation| at full width on `calibration_input_ids` `(B, T)` times the
        norm of its `c_proj` row. The full model's function and every width up to `start` are unchanged; a width in
        between then keeps the neurons that matter most to the full model (Mix'n'Match between student and TA)."""
        start = self.config.student_width if start is None else start
        state = dict(self.state_dict())
        _reorder_neurons_by_importance(self, state, calibration_input_ids, start or 0)
        self.load_state_dict(state)

    @classmethod
    def from_gpt2(
        cls,
        model_or_name: GPT2LMHeadModel | str,
        mat_widths: Sequence[int],
        student_width: int | None = None,
        calibration_input_ids: torch.LongTensor | None = None,
        **from_pretrained_kwargs,
    ) -> "MatGPT2LMHeadModel":
        r"""Grow (or cut) a pretrained GPT-2 into a nested MatGPT2 whose full width is `mat_widths[-1]`.

        Every parameter but the FFNs' is copied. Each FFN keeps the pretrained neurons first:
        - widths above the pretrained FFN width `n` add neurons whose `c_fc` columns are initialised like GPT-2's
          and whose `c_proj` rows are zero, so every width `>= n` computes exactly the pretrained function at step 0
          (with `student_width=n` the student *is* the pretrained model and the TA grows around it);
        - widths below `n` are sub-networks: the prefix of the pretrained neurons. With `calibration_input_ids`, the
          neurons of each layer are first reordered by importance on that text (mean |activation| times the norm of
          the neuron's `c_proj` row, largest first), which leaves the full model's function unchanged and puts the
          neurons that matter most into the prefix. Without it, the prefix is the pretrained order.

        Args:
            model_or_name: a `GPT2LMHeadModel`, or a name or path for `GPT2LMHeadModel.from_pretrained`.
            mat_widths: ascending nested FFN widths; the last is the TA's full width.
            student_width: the served granularity (one of `mat_widths`); defaults to the smallest.
            calibration_input_ids: `(B, T)` token ids used to rank neurons when a width cuts into the pretrained FFN.
        """
        if isinstance(model_or_name, str):
            source = GPT2LMHeadModel.from_pretrained(model_or_name, **from_pretrained_kwargs)
        else:
            source = model_or_name
        source_config = source.config.to_dict()
        pretrained_width = source_config.pop("n_inner") or 4 * source.config.n_embd
        for key in ("model_type", "architectures", "transformers_version", "auto_map"):
            source_config.pop(key, None)
        config = MatGPT2Config(
            **source_config, n_inner=mat_widths[-1], mat_widths=list(mat_widths), student_width=student_width
        )
        model = cls(config).to(dtype=source.dtype)
        state = {name: tensor.detach().clone() for name, tensor in source.state_dict().items()}
        if calibration_input_ids is not None and min(mat_widths) < pretrained_width:
            _reorder_neurons_by_importance(source, state, calibration_input_ids)
        kept = min(pretrained_width, config.n_inner[0])
        target = model.state_dict()
        for layer_idx in range(config.n_layer):
            for name, dim in nested_ffn_parameters(layer_idx).items():
                # New hidden units read their input through the fresh init of `c_fc.weight`; their bias and their
                # `c_proj` rows (what they add to the output) start at zero.
                grown = target[name].clone() if name.endswith("c_fc.weight") else torch.zeros_like(target[name])
                grown.narrow(dim, 0, kept).copy_(state[name].narrow(dim, 0, kept))
                state[name] = grown
        model.load_state_dict(state, strict=False)
        return model


# transformers looks models up by class name in its name tables, which `AutoModelForCausalLM.register` does not fill:
# Trainer shifts the labels for label smoothing only for the causal LMs listed there, the text-generation pipeline
# checks them, and so do transformers' common model tests. No public API adds to them. Done here, in the file that
# travels as remote code, so that loading with `trust_remote_code=True` registers the model as importing hf_matta does.
MODEL_MAPPING_NAMES.setdefault(MatGPT2Config.model_type, MatGPT2Model.__name__)
MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.setdefault(MatGPT2Config.model_type, MatGPT2LMHeadModel.__name__)


@torch.no_grad()
def _reorder_neurons_by_importance(
    source: GPT2LMHeadModel, state: dict[str, torch.Tensor], calibration_input_ids: torch.LongTensor, start: int = 0
) -> None:
    """Permute each layer's FFN neurons `[start:]` in `state`, most important first, by `source`'s full-width
    activations on the calibration text (the full function and every prefix of at most `start` neurons are
    unchanged)."""
    activations = {}
    hooks = [
        block.mlp.act.register_forward_hook(
            lambda module, inputs, output, layer_idx=layer_idx: activations.__setitem__(layer_idx, output)
        )
        for layer_idx, block in enumerate(source.transformer.h)
    ]
    was_training = source.training
    try:
        source.eval()(calibration_input_ids.to(source.device))
    finally:
        source.train(was_training)
        for hook in hooks:
            hook.remove()
    for layer_idx, hidden in activations.items():
        proj_weight = state[f"transformer.h.{layer_idx}.mlp.c_proj.weight"]  # (n, d)
        importance = hidden.abs().flatten(0, -2).float().mean(0) * proj_weight.float().norm(dim=1)  # (n,)
        order = torch.cat([torch.arange(start), start + importance[start:].argsort(descending=True)])
        for name, dim in nested_ffn_parameters(layer_idx).items():
            state[name] = state[name].index_select(dim, order)


__all__ = ["NESTED_FFN_DIMS", "MatGPT2LMHeadModel", "MatGPT2Model", "MatGPT2PreTrainedModel", "nested_ffn_parameters"]
