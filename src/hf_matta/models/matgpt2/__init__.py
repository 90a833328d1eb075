from .configuration_matgpt2 import MatGPT2Config
from .modeling_matgpt2 import (
    NESTED_FFN_DIMS,
    MatGPT2LMHeadModel,
    MatGPT2Model,
    MatGPT2PreTrainedModel,
    nested_ffn_parameters,
)


__all__ = [
    "NESTED_FFN_DIMS",
    "MatGPT2Config",
    "MatGPT2LMHeadModel",
    "MatGPT2Model",
    "MatGPT2PreTrainedModel",
    "nested_ffn_parameters",
]
