"""Train a MatTA family of nested GPT-2 students: a frozen teacher, a wide teaching assistant (TA) and the student
nested inside it, in one run.

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

Every field of `ModelArguments`, `DataArguments` and `MatTATrainingArguments` can be set in the YAML/JSON config
and overridden on the command line (`--max_steps 20 --block_size 64`); `--help` lists them.

Steps: parse -> tokenizer (loaded, or a ByteLevel BPE trained on the corpus and cached) -> data (tokenised, packed,
cached) -> teacher (loaded, or a small GPT-2 pre-trained with the plain Trainer and cached) -> TA (grown from a
pretrained GPT-2 with `from_gpt2`, or built from a config) -> MatTA training -> save the nested model and its
tokenizer -> summary (validation perplexity per width at start and end, tokens/s, time, checkpoint path).
"""

import argparse
import dataclasses
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from transformers import (
    AutoTokenizer,
    GPT2Config,
    GPT2LMHeadModel,
    HfArgumentParser,
    PreTrainedTokenizerBase,
    Trainer,
    TrainingArguments,
    default_data_collator,
    set_seed,
)

from hf_matta import MatGPT2Config, MatGPT2LMHeadModel
from hf_matta.data import DataArguments, check_block_size, load_corpus, load_or_train_tokenizer, tokenize_and_pack
from hf_matta.trainer import MatTATrainer
from hf_matta.training_args import MatTATrainingArguments
from hf_matta.widths import check_plan, count_parameters, parse_plan, plan_name


DEFAULT_CONFIG = Path(__file__).parent / "configs" / "tiny_cpu.yaml"


@dataclass
class ModelArguments:
    """The nested model (TA and student), its tokenizer, and how to obtain the teacher when it does not exist yet."""

    model_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "Pretrained GPT-2 (Hub id or folder) grown into the TA with `MatGPT2LMHeadModel.from_gpt2`. "
            "Unset: the TA is built from scratch from `config_overrides`."
        },
    )
    config_overrides: str | None = field(
        default=None,
        metadata={
            "help": "From-scratch GPT-2 shape as `key=value` pairs on top of GPT2Config's defaults, e.g. "
            "`n_layer=4,n_embd=128,n_head=4,n_positions=128` (the FFN widths come from mat_widths)."
        },
    )
    mat_widths: list[int] | None = field(
        default=None,
        metadata={"help": "Nested FFN widths, ascending; the last is the TA's full width, e.g. `4096 8192`."},
    )
    student_width: int | None = field(
        default=None, metadata={"help": "The served granularity, one of mat_widths (default: the smallest)."}
    )
    tokenizer_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "Tokenizer (Hub id or folder); defaults to model_name_or_path's. A folder that does not exist "
            "yet receives a ByteLevel BPE trained on the training text (and is reused by the next run)."
        },
    )
    tokenizer_vocab_size: int = field(
        default=4096, metadata={"help": "Vocabulary size of a BPE tokenizer trained on the corpus."}
    )
    teacher_pretrain_config: str | None = field(
        default=None,
        metadata={
            "help": "When `teacher_model_name_or_path` is a folder that does not exist yet: pre-train a GPT-2 of "
            "this shape (`key=value` pairs, as config_overrides) on the training text with the plain Trainer, "
            "save it there and use it as the teacher (the next run reuses it)."
        },
    )
    teacher_pretrain_steps: int = field(default=200, metadata={"help": "Optimizer steps of teacher pre-training."})
    teacher_pretrain_learning_rate: float | None = field(
        default=None, metadata={"help": "Learning rate of teacher pre-training (default: learning_rate)."}
    )
    extract_plans: list[str] | None = field(
        default=None,
        metadata={
            "help": "After training, extract these students with `hf_matta.extract` into `output_dir/students/`: "
            "one plan per entry, a width (`256`), per-layer widths (`256,1024,1024,256`) or runs (`256x2,1024x2`)."
        },
    )

    def __post_init__(self):
        if self.model_name_or_path is None and self.config_overrides is None:
            raise ValueError(
                "Neither model_name_or_path (a pretrained GPT-2 to grow into the TA) nor config_overrides (a shape "
                "to train from scratch) is set: give one."
            )
        if self.model_name_or_path is not None and self.config_overrides is not None:
            raise ValueError(
                f"model_name_or_path={self.model_name_or_path!r} and config_overrides={self.config_overrides!r} "
                "are both set: the shape comes from the pretrained model, so drop config_overrides."
            )
        if not self.mat_widths:
            raise ValueError("mat_widths is not set: give the nested FFN widths, e.g. `--mat_widths 256 1024`.")
        if self.tokenizer_name_or_path is None:
            if self.model_name_or_path is None:
                raise ValueError("A from-scratch model needs tokenizer_name_or_path (a folder gets a trained BPE).")
            self.tokenizer_name_or_path = self.model_name_or_path
        if self.teacher_pretrain_steps < 1:
            raise ValueError(f"teacher_pretrain_steps={self.teacher_pretrain_steps} must be at least 1.")


