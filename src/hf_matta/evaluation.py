"""Evaluation: lm-eval-harness tasks on students, a results table, and the elastic curve (score against size).

- `evaluate_students(...)` runs lm-eval's own machinery (`HFLM` and `simple_evaluate`) on every student: folders,
  Hub ids, or the plans of a nested model evaluated in memory (`hf_matta.extract.extract_student`, nothing written).
  Default tasks: `agieval_sat_math` and `lambada_openai`, the paper's benchmarks; any lm-eval task works by name.
- Offline: with `data_dir` the two default tasks read local files (the task definitions in
  `lm_eval_tasks/local_files`, on lm-eval's include path, keep the standard names, prompts and metrics);
  `lambada_heldout` needs no data at all: LAMBADA-style passages from the held-out split of the training corpus
  (`lm_eval_tasks/heldout`).
- Output: `results.json` (lm-eval's metrics per student, with its plan and parameter count, read back by
  `load_results` and `results_for_plan`), `results.md` (the table) and `elastic_curve.png`. With a baseline, the
  relative improvement over it and its standard error, paired over the same documents.
"""

import dataclasses
import difflib
import functools
import json
import logging
import math
import os
import re
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from datasets import Dataset, DatasetDict
from huggingface_hub import constants as hub_constants
from tqdm.auto import tqdm
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    GPT2Config,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from . import __version__
from .data import TOKENIZER_FILES, DataArguments, load_corpus, load_tokenizer
from .extract import extract_student
from .models import MatGPT2Config, MatGPT2LMHeadModel
from .widths import Plan, check_plan, count_parameters, format_plan, plan_name, uniform_plans


try:
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager
except ImportError as error:  # the `eval` extra
    raise ImportError(
        f"hf_matta.evaluation runs lm-eval-harness, which is not installed ({error}): "
        "pip install 'hf_matta[eval]' (lm-eval[hf] and matplotlib)."
    ) from error


DEFAULT_TASKS = ("agieval_sat_math", "lambada_openai")
HELDOUT_TASK = "lambada_heldout"
# The held-out split of the embedded training default (recipes/configs/tiny_cpu.yaml): what `lambada_heldout` reads
# unless told otherwise. Keys are `hf_matta.data.DataArguments` fields, plus the seed that drew the split.
HELDOUT_DEFAULTS = {"builtin_corpus": "pydoc_data.topics", "validation_split_percentage": 10, "seed": 0}
# The files `data_dir` holds per task, in order of preference, named as in the benchmarks' own releases.
DATA_FILES = {
    "lambada_openai": ("lambada_test.jsonl",),
    "agieval_sat_math": ("sat-math.lm-eval.jsonl", "sat-math.jsonl"),
}
RESULTS_FILES = ("results.json", "results.md", "elastic_curve.png")
# The task definitions this project adds to lm-eval's include path.
TASKS_DIR = Path(__file__).resolve().parent / "lm_eval_tasks"  # package data (pyproject.toml): in the wheel too
RELATIVE_DEFINITION = (
    "(student - baseline) / baseline for metrics where higher is better, (baseline - student) / baseline where lower "
    "is better (perplexity): positive means better than the baseline. Standard errors are paired over the same "
    "documents (delta method on the per-document values lm-eval logs) for mean and perplexity metrics; for other "
    "aggregations they combine the two reported standard errors as if independent."
)
_SCHEMAS = {  # per data file: required fields, their types, and one example line for error messages
    "lambada_test.jsonl": ({"text": str}, '{"text": "... all the words of the passage, the last one the target"}'),
    "sat-math.lm-eval.jsonl": (
        {"query": str, "choices": list, "gold": (list, int)},
        '{"query": "Q: ... Answer Choices: (A)2 (B)4 (C)9 (D)10\\nA: Among A through D, the answer is", '
        '"choices": ["(A)2", "(B)4", "(C)9", "(D)10"], "gold": [3]}',
    ),
    "sat-math.jsonl": (
        {"question": str, "options": list, "label": str},
        '{"passage": "", "question": "...", "options": ["(A)2", "(B)4", "(C)9", "(D)10"], "label": "D"}',
    ),
}
_SENTENCE_END = re.compile(r"([A-Za-z]{3,})[.!?]")  # a sentence's last word, the target of a held-out passage


# --------------------------------------------------------------------------------------------------------------------
# Data: the local files of the two default tasks, and the held-out last-word task.


def read_data_file(task: str, data_dir: str | os.PathLike | None) -> tuple[Path, list[dict]]:
    """The documents of `task` (`lambada_openai` or `agieval_sat_math`) from `data_dir`, in lm-eval's schema.

    Takes the first of `DATA_FILES[task]` that exists; a raw AGIEval `sat-math.jsonl` is converted with
    `agieval_zero_shot`. Raises `FileNotFoundError` naming the files that `data_dir` should hold, or `ValueError`
    naming the file, line and field of a malformed row.
    """
    if data_dir is None:
        raise ValueError(
            f"task {task!r} from lm_eval_tasks/local_files reads a local file: give data_dir (--data-dir DIR, or "
            f"lm-eval's --metadata '{{\"data_dir\": \"DIR\"}}') holding {' or '.join(DATA_FILES[task])}."
        )
    folder = Path(data_dir)
    if not folder.is_dir():
        raise FileNotFoundError(f"--data-dir {str(folder)!r} is not a folder; give the folder that holds the files.")
    path = next((folder / name for name in DATA_FILES[task] if (folder / name).is_file()), None)
    if path is None:
        raise FileNotFoundError(
            f"--data-dir {str(folder)!r} has no {' or '.join(DATA_FILES[task])} for task {task!r}: put the test set "
            "there under that name (schemas in evals/README.md), or leave the task out of --tasks."
        )
    rows = _read_jsonl(path)
    if path.name == "sat-math.jsonl":
        rows = [agieval_zero_shot(row, f"{path}, line {line}") for line, row in enumerate(rows, 1)]
    elif path.name == "sat-math.lm-eval.jsonl":
        for line, row in enumerate(rows, 1):
            gold = row["gold"] if isinstance(row["gold"], list) else [row["gold"]]
            if not gold or any(not isinstance(g, int) or not 0 <= g < len(row["choices"]) for g in gold):
                raise ValueError(
                    f"{path}, line {line}: gold {row['gold']!r} is not an index into its {len(row['choices'])} "
                    "choices; write e.g. \"gold\": [3] for the fourth."
                )
    else:
        for line, row in enumerate(rows, 1):
            if " " not in row["text"].strip():
                raise ValueError(
                    f"{path}, line {line}: text {row['text'][:60]!r} has no context before its last word; "
                    "each passage is its context, a space and the target word."
                )
    return path, rows


