"""hf_matta: MatTA (Matryoshka teaching assistants) for Hugging Face Transformers.

The package's face, as TRL's: `from hf_matta import MatGPT2LMHeadModel, MatTATrainer, extract_student` imports each
name's module on first use, so that `import hf_matta` (and the `hf-matta` command) starts without torch or
transformers, and importing the model does not import the trainer. Any of the model names registers `MatGPT2` with
the Auto classes (see `hf_matta.models`).
"""

import importlib
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any


__version__ = "0.1.0"

# name -> the module that defines it
_EXPORTS = {
    "MatGPT2Config": "hf_matta.models",
    "MatGPT2LMHeadModel": "hf_matta.models",
    "MatGPT2Model": "hf_matta.models",
    "MatGPT2PreTrainedModel": "hf_matta.models",
    "MatTATrainer": "hf_matta.trainer",
    "MatTATrainingArguments": "hf_matta.training_args",
    "extract_student": "hf_matta.extract",
    "save_student": "hf_matta.extract",
    "mix_n_match": "hf_matta.extract",
}

__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:
    from .extract import extract_student, mix_n_match, save_student
    from .models import MatGPT2Config, MatGPT2LMHeadModel, MatGPT2Model, MatGPT2PreTrainedModel
    from .trainer import MatTATrainer
    from .training_args import MatTATrainingArguments


def lazy_exports(package: str, exports: dict[str, str]) -> Callable[[str], Any]:
    """A module `__getattr__` (PEP 562) for `package`: each name of `exports` is imported from the module it maps to
    on first access, then kept on the package."""

    def __getattr__(name: str) -> Any:
        if name not in exports:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(exports[name]), name)
        setattr(sys.modules[package], name, value)
        return value

    return __getattr__


__getattr__ = lazy_exports(__name__, _EXPORTS)


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})