def parse_args(argv: list[str] | None = None) -> tuple[ModelArguments, DataArguments, MatTATrainingArguments, Path]:
    """Fields from the config file (`--config`, default tiny_cpu.yaml), then command-line overrides on top."""
    pre_parser = argparse.ArgumentParser(add_help=False)
    pre_parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG)
    config_path = pre_parser.parse_known_args(argv)[0].config
    if not config_path.is_file():
        raise FileNotFoundError(f"--config {str(config_path)!r} does not exist; see recipes/configs/ for examples.")
    with open(config_path) as f:
        config = json.load(f) if config_path.suffix == ".json" else yaml.safe_load(f)
    parser = HfArgumentParser((ModelArguments, DataArguments, MatTATrainingArguments))
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help="YAML or JSON file with any field below.")
    known = {action.dest: action for action in parser._actions}
    unknown = sorted(set(config or {}) - set(known))
    if unknown:
        raise ValueError(f"{config_path}: unknown fields {unknown}; `--help` lists the valid ones.")
    for name in config or {}:
        known[name].required = False  # a required field given in the file is no longer required on the command line
    parser.set_defaults(**(config or {}))
    model_args, data_args, training_args, _ = parser.parse_args_into_dataclasses(argv)
    return model_args, data_args, training_args, config_path


def parse_config_string(overrides: str) -> dict:
    """`"n_layer=4,n_embd=128"` -> `{"n_layer": 4, "n_embd": 128}`, typed as GPT2Config's defaults (run_clm's form)."""
    config = GPT2Config()
    try:
        config.update_from_string(overrides)
    except ValueError as error:
        raise ValueError(f"config string {overrides!r} is not valid: {error}") from error
    return {pair.split("=")[0].strip(): getattr(config, pair.split("=")[0].strip()) for pair in overrides.split(",")}


def build_nested_model(model_args: ModelArguments, tokenizer: PreTrainedTokenizerBase) -> MatGPT2LMHeadModel:
    """The TA with the student nested inside it: grown from a pretrained GPT-2, or initialised from a config."""
    if model_args.model_name_or_path is not None:
        return MatGPT2LMHeadModel.from_gpt2(
            model_args.model_name_or_path, mat_widths=model_args.mat_widths, student_width=model_args.student_width
        )
    config = MatGPT2Config(
        **parse_config_string(model_args.config_overrides),
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        n_inner=model_args.mat_widths[-1],
        mat_widths=model_args.mat_widths,
        student_width=model_args.student_width,
    )
    return MatGPT2LMHeadModel(config)


def ensure_teacher(
    model_args: ModelArguments,
    training_args: MatTATrainingArguments,
    tokenizer: PreTrainedTokenizerBase,
    blocks: dict,
    block_size: int,
) -> dict:
    """Pre-train the teacher at `teacher_model_name_or_path` when it is a folder that does not exist yet and
    `teacher_pretrain_config` says how; MatTATrainer then loads it from there. Returns the pre-training metrics."""
    path = training_args.teacher_model_name_or_path
    if path is None or model_args.teacher_pretrain_config is None or (Path(path) / "config.json").is_file():
        return {}
    return pretrain_teacher(model_args, training_args, tokenizer, blocks, block_size, path)


