"""The stages of a MatTA run, in order: teacher -> train -> extract -> evaluate -> publish -> report.

Each stage is a function of the run (`Run`: the arguments, the output folder, the data prepared once) that does its
work and returns its outputs as a JSON-able dict; `hf_matta.pipeline.run` records them as the stage's completion
marker and hands them to the stages after it. Folder layout of a run, all under `output_dir`:

    config.json, model.safetensors, tokenizer.json, ...   the nested model (TA and student), as the Trainer saves it
    matta_summary.json                                    the train stage's figures (perplexity per width, time)
    baseline/                                             the student's shape trained alone (`baseline: true`)
    students/ffn<plan>/                                   one standalone model per plan (extract)
    eval/validation.json, eval/results.json, ...          validation perplexity; lm-eval results (evaluate)
    hub/<repo>/                                           the repo folders of a dry run (publish)
    report.md, elastic_curve.png                          the report
    stages/<stage>.json                                   what each stage did (the completion markers)
"""

import dataclasses
import math
import os
import time
import types
from collections.abc import Callable
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import constants as hub_constants
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GPT2Config,
    GPT2LMHeadModel,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    Trainer,
    TrainingArguments,
    default_data_collator,
    set_seed,
)
from transformers.trainer_utils import get_last_checkpoint

from ..data import (
    DataArguments,
    check_block_size,
    load_corpus,
    load_or_train_tokenizer,
    load_tokenizer,
    tokenize_and_pack,
)
from ..extract import (
    extract_student,
    load_nested_model,
    finish_saved_folder,
    mix_n_match,
    save_student,
    set_serving_defaults,
    smallest_plan,
    validation_loss,
)
from ..files import atomic_folder, is_empty_folder, write_json_atomic
from ..hub import read_lineage, write_lineage
from ..models import MatGPT2Config, MatGPT2LMHeadModel
from ..teacher_cache import TeacherCache, build_teacher_cache
from ..trainer import MatTATrainer, load_teacher
from ..widths import check_budgets, check_plan, count_parameters, format_plan, parse_budget, parse_plan, plan_name
from .arguments import ExtractArguments, ModelArguments, PipelineArguments
from .report import shareable_path, teaching_lines


SUMMARY_FILE = "matta_summary.json"
BASELINE_DIR = "baseline"
STUDENTS_DIR = "students"
EVAL_DIR = "eval"
HUB_DIR = "hub"
DRY_RUN_NAMESPACE = "your-namespace"  # the repo ids a dry run without publish_namespace writes into its cards


class Run:
    """One run: its arguments, its output folder, a log, the stages' outputs so far, and the tokenizer and data,
    prepared once (on first use) and shared by the stages that need them."""

    def __init__(self, args: PipelineArguments, log: Callable[[str], None] = print):
        self.args = args
        self.log = log
        self.output_dir = Path(args.training.output_dir)
        self.outputs: dict[str, dict] = {}  # stage name -> what it returned (this run, or recorded by an earlier one)

    @property
    def is_main_process(self) -> bool:
        return self.args.training.process_index == 0

    @cached_property
    def prepared(self) -> tuple[PreTrainedTokenizerBase, dict]:
        """The tokenizer (loaded, or a BPE trained on the corpus and cached) and the tokenised, packed blocks."""
        model_args, data_args, training_args = self.args.model, self.args.data, self.args.training
        with training_args.main_process_first(desc="tokenizer and dataset preparation"):
            raw = load_corpus(data_args, seed=training_args.seed)
            if model_args.model_name_or_path is None:  # from scratch: a saved tokenizer, or a BPE trained on the text
                tokenizer = load_or_train_tokenizer(
                    model_args.tokenizer_name_or_path,
                    raw["train"],
                    data_args.text_column,
                    model_args.tokenizer_vocab_size,
                )
            else:
                tokenizer = AutoTokenizer.from_pretrained(model_args.tokenizer_name_or_path)
            blocks = tokenize_and_pack(raw, tokenizer, data_args)
        return tokenizer, blocks

    @cached_property
    def heldout_ids(self) -> torch.LongTensor:
        """The validation blocks (N, T) that every model's perplexity is measured on."""
        blocks = self.prepared[1]
        if "validation" not in blocks:
            raise ValueError(
                "there is no validation split to measure perplexity on (validation_split_percentage=0 and no "
                "validation file or split): set validation_split_percentage above 0 or give a validation_file."
            )
        return torch.tensor([row["input_ids"] for row in blocks["validation"]], dtype=torch.long)


