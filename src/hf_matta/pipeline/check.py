"""`--check`: everything about a run that can be known without training, found in seconds.

`check_run` reads configs, tokenizers and file heads only (no weights, no tokenisation, no training) and raises one
`ValueError` that lists every problem it found, each naming the bad value and what to do. The pipeline runs it before
any stage, so a mistake costs seconds, not GPU hours.
"""

import os
from collections.abc import Callable
from pathlib import Path

from huggingface_hub.utils import HFValidationError, validate_repo_id
from transformers import AutoConfig, PretrainedConfig

from ..data import check_block_size, check_text_file, load_tokenizer
from ..files import is_empty_folder
from ..hub import PublishError
from ..trainer import check_output_dir, check_ta_neuron_lr_scale, check_teacher_location
from ..models import MatGPT2Config
from .arguments import PipelineArguments
from .stages import DRY_RUN_NAMESPACE, config_from_string, resolve_plans


_TEXT_HEAD_BYTES = 1 << 16  # how much of a local text file is read to check that it is text


def check_run(args: PipelineArguments) -> MatGPT2Config:
    """Check a run before any work; return the nested model's config (on no weights).

    Raises:
        ValueError: listing every problem found: the launch, the model's shape, the plans and budgets, the data
            files, the teacher (its vocabulary and context when it is local), the output folder against the teacher's
            and the tokenizer's.
    """
    problems: list[str] = []

    def attempt(check: Callable[[], object]) -> object:
        try:
            return check()
        except (ValueError, FileNotFoundError, FileExistsError, OSError, PublishError) as error:
            problems.append(str(error))
            return None

    attempt(lambda: _check_launch(args))
    vocab = attempt(lambda: _vocabulary(args))
    config = attempt(lambda: _nested_config(args, vocab)) if vocab is not None else None
    if config is not None:
        attempt(lambda: check_block_size(args.data.block_size, config.n_positions))
        attempt(lambda: check_ta_neuron_lr_scale(args.training, config))
        plans = attempt(lambda: resolve_plans(args.extract, config))
        attempt(lambda: _check_search(args))
        if plans is not None:
            attempt(lambda: _check_publish(args, config, plans))
    for name in ("train_file", "validation_file"):
        if getattr(args.data, name) is not None:
            path = getattr(args.data, name)
            attempt(lambda name=name, path=path: check_text_file(path, name, args.data.text_column, _TEXT_HEAD_BYTES))
    attempt(lambda: _check_teacher(args, vocab))
    attempt(lambda: _check_folders(args))
    if problems:
        source = f" in {args.run.config}" if args.run.config else ""
        raise ValueError(f"{len(problems)} problem(s){source}:\n" + "\n".join(f"- {problem}" for problem in problems))
    return config


def _check_launch(args: PipelineArguments) -> None:
    """Launched processes must form one process group, or each would train alone."""
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched != args.training.world_size:
        raise ValueError(
            f"{launched} processes were launched (WORLD_SIZE={launched}) but they did not form a process group "
            f"(world_size={args.training.world_size}): each would train alone. On CPU pass --use_cpu true."
        )


def _vocabulary(args: PipelineArguments) -> int:
    """The run's vocabulary size: its saved tokenizer's, or the size of the BPE it will train."""
    tokenizer = load_tokenizer(args.model.tokenizer_name_or_path)
    if tokenizer is not None:
        return len(tokenizer)
    if args.model.model_name_or_path is not None:
        raise ValueError(
            f"tokenizer_name_or_path={args.model.tokenizer_name_or_path!r} holds no tokenizer (nor is it a Hub repo "
            "reachable from here): give the pretrained model's tokenizer."
        )
    return args.model.tokenizer_vocab_size


def _nested_config(args: PipelineArguments, vocab: int) -> MatGPT2Config:
    """The nested model's config, validated as the train stage builds it (no weights)."""
    model_args = args.model
    if model_args.model_name_or_path is not None:
        source = AutoConfig.from_pretrained(model_args.model_name_or_path).to_dict()
        for key in ("model_type", "architectures", "transformers_version", "auto_map", "n_inner"):
            source.pop(key, None)
        return MatGPT2Config(
            **source,
            n_inner=model_args.mat_widths[-1],
            mat_widths=model_args.mat_widths,
            student_width=model_args.student_width,
        )
    return config_from_string(
        model_args.config_overrides,
        None,
        MatGPT2Config,
        vocab_size=vocab,
        bos_token_id=None,  # the tokenizer's, once it exists
        eos_token_id=None,
        n_inner=model_args.mat_widths[-1],
        mat_widths=model_args.mat_widths,
        student_width=model_args.student_width,
    )