def _read_jsonl(path: Path) -> list[dict]:
    """The rows of a JSON-lines data file, each checked against `_SCHEMAS[path.name]` (fields and their types)."""
    fields, example = _SCHEMAS[path.name]
    rows = []
    with open(path, encoding="utf-8") as file:
        for line, text in enumerate(file, 1):
            if not text.strip():
                continue
            try:
                row = json.loads(text)
            except json.JSONDecodeError as error:
                raise ValueError(
                    f"{path}, line {line}: not valid JSON ({error.msg}); each line is one object: {example}"
                ) from None
            missing = [name for name in fields if not isinstance(row, dict) or name not in row]
            if missing:
                raise ValueError(f"{path}, line {line}: no field {missing}; each line is one object: {example}")
            wrong = [name for name, kind in fields.items() if not isinstance(row[name], kind)]
            if wrong:
                raise ValueError(f"{path}, line {line}: field {wrong} has the wrong type; each line is like {example}")
            rows.append(row)
    if not rows:
        raise ValueError(f"{path} is empty; it holds one JSON object per line: {example}")
    return rows


def agieval_zero_shot(row: Mapping[str, Any], where: str = "row") -> dict:
    """A raw AGIEval row (`passage`, `question`, `options`, `label`) as lm-eval's `agieval_*` document.

    The query is AGIEval's English zero-shot prompt (its `dataset_loader.convert_zero_shot`), as in the Hub dataset
    that lm-eval's task reads: `<passage>Q: <question> Answer Choices: <options joined by a space>\\nA: Among A
    through <last letter>, the answer is`; the choices are the options, `gold` the label's index.
    """
    options = row["options"]
    letters = [chr(ord("A") + idx) for idx in range(len(options))]
    if row["label"] not in letters:
        raise ValueError(f"{where}: label {row['label']!r} is not one of the options' letters {letters}.")
    query = (
        f"{row.get('passage') or ''}Q: {row['question']} Answer Choices: {' '.join(options)}\n"
        f"A: Among A through {letters[-1]}, the answer is"
    )
    return {"query": query, "choices": list(options), "gold": [letters.index(row["label"])]}


def load_lambada_openai(data_dir: str | None = None, **metadata: Any) -> DatasetDict:
    """`custom_dataset` of lm_eval_tasks/local_files/lambada_openai.yaml: `data_dir`'s file as the test split."""
    return DatasetDict({"test": Dataset.from_list(read_data_file("lambada_openai", data_dir)[1])})


def load_agieval_sat_math(data_dir: str | None = None, **metadata: Any) -> DatasetDict:
    """`custom_dataset` of lm_eval_tasks/local_files/agieval_sat_math.yaml: `data_dir`'s file as the test split."""
    return DatasetDict({"test": Dataset.from_list(read_data_file("agieval_sat_math", data_dir)[1])})


def last_word_passages(documents: Iterable[str], context_words: int = 50) -> list[dict]:
    """LAMBADA-style passages cut from `documents`: `{"text": ...}`, the target being the last word.

    Each passage is a stretch of a document that starts at a line start and ends with the last word of a sentence
    (at least three letters, its full stop dropped) after at least `context_words` words of context; the next one
    starts at the line after it, so passages do not overlap. The character before the target is a single space after
    a non-space, so `text.split(' ')` gives back exactly the context and the target, as `lambada_openai` splits them.
    """
    passages = []
    for text in documents:
        start, words = 0, 0
        for match in re.finditer(r"\S+", text):
            if match.start() < start:
                continue
            target = _SENTENCE_END.fullmatch(match.group())
            before = text[match.start() - 2 : match.start()]  # a non-space, then one space
            if target and words >= context_words and len(before) == 2 and before[1] == " " and not before.isspace():
                end = match.start() + len(target[1])
                passages.append({"text": text[start:end]})
                next_line = text.find("\n", end)
                if next_line < 0:
                    break
                start, words = next_line + 1, 0
            else:
                words += 1
    return passages


def heldout_documents(heldout_data: Mapping[str, Any] | None = None) -> dict[str, list[str]]:
    """The documents of a training run, `{"train": [...], "validation": [...]}`, split by `hf_matta.data.load_corpus`
    exactly as training split them.

    `heldout_data` holds `DataArguments` fields and the run's `seed` (default `HELDOUT_DEFAULTS`: the embedded
    training default, whose 8 held-out `pydoc_data.topics` documents are the validation split).
    """
    settings = dict(HELDOUT_DEFAULTS if heldout_data is None else heldout_data)
    seed = settings.pop("seed", 0)
    known = {field.name for field in dataclasses.fields(DataArguments)}
    unknown = sorted(set(settings) - known)
    if unknown:
        raise ValueError(
            f"heldout_data has unknown fields {unknown}: give hf_matta.data.DataArguments fields (e.g. "
            "builtin_corpus, train_file, validation_file, validation_split_percentage) and the training seed."
        )
    data_args = DataArguments(**settings)
    raw = load_corpus(data_args, seed=seed)
    if "validation" not in raw:
        raise ValueError(
            f"heldout_data {settings} holds nothing out (validation_split_percentage=0 and no validation file): "
            "give the training run's validation_split_percentage or validation_file."
        )
    return {split: list(raw[split][data_args.text_column]) for split in ("train", "validation")}


def load_lambada_heldout(
    heldout_data: Mapping[str, Any] | None = None, context_words: int = 50, **metadata: Any
) -> DatasetDict:
    """`custom_dataset` of lm_eval_tasks/heldout/lambada_heldout.yaml: `last_word_passages` of the held-out documents,
    less any passage that a training document also holds word for word (`pydoc_data.topics` repeats paragraphs
    across topics: 22 of the default's 86 passages), so that no passage was seen in training."""
    documents = heldout_documents(heldout_data)
    passages = [
        passage
        for passage in last_word_passages(documents["validation"], context_words)
        if not any(passage["text"] in document for document in documents["train"])
    ]
    if not passages:
        raise ValueError(
            f"the held-out documents of {heldout_data or HELDOUT_DEFAULTS} give no unseen passage of {context_words} "
            "words ending a sentence: hold out more text, or lower context_words."
        )
    return DatasetDict({"test": Dataset.from_list(passages)})