# --- building models from config strings -------------------------------------------------------------------------


def config_from_string(
    shape: str, tokenizer: PreTrainedTokenizerBase | None = None, config_class: type[GPT2Config] = GPT2Config, **extra
) -> GPT2Config:
    """A GPT-2-style config from `"n_layer=4,n_embd=128"` on top of GPT2Config's defaults (run_clm's
    `config_overrides`), sized for `tokenizer` (vocabulary, bos and eos) when one is given."""
    config = GPT2Config()
    try:
        config.update_from_string(shape)
    except ValueError as error:
        raise ValueError(f"config string {shape!r} is not valid: {error}") from None
    fields = {pair.split("=")[0].strip(): getattr(config, pair.split("=")[0].strip()) for pair in shape.split(",")}
    if tokenizer is not None:
        fields.update(
            vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id
        )
    return config_class(**fields, **extra)


def build_nested_model(
    model_args: ModelArguments, tokenizer: PreTrainedTokenizerBase, mat_widths: list[int] | None = None
) -> MatGPT2LMHeadModel:
    """The TA with the student nested inside it: grown from a pretrained GPT-2, or initialised from
    `config_overrides`. `mat_widths` replaces the arguments' granularities (`[student_width]`: the baseline)."""
    widths = mat_widths or model_args.mat_widths
    if model_args.model_name_or_path is not None:
        return MatGPT2LMHeadModel.from_gpt2(
            model_args.model_name_or_path, mat_widths=widths, student_width=model_args.student_width
        )
    config = config_from_string(
        model_args.config_overrides,
        tokenizer,
        MatGPT2Config,
        n_inner=widths[-1],
        mat_widths=widths,
        student_width=model_args.student_width,
    )
    return MatGPT2LMHeadModel(config)


# --- teacher -------------------------------------------------------------------------------------------------------


def pretrain_teacher(
    config: GPT2Config,
    args: TrainingArguments,
    tokenizer: PreTrainedTokenizerBase,
    train_dataset: Any,
    output_dir: str | os.PathLike,
    eval_dataset: Any = None,
    max_steps: int | None = None,
    learning_rate: float | None = None,
) -> dict:
    """Pre-train a plain `GPT2LMHeadModel` of `config` with Transformers' own Trainer; save it with `tokenizer`.

    Args:
        config: the teacher's shape (`config_from_string(shape, tokenizer)` builds one from a config string).
        args: training arguments whose plain `TrainingArguments` fields (batch size, schedule, seed, precision,
            device) are used; a `MatTATrainingArguments` works. Output, evaluation, saving, logging integrations and
            the Hub are set here: nothing is pushed, no checkpoint is kept.
        train_dataset, eval_dataset: blocks with `input_ids` and `labels` (`hf_matta.data.tokenize_and_pack`'s).
        output_dir: the teacher's folder; written atomically (complete, or not at all), so that a run interrupted
            while saving never leaves a folder the next run would take for a finished teacher.
        max_steps, learning_rate: replace `args`' values.

    Returns:
        Trainer's training metrics, and `eval_loss` when `eval_dataset` is given.
    """
    if not is_empty_folder(output_dir):
        raise FileExistsError(f"teacher folder {str(output_dir)!r} is not empty; it is left as it is.")
    sharded_by_launcher = any(os.environ.get(f"ACCELERATE_USE_{name}") == "true" for name in ("DEEPSPEED", "FSDP"))
    if args.deepspeed or args.fsdp or sharded_by_launcher:
        raise ValueError(
            f"teacher {str(output_dir)!r} does not exist and would be pre-trained here, which runs without "
            "DeepSpeed/FSDP: pre-train it first with a plain or DDP launch (it is cached), then relaunch."
        )
    plain_fields = {f.name for f in dataclasses.fields(TrainingArguments) if f.init}
    overrides = {
        "output_dir": str(output_dir),
        "eval_on_start": False,
        "eval_strategy": "no",
        "save_strategy": "no",
        "report_to": "none",
        "push_to_hub": False,
        "hub_token": None,
    }
    if max_steps is not None:
        overrides["max_steps"] = max_steps
    if learning_rate is not None:
        overrides["learning_rate"] = learning_rate
    plain = {name: value for name, value in args.to_dict().items() if name in plain_fields}
    set_seed(args.seed)  # the teacher's initialisation, whatever drew random numbers before
    trainer = Trainer(
        model=GPT2LMHeadModel(config),
        args=TrainingArguments(**{**plain, **overrides}),
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        data_collator=default_data_collator,
        processing_class=tokenizer,
    )
    trainer.accelerator.print(f"Pre-training the teacher ({output_dir}): {config.n_layer} layers x {config.n_embd}")
    metrics = trainer.train().metrics
    if eval_dataset is not None:
        metrics.update(trainer.evaluate())
    if trainer.is_world_process_zero():  # without DeepSpeed/FSDP only this process writes the model
        with atomic_folder(output_dir) as folder:
            set_serving_defaults(trainer.model)
            trainer.save_model(folder)
            finish_saved_folder(folder, tokenizer, config.n_positions)
    trainer.accelerator.wait_for_everyone()  # every process then loads the saved teacher
    return metrics