def _check_search(args: PipelineArguments) -> None:
    """`search` measures plans on the validation split: there must be one."""
    data = args.data
    if args.extract.extract_budgets and args.extract.extract_strategy == "search":
        if data.validation_split_percentage == 0 and data.validation_file is None and data.dataset_name is None:
            raise ValueError(
                "extract_strategy='search' measures plans on the validation split, and there is none "
                "(validation_split_percentage=0, no validation_file): hold some text out."
            )


def _check_publish(args: PipelineArguments, config: MatGPT2Config, plans: list[tuple[int, ...]]) -> None:
    """The repo ids the students will get (namespace and name template), and with `push` the token: present, valid
    and allowed to write to the namespace (asked of the Hub, the one check that needs the network)."""
    from ..hub import DEFAULT_NAME_TEMPLATE, check_hub_access, repo_names

    publish = args.publish
    if publish.push and publish.publish_namespace is None:
        raise ValueError("push needs publish_namespace: the Hub user or organization that will own the repos.")
    template = publish.publish_name_template or DEFAULT_NAME_TEMPLATE
    namespace = publish.publish_namespace or DRY_RUN_NAMESPACE
    for name in repo_names(config, {"base_model": args.model.model_name_or_path}, plans, template):
        try:
            validate_repo_id(f"{namespace}/{name}")
        except HFValidationError as error:
            raise ValueError(
                f"repo id {namespace}/{name} is not valid ({error}): change publish_namespace or "
                "publish_name_template."
            ) from None
    if publish.push:
        check_hub_access(namespace)


def _check_teacher(args: PipelineArguments, vocab: int | None) -> None:
    """The teacher's vocabulary and context against the run's, when the teacher is a local folder (with its weights) or
    is to be pre-trained; a Hub id is checked for its form only (no network)."""
    path = args.training.teacher_model_name_or_path
    if path is None:
        return
    folder = Path(path)
    if args.teacher.teacher_pretrain_config is not None and is_empty_folder(folder):  # to be pre-trained there
        config = config_from_string(args.teacher.teacher_pretrain_config)
        try:
            check_block_size(args.data.block_size, config.n_positions)
        except ValueError as error:
            raise ValueError(f"the teacher to pre-train (teacher_pretrain_config): {error}") from None
        return
    try:
        check_teacher_location(path)  # a missing folder, a mistyped path, a folder whose save did not complete
    except FileNotFoundError as error:
        if folder.exists():
            raise
        raise FileNotFoundError(f"{error} To pre-train a teacher there, set teacher_pretrain_config.") from None
    if (folder / "config.json").is_file():
        config: PretrainedConfig = AutoConfig.from_pretrained(folder)
        if vocab is not None and config.vocab_size != vocab:
            raise ValueError(
                f"the teacher {path!r} has vocab_size={config.vocab_size} but the run's tokenizer has {vocab} tokens: "
                "distillation compares their distributions token by token; use the teacher's tokenizer "
                f"(tokenizer_name_or_path={path!r}) or another teacher."
            )
        try:
            check_block_size(args.data.block_size, getattr(config, "n_positions", args.data.block_size))
        except ValueError as error:
            raise ValueError(f"the teacher {path!r}: {error}") from None
        _check_same_tokenizer(args, folder)


def _check_same_tokenizer(args: PipelineArguments, teacher: Path) -> None:
    """A local teacher and the run must share one tokenizer; a tokenizer still to be trained would not be its."""
    teacher_tokenizer = load_tokenizer(teacher)
    run_tokenizer = load_tokenizer(args.model.tokenizer_name_or_path)
    if teacher_tokenizer is None:
        return
    if run_tokenizer is None:
        raise ValueError(
            f"the teacher {str(teacher)!r} exists but the tokenizer {args.model.tokenizer_name_or_path!r} does not: "
            "one trained now would not be the teacher's. Set tokenizer_name_or_path to the teacher's folder, or "
            "delete the teacher so that both are made again."
        )
    if teacher_tokenizer.get_vocab() != run_tokenizer.get_vocab():
        raise ValueError(
            f"the teacher {str(teacher)!r} and tokenizer_name_or_path={args.model.tokenizer_name_or_path!r} have "
            "different vocabularies; give the run the teacher's tokenizer."
        )


def _check_folders(args: PipelineArguments) -> None:
    """The output folder must not be, or be inside, a folder the run reads: the teacher's or the tokenizer's."""
    reads = {"teacher_model_name_or_path": args.training.teacher_model_name_or_path}
    if args.model.model_name_or_path is None:
        reads["tokenizer_name_or_path"] = args.model.tokenizer_name_or_path
    check_output_dir(args.training.output_dir, reads)


__all__ = ["check_run"]
