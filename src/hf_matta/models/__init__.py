"""The models of hf_matta. Importing this package (which any hf_matta module that touches a model does) registers
`MatGPT2` with the Auto classes and marks it for `auto_map`, so that `AutoModelForCausalLM.from_pretrained` loads a
saved MatGPT2 folder, and every saved model carries its modeling files and loads with `trust_remote_code=True` where
hf_matta is not installed."""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from .matgpt2 import MatGPT2Config, MatGPT2LMHeadModel, MatGPT2Model, MatGPT2PreTrainedModel


AutoConfig.register(MatGPT2Config.model_type, MatGPT2Config, exist_ok=True)
AutoModel.register(MatGPT2Config, MatGPT2Model, exist_ok=True)
AutoModelForCausalLM.register(MatGPT2Config, MatGPT2LMHeadModel, exist_ok=True)
MatGPT2Config.register_for_auto_class()
MatGPT2Model.register_for_auto_class("AutoModel")
MatGPT2LMHeadModel.register_for_auto_class("AutoModelForCausalLM")

__all__ = ["MatGPT2Config", "MatGPT2LMHeadModel", "MatGPT2Model", "MatGPT2PreTrainedModel"]