# --------------------------------------------------------------------------------------------------------------------
# Students: what is evaluated, checked before any weights load.


@dataclass
class _Candidate:
    """One model to evaluate: its identity in results.json, and how to get it (weights load only when it runs)."""

    name: str
    source: str
    role: str
    plan: list[int] | None
    parameters: int | None
    load: Callable[[], tuple[PreTrainedModel, PreTrainedTokenizerBase]]


def _resolve_students(
    students: Sequence[str | os.PathLike],
    nested_model: MatGPT2LMHeadModel | None,
    tokenizer: PreTrainedTokenizerBase | None,
    plans: Sequence[Plan] | None,
    nested_name: str | None,
    dtype: torch.dtype | None,
    trust_remote_code: bool,
) -> list[_Candidate]:
    """Every student as a candidate: nested models expand into their plans (every granularity, or `plans`)."""
    candidates, nested_seen = [], False
    if nested_model is not None:
        if tokenizer is None:
            raise ValueError("nested_model is evaluated with its tokenizer: pass tokenizer=... as well.")
        source = f"nested:{nested_name or nested_model.name_or_path or 'in-memory'}"
        candidates += _plan_candidates(lambda: nested_model, lambda: tokenizer, nested_model.config, plans, source)
        nested_seen = True
    for student in students:
        student = str(student)
        config = _read_config(student, trust_remote_code)
        if _is_nested(config):
            get_model = functools.cache(lambda s=student: MatGPT2LMHeadModel.from_pretrained(s).eval())
            get_tokenizer = functools.cache(lambda s=student: _load_tokenizer(s))
            candidates += _plan_candidates(get_model, get_tokenizer, config, plans, f"nested:{student}")
            nested_seen = True
        else:
            load = functools.partial(_load_pretrained, student, dtype, trust_remote_code)
            candidates.append(_Candidate(_folder_name(student), student, "student", _config_plan(config), None, load))
    if plans and not nested_seen:
        raise ValueError(
            f"plans {list(plans)} are widths of a nested model: give a nested MatGPT2 folder (as the training recipe "
            "saves it) among the students, or drop --plan to evaluate the students as they are."
        )
    return _unique_names(candidates)


def _plan_candidates(
    get_model: Callable[[], MatGPT2LMHeadModel],
    get_tokenizer: Callable[[], PreTrainedTokenizerBase],
    config: MatGPT2Config,
    plans: Sequence[Plan] | None,
    source: str,
) -> list[_Candidate]:
    """One candidate per plan of a nested model, extracted in memory when its turn comes."""
    widths_list = [check_plan(config, plan) for plan in plans] if plans else uniform_plans(config)
    student = (config.student_width,) * config.n_layer if config.student_width is not None else None
    candidates = []
    for widths in dict.fromkeys(widths_list):
        role = "ta" if widths == tuple(config.n_inner) else "student" if widths == student else "member"

        def load(widths: tuple[int, ...] = widths) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
            return extract_student(get_model(), list(widths)), get_tokenizer()

        candidates.append(
            _Candidate(plan_name(widths), source, role, list(widths), count_parameters(config, widths), load)
        )
    return candidates


