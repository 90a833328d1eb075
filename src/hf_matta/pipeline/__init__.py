"""The MatTA pipeline in the package: teacher -> train -> extract -> evaluate -> publish -> report, run in order from
one config by `hf-matta run CONFIG` and by `recipes/train_gpt2m.py` (a thin script), each stage resumable.

- `arguments`: one dataclass per stage, and one vocabulary (config file, recipe and `hf-matta run` alike);
- `stages`: the stage functions, and what they are built from (`pretrain_teacher`, `build_nested_model`);
- `check`: `--check`, everything that can be known in seconds, before any training;
- `run`: the order, the completion records, skipping and `--stage`;
- `report`: `report.md` and `elastic_curve.png` from the stages' JSON files;
- `main`: the command.

Names are imported from their module on first use, so that `hf-matta run` parses its arguments before the trainer,
lm-eval and the Hub client load.
"""

import importlib
from typing import TYPE_CHECKING, Any


_EXPORTS = {
    "STAGES": "arguments",
    "PipelineArguments": "arguments",
    "parse_args": "arguments",
    "main": "main",
    "run_pipeline": "run",
    "build_nested_model": "stages",
    "config_from_string": "stages",
    "pretrain_teacher": "stages",
}

__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:
    from .arguments import STAGES, PipelineArguments, parse_args
    from .main import main
    from .run import run_pipeline
    from .stages import build_nested_model, config_from_string, pretrain_teacher


def __getattr__(name: str) -> Any:
    """Import the module that defines `name` on first access (PEP 562)."""
    if name not in _EXPORTS:
        raise AttributeError(f"module 'hf_matta.pipeline' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    globals()[name] = value
    return value