def teacher_stage(run: Run) -> dict:
    """The teacher: none, one used as it is (a Hub id or a folder), or, when `teacher_pretrain_config` is set and
    the folder does not exist, a GPT-2 pre-trained on the training blocks and saved there (reused by later runs)."""
    path = run.args.training.teacher_model_name_or_path
    teacher_args = run.args.teacher
    if path is None:
        return {"teacher": None, "pretrained": False}
    if teacher_args.teacher_pretrain_config is None or (Path(path) / "config.json").is_file():
        if teacher_args.teacher_pretrain_config is not None:
            run.log(f"teacher {path} exists: used as it is (delete the folder to pre-train it again)")
        return {"teacher": path, "pretrained": False}
    tokenizer, blocks = run.prepared
    config = config_from_string(teacher_args.teacher_pretrain_config, tokenizer)
    check_block_size(run.args.data.block_size, config.n_positions)
    metrics = pretrain_teacher(
        config,
        run.args.training,
        tokenizer,
        blocks["train"],
        path,
        eval_dataset=blocks.get("validation"),
        max_steps=teacher_args.teacher_pretrain_steps,
        learning_rate=teacher_args.teacher_pretrain_learning_rate,
    )
    return {"teacher": path, "pretrained": True, "metrics": metrics}


# --- train ---------------------------------------------------------------------------------------------------------


def train_stage(run: Run) -> dict:
    """MatTA training of the nested model (resumed from the last checkpoint in `output_dir` when there is one),
    saved with its tokenizer; then the baseline, when asked. Returns the summary (also `matta_summary.json`)."""
    args = run.args
    training_args = args.training
    set_seed(training_args.seed)
    start = time.perf_counter()
    tokenizer, blocks = run.prepared
    _derive_max_steps(args)
    _ensure_teacher_cache(run, blocks["train"])
    model = build_nested_model(args.model, tokenizer)
    summary = _train(run, model, training_args, tokenizer, blocks, start)
    if run.is_main_process:
        # Where the nested model comes from, for the students' model cards (hf_matta.hub): no local paths in it.
        provenance = types.SimpleNamespace(**vars(args.model), **vars(args.teacher))
        write_lineage(run.output_dir, provenance, args.data, training_args, model.config, summary["steps"])
        write_json_atomic(run.output_dir / SUMMARY_FILE, summary)
        run.log(format_summary(summary))
    outputs = {"summary": summary, "baseline": None}
    if args.model.baseline:
        set_seed(training_args.seed)
        # one width, so no TA-only neurons to step differently
        baseline_args = dataclasses.replace(
            training_args, output_dir=str(run.output_dir / BASELINE_DIR), ta_neuron_lr_scale=1.0
        )
        width = args.model.student_width or args.model.mat_widths[0]
        model = build_nested_model(args.model, tokenizer, mat_widths=[width])
        baseline = _train(run, model, baseline_args, tokenizer, blocks, time.perf_counter())
        if run.is_main_process:
            # A model of one width is a plain GPT-2: saved as one (replacing the trainer's folder and checkpoints),
            # so that it loads and is evaluated as any student.
            plain = extract_student(MatGPT2LMHeadModel.from_pretrained(baseline_args.output_dir), width)
            save_student(plain, baseline_args.output_dir, tokenizer, overwrite=True)
            write_json_atomic(run.output_dir / BASELINE_DIR / SUMMARY_FILE, baseline)
            run.log(format_summary(baseline, title="baseline (no TA)"))
        outputs["baseline"] = {"folder": BASELINE_DIR, "summary": baseline}
    return outputs


