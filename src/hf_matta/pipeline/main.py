"""The command that `hf-matta run` and `recipes/train_gpt2m.py` both are: parse, run, and end a bad input with its
message. The arguments are parsed before torch, the trainer, lm-eval and the Hub client are imported, so that a
mistake on the command line or in the config is reported in seconds."""

import os
import sys


def main(
    argv: list[str] | None = None,
    default_config: str | os.PathLike | None = None,
    prog: str = "hf-matta run",
    config_positional: bool = True,
) -> int:
    """Parse the arguments (`parse_args`) and run the pipeline (`run_pipeline`). A bad config or input ends with its
    message and status 2, a Hub failure or a diverged training (a non-finite loss) with status 1. `hf-matta run` takes
    the config as its first positional argument, the recipe as `--config` (with `default_config` when not given)."""
    from .options import check_quickly

    try:
        check_quickly(list(argv or []), prog, config_positional, default_config)  # --help and bad options, light
        from .arguments import parse_args

        args = parse_args(argv, default_config, prog=prog, config_positional=config_positional)
        from .run import run_pipeline

        run_pipeline(args)
    except (ValueError, OSError) as error:  # a bad config or input; a missing, unreadable or full folder
        print(f"{prog}: error: {error}", file=sys.stderr, flush=True)
        return 2
    except FloatingPointError as error:  # training diverged (trainer.NonFiniteLossError); its checkpoint is kept
        print(f"{prog}: error: {error}", file=sys.stderr, flush=True)
        return 1
    except RuntimeError as error:
        from ..hub import PublishError

        if not isinstance(error, PublishError):
            raise
        print(f"{prog}: error: {error}", file=sys.stderr, flush=True)  # what was published is named; run again
        return 1
    return 0


__all__ = ["main"]
