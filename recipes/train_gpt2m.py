"""Train a MatTA family of nested GPT-2 students and turn it into servable models: a frozen teacher, a wide teaching
assistant (TA) and the student nested inside it, trained in one run; then the students extracted, evaluated,
published (dry run by default) and reported. The work is `hf_matta.pipeline`; `hf-matta run CONFIG` runs the same.

Launch:

    # the paper-scale run: student gpt2-medium, TA with 2x FFN, teacher gpt2-xl, Shampoo, web text from the Hub
    accelerate launch recipes/train_gpt2m.py --config recipes/configs/gpt2m.yaml
    accelerate launch --config_file recipes/accelerate/multi_gpu.yaml recipes/train_gpt2m.py \
        --config recipes/configs/gpt2m.yaml

    # the embedded offline default (recipes/configs/tiny_cpu.yaml): a few minutes on 2 CPU cores, no network
    python recipes/train_gpt2m.py

    # the same on 2 CPU processes (gloo); `--cpu --num_processes 2` would silently start only one
    accelerate launch --multi_gpu --num_processes 2 --num_machines 1 --mixed_precision no --dynamo_backend no \
        recipes/train_gpt2m.py

Every field of the pipeline's arguments (`hf_matta.pipeline.arguments`: model, data, teacher, training, extract,
evaluate, publish) can be set in the YAML/JSON config and overridden on the command line (`--max_steps 20`); `--help`
lists them. `--check` validates the config and stops; `--stage NAME` runs one stage; `--push` publishes to the Hub.
"""

import os
import sys
from pathlib import Path

from hf_matta.pipeline import main


DEFAULT_CONFIG = Path(__file__).parent / "configs" / "tiny_cpu.yaml"


if __name__ == "__main__":
    status = main(sys.argv[1:], default_config=DEFAULT_CONFIG, prog="train_gpt2m.py", config_positional=False)
    # Some launched runs abort in interpreter teardown (SIGABRT) after finishing: flush and leave directly.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)