def _ensure_teacher_cache(run: Run, dataset) -> None:
    """With `teacher_cache_dir`: the teacher's top-k cache of the training blocks, built there on the main process
    unless finished (an interrupted build resumes); training (and the baseline's) then reads it. A finished cache
    of another teacher or another top-k is refused (a build refuses an unfinished one: its settings differ)."""
    training_args = run.args.training
    folder = training_args.teacher_cache_dir
    if folder is None or training_args.teacher_weight == 0:
        return
    teacher = training_args.teacher_model_name_or_path
    k = run.args.teacher.teacher_cache_top_k
    with training_args.main_process_first(desc="teacher cache"):
        try:
            cache = TeacherCache(folder)
        except (FileNotFoundError, ValueError):
            cache = None
        if cache is not None:  # finished; the trainer checks it against the training blocks
            _check_cache_teacher(cache, teacher, k)
            return
        if teacher is None:
            raise ValueError(
                f"teacher_cache_dir={folder!r} holds no finished teacher cache and teacher_model_name_or_path is not "
                "set: name the teacher that builds it."
            )
        run.log(f"building the teacher cache {folder}: the top-{k} tokens of {teacher} on {len(dataset)} blocks")
        build_teacher_cache(
            load_teacher(teacher).to(training_args.device), dataset, folder, top_k=k,
            temperature=training_args.teacher_temperature, batch_size=training_args.per_device_eval_batch_size,
            teacher_name=teacher,
        )  # fmt: skip


def _check_cache_teacher(cache: TeacherCache, teacher: str | None, top_k: int) -> None:
    """Refuse a finished cache built by another teacher (when the run names one) or with another top-k. The cache
    records the teacher as the config named it (no absolute path: a moved project keeps its cache); two names of one
    local folder are the same teacher."""
    recorded = cache.teacher_name
    same_teacher = teacher is None or recorded == teacher or _same_folder(recorded, teacher)
    if not same_teacher or cache.top_k != top_k:
        raise ValueError(
            f"teacher_cache_dir={str(cache.folder)!r} holds the top-{cache.top_k} targets of the teacher "
            f"{cache.teacher_name!r}, but this run asks for the top-{top_k} of teacher_model_name_or_path="
            f"{teacher!r} (teacher_cache_top_k={top_k}): delete {cache.folder} to rebuild it, or choose another "
            "teacher_cache_dir."
        )


def _same_folder(path: str | None, other: str) -> bool:
    """Whether two paths name one existing file or folder."""
    return path is not None and Path(path).exists() and Path(other).exists() and Path(path).samefile(other)


def _derive_max_steps(args: PipelineArguments) -> None:
    """A stream has no length: derive `max_steps` from `max_train_tokens` when it is not set."""
    data_args, training_args = args.data, args.training
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


def _train(run: Run, model, training_args, tokenizer, blocks: dict, start: float) -> dict:
    """One MatTATrainer run into `training_args.output_dir`; the model and tokenizer saved there; its summary."""
    check_block_size(run.args.data.block_size, model.config.n_positions)
    trainer = MatTATrainer(
        model=model,
        args=training_args,
        train_dataset=blocks["train"],
        eval_dataset=blocks.get("validation"),
        data_collator=default_data_collator,
        processing_class=tokenizer,
    )
    resume = training_args.resume_from_checkpoint
    if resume is None and Path(training_args.output_dir).is_dir():
        resume = get_last_checkpoint(training_args.output_dir)  # left by a run that was stopped (SIGTERM saves one)
        if resume is not None:
            run.log(f"resuming training from {resume}")
    train_metrics = trainer.train(resume_from_checkpoint=resume).metrics
    final_metrics = trainer.evaluate() if "validation" in blocks else {}
    set_serving_defaults(model)  # Trainer turned the KV cache off in the config it saves
    trainer.save_model(training_args.output_dir)
    if run.is_main_process:
        finish_saved_folder(training_args.output_dir, tokenizer, model.config.n_positions)
    return _summary(trainer, model.config, run.args.data, run.args.run.config, train_metrics, final_metrics, start)