def pretrain_teacher(
    model_args: ModelArguments,
    training_args: MatTATrainingArguments,
    tokenizer: PreTrainedTokenizerBase,
    blocks: dict,
    block_size: int,
    path: str,
) -> dict:
    """Train a plain GPT-2 on the training blocks with Transformers' own Trainer and save it (with the tokenizer)."""
    sharded_by_launcher = any(os.environ.get(f"ACCELERATE_USE_{name}") == "true" for name in ("DEEPSPEED", "FSDP"))
    if training_args.deepspeed or training_args.fsdp or sharded_by_launcher:
        raise ValueError(
            f"teacher {path!r} does not exist and would be pre-trained here, which runs without DeepSpeed/FSDP: "
            "pre-train it first with a plain or DDP launch of this recipe (it is cached), then relaunch."
        )
    config = GPT2Config(
        **parse_config_string(model_args.teacher_pretrain_config),
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    check_block_size(block_size, config.n_positions)
    plain_fields = {f.name for f in dataclasses.fields(TrainingArguments) if f.init}
    args = TrainingArguments(
        **{
            **{name: value for name, value in training_args.to_dict().items() if name in plain_fields},
            "output_dir": path,
            "max_steps": model_args.teacher_pretrain_steps,
            "learning_rate": model_args.teacher_pretrain_learning_rate or training_args.learning_rate,
            "eval_on_start": False,
            "eval_strategy": "no",
            "save_strategy": "no",
            "report_to": "none",
            "push_to_hub": False,
            "hub_token": None,
        }
    )
    trainer = Trainer(
        model=GPT2LMHeadModel(config),
        args=args,
        train_dataset=blocks["train"],
        eval_dataset=blocks.get("validation"),
        data_collator=default_data_collator,
        processing_class=tokenizer,
    )
    trainer.accelerator.print(f"Pre-training the teacher ({path}): {config.n_layer} layers x {config.n_embd}")
    metrics = trainer.train().metrics
    if "validation" in blocks:
        metrics.update(trainer.evaluate())
    trainer.save_model(path)
    trainer.accelerator.wait_for_everyone()  # every process then loads the saved teacher
    return metrics


def main(argv: list[str] | None = None) -> dict:
    """Run the recipe; returns the summary (also printed) for callers and tests."""
    model_args, data_args, training_args, config_path = parse_args(argv)
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched != training_args.world_size:
        raise RuntimeError(
            f"{launched} processes were launched (WORLD_SIZE={launched}) but they did not form a process group "
            f"(world_size={training_args.world_size}): each would train alone. On CPU pass --use_cpu true."
        )
    set_seed(training_args.seed)
    start = time.perf_counter()

    with training_args.main_process_first(desc="tokenizer and dataset preparation"):
        raw = load_corpus(data_args, seed=training_args.seed)
        if model_args.model_name_or_path is None:  # from scratch: a saved tokenizer, or a BPE trained on the corpus
            tokenizer = load_or_train_tokenizer(
                model_args.tokenizer_name_or_path, raw["train"], data_args.text_column, model_args.tokenizer_vocab_size
            )
        else:
            tokenizer = AutoTokenizer.from_pretrained(model_args.tokenizer_name_or_path)
        model = build_nested_model(model_args, tokenizer)
        check_block_size(data_args.block_size, model.config.n_positions)  # before tokenising anything
        plans = [check_plan(model.config, parse_plan(text)) for text in model_args.extract_plans or []]
        blocks = tokenize_and_pack(raw, tokenizer, data_args)

    if data_args.streaming and training_args.max_steps <= 0:
        if data_args.max_train_tokens is None:
            raise ValueError("A streamed dataset has no length: set max_steps or max_train_tokens.")
        tokens_per_step = (
            training_args.per_device_train_batch_size
            * training_args.gradient_accumulation_steps
            * training_args.world_size
            * data_args.block_size
        )
        training_args.max_steps = math.ceil(data_args.max_train_tokens / tokens_per_step)

    teacher_metrics = ensure_teacher(model_args, training_args, tokenizer, blocks, data_args.block_size)
    trainer = MatTATrainer(
        model=model,
        args=training_args,
        train_dataset=blocks["train"],
        eval_dataset=blocks.get("validation"),
        data_collator=default_data_collator,
        processing_class=tokenizer,
    )
    train_metrics = trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint).metrics
    final_metrics = trainer.evaluate() if "validation" in blocks else {}
    trainer.save_model(training_args.output_dir)
    if trainer.is_world_process_zero():
        after_training(Path(training_args.output_dir), tokenizer, plans)

    summary = _summary(
        trainer, model.config, data_args, config_path, train_metrics, final_metrics, teacher_metrics, start
    )
    if trainer.is_world_process_zero():
        Path(training_args.output_dir, "matta_summary.json").write_text(json.dumps(summary, indent=2))
        print(_format_summary(summary), flush=True)
    return summary