def _read_config(student: str, trust_remote_code: bool) -> PretrainedConfig:
    """A student's config (cheap: no weights), with an error naming what is wrong with the folder or id."""
    path = Path(student)
    if path.exists():
        if not path.is_dir():
            raise ValueError(f"STUDENT {student!r} is a file, not a model folder; give the folder it is saved in.")
        if not (path / "config.json").is_file():
            raise ValueError(
                f"STUDENT {student!r} is a folder without config.json, not a saved model: give a folder written by "
                "save_pretrained (the training recipe, hf-matta extract) or a Hub model id."
            )
        if not any(path.glob("*.safetensors")) and not any(path.glob("pytorch_model*.bin")):
            raise ValueError(
                f"STUDENT {student!r} has a config.json but no weights (*.safetensors or pytorch_model.bin); save "
                "the model there with save_pretrained."
            )
        if not any((path / name).is_file() for name in TOKENIZER_FILES):
            raise ValueError(
                f"STUDENT {student!r} has no tokenizer; save the training tokenizer next to the model "
                "(tokenizer.save_pretrained(folder); hf-matta extract does this)."
            )
        return AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    if not re.fullmatch(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?", student):  # not shaped as a Hub id ("name", "org/name")
        raise FileNotFoundError(f"STUDENT {student!r} does not exist; give a model folder or a Hub model id.")
    try:
        return AutoConfig.from_pretrained(student, trust_remote_code=trust_remote_code)
    except OSError as error:
        offline = " (the Hub is offline here: HF_HUB_OFFLINE=1)" if hub_constants.HF_HUB_OFFLINE else ""
        raise ValueError(
            f"STUDENT {student!r} is not a local folder, and loading it from the Hub failed{offline}: give a model "
            f"folder, or a Hub id that is cached or reachable ({str(error).splitlines()[0]})"
        ) from error


def _is_nested(config: PretrainedConfig) -> bool:
    """A nested model with granularities (the recipe's output), as opposed to a student extracted from one."""
    return isinstance(config, MatGPT2Config) and bool(config.mat_widths)


def _config_plan(config: PretrainedConfig) -> list[int] | None:
    """Per-layer FFN widths of a GPT-2 or MatGPT2 model; None for other architectures."""
    if isinstance(config, MatGPT2Config):
        return list(config.n_inner)
    if isinstance(config, GPT2Config):
        return [config.n_inner or 4 * config.n_embd] * config.n_layer
    return None


def _load_pretrained(
    student: str, dtype: torch.dtype | None, trust_remote_code: bool
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """A student folder or Hub id: uniform students are stock GPT-2, mixed ones the registered MatGPT2 class."""
    model = AutoModelForCausalLM.from_pretrained(
        student, dtype=dtype or "auto", trust_remote_code=trust_remote_code
    )
    return model.eval(), _load_tokenizer(student)


def _load_tokenizer(student: str) -> PreTrainedTokenizerBase:
    tokenizer = load_tokenizer(student)
    if tokenizer is None:
        raise ValueError(f"{student!r} has no tokenizer; save the one it was trained with next to it.")
    return tokenizer


def _folder_name(student: str) -> str:
    return Path(student).name if Path(student).exists() else student


def _unique_names(candidates: list[_Candidate]) -> list[_Candidate]:
    """Names identify models in the table and the plot: on a clash the source is added, and a model given twice is
    an error."""
    names = [candidate.name for candidate in candidates]
    for candidate in candidates:
        if names.count(candidate.name) > 1:
            candidate.name = f"{candidate.name} ({candidate.source})"
    names = [candidate.name for candidate in candidates]
    twice = sorted({name for name in names if names.count(name) > 1})
    if twice:
        raise ValueError(f"{twice} are given twice; give each model once.")
    return candidates


# --------------------------------------------------------------------------------------------------------------------
# Tasks: lm-eval's TaskManager with this project's task folders on its include path.


def _task_manager(tasks: Sequence[str], data_dir: str | None, heldout_data: Mapping[str, Any] | None) -> TaskManager:
    """lm-eval's TaskManager: `lm_eval_tasks/heldout` always, `lm_eval_tasks/local_files` with `data_dir`, and
    lm-eval's own tasks only when a task asks for them (indexing its ~15 000 YAML files takes 10-20 s on 2 cores)."""
    folders = [TASKS_DIR / "heldout"] + ([TASKS_DIR / "local_files"] if data_dir is not None else [])
    missing = [str(folder) for folder in folders if not folder.is_dir()]
    if missing:
        raise FileNotFoundError(
            f"task definitions {missing} are missing: they ship inside the package (hf_matta/lm_eval_tasks); "
            "reinstall hf_matta (pip install --force-reinstall hf_matta, or pip install -e . from a clone)."
        )
    metadata = json.dumps({"data_dir": data_dir, "heldout_data": dict(heldout_data or HELDOUT_DEFAULTS)})
    include = tuple(str(folder) for folder in folders)
    manager = _cached_task_manager(include, False, metadata)
    if all(task in manager.all_tasks for task in tasks):
        return manager
    return _cached_task_manager(include, True, metadata)


@functools.lru_cache(maxsize=4)
def _cached_task_manager(include: tuple[str, ...], include_defaults: bool, metadata: str) -> TaskManager:
    """One index per setting and process: a second evaluation (the pipeline's next stage, a test) reuses it."""
    return TaskManager(include_path=list(include), include_defaults=include_defaults, metadata=json.loads(metadata))


def _load_tasks(manager: TaskManager, tasks: Sequence[str], data_dir: str | None) -> dict[str, Any]:
    """{leaf task name: lm-eval Task}, data loaded (so a missing file or network fails here, before any model)."""
    loaded = {}
    for name in tasks:
        if name not in manager.all_tasks:
            close = difflib.get_close_matches(name, manager.all_tasks, n=3, cutoff=0.7)
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            raise ValueError(
                f"unknown task {name!r}{hint}: lm-eval {lm_eval.__version__} has no task, group or tag of that name, "
                f"nor has hf_matta/lm_eval_tasks; `lm-eval ls tasks` lists them (this project adds {HELDOUT_TASK!r})."
            )
        try:
            loaded.update(manager.load([name])["tasks"])
        except ConnectionError as error:
            local = f"give --data-dir DIR holding {' or '.join(DATA_FILES[name])} (see evals/README.md), " if (
                name in DATA_FILES and data_dir is None
            ) else ""
            raise ValueError(
                f"task {name!r} needs its data from the Hub, which cannot be reached ({error}): {local}run it once "
                f"with network so that `datasets` caches the data, or evaluate offline on --tasks {HELDOUT_TASK}, "
                "which needs no data."
            ) from error
    return loaded


# --------------------------------------------------------------------------------------------------------------------
# The run.


class _LmEvalMessages(logging.Filter):
    """While attached: drops lm-eval's messages that only concern how hf-matta calls it (a model object passed on
    purpose, the `--metadata` hint of every custom dataset), and counts its one-line-per-request truncation warnings
    (every LAMBADA passage, for a model with a 128-token context) instead of printing them."""

    LOGGERS = ("lm_eval.models.huggingface", "lm_eval.api.task")
    NOISE = ("`pretrained` model kwarg is not of type `str`", "Passed an already-initialized model", "Custom kwargs")

    def __init__(self) -> None:
        super().__init__()
        self.truncated = 0

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if "exceeds model's maximum length" in message:
            self.truncated += 1
            return False
        return not any(noise in message for noise in self.NOISE)

    def __enter__(self) -> "_LmEvalMessages":
        for name in self.LOGGERS:
            logging.getLogger(name).addFilter(self)
        return self

    def __exit__(self, *exc_info: object) -> None:
        for name in self.LOGGERS:
            logging.getLogger(name).removeFilter(self)


def evaluate_students(
    students: Sequence[str | os.PathLike] = (),
    tasks: Sequence[str] = DEFAULT_TASKS,
    *,
    nested_model: MatGPT2LMHeadModel | None = None,
    tokenizer: PreTrainedTokenizerBase | None = None,
    plans: Sequence[Plan] | None = None,
    nested_name: str | None = None,
    data_dir: str | os.PathLike | None = None,
    heldout_data: Mapping[str, Any] | None = None,
    limit: float | None = None,
    num_fewshot: int | None = None,
    batch_size: int | str = 8,
    device: str | None = None,
    dtype: str | torch.dtype | None = "auto",
    output_dir: str | os.PathLike | None = None,
    baseline: str | os.PathLike | None = None,
    overwrite: bool = False,
    trust_remote_code: bool = False,
    bootstrap_iters: int = 100_000,
    progress: bool = True,
) -> dict:
    """Run lm-eval tasks on every student; return the results (the content of results.json) and write the files.

    Args:
        students: model folders or Hub ids. A uniform student is a stock GPT-2, a mixed one a MatGPT2 (the registered
            class). A nested MatGPT2 folder (with granularities, as the training recipe saves it) stands for its
            plans: `plans`, or every granularity from the student to the TA.
        tasks: lm-eval task names (groups and tags expand to their tasks). `lambada_heldout` needs no data.
        nested_model: a trained nested model in memory; its plans are extracted and evaluated one at a time, never
            written to disk. Needs `tokenizer`.
        plans: per-layer FFN widths (or one width for all layers) of the nested model(s) to evaluate.
        nested_name: the nested model's folder for results.json's `source` (`nested:<folder>`; default its
            `name_or_path`).
        data_dir: a folder with `lambada_test.jsonl` and `sat-math.lm-eval.jsonl` or `sat-math.jsonl` (AGIEval's
            raw schema): `lambada_openai` and `agieval_sat_math` read it instead of the Hub.
        heldout_data: the training run's held-out split for `lambada_heldout` (`DataArguments` fields and `seed`;
            default `HELDOUT_DEFAULTS`, the embedded training default's).
        limit: documents per task (a fraction when below 1), lm-eval's `limit`; for quick runs, not for reporting.
        num_fewshot: few-shot examples (default: each task's own, 0 for both default tasks).
        batch_size: lm-eval's batch size (an int, or "auto").
        device: "cpu", "cuda", "cuda:1", ... (default: CUDA when available).
        dtype: "auto" (the checkpoint's), "float32", "bfloat16", "float16" or a torch dtype.
        output_dir: where results.json, results.md and elastic_curve.png go (None: write nothing). Existing results
            there are kept unless `overwrite`.
        baseline: the name of an evaluated student, or a model folder / Hub id evaluated too: the relative
            improvement of every other student over it, with a paired standard error, goes into `relative`.
        bootstrap_iters: lm-eval's bootstrap resamples for standard errors of non-mean metrics (perplexity).
        progress: show a progress bar over students x tasks.

    Returns:
        `{"tasks", "lm_eval_version", "students": [{"name", "source", "role", "plan", "parameters", "results":
        {task: {metric: value, metric_stderr: value}}, "seconds": {task: s}, "truncated_requests": {task: n}}],
        "baseline", "relative", "task_info", "config", "run"}`, as results.json. `truncated_requests` counts the
        requests longer than the model's context, which lm-eval cuts from the left.

    Raises:
        ValueError / FileNotFoundError / FileExistsError naming the bad input (unknown task, missing or malformed data
        file, a folder that is not a model, a task that needs the network while offline, results already there),
        all before any model's weights are loaded.
    """
    start = time.perf_counter()
    load_average_start = os.getloadavg()
    tasks = [task.strip() for task in (tasks.split(",") if isinstance(tasks, str) else tasks) if task.strip()]
    if not tasks:
        raise ValueError("no task given; name lm-eval tasks, e.g. agieval_sat_math,lambada_openai.")
    torch_dtype = _torch_dtype(dtype)
    device = _check_device(device)
    _check_batch_size(batch_size)
    if limit is not None and not (0 < limit < 1 or limit == int(limit) >= 1):
        raise ValueError(f"limit={limit} must be a whole number of documents, or a fraction between 0 and 1.")
    limit = int(limit) if limit is not None and limit >= 1 else limit
    if bootstrap_iters < 0:
        raise ValueError(f"bootstrap_iters={bootstrap_iters} must be 0 (no bootstrap standard errors) or more.")
    if output_dir is not None:
        _check_output_dir(Path(output_dir), overwrite)
    candidates = _resolve_students(
        students, nested_model, tokenizer, plans, nested_name, torch_dtype, trust_remote_code
    )
    if not candidates:
        raise ValueError("no student given; give model folders, Hub ids or a nested model.")
    baseline_name = _resolve_baseline(baseline, candidates, torch_dtype, trust_remote_code)

    data_dir = None if data_dir is None else str(data_dir)
    data_files = {task: str(read_data_file(task, data_dir)[0]) for task in DATA_FILES if task in tasks and data_dir}
    with _LmEvalMessages() as messages:
        manager = _task_manager(tasks, data_dir, heldout_data)
        task_objects = _load_tasks(manager, tasks, data_dir)
        entries, per_sample, task_info = _run(
            candidates, task_objects, manager, messages, num_fewshot, limit, batch_size, device, torch_dtype,
            bootstrap_iters, progress,
        )  # fmt: skip

    results = {
        "tasks": list(task_objects),
        "lm_eval_version": lm_eval.__version__,
        "students": entries,
        "baseline": baseline_name,
        "relative": _relative(entries, baseline_name, per_sample, task_info),
        "relative_definition": RELATIVE_DEFINITION,
        "task_info": task_info,
        "config": {
            "limit": limit,
            "num_fewshot": num_fewshot,
            "batch_size": batch_size,
            "device": str(device),
            "dtype": str(dtype if torch_dtype is None else torch_dtype).removeprefix("torch."),
            "data_dir": data_dir,
            "data_files": data_files,
            "heldout_data": dict(heldout_data or HELDOUT_DEFAULTS) if HELDOUT_TASK in task_objects else None,
            "bootstrap_iters": bootstrap_iters,
        },
        "run": {
            "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
            "seconds": round(time.perf_counter() - start, 2),
            "torch_threads": torch.get_num_threads(),
            "load_average_start": [round(load, 2) for load in load_average_start],
            "load_average_end": [round(load, 2) for load in os.getloadavg()],
            "hf_matta_version": __version__,
        },
    }
    if output_dir is not None:
        write_results(results, output_dir)
    return results


def _run(
    candidates: list[_Candidate],
    task_objects: Mapping[str, Any],
    manager: TaskManager,
    messages: _LmEvalMessages,
    num_fewshot: int | None,
    limit: float | None,
    batch_size: int | str,
    device: torch.device,
    dtype: torch.dtype | None,
    bootstrap_iters: int,
    progress: bool,
) -> tuple[list[dict], dict, dict]:
    """Every candidate on every task, one model at a time: (results.json's students, per-document values, tasks)."""
    per_sample: dict[str, dict[str, dict[str, np.ndarray]]] = {}
    task_info: dict[str, dict] = {}
    entries = []
    bar = tqdm(total=len(candidates) * len(task_objects), desc="hf-matta eval", unit="task", disable=not progress)
    for candidate in candidates:
        model, tokenizer = candidate.load()
        model = model.to(device=device, dtype=dtype) if dtype else model.to(device)
        lm = HFLM(pretrained=model, tokenizer=tokenizer, backend="causal", batch_size=batch_size)
        entry = {
            "name": candidate.name,
            "source": candidate.source,
            "role": candidate.role,
            "plan": candidate.plan,
            "parameters": candidate.parameters if candidate.parameters is not None else model.num_parameters(),
            "results": {},
            "seconds": {},
            "truncated_requests": {},
        }
        per_sample[candidate.name] = {}
        for name, task in task_objects.items():
            bar.set_postfix_str(f"{candidate.name} / {name}")
            start, truncated = time.perf_counter(), messages.truncated
            output = lm_eval.simple_evaluate(
                model=lm,
                tasks=[task],
                num_fewshot=num_fewshot,
                limit=limit,
                bootstrap_iters=bootstrap_iters,
                log_samples=True,
                task_manager=manager,
            )
            entry["seconds"][name] = round(time.perf_counter() - start, 2)
            entry["truncated_requests"][name] = messages.truncated - truncated
            entry["results"][name] = _metrics(output["results"][name])
            per_sample[candidate.name][name] = _per_document(output["samples"][name])
            task_info.setdefault(name, _task_info(output, name, task))
            bar.update()
        entries.append(entry)
        del lm, model
    bar.close()
    return entries, per_sample, task_info


def _torch_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    """None for "auto" (keep each model's dtype), else a floating torch dtype; an error names the valid ones."""
    if dtype is None or dtype == "auto" or isinstance(dtype, torch.dtype):
        return None if dtype in (None, "auto") else dtype
    candidate = getattr(torch, str(dtype), None)
    if not isinstance(candidate, torch.dtype) or not candidate.is_floating_point:
        raise ValueError(f"dtype {dtype!r} is not a floating torch dtype; use auto, float32, bfloat16 or float16.")
    return candidate


def _check_device(device: str | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        parsed = torch.device(device)
    except RuntimeError as error:
        raise ValueError(f"device {device!r} is not a torch device ({error}); use cpu, cuda or cuda:N.") from None
    if parsed.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} asks for CUDA, which this machine does not have; use --device cpu.")
    return parsed


def _check_batch_size(batch_size: int | str) -> None:
    if isinstance(batch_size, int) and not isinstance(batch_size, bool) and batch_size >= 1:
        return
    if isinstance(batch_size, str) and re.fullmatch(r"auto(:\d+)?", batch_size):
        return
    raise ValueError(f"batch_size {batch_size!r} must be a positive int, or 'auto' (lm-eval finds the largest).")


def _check_output_dir(output_dir: Path, overwrite: bool) -> None:
    """Refuse, before any work, to replace results a user already has."""
    if output_dir.exists() and not output_dir.is_dir():
        raise FileExistsError(f"--output-dir {str(output_dir)!r} is a file; give a folder.")
    taken = [name for name in RESULTS_FILES if (output_dir / name).exists()]
    if taken and not overwrite:
        raise FileExistsError(
            f"{output_dir} already holds {taken}; choose another --output-dir, or pass --overwrite to replace them."
        )


def _resolve_baseline(
    baseline: str | os.PathLike | None,
    candidates: list[_Candidate],
    dtype: torch.dtype | None,
    trust_remote_code: bool,
) -> str | None:
    """The baseline's name: an evaluated student (by name or source), or one more model evaluated as `baseline`."""
    if baseline is None:
        return None
    baseline = str(baseline)
    for candidate in candidates:
        if baseline in (candidate.name, candidate.source):
            candidate.role = "baseline"
            return candidate.name
    config = _read_config(baseline, trust_remote_code)
    if _is_nested(config):
        raise ValueError(
            f"--baseline {baseline!r} is a nested model with several granularities; give one model (a student "
            "folder, or the name of one of the evaluated plans such as ffn256)."
        )
    load = functools.partial(_load_pretrained, baseline, dtype, trust_remote_code)
    candidates.append(_Candidate(_folder_name(baseline), baseline, "baseline", _config_plan(config), None, load))
    _unique_names(candidates)
    return candidates[-1].name


def _metrics(task_results: Mapping[str, Any]) -> dict[str, float | None]:
    """lm-eval's `{"acc,none": v, "acc_stderr,none": s}` as `{"acc": v, "acc_stderr": s}` (other filters keep
    their name: `exact_match,strict-match`); a standard error lm-eval did not compute ("N/A") is None."""
    metrics = {}
    for key, value in task_results.items():
        if "," not in key:  # "alias", "samples"
            continue
        metric, filter_name = key.split(",", 1)
        label = metric if filter_name == "none" else key
        metrics[label] = float(value) if isinstance(value, (int, float)) else None
    return metrics


def _per_document(samples: Sequence[Mapping[str, Any]]) -> dict[str, np.ndarray]:
    """Per-document values of each metric (the loglikelihood for perplexity), in doc_id order, from lm-eval's logs."""
    rows = sorted((sample for sample in samples if sample.get("filter", "none") == "none"), key=lambda s: s["doc_id"])
    values: dict[str, np.ndarray] = {"doc_id": np.array([row["doc_id"] for row in rows])}
    for metric, value in (rows[0].items() if rows else ()):
        if isinstance(value, (bool, int, float)) and metric != "doc_id":
            values[metric] = np.array([float(row[metric]) for row in rows])
    return values


def _task_info(output: Mapping[str, Any], name: str, task: Any) -> dict:
    """What results.json records once per task: documents, version, direction and aggregation of each metric."""
    aggregations = task.aggregation()
    return {
        "n_samples": output["n-samples"][name]["effective"],
        "n_documents": output["n-samples"][name]["original"],
        "version": output["versions"][name],
        "num_fewshot": output["n-shot"][name],
        "higher_is_better": output["higher_is_better"][name],
        "aggregation": {metric: getattr(fn, "__name__", str(fn)) for metric, fn in aggregations.items()},
    }


# --------------------------------------------------------------------------------------------------------------------
# Relative improvement over a baseline.


def _relative(
    entries: list[dict], baseline: str | None, per_sample: Mapping, task_info: Mapping[str, dict]
) -> dict:
    """{student: {task: {metric: improvement, metric_stderr: its standard error}}} over the baseline."""
    if baseline is None:
        return {}
    base = next(entry for entry in entries if entry["name"] == baseline)
    relative = {}
    for entry in entries:
        if entry["name"] == baseline:
            continue
        relative[entry["name"]] = {}
        for task, info in task_info.items():
            values = {}
            for label in metric_labels(entry["results"][task]):
                metric = label.partition(",")[0]
                if metric not in info["higher_is_better"]:
                    continue
                values[label], values[stderr_label(label)] = relative_improvement(
                    entry["results"][task][label],
                    base["results"][task].get(label),
                    entry["results"][task].get(stderr_label(label)),
                    base["results"][task].get(stderr_label(label)),
                    info["higher_is_better"][metric],
                    info["aggregation"].get(metric),
                    per_sample[entry["name"]][task],
                    per_sample[baseline][task],
                    label,
                )
            relative[entry["name"]][task] = values
    return relative


def relative_improvement(
    student: float,
    baseline: float,
    student_stderr: float | None,
    baseline_stderr: float | None,
    higher_is_better: bool,
    aggregation: str | None = None,
    student_documents: Mapping[str, np.ndarray] | None = None,
    baseline_documents: Mapping[str, np.ndarray] | None = None,
    metric: str | None = None,
) -> tuple[float | None, float | None]:
    """The student's relative improvement over the baseline (positive: better) and its standard error.

    With per-document values of both on the same documents (`doc_id`), the error is paired, as both models answer
    the same questions: for a mean metric, r = mean(x) / mean(y) has standard error std(x - r y) / (sqrt(n) mean(y))
    (the delta method); for perplexity, exp(-mean loglikelihood), the ratio is exp(-mean d) with d the per-document
    difference of loglikelihoods, standard error exp(-mean d) std(d) / sqrt(n). Otherwise the two reported
    standard errors are combined as if independent: sqrt(se_s^2 + r^2 se_b^2) / |baseline|.
    Returns (None, None) when the baseline's value is 0 (no relative change is defined).
    """
    if baseline == 0 or student is None or baseline is None:
        return None, None
    sign = 1.0 if higher_is_better else -1.0
    paired = (
        student_documents is not None
        and baseline_documents is not None
        and metric in student_documents
        and metric in baseline_documents
        and np.array_equal(student_documents["doc_id"], baseline_documents["doc_id"])
        and len(student_documents["doc_id"]) > 1
    )
    if paired and aggregation == "perplexity":
        differences = student_documents[metric] - baseline_documents[metric]
        ratio = math.exp(-differences.mean())  # student perplexity / baseline perplexity
        stderr = ratio * differences.std(ddof=1) / math.sqrt(len(differences))
        return sign * (ratio - 1.0), float(stderr)
    ratio = student / baseline
    if paired and aggregation == "mean":
        x, y = student_documents[metric], baseline_documents[metric]
        stderr = (x - ratio * y).std(ddof=1) / (math.sqrt(len(x)) * abs(y.mean()))
        return sign * (ratio - 1.0), float(stderr)
    if student_stderr is None or baseline_stderr is None:
        return sign * (ratio - 1.0), None
    return sign * (ratio - 1.0), math.sqrt(student_stderr**2 + ratio**2 * baseline_stderr**2) / abs(baseline)


# --------------------------------------------------------------------------------------------------------------------
# Output: results.json, results.md, elastic_curve.png; reading them back.


def write_results(results: Mapping[str, Any], output_dir: str | os.PathLike) -> dict[str, Path]:
    """Write results.json, results.md and elastic_curve.png into `output_dir`; returns their paths."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    paths = {name: output_dir / name for name in RESULTS_FILES}
    paths["results.json"].write_text(json.dumps(results, indent=2) + "\n")
    paths["results.md"].write_text(results_markdown(results))
    plot_elastic_curve(results, paths["elastic_curve.png"])
    return paths


def load_results(path: str | os.PathLike) -> dict:
    """results.json (or the folder holding it) as written by `evaluate_students` / `hf-matta eval`."""
    path = Path(path)
    if path.is_dir():
        path = path / "results.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist; give the results.json that hf-matta eval wrote.")
    results = json.loads(path.read_text())
    if not isinstance(results, dict) or not {"tasks", "students"} <= set(results):
        raise ValueError(f"{path} is not an hf-matta eval results.json (it has no 'tasks' and 'students').")
    return results


def results_for_plan(results: Mapping[str, Any], plan: int | Sequence[int]) -> dict | None:
    """The evaluated student whose per-layer FFN widths are `plan` (an int: that width in every layer), or None.

    A student of the family comes before a baseline of the same shape. Its `results` are `{task: {metric: value,
    metric_stderr: value}}` with lm-eval's task and metric names.
    """
    matches = [
        student
        for student in results["students"]
        if student["plan"] is not None
        and (set(student["plan"]) == {plan} if isinstance(plan, int) else list(student["plan"]) == list(plan))
    ]
    matches.sort(key=lambda student: student["role"] == "baseline")
    return matches[0] if matches else None


def metric_labels(task_results: Mapping[str, Any]) -> list[str]:
    """The metrics of one task's results, without their standard errors: `["perplexity", "acc"]`."""
    return [label for label in task_results if not label.partition(",")[0].endswith("_stderr")]


def stderr_label(label: str) -> str:
    """The key of a metric's standard error: `acc` -> `acc_stderr`, `exact_match,strict-match` ->
    `exact_match_stderr,strict-match` (lm-eval's naming, its filter suffix kept)."""
    metric, comma, filter_name = label.partition(",")
    return f"{metric}_stderr{comma}{filter_name}"


def primary_metric(results: Mapping[str, Any], task: str) -> str:
    """The metric the elastic curve shows for `task`: `acc` when the task has it, else its first metric; but when
    every model has the same value of it (tiny models all at 0 on LAMBADA), the task's next metric, which may tell
    them apart (perplexity)."""
    scored = [student["results"][task] for student in results["students"] if task in student["results"]]
    labels = metric_labels(scored[0])
    ordered = ["acc", *(label for label in labels if label != "acc")] if "acc" in labels else labels
    for label in ordered:
        if len({values.get(label) for values in scored}) > 1:
            return label
    return ordered[0]


def format_number(value: float | None) -> str:
    """A metric as the table writes it: 4 decimals below 10 (accuracies), 2 above (perplexities); '-' for none."""
    if value is None:
        return "-"
    return f"{value:.4f}" if abs(value) < 10 else f"{value:,.2f}"


def results_markdown(results: Mapping[str, Any]) -> str:
    """The results table (and, with a baseline, the relative improvements) as Markdown."""
    columns = [
        (task, label) for task in results["tasks"] for label in metric_labels(results["students"][0]["results"][task])
    ]
    config, run = results["config"], results["run"]
    documents = ", ".join(f"{task} ({results['task_info'][task]['n_samples']} documents)" for task in results["tasks"])
    lines = [
        "# lm-eval results",
        "",
        f"lm-eval {results['lm_eval_version']}: {documents}; limit {config['limit']}, num_fewshot "
        f"{config['num_fewshot'] if config['num_fewshot'] is not None else 'task default'}, batch size "
        f"{config['batch_size']}, device {config['device']}, dtype {config['dtype']}"
        + (f", data from {config['data_dir']}" if config["data_dir"] else "")
        + f". {len(results['students'])} models in {run['seconds']:.1f} s, torch threads {run['torch_threads']}, "
        f"{run['date']}. Each value is followed by its standard error.",
        "",
        "| student | role | parameters | plan | " + " | ".join(f"{task} {metric}" for task, metric in columns) + " |",
        "|---|---|---:|---|" + "---:|" * len(columns),
    ]
    for student in results["students"]:
        cells = []
        for task, metric in columns:
            values = student["results"][task]
            cells.append(f"{format_number(values.get(metric))} ± {format_number(values.get(stderr_label(metric)))}")
        plan = format_plan(student["plan"]) if student["plan"] else "-"
        identity = f"| {student['name']} | {student['role']} | {student['parameters']:,} | {plan} | "
        lines.append(identity + " | ".join(cells) + " |")
    truncated = {
        task: max(student.get("truncated_requests", {}).get(task, 0) for student in results["students"])
        for task in results["tasks"]
    }
    if any(truncated.values()):
        cut = ", ".join(f"{task} {count:,}" for task, count in truncated.items() if count)
        lines += ["", f"Requests longer than a model's context, cut from the left as lm-eval does (per model): {cut}."]
    if results["baseline"] is not None:
        lines += [
            "",
            f"## Relative improvement over {results['baseline']}",
            "",
            "Positive: better than the baseline; each value ± one standard error (paired over the same documents); "
            "*within noise* where the improvement is smaller than two standard errors.",
            "",
            "| student | " + " | ".join(f"{task} {metric}" for task, metric in columns) + " |",
            "|---|" + "---:|" * len(columns),
        ]
        for name, per_task in results["relative"].items():
            cells = []
            for task, metric in columns:
                value, stderr = per_task[task].get(metric), per_task[task].get(stderr_label(metric))
                cells.append(_relative_cell(value, stderr))
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _relative_cell(value: float | None, stderr: float | None) -> str:
    if value is None:
        return "-"
    text = f"{100 * value:+.2f} % ± {'-' if stderr is None else f'{100 * stderr:.2f} %'}"
    return text + (" *within noise*" if stderr is not None and abs(value) < 2 * stderr else "")


def plot_elastic_curve(results: Mapping[str, Any], path: str | os.PathLike) -> None:
    """One panel per task: its primary metric against parameters for every model, ± one standard error; the students
    (and TA) joined by a line in order of size, the TA a star, the baseline a square and a dotted line."""
    from matplotlib.figure import Figure  # no pyplot: no global state, no display needed

    tasks = results["tasks"]
    figure = Figure(figsize=(5.5 * len(tasks), 4.5), layout="constrained")
    axes = figure.subplots(1, len(tasks), squeeze=False)[0]
    for ax, task in zip(axes, tasks):
        metric = primary_metric(results, task)
        higher = results["task_info"][task]["higher_is_better"][metric.partition(",")[0]]

        def point(student: Mapping[str, Any]) -> tuple[float, float, float]:
            values = student["results"][task]
            return student["parameters"] / 1e6, values[metric], values.get(stderr_label(metric)) or 0.0

        scored = [student for student in results["students"] if metric in student["results"].get(task, {})]
        family = sorted((s for s in scored if s["role"] != "baseline"), key=lambda s: s["parameters"])
        if family:
            xs, ys, errors = zip(*(point(student) for student in family))
            ax.errorbar(xs, ys, yerr=errors, marker="o", capsize=3, label="students")
        for student in scored:
            x, y, error = point(student)
            if student["role"] == "ta":
                ax.plot(x, y, marker="*", markersize=16, linestyle="none", color="tab:orange", label="TA")
            elif student["role"] == "baseline":
                ax.errorbar(
                    x, y, yerr=error, marker="s", markersize=8, capsize=3, color="tab:red",
                    label=f"baseline ({student['name']})",
                )  # fmt: skip
                ax.axhline(y, linestyle=":", color="tab:red")
            ax.annotate(student["name"], (x, y), textcoords="offset points", xytext=(5, 5), fontsize=8)
        if metric == "perplexity":
            ax.set_yscale("log")
        handles, labels = ax.get_legend_handles_labels()
        unique = dict(zip(labels, handles))  # one legend entry per kind of marker
        ax.legend(unique.values(), unique.keys(), fontsize=8)
        ax.set_title(task)
        ax.set_xlabel("parameters (millions)")
        ax.set_ylabel(f"{metric} ({'higher' if higher else 'lower'} is better)")
        ax.grid(alpha=0.3)
    figure.savefig(path, dpi=120)


__all__ = [
    "DATA_FILES",
    "DEFAULT_TASKS",
    "HELDOUT_DEFAULTS",
    "HELDOUT_TASK",
    "agieval_zero_shot",
    "evaluate_students",
    "heldout_documents",
    "last_word_passages",
    "metric_labels",
    "load_agieval_sat_math",
    "load_lambada_heldout",
    "load_lambada_openai",
    "load_results",
    "plot_elastic_curve",
    "primary_metric",
    "read_data_file",
    "relative_improvement",
    "results_for_plan",
    "results_markdown",
    "stderr_label",
    "write_results",
]