def _summary(trainer, config, data_args, config_path, train_metrics, final_metrics, start) -> dict:
    """The figures a user reads at the end: perplexity per width at start and end, throughput, time."""
    state, args = trainer.state, trainer.args
    evaluations = [log for log in state.log_history if any(key.startswith("eval_ppl") for key in log)]
    start_metrics = evaluations[0] if args.eval_on_start and evaluations else {}
    tokens = state.global_step * args.per_device_train_batch_size * args.gradient_accumulation_steps
    tokens *= args.world_size * data_args.block_size
    widths = {"student": config.student_width}
    if config.mat_widths[-1] != config.student_width:  # a baseline has no TA
        widths["TA"] = config.mat_widths[-1]
    return {
        "config": shareable_path(config_path),
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
        "diagnostics": {  # is the TA teaching anything? (hf_matta.diagnostics)
            key.removeprefix("eval_"): value
            for key, value in final_metrics.items()
            if key.startswith(("eval_kl_", "eval_ffn_"))
        },
        "distributed_type": str(trainer.accelerator.distributed_type.value),
        "processes": trainer.accelerator.num_processes,
        "train_loss": train_metrics.get("train_loss"),
        "steps": state.global_step,
        "train_tokens": tokens,
        "tokens_per_second": tokens / train_metrics["train_runtime"],
        "train_seconds": train_metrics["train_runtime"],
        "total_seconds": time.perf_counter() - start,
        "checkpoint": shareable_path(args.output_dir),
    }


def format_summary(summary: dict, title: str = "MatTA") -> str:
    """The train stage's summary as the table printed at the end of training."""

    def cell(value: float | None) -> str:
        return f"{value:10.2f}" if value is not None else f"{'-':>10}"

    lines = [f"=== {title} summary ===", f"{'validation':<40}{'ppl start':>10}{'ppl end':>10}{'loss end':>10}"]
    for name, row in summary["widths"].items():
        label = f"{name} (FFN {row['ffn_width']}, {row['parameters'] / 1e6:.2f}M params)"
        lines.append(f"  {label:<38}{cell(row['start_ppl'])}{cell(row['end_ppl'])}{cell(row['end_loss'])}")
    lines += teaching_lines(summary)
    lines += [
        f"steps {summary['steps']} on {summary['processes']} process(es) ({summary['distributed_type']}), "
        f"{summary['train_tokens']:,} tokens in {summary['train_seconds']:.1f} s "
        f"({summary['tokens_per_second']:,.0f} tokens/s); whole stage {summary['total_seconds']:.1f} s",
        f"final train loss {summary['train_loss']:.4f}",
        f"model and tokenizer saved to {summary['checkpoint']}",
    ]
    return "\n".join(lines)


# --- extract -------------------------------------------------------------------------------------------------------


def resolve_plans(
    extract_args: ExtractArguments,
    config: MatGPT2Config,
    model: MatGPT2LMHeadModel | None = None,
    input_ids: torch.LongTensor | None = None,
    batch_size: int = 8,
) -> list[tuple[int, ...]]:
    """The students to extract, ascending in size: the student and the TA always, then `extract_plans`, then one plan
    per `extract_budgets` entry (`extract_strategy`). `search` measures on `input_ids` with `model`; without them its
    budgets are only checked against the range of sizes (what `--check` can do without weights)."""
    plans = [check_plan(config, config.student_width), check_plan(config, None)]
    plans += [check_plan(config, parse_plan(text)) for text in extract_args.extract_plans or []]
    if extract_args.extract_budgets:
        strategy = extract_args.extract_strategy
        budgets = [parse_budget(text) for text in extract_args.extract_budgets]
        check_budgets(config, budgets, smallest_plan(config, strategy))
        if strategy != "search":
            plans += [point.widths for point in mix_n_match(config, strategy, budgets)]
        elif model is not None:
            plans += [point.widths for point in mix_n_match(model, "search", budgets, input_ids, batch_size)]
    return sorted(dict.fromkeys(plans), key=lambda widths: count_parameters(config, widths))