def after_training(output_dir: Path, tokenizer: PreTrainedTokenizerBase, plans: list[tuple[int, ...]]) -> None:
    """What runs on the saved model once training is done, on the main process, each step behind its own flag:
    extraction (`extract_plans`, with `hf_matta.extract`) now; evaluating and publishing the students belong here
    too, behind flags of their own, once `hf_matta.evaluation` and `hf_matta.hub` exist.

    Extraction saves one standalone student per plan under `output_dir/students/`, as `hf-matta extract` writes
    them. It reads the saved nested model back, whole, so it works the same after ZeRO-3 or FSDP sharded training.
    """
    if not plans:
        return
    from hf_matta.extract import extract_student, save_student

    model = MatGPT2LMHeadModel.from_pretrained(output_dir)
    for widths in plans:
        student = extract_student(model, list(widths))
        save_student(student, output_dir / "students" / plan_name(widths), tokenizer, overwrite=True)


def _summary(trainer, config, data_args, config_path, train_metrics, final_metrics, teacher_metrics, start) -> dict:
    """The figures a user reads at the end: perplexity per width at start and end, throughput, time, paths."""
    state, args = trainer.state, trainer.args
    evaluations = [log for log in state.log_history if any(key.startswith("eval_ppl") for key in log)]
    start_metrics = evaluations[0] if args.eval_on_start and evaluations else {}
    tokens = state.global_step * args.per_device_train_batch_size * args.gradient_accumulation_steps
    tokens *= args.world_size * data_args.block_size
    widths = {"student": config.student_width, "TA": config.mat_widths[-1]}
    return {
        "config": str(config_path),
        "widths": {
            name: {
                "ffn_width": width,
                "parameters": count_parameters(config, width),
                "start_ppl": start_metrics.get(f"eval_ppl_w{width}"),
                "end_ppl": final_metrics.get(f"eval_ppl_w{width}"),
                "end_loss": final_metrics.get(f"eval_loss_w{width}"),
            }
            for name, width in widths.items()
        },
        "distributed_type": str(trainer.accelerator.distributed_type.value),
        "processes": trainer.accelerator.num_processes,
        "teacher_ppl": math.exp(teacher_metrics["eval_loss"]) if "eval_loss" in teacher_metrics else None,
        "train_loss": train_metrics.get("train_loss"),
        "steps": state.global_step,
        "train_tokens": tokens,
        "tokens_per_second": tokens / train_metrics["train_runtime"],
        "train_seconds": train_metrics["train_runtime"],
        "total_seconds": time.perf_counter() - start,
        "checkpoint": str(Path(args.output_dir).resolve()),
    }


def _format_summary(summary: dict) -> str:
    def cell(value: float | None) -> str:
        return f"{value:10.2f}" if value is not None else f"{'-':>10}"

    lines = ["", "=== MatTA summary ===", f"{'validation':<40}{'ppl start':>10}{'ppl end':>10}{'loss end':>10}"]
    for name, row in summary["widths"].items():
        label = f"{name} (FFN {row['ffn_width']}, {row['parameters'] / 1e6:.2f}M params)"
        lines.append(f"  {label:<38}{cell(row['start_ppl'])}{cell(row['end_ppl'])}{cell(row['end_loss'])}")
    if summary["teacher_ppl"] is not None:
        lines.append(f"  {'teacher (after its pre-training)':<38}{'':>10}{cell(summary['teacher_ppl'])}")
    lines += [
        f"steps {summary['steps']} on {summary['processes']} process(es) ({summary['distributed_type']}), "
        f"{summary['train_tokens']:,} tokens in {summary['train_seconds']:.1f} s "
        f"({summary['tokens_per_second']:,.0f} tokens/s); whole run {summary['total_seconds']:.1f} s",
        f"final train loss {summary['train_loss']:.4f}",
        f"nested model and tokenizer saved to {summary['checkpoint']}",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
    # Some launched runs abort in interpreter teardown (SIGABRT) after finishing: flush and leave directly.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
