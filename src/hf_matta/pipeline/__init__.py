"""The MatTA pipeline in the package: teacher -> train -> extract -> evaluate -> publish -> report, run in order from
one config by `hf-matta run CONFIG` and by `recipes/train_gpt2m.py` (a thin script), each stage resumable.

- `arguments`: one dataclass per stage, and one vocabulary (config file, recipe and `hf-matta run` alike);
- `stages`: the stage functions, and what they are built from (`pretrain_teacher`, `build_nested_model`);
- `check`: `--check`, everything that can be known in seconds, before any training;
- `run`: the order, the completion records, skipping and `--stage`; `main` is the command.
"""

from .arguments import STAGES, PipelineArguments, parse_args
from .run import main, run_pipeline
from .stages import build_nested_model, config_from_string, pretrain_teacher


__all__ = [
    "STAGES",
    "PipelineArguments",
    "build_nested_model",
    "config_from_string",
    "main",
    "parse_args",
    "pretrain_teacher",
    "run_pipeline",
]