def student_role(config: MatGPT2Config, widths: tuple[int, ...]) -> str:
    """`ta` (full width), `student` (the served granularity in every layer) or `member` (any other plan), as
    `hf_matta.evaluation` names them."""
    if widths == tuple(config.n_inner):
        return "ta"
    return "student" if widths == (config.student_width,) * config.n_layer else "member"


def extract_stage(run: Run) -> dict:
    """One standalone student per plan under `output_dir/students/<plan name>/`, each written atomically."""
    model = load_nested_model(run.output_dir)  # a corrupted weights file or non-finite weights are named
    config = model.config
    tokenizer = load_tokenizer(run.output_dir)
    students = []
    batch_size = run.args.training.per_device_eval_batch_size
    search = run.args.extract.extract_strategy == "search" and run.args.extract.extract_budgets
    input_ids = run.heldout_ids if search else None
    lineage = read_lineage(run.output_dir)  # each student carries the training run's record (its model card's source)
    for widths in resolve_plans(run.args.extract, config, model, input_ids, batch_size):
        folder = Path(STUDENTS_DIR) / plan_name(widths)
        student = extract_student(model, widths)
        save_student(student, run.output_dir / folder, tokenizer, overwrite=True, lineage=lineage)
        students.append(
            {
                "name": plan_name(widths),
                "role": student_role(config, widths),
                "plan": list(widths),
                "plan_text": format_plan(widths),
                "parameters": count_parameters(config, widths),
                "folder": str(folder),
            }
        )
        run.log(f"extracted {folder} ({students[-1]['role']}, plan {format_plan(widths)}, "
                f"{students[-1]['parameters']:,} parameters)")  # fmt: skip
    return {"students": students}


# --- evaluate ------------------------------------------------------------------------------------------------------


def evaluated_models(run: Run) -> list[dict]:
    """Every model the run reports on: the students (TA included), the teacher and the baseline when there are."""
    models = [dict(student) for student in run.outputs["extract"]["students"]]
    teacher = run.outputs["teacher"]["teacher"]
    if teacher is not None:
        models.append({"name": "teacher", "role": "teacher", "plan": None, "folder": teacher})
    baseline = run.outputs["train"]["baseline"]
    if baseline is not None:
        models.append({"name": "baseline", "role": "baseline", "plan": None, "folder": baseline["folder"]})
    return models


def _load_model(run: Run, entry: dict) -> PreTrainedModel:
    """A model of `evaluated_models` by its recorded folder (relative to the output folder); the teacher as the
    trainer loads it (a folder, a Hub id or a PEFT adapter)."""
    if entry["role"] == "teacher":
        return load_teacher(entry["folder"]).eval()
    return AutoModelForCausalLM.from_pretrained(run.output_dir / entry["folder"]).eval()


def validation_perplexities(run: Run) -> dict:
    """Validation loss and perplexity of every model of `evaluated_models`, on the run's validation blocks."""
    input_ids = run.heldout_ids
    batch_size = run.args.training.per_device_eval_batch_size
    rows = []
    for entry in evaluated_models(run):
        model = _load_model(run, entry)
        loss = validation_loss(model, input_ids, batch_size=batch_size)
        parameters = entry.get("parameters") or sum(p.numel() for p in model.parameters())
        rows.append({**entry, "parameters": parameters, "loss": loss, "perplexity": math.exp(loss)})
        run.log(f"validation perplexity of {entry['name']}: {rows[-1]['perplexity']:.2f}")
    return {"blocks": len(input_ids), "block_size": input_ids.shape[1], "models": rows}


def evaluation_tasks(run: Run) -> tuple[list[str], dict[str, str]]:
    """The lm-eval tasks this run can evaluate, and why the others are left out: `eval_tasks` and `lambada_heldout`
    (the held-out split's last words, no data needed); offline, the tasks whose data is the Hub's need
    `eval_data_dir`."""
    from ..evaluation import DATA_FILES, HELDOUT_TASK

    evaluate_args, skipped = run.args.evaluate, {}
    tasks = list(dict.fromkeys([*evaluate_args.eval_tasks, HELDOUT_TASK]))
    if evaluate_args.eval_data_dir is None and (hub_constants.HF_HUB_OFFLINE or os.environ.get("HF_DATASETS_OFFLINE")):
        for task in [task for task in tasks if task in DATA_FILES]:
            files = " or ".join(DATA_FILES[task])
            skipped[task] = f"the Hub is offline and eval_data_dir (a folder with {files}) is unset"
            tasks.remove(task)
    if run.args.data.streaming:
        skipped[HELDOUT_TASK] = "a streamed corpus: its held-out documents are not kept"
        tasks.remove(HELDOUT_TASK)
    return tasks, skipped


