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

from typing import TYPE_CHECKING

from .. import lazy_exports


_EXPORTS = {
    "STAGES": "hf_matta.pipeline.arguments",
    "PipelineArguments": "hf_matta.pipeline.arguments",
    "parse_args": "hf_matta.pipeline.arguments",
    "main": "hf_matta.pipeline.main",
    "run_pipeline": "hf_matta.pipeline.run",
    "build_nested_model": "hf_matta.pipeline.stages",
    "config_from_string": "hf_matta.pipeline.stages",
    "pretrain_teacher": "hf_matta.pipeline.stages",
}

__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:
    from .arguments import STAGES, PipelineArguments, parse_args
    from .main import main
    from .run import run_pipeline
    from .stages import build_nested_model, config_from_string, pretrain_teacher

__getattr__ = lazy_exports(__name__, _EXPORTS)
