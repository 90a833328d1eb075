"""The models of hf_matta. Importing this package (which any hf_matta module that touches a model does) registers
`MatGPT2` wherever transformers and PEFT look a model up by its type:

- the Auto classes (`AutoConfig`, `AutoModel`, `AutoModelForCausalLM`), so that `from_pretrained` loads a saved
  MatGPT2 folder, and `auto_map`, so that every saved model carries its modeling files and loads with
  `trust_remote_code=True` where hf_matta is not installed;
- transformers' causal-LM name tables (Trainer's label smoothing, the text-generation pipeline, the common model
  tests), filled by `modeling_matgpt2` itself so that remote-code loading registers them too;
- PEFT's default target modules: MatGPT2 keeps GPT-2's module names, so every PEFT method that knows GPT-2 gets the
  same defaults for `matgpt2` (LoRA: `c_attn`), and `LoraConfig()` without `target_modules` works as on GPT-2.
"""

import peft.utils
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from .matgpt2 import MatGPT2Config, MatGPT2LMHeadModel, MatGPT2Model, MatGPT2PreTrainedModel


AutoConfig.register(MatGPT2Config.model_type, MatGPT2Config, exist_ok=True)
AutoModel.register(MatGPT2Config, MatGPT2Model, exist_ok=True)
AutoModelForCausalLM.register(MatGPT2Config, MatGPT2LMHeadModel, exist_ok=True)
MatGPT2Config.register_for_auto_class()
MatGPT2Model.register_for_auto_class("AutoModel")
MatGPT2LMHeadModel.register_for_auto_class("AutoModelForCausalLM")


def _register_with_peft() -> None:
    """Give `matgpt2` GPT-2's entry in each of PEFT's per-model-type tables (public in `peft.utils`, one per method:
    `TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING`, ...); PEFT has no function that registers a model type."""
    for name in dir(peft.utils):
        table = getattr(peft.utils, name)
        if name.startswith("TRANSFORMERS_MODELS_TO_") and isinstance(table, dict) and "gpt2" in table:
            table.setdefault(MatGPT2Config.model_type, table["gpt2"])


_register_with_peft()

__all__ = ["MatGPT2Config", "MatGPT2LMHeadModel", "MatGPT2Model", "MatGPT2PreTrainedModel"]