def _heldout_data(run: Run) -> dict:
    """The run's held-out split for `lambada_heldout`: the data fields that differ from their defaults; the seed."""
    defaults = DataArguments.__dataclass_fields__
    data = {
        name: value
        for name, value in dataclasses.asdict(run.args.data).items()
        if value != defaults[name].default and name != "preprocessing_num_workers"
    }
    return {**data, "seed": run.args.training.seed}


def evaluate_stage(run: Run) -> dict:
    """Validation perplexity of every model (`evaluated_models`), computed here with
    `hf_matta.extract.validation_loss`; then lm-eval's tasks (`evaluation_tasks`) on the students (the nested model's
    plans, extracted in memory), the TA, the baseline (the relative improvements are over it) and the teacher."""
    from ..evaluation import evaluate_students

    eval_dir = run.output_dir / EVAL_DIR
    validation = validation_perplexities(run)
    tasks, skipped = evaluation_tasks(run)
    for task, reason in skipped.items():
        run.log(f"lm-eval task {task}: left out ({reason})")
    options = dict(
        heldout_data=_heldout_data(run),
        data_dir=run.args.evaluate.eval_data_dir,
        limit=run.args.evaluate.eval_limit,
        batch_size=run.args.training.per_device_eval_batch_size,
        device="cpu" if run.args.training.use_cpu else None,
        progress=not run.args.training.disable_tqdm,
    )
    outputs = {"validation": f"{EVAL_DIR}/validation.json", "tasks": tasks, "skipped_tasks": skipped}
    if tasks:
        baseline = run.outputs["train"]["baseline"]
        evaluate_students(
            [str(run.output_dir)],
            tasks,
            plans=[student["plan"] for student in run.outputs["extract"]["students"]],
            baseline=None if baseline is None else str(run.output_dir / baseline["folder"]),
            output_dir=eval_dir,
            overwrite=True,
            **options,
        )
        outputs["results"] = f"{EVAL_DIR}/results.json"
        teacher = run.outputs["teacher"]["teacher"]
        if teacher is not None:
            write_json_atomic(eval_dir / "teacher_results.json", evaluate_students([teacher], tasks, **options))
            outputs["teacher_results"] = f"{EVAL_DIR}/teacher_results.json"
    write_json_atomic(eval_dir / "validation.json", validation)
    return outputs


# --- publish -------------------------------------------------------------------------------------------------------


def publish_stage(run: Run) -> dict:
    """Every extracted student in its own repo `publish_namespace/<name>`, its card carrying its lm-eval results: the
    exact repo folders under `output_dir/hub/` (a dry run, the default), or the Hub itself with `push`."""
    from ..hub import publish_students

    publish = run.args.publish
    namespace = publish.publish_namespace or DRY_RUN_NAMESPACE
    results = run.outputs["evaluate"].get("results")
    published = publish_students(
        run.output_dir,
        namespace,
        [student["plan"] for student in run.outputs["extract"]["students"]],
        push=publish.push,
        out_dir=None if publish.push else run.output_dir / HUB_DIR,
        overwrite=True,
        name_template=publish.publish_name_template,
        private=publish.publish_private,
        collection=publish.publish_collection,
        results=None if results is None else run.output_dir / results,
        log=run.log,
    )
    return {
        "push": publish.push,
        "published": [
            {
                "name": plan_name(item.plan),
                "repo_id": item.repo_id,
                "status": item.status,
                "location": item.location if publish.push else str(Path(item.location).relative_to(run.output_dir)),
                "commit": item.commit,
            }
            for item in published
        ],
    }


__all__ = [
    "Run",
    "build_nested_model",
    "config_from_string",
    "evaluate_stage",
    "extract_stage",
    "format_summary",
    "pretrain_teacher",
    "publish_stage",
    "resolve_plans",
    "teacher_stage",
    "train_stage",
]
