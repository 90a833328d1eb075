"""Is the TA teaching anything? Measures that show a collapsed nested model while it trains.

A nested TA can end up computing its own student's function (DESIGN.md): trained from step 0 on the same error
signal as the student neurons, the TA-only FFN neurons learn outputs parallel to the student neurons' outputs, the
next LayerNorm removes the extra scale, and every Mix'n'Match size is the same model. Two measures tell it apart:

- KL(TA || student) in nats per token (`MatTATrainer` reports it as `eval_kl_ta_student`): 0 when the TA predicts
  exactly what its student predicts.
- Per layer, the TA's FFN output split by neuron, `h W = h[:, :w_S] W[:w_S] + h[:, w_S:] W[w_S:]` (`h` the FFN's
  hidden activations `(B, T, W)`, `W` `c_proj.weight` `(W, d)`, the shared bias left out): the mean per-token cosine
  between the TA-only neurons' part and the student neurons' part (`ffn_cos_l{i}`; near 1 means the TA-only
  neurons only repeat the student's direction), the same once the parts' means over tokens are removed
  (`ffn_centered_cos_l{i}`), and the ratio of their root-mean-square norms (`ffn_norm_ratio_l{i}`; near 0 means
  they add nothing). See `ffn_split_metrics`.
"""

import torch
import torch.nn.functional as F
from torch import nn


def ffn_split_sums(hidden: torch.Tensor, proj_weight: torch.Tensor, split: int) -> torch.Tensor:
    """Sums over tokens for one FFN layer, `(5 + 2 d,)`: cosine, |TA-only part|^2, |student part|^2, token count,
    <student part, TA-only part>, then the student part and the TA-only part themselves `(d,)` each.

    `hidden` `(..., W)` are the FFN's activations at full width, `proj_weight` `(W, d)` its `c_proj.weight`, `split`
    the student's width: neurons `[:split]` are the student's, `[split:]` the TA's own.
    """
    hidden = hidden.reshape(-1, hidden.size(-1)).float()  # (N, W)
    weight = proj_weight.float()
    student = hidden[:, :split] @ weight[:split]  # (N, d)
    extra = hidden[:, split:] @ weight[split:]  # (N, d)
    cosine = F.cosine_similarity(student, extra, dim=-1)  # (N,); 0 where a part is exactly zero
    count = torch.tensor(float(len(hidden)), device=hidden.device)
    scalars = torch.stack([cosine.sum(), extra.pow(2).sum(), student.pow(2).sum(), count, (student * extra).sum()])
    return torch.cat([scalars, student.sum(0), extra.sum(0)])


def ffn_split_metrics(sums: torch.Tensor, prefix: str = "") -> dict[str, float]:
    """`(n_layer, 5 + 2 d)` sums of `ffn_split_sums` -> per layer and averaged over layers:

    - `ffn_cos_l{i}`: the mean per-token cosine between the TA-only neurons' output and the student neurons';
    - `ffn_centered_cos_l{i}`: the same alignment once each part's mean over tokens is removed (a pooled cosine of
      the token-dependent parts): a constant offset that both parts learn (GELU activations have a positive mean, so
      every neuron can carry part of a bias) makes the first near 1 without making the TA-only neurons redundant;
    - `ffn_norm_ratio_l{i}`: the ratio of their root-mean-square norms.
    """
    sums = sums.double()
    cosine, extra_sq, student_sq, count, cross = sums[:, :5].unbind(-1)
    student_sum, extra_sum = sums[:, 5:].chunk(2, dim=-1)  # (L, d) each
    count = count.clamp(min=1)
    centered_cross = cross - (student_sum * extra_sum).sum(-1) / count
    centered_student = student_sq - student_sum.pow(2).sum(-1) / count
    centered_extra = extra_sq - extra_sum.pow(2).sum(-1) / count
    measures = {
        "ffn_cos": cosine / count,
        "ffn_centered_cos": centered_cross / (centered_student * centered_extra).clamp(min=1e-30).sqrt(),
        "ffn_norm_ratio": (extra_sq / student_sq.clamp(min=1e-30)).sqrt(),
    }
    metrics = {}
    for name, values in measures.items():
        for layer_idx, value in enumerate(values.tolist()):
            metrics[f"{prefix}{name}_l{layer_idx}"] = value
        metrics[f"{prefix}{name}"] = values.mean().item()
    return metrics


class FFNSplitProbe:
    """While active (a context manager), every full-width forward of a nested `MatGPT2LMHeadModel` adds, per layer,
    the `ffn_split_sums` of its FFN output split at `split` (the student's width) to `self.sums` `(n_layer, 5 + 2 d)`.

    Narrower forwards (student, extra widths) are not recorded: their hidden activations are narrower than the
    layer's full width.
    """

    def __init__(self, model: nn.Module, split: int):
        self.blocks = model.transformer.h
        self.split = split
        self.sums = torch.zeros(len(self.blocks), 5 + 2 * model.config.n_embd)
        self._hooks = []

    def _record(self, layer_idx: int, module: nn.Module, args: tuple) -> None:
        hidden = args[0]  # (B, T, w): c_proj's input, the FFN's activations
        if hidden.size(-1) != module.weight.size(0) or hidden.size(-1) <= self.split:
            return
        with torch.no_grad():
            sums = ffn_split_sums(hidden, module.weight, self.split)
        self.sums = self.sums.to(sums.device)
        self.sums[layer_idx] += sums

    def __enter__(self) -> "FFNSplitProbe":
        self._hooks = [
            block.mlp.c_proj.register_forward_pre_hook(
                lambda module, args, layer_idx=layer_idx: self._record(layer_idx, module, args)
            )
            for layer_idx, block in enumerate(self.blocks)
        ]
        return self

    def __exit__(self, *exc_info) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks = []


__all__ = ["FFNSplitProbe", "ffn_split_metrics", "ffn_split_sums"]
