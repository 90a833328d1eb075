"""The pipeline's arguments: a dataclass per stage, and one vocabulary for config files, the recipe and `hf-matta run`.

Every option is a field of one of `ARGUMENT_CLASSES`: `ModelArguments` (the nested model and its tokenizer),
`hf_matta.data.DataArguments`, `TeacherArguments`, `MatTATrainingArguments` (the train stage), `ExtractArguments`,
`EvaluateArguments`, `PublishArguments` and `RunArguments` (what this invocation does). `HfArgumentParser` turns them
into the command line (`--max_steps 20`, or `--max-steps 20`); a config file holds the same names with the same
defaults. Config values go through the same argparse types and choices as the command line, so `max_steps: 3.5` is
refused with the file, the field and the value named, before anything runs; `None` (or YAML's `null`) unsets an
optional field from either side.
"""

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

from transformers import HfArgumentParser, TrainingArguments

from ..data import DataArguments
from ..training_args import MatTATrainingArguments
from ..widths import STRATEGIES
from .options import config_to_argv, field_actions, or_none, read_config_file, save_options


STAGES = ("teacher", "train", "extract", "evaluate", "publish", "report")


@dataclass
class ModelArguments:
    """The nested model (TA and student) and its tokenizer; optionally a baseline trained without the TA."""

    _argument_group_name = "model"

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
    baseline: bool = field(
        default=False,
        metadata={
            "help": "Also train a baseline: the student's shape alone (no TA; distilled from the teacher when there "
            "is one), with the same data, steps and optimizer, into output_dir/baseline; the report compares it."
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
        if self.tokenizer_vocab_size < 258:  # 256 bytes, the end-of-text token, and at least one merge
            raise ValueError(f"tokenizer_vocab_size={self.tokenizer_vocab_size} must be at least 258.")


@dataclass
class TeacherArguments:
    """The teacher stage: when `teacher_model_name_or_path` is a folder that does not exist yet, pre-train it."""

    _argument_group_name = "teacher"

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
    teacher_cache_top_k: int = field(
        default=64,
        metadata={
            "help": "With teacher_cache_dir: the teacher's most likely tokens kept per position when the train stage "
            "builds the cache (hf_matta.teacher_cache) before training."
        },
    )

    def __post_init__(self):
        if self.teacher_pretrain_steps < 1:
            raise ValueError(f"teacher_pretrain_steps={self.teacher_pretrain_steps} must be at least 1.")
        if self.teacher_cache_top_k < 1:
            raise ValueError(f"teacher_cache_top_k={self.teacher_cache_top_k} must be at least 1.")
        rate = self.teacher_pretrain_learning_rate
        if rate is not None and not (math.isfinite(rate) and rate > 0):
            raise ValueError(f"teacher_pretrain_learning_rate={rate} must be a finite number above 0.")


@dataclass
class ExtractArguments:
    """The extract stage: which students to write as standalone models under `output_dir/students/`."""

    _argument_group_name = "extract"

    extract_plans: list[str] | None = field(
        default=None,
        metadata={
            "help": "Students to extract, one plan per entry: a width (`256`), per-layer widths (`256,1024,1024,256`) "
            "or runs (`256x2,1024x2`). With neither this nor extract_budgets: every granularity, student to TA."
        },
    )
    extract_budgets: list[str] | None = field(
        default=None,
        metadata={
            "help": "Students by parameter budget (`1.3M 1.7M`): for each, the largest plan of extract_strategy "
            "that fits. Added to extract_plans."
        },
    )
    extract_strategy: str = field(
        default="uniform",
        metadata={
            "help": "How budgets become plans: uniform (one granularity in every layer), block (a centred block of "
            "wider layers) or search (greedy, measured on the validation split).",
            "choices": list(STRATEGIES),
        },
    )

    def __post_init__(self):
        if self.extract_strategy not in STRATEGIES:
            raise ValueError(f"extract_strategy={self.extract_strategy!r} is not one of {list(STRATEGIES)}.")


@dataclass
class EvaluateArguments:
    """The evaluate stage: validation perplexity of every model always; lm-eval tasks (`hf_matta.evaluation`)."""

    _argument_group_name = "evaluate"

    eval_tasks: list[str] = field(
        default_factory=lambda: ["agieval_sat_math", "lambada_openai"],
        metadata={
            "help": "lm-eval tasks run on every student, the TA, the teacher and the baseline. Offline, the two "
            "defaults need eval_data_dir (they are skipped, and said so, without it); lambada_heldout (the last "
            "words of the held-out split) needs no data and always runs."
        },
    )
    eval_data_dir: str | None = field(
        default=None,
        metadata={
            "help": "Folder with lambada_test.jsonl and sat-math.lm-eval.jsonl or sat-math.jsonl: the default "
            "tasks read these instead of the Hub."
        },
    )
    eval_limit: float | None = field(
        default=None, metadata={"help": "Documents per lm-eval task (a fraction when below 1); for quick looks."}
    )

    def __post_init__(self):
        if self.eval_limit is not None and not (math.isfinite(self.eval_limit) and self.eval_limit > 0):
            raise ValueError(f"eval_limit={self.eval_limit} must be a positive number of documents or a fraction.")


@dataclass
class PublishArguments:
    """The publish stage (`hf_matta.hub.publish_students`): dry-run repo folders by default, real repos with push."""

    _argument_group_name = "publish"

    publish_namespace: str | None = field(
        default=None,
        metadata={
            "help": "Hub user or organization that owns the students' repos (`namespace/<name>`); needed with push. "
            "A dry run without it names the repos `your-namespace/<name>`."
        },
    )
    publish_name_template: str | None = field(
        default=None,
        metadata={"help": "Repo names from {base}, {params} and {plan} (default: hf_matta.hub's template)."},
    )
    publish_private: bool = field(default=False, metadata={"help": "Create the repos private."})
    publish_collection: str | None = field(
        default=None, metadata={"help": "Gather the family in a collection of this title in the namespace."}
    )
    push: bool = field(
        default=False,
        metadata={
            "help": "Upload to the Hub (token from HF_TOKEN or `hf auth login`, checked before any work). Without "
            "it, the exact repo folders are written to output_dir/hub/ and nothing is uploaded."
        },
    )


@dataclass
class RunArguments:
    """What this invocation does with the config."""

    _argument_group_name = "run"

    config: str | None = field(
        default=None, metadata={"help": "YAML or JSON file holding any of the fields; the command line overrides it."}
    )
    check: bool = field(
        default=False,
        metadata={"help": "Validate the whole config (shapes, plans, data, teacher, names, token) and stop."},
    )
    stage: str | None = field(
        default=None,
        metadata={
            "help": "Run only this stage, from the outputs of the stages before it (which must be complete); the "
            "later stages then run again on the next run.",
            "choices": list(STAGES),
        },
    )
    stop_after: str | None = field(
        default=None,
        metadata={
            "help": "Stop after this stage (e.g. `train`: train and save, as a training script does); the later "
            "stages run on the next run.",
            "choices": list(STAGES),
        },
    )

    def __post_init__(self):
        if self.stage is not None and self.stop_after is not None:
            raise ValueError(f"stage={self.stage!r} runs one stage: stop_after={self.stop_after!r} cannot apply.")


ARGUMENT_CLASSES = (
    ModelArguments,
    DataArguments,
    TeacherArguments,
    MatTATrainingArguments,
    ExtractArguments,
    EvaluateArguments,
    PublishArguments,
    RunArguments,
)


@dataclass
class PipelineArguments:
    """One run's arguments, one dataclass per stage."""

    model: ModelArguments
    data: DataArguments
    teacher: TeacherArguments
    training: MatTATrainingArguments
    extract: ExtractArguments
    evaluate: EvaluateArguments
    publish: PublishArguments
    run: RunArguments


def build_parser(prog: str | None = None, config_positional: bool = False) -> HfArgumentParser:
    """The parser of every field of `ARGUMENT_CLASSES`; optional single-value fields also take `None` to unset.
    `config_positional` adds the config file as a positional argument (`hf-matta run CONFIG`)."""
    parser = HfArgumentParser(ARGUMENT_CLASSES, prog=prog, allow_abbrev=False)
    optional = _optional_fields()
    for action in field_actions(parser).values():
        if action.dest in optional and action.type is not None and action.nargs != "+":
            action.type = or_none(action.type)
    if config_positional:
        parser.add_argument("config_file", nargs="?", metavar="CONFIG", help="The run's config (same as --config).")
    return parser


def _optional_fields() -> set[str]:
    """Names of the fields typed `X | None`."""
    return {
        name
        for cls in ARGUMENT_CLASSES
        for name, hint in typing.get_type_hints(cls).items()
        if isinstance(hint, types.UnionType) and type(None) in hint.__args__
    }


def parse_args(
    argv: list[str] | None = None,
    default_config: str | Path | None = None,
    prog: str | None = None,
    config_positional: bool = False,
) -> PipelineArguments:
    """The run's arguments: the config file's fields (`--config`, the positional CONFIG with `config_positional`, or
    `default_config`), then the command line's on top.

    Raises `ValueError` / `FileNotFoundError` for a bad config file; argparse exits with status 2 for a bad command
    line (and prints the help for `--help`); the dataclasses raise `ValueError` for values out of range.
    """
    argv = list(argv or [])
    parser = build_parser(prog, config_positional)
    save_options(parser, _optional_fields(), prog, config_positional)  # for the next run's quick checks (options.py)
    known = parser.parse_known_args(argv)[0]  # the full parser, so that option values are not taken for CONFIG
    positional = getattr(known, "config_file", None)
    if positional is not None and known.config is not None and positional != known.config:
        parser.error(f"two configs given: {positional} and --config {known.config}; give one.")
    config_path = positional or known.config or default_config
    if config_path is None and config_positional:
        parser.error("give the run's config: hf-matta run CONFIG (e.g. recipes/configs/tiny_cpu.yaml).")
    tokens = []
    if config_path is not None:
        tokens = config_to_argv(read_config_file(config_path), parser, str(config_path), _optional_fields())
        tokens += ["--config", str(config_path)]
    for action in parser._actions:  # a field the file sets is no longer required on the command line
        if action.required and any(option in tokens for option in action.option_strings):
            action.required = False
    parsed = parser.parse_args_into_dataclasses(args=tokens + argv)
    return PipelineArguments(*parsed[: len(ARGUMENT_CLASSES)])  # (a positional CONFIG comes back as a namespace)


def training_fingerprint_fields() -> tuple[str, ...]:
    """The training arguments that change what the train stage produces: every MatTA field, and Trainer's fields of
    the optimisation (not logging, saving, evaluation cadence or output places)."""
    plain = {f.name for f in dataclasses.fields(TrainingArguments)}
    matta = [f.name for f in dataclasses.fields(MatTATrainingArguments) if f.name not in plain]
    return (*(name for name in _OPTIMISATION_FIELDS if name in plain), *matta)


_OPTIMISATION_FIELDS = (
    "learning_rate", "max_steps", "num_train_epochs", "per_device_train_batch_size", "gradient_accumulation_steps",
    "seed", "data_seed", "warmup_steps", "lr_scheduler_type", "lr_scheduler_kwargs", "weight_decay", "adam_beta1",
    "adam_beta2", "adam_epsilon", "max_grad_norm", "optim", "optim_args", "bf16", "fp16",
)  # fmt: skip


__all__ = [
    "ARGUMENT_CLASSES",
    "STAGES",
    "EvaluateArguments",
    "ExtractArguments",
    "ModelArguments",
    "PipelineArguments",
    "PublishArguments",
    "RunArguments",
    "TeacherArguments",
    "build_parser",
    "config_to_argv",
    "parse_args",
    "read_config_file",
]
