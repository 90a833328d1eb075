from .configuration_matgpt2 import MatGPT2Config
from .modeling_matgpt2 import MatGPT2LMHeadModel, MatGPT2Model, MatGPT2PreTrainedModel


__all__ = ["MatGPT2Config", "MatGPT2LMHeadModel", "MatGPT2Model", "MatGPT2PreTrainedModel"]
