"""Publishing a MatTA family: every student in its own Hub repo, with a model card (see `hf_matta.cards`).

- `write_lineage(...)` saves, at training time, where the nested model comes from (`matta_lineage.json`: base model,
  teacher, data, steps, tokens, optimizer, loss weights, temperatures, hf_matta version and commit), with no local
  path and no token. Students extracted from the model carry the same record (`save_student(..., lineage=...)`).
- `publish_students(source, namespace, ...)` takes a trained nested model (and plans), one student folder or a folder
  of student folders, and either writes the exact repo folders that would be uploaded (the default, no network, no
  token) or, with `push=True`, creates each repo and uploads its files in one commit, skipping repos whose files the
  Hub already holds (compared by sha256 / git blob id), so that a second run makes no commit and an interrupted run
  completes the rest when run again.

The token comes from `HF_TOKEN` or the login cache (`hf auth login`), is checked (whoami, write access to the
namespace) before anything is extracted or uploaded, and appears in no card, log line, error or file.
"""

import hashlib
import json
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from huggingface_hub import CommitOperationAdd, HfApi, RepoFile, constants, get_token
from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError, RevisionNotFoundError
from huggingface_hub.utils import HFValidationError, validate_repo_id
from huggingface_hub.utils.sha import git_hash
from transformers import AutoConfig, GPT2Config

from . import __version__
from .cards import FamilyMember, family_member, human_count, model_card
from .data import TOKENIZER_FILES, load_tokenizer
from .extract import LINEAGE_FILE, extract_student, save_student
from .files import atomic_folder, is_empty_folder, write_json_atomic
from .models.matgpt2 import MatGPT2Config, MatGPT2LMHeadModel
from .widths import Plan, check_plan, count_parameters, format_plan, plan_name, uniform_plans


LINEAGE_FORMAT = 1
DEFAULT_NAME_TEMPLATE = "{base}-matta-{params}-{plan}"
NAME_FIELDS = ("base", "params", "plan")
# What a student folder must hold to be published (weights as safetensors only: no pickled checkpoints).
REQUIRED_FILES = ("config.json", "model.safetensors")
STATUSES = ("created", "updated", "unchanged")  # of a pushed student; a dry run's are all "written"
BRANCH = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/-]{0,199}$")


class PublishError(RuntimeError):
    """The Hub refused or failed a step of publishing (the message says which, and how to finish)."""


@dataclass(frozen=True)
class Published:
    """What happened to one student: `created`, `updated` or `unchanged` on the Hub, or `written` (dry run)."""

    repo_id: str
    plan: tuple[int, ...]
    status: str
    location: str  # the repo's URL, or the dry-run folder
    commit: str | None = None


# --- lineage: recorded at training time ----------------------------------------------------------------------------


def build_lineage(
    model_args: Any, data_args: Any, training_args: Any, config: MatGPT2Config, steps: int, teacher_args: Any = None
) -> dict[str, Any]:
    """The lineage record of a training run, from its three argument dataclasses and the nested model's config.

    Args:
        model_args: the run's model arguments (`model_name_or_path` and `tokenizer_name_or_path` are read).
        data_args: `hf_matta.data.DataArguments`.
        training_args: `MatTATrainingArguments` (the loss, teacher and optimizer fields; never `hub_token`).
        config: the nested model's `MatGPT2Config`.
        steps: optimizer steps taken (`trainer.state.global_step`).
        teacher_args: where `teacher_pretrain_config` and `teacher_pretrain_steps` live, when the run pre-trained
            its teacher (default: `model_args`).

    Local files are recorded as `"local"`: the record names Hub ids only, never a path of this machine.
    """
    tokens_per_step = (
        training_args.per_device_train_batch_size
        * training_args.gradient_accumulation_steps
        * training_args.world_size
        * data_args.block_size
    )
    teacher = _hub_id_or_local(training_args.teacher_model_name_or_path)
    teacher_args = model_args if teacher_args is None else teacher_args
    pretrain_shape = getattr(teacher_args, "teacher_pretrain_config", None)
    nested_config = {
        key: value for key, value in config.to_diff_dict().items() if key not in ("_name_or_path", "auto_map")
    }
    return {
        "format": LINEAGE_FORMAT,
        "base_model": _hub_id_or_local(getattr(model_args, "model_name_or_path", None)),
        "tokenizer": _hub_id_or_local(getattr(model_args, "tokenizer_name_or_path", None)),
        "teacher": teacher,
        "teacher_pretraining": (
            {"shape": pretrain_shape, "steps": teacher_args.teacher_pretrain_steps}
            if teacher == "local" and pretrain_shape
            else None
        ),
        "data": _data_lineage(data_args),
        "nested_config": nested_config,
        "training": {
            "steps": steps,
            "tokens": steps * tokens_per_step,
            "tokens_per_step": tokens_per_step,
            "optimizer": training_args.optimizer or f"{_enum_value(training_args.optim)} (Trainer)",
            "learning_rate": training_args.learning_rate,
            "ta_neuron_lr_scale": training_args.ta_neuron_lr_scale,
            "lr_scheduler_type": _enum_value(training_args.lr_scheduler_type),
            "weight_decay": training_args.weight_decay,
            "block_size": data_args.block_size,
            "seed": training_args.seed,
            "precision": "bf16" if training_args.bf16 else "fp16" if training_args.fp16 else "fp32",
        },
        "loss": {
            "student_weight": training_args.student_weight,
            "ta_weight": training_args.ta_weight,
            "distill_weight": training_args.distill_weight,
            "distill_warmup_steps": training_args.distill_warmup_steps,
            "detach_ta_targets": training_args.detach_ta_targets,
            "teacher_weight": training_args.teacher_weight if teacher else 0.0,
            "teacher_temperature": training_args.teacher_temperature,
            "distill_temperature": training_args.distill_temperature,
            "extra_widths": training_args.extra_widths,
            "width_schedule": training_args.width_schedule,
        },
        "package": {"name": "hf_matta", "version": __version__, "commit": _package_commit()},
    }


def write_lineage(
    output_dir: str | Path,
    model_args: Any,
    data_args: Any,
    training_args: Any,
    config: MatGPT2Config,
    steps: int,
    teacher_args: Any = None,
) -> Path:
    """Save `build_lineage(...)` as `output_dir/matta_lineage.json` (next to the nested model); returns the path."""
    lineage = build_lineage(model_args, data_args, training_args, config, steps, teacher_args)
    return write_json_atomic(Path(output_dir) / LINEAGE_FILE, lineage)


def read_lineage(folder: str | Path) -> dict[str, Any] | None:
    """The lineage record saved in a model or student folder, or None if it has none."""
    path = Path(folder) / LINEAGE_FILE
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON ({error}); it is written by hf_matta at training time.") from None


def _hub_id_or_local(name_or_path: str | None) -> str | None:
    """A Hub id as it is; anything on this machine (or not shaped as a Hub id) as `"local"`; None as None."""
    if name_or_path is None:
        return None
    if Path(name_or_path).exists() or name_or_path.startswith((".", "/", "~")):
        return "local"
    try:
        validate_repo_id(name_or_path)
    except HFValidationError:
        return "local"
    return name_or_path


def _enum_value(value: Any) -> str:
    """Transformers' option enums (`OptimizerNames.ADAMW_TORCH`) as the string a config file gives."""
    return str(getattr(value, "value", value))


def _data_lineage(data_args: Any) -> dict[str, Any]:
    if data_args.dataset_name is not None:
        return {
            "datasets": [data_args.dataset_name],
            "config": data_args.dataset_config_name,
            "description": f"Hub dataset, subset {data_args.dataset_config_name}"
            if data_args.dataset_config_name
            else "Hub dataset",
        }
    if data_args.builtin_corpus is not None:
        return {"datasets": "local", "description": f"`{data_args.builtin_corpus}`, text that ships with Python"}
    return {"datasets": "local", "description": "local text files"}


def _package_commit() -> str | None:
    """The git commit of the hf_matta source tree, when it is a git checkout (None for an installed wheel)."""
    try:
        result = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    commit = result.stdout.strip()
    return commit if result.returncode == 0 and re.fullmatch(r"[0-9a-f]{40}", commit) else None


# --- access: the token, checked before any work -------------------------------------------------------------------


def check_hub_access(namespace: str, api: HfApi | None = None) -> tuple[HfApi, str]:
    """The client and token for publishing to `namespace`, after the Hub has confirmed the token may write there.

    Raises:
        ValueError: offline mode is on, or there is no token (neither `HF_TOKEN` nor the login cache).
        PublishError: the Hub rejected the token, the token is read-only, or `namespace` is neither the token's user
            nor one of its organizations.
    """
    api = api or HfApi()
    if constants.HF_HUB_OFFLINE:
        raise ValueError(
            "HF_HUB_OFFLINE is set: publishing needs the Hub. Unset it, or write the repo folders with a dry run "
            "(--dry-run --out DIR)."
        )
    token = get_token()
    if token is None:
        raise ValueError(
            "no Hugging Face token: set HF_TOKEN or run `hf auth login` (a token with write access, from "
            f"{api.endpoint}/settings/tokens); a dry run (--dry-run --out DIR) needs none."
        )
    source = "HF_TOKEN" if os.environ.get("HF_TOKEN") == token else "the login cache"
    with _hub_errors(token, f"checking the token from {source} with {api.endpoint}"):
        try:
            whoami = api.whoami(token=token)
        except HfHubHTTPError as error:
            if error.response is not None and error.response.status_code == 401:
                raise PublishError(
                    f"the Hub at {api.endpoint} rejected the token from {source} (401 Unauthorized): create a token "
                    f"with write access at {api.endpoint}/settings/tokens, then set HF_TOKEN or run `hf auth login`."
                ) from None
            raise
    user, orgs = whoami["name"], [org["name"] for org in whoami.get("orgs", [])]
    if whoami.get("auth", {}).get("accessToken", {}).get("role") == "read":
        raise PublishError(
            f"the token from {source} (user {user!r}) is read-only: publishing needs a token with write access."
        )
    if namespace not in (user, *orgs):
        raise PublishError(
            f"the token from {source} belongs to {user!r}, which cannot write to namespace {namespace!r}: use "
            f"{user!r}{' or one of ' + ', '.join(map(repr, orgs)) if orgs else ''}, or a token of that namespace."
        )
    return api, token


@contextmanager
def _hub_errors(token: str, doing: str) -> Iterator[None]:
    """Any failure of a Hub call as a `PublishError` that says what was being done, with the token redacted."""
    try:
        yield
    except PublishError:
        raise
    except HfHubHTTPError as error:
        status = error.response.status_code if error.response is not None else "no answer"
        detail = error.server_message or str(error).splitlines()[0]
        raise PublishError(f"{doing}: the Hub answered {status}: {detail}".replace(token, "<token>")) from error
    except Exception as error:  # network failures of the HTTP client (connection refused, timeouts) and the like
        raise PublishError(f"{doing}: {type(error).__name__}: {error}".replace(token, "<token>")) from error


# --- publishing ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Family:
    """What is published: the nested model's config and lineage, and each member with the folder it comes from."""

    config: MatGPT2Config
    lineage: dict | None
    members: list[FamilyMember]
    folders: dict[str, Path | None]  # repo id -> the student folder, or None: extracted from the nested model
    nested_dir: Path | None


def publish_students(
    source: str | Path,
    namespace: str,
    plans: Sequence[Plan] | None = None,
    *,
    push: bool = False,
    out_dir: str | Path | None = None,
    overwrite: bool = False,
    name_template: str | None = None,
    private: bool = False,
    revision: str | None = None,
    collection: str | None = None,
    results: str | Path | dict | None = None,
    license: str | None = None,
    log: Callable[[str], None] | None = print,
) -> list[Published]:
    """Publish a MatTA family: each student in its own repo `namespace/<name>`, with its model card.

    Args:
        source: a trained nested model folder (students are extracted from it for `plans`), one student folder, or a
            folder of student folders (as `hf-matta extract` writes them; they carry the lineage record).
        namespace: the user or organization that owns the repos.
        plans: for a nested model, the students' per-layer FFN widths (as `hf-matta extract --plan` takes them);
            default: every trained granularity, from the student to the TA. Must be None for student folders.
        push: upload to the Hub (token from `HF_TOKEN` or the login cache). Default: a dry run into `out_dir`.
        out_dir: dry run only: the folder receiving one folder per repo, exactly the files that would be uploaded
            (written to a temporary folder, renamed when complete).
        overwrite: dry run only: replace `out_dir` if it already holds files.
        name_template: repo names (default `DEFAULT_NAME_TEMPLATE`) from `{base}` (the base model's name, or
            `matgpt2`), `{params}` (e.g. `1.31M`) and `{plan}` (e.g. `ffn256` or `ffn256x2-512x2`); the rendered
            names must differ.
        private: create the repos (and the collection) private; existing repos keep their visibility.
        revision: the branch to commit to (created from `main` if missing); default `main`.
        collection: the title of a collection in `namespace` gathering the family (created if missing).
        results: `hf-matta eval`'s results.json (a path or the loaded dict); students are matched by plan and their
            results written as `model-index` entries.
        license: the cards' license id; default: the base model's when known, else hf_matta's (stated in the card).
        log: receives one line per student and a summary (None: silent).

    Returns:
        One `Published` per student, in the order of `plans` (or of the folders).

    Raises:
        ValueError / FileNotFoundError / FileExistsError: bad input, found before anything is extracted or uploaded
            (no token, invalid names, a folder that is not a model, a dry-run folder that exists).
        PublishError: a Hub failure; the message lists what was published before it. Running again completes.
    """
    log = log or (lambda line: None)
    if push == (out_dir is not None):
        raise ValueError("give either push=True (upload) or out_dir (dry run), not both or neither.")
    if revision is not None and (not BRANCH.match(revision) or ".." in revision):
        raise ValueError(f"revision {revision!r} is not a valid branch name; use letters, digits, '.', '_', '-', '/'.")
    family = _read_family(Path(source), namespace, plans, name_template or DEFAULT_NAME_TEMPLATE)
    if isinstance(results, (str, Path)):
        from .evaluation import load_results  # lm-eval (the `eval` extra) loads only when results are given

        results = load_results(results)
    if push:
        api, token = check_hub_access(namespace)
        with tempfile.TemporaryDirectory(prefix="hf-matta-publish-") as staging:
            folders = _stage(family, Path(staging), api.endpoint, results, revision, license)
            return _push_family(api, token, family, folders, revision, private, collection, log)
    out_dir = Path(out_dir)
    if not overwrite and not is_empty_folder(out_dir):
        raise FileExistsError(f"{out_dir} exists and is not empty; pass overwrite=True (--overwrite) to replace it.")
    with atomic_folder(out_dir, replace=overwrite) as staging:  # the folder appears complete, or not at all
        _stage(family, staging, constants.ENDPOINT, results, revision, license)
    published = [
        Published(m.repo_id, m.plan, "written", str(out_dir / m.repo_id.split("/")[1])) for m in family.members
    ]
    for item in published:
        log(f"written    {item.repo_id:<48} {item.location} ({_count_files(Path(item.location))} files)")
    if collection is not None:
        log(f"collection {collection!r} of {namespace} would gather these {len(published)} repos")
    log(f"{len(published)} repo folders written to {out_dir} (dry run: nothing uploaded)")
    return published


def _push_family(
    api: HfApi,
    token: str,
    family: _Family,
    folders: dict[str, Path],
    revision: str | None,
    private: bool,
    collection: str | None,
    log: Callable[[str], None],
) -> list[Published]:
    """Push every staged repo folder, then gather the collection; one progress line each and a summary."""
    published = []
    for member in family.members:
        with _hub_errors(token, _progress_so_far(f"publishing {member.repo_id}", published)):
            item = _push_student(api, token, member, folders[member.repo_id], revision, private)
        published.append(item)
        log(f"{item.status:<10} {item.repo_id:<48} {item.location}" + _commit_note(item))
    if collection is not None:
        namespace = family.members[0].repo_id.split("/")[0]
        with _hub_errors(token, _progress_so_far(f"gathering the collection {collection!r}", published)):
            url = _collect(api, token, namespace, collection, family.members, private)
        log(f"collection {collection!r}: {url}")
    counts = {status: sum(item.status == status for item in published) for status in STATUSES}
    log(f"{len(published)} students: " + ", ".join(f"{count} {status}" for status, count in counts.items()))
    return published


def repo_names(
    config: MatGPT2Config, lineage: dict | None, plans: Sequence[Sequence[int]], template: str
) -> list[str]:
    """The repo name (without namespace) of each plan from `template`; `ValueError` for an unknown field or two plans
    that get the same name."""
    fields = set(re.findall(r"{([^{}]*)}", template))
    unknown = fields - set(NAME_FIELDS)
    if unknown:
        raise ValueError(
            f"name template {template!r} uses {sorted(unknown)}; the fields are {{base}}, {{params}} and {{plan}}."
        )
    base_model = (lineage or {}).get("base_model")
    base = base_model.split("/")[-1] if base_model and base_model != "local" else "matgpt2"
    names = [
        template.format(base=base, params=human_count(count_parameters(config, plan)), plan=plan_name(plan))
        for plan in plans
    ]
    for idx, name in enumerate(names):
        if name in names[:idx]:
            other = plans[names.index(name)]
            raise ValueError(
                f"name template {template!r} gives plans {format_plan(other)} and {format_plan(plans[idx])} the same "
                f"name {name!r}; add {{plan}} to it."
            )
    return names


def _read_family(source: Path, namespace: str, plans: Sequence[Plan] | None, template: str) -> _Family:
    """Everything about the family that can be checked without extracting or uploading anything."""
    if not source.is_dir():
        raise FileNotFoundError(f"{str(source)!r} is not a folder; give a trained nested model or student folders.")
    nested = _nested_config(source)
    if nested is not None:
        lineage = read_lineage(source)
        _check_tokenizer(source)
        widths = [check_plan(nested, plan) for plan in plans] if plans else uniform_plans(nested)
        folders = dict.fromkeys(widths)  # None: extracted from the nested model
        nested_dir = source
    else:
        if plans:
            raise ValueError(f"{source} holds extracted students: plans apply to a nested model folder only.")
        student_dirs = [source] if (source / "config.json").is_file() else sorted(
            folder for folder in source.iterdir() if (folder / "config.json").is_file()
        )  # fmt: skip
        if not student_dirs:
            raise FileNotFoundError(
                f"{source} holds no model: give a trained nested model folder, a student folder, or a folder of "
                "student folders (as `hf-matta extract` writes them)."
            )
        lineage, nested, folders = _read_students(student_dirs)
        nested_dir = None
    names = repo_names(nested, lineage, list(folders), template)
    members = []
    for name, plan in zip(names, folders):
        repo_id = f"{namespace}/{name}"
        try:
            validate_repo_id(repo_id)
        except HFValidationError as error:
            raise ValueError(
                f"repo id {repo_id!r} is not valid ({error}); choose another namespace or --name-template."
            ) from None
        members.append(family_member(nested, repo_id, plan))
    by_repo = {member.repo_id: folders[member.plan] for member in members}
    return _Family(nested, lineage, members, by_repo, nested_dir)


def _nested_config(folder: Path) -> MatGPT2Config | None:
    """The config of a trained nested model in `folder` (one with granularities), or None for anything else."""
    if not (folder / "config.json").is_file():
        return None
    config = AutoConfig.from_pretrained(folder)
    return config if isinstance(config, MatGPT2Config) and config.mat_widths else None


def _check_tokenizer(folder: Path) -> None:
    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        raise FileNotFoundError(
            f"{folder} has no tokenizer ({' or '.join(TOKENIZER_FILES)}); a published model needs one: save it with "
            "the model (`tokenizer.save_pretrained`), as the training recipe and `hf-matta extract` do."
        )


def _read_students(folders: Sequence[Path]) -> tuple[dict, MatGPT2Config, dict[tuple[int, ...], Path]]:
    """The shared lineage, the nested config it records, and each student folder keyed by its plan."""
    lineages = {}
    for folder in folders:
        missing = [name for name in REQUIRED_FILES if not (folder / name).is_file()]
        if missing:
            raise FileNotFoundError(
                f"student folder {folder} lacks {missing}; extract it again with hf-matta extract."
            )
        _check_tokenizer(folder)
        lineage = read_lineage(folder)
        if lineage is None:
            raise FileNotFoundError(
                f"student folder {folder} has no {LINEAGE_FILE}, so its card cannot say where it comes from: publish "
                "from the nested model folder instead, or extract the student again from a model trained with "
                "hf_matta's recipe (which records the lineage)."
            )
        lineages[folder] = lineage
    if len({json.dumps(lineage, sort_keys=True) for lineage in lineages.values()}) > 1:
        raise ValueError(
            f"the student folders {[str(f) for f in folders]} come from different training runs (their "
            f"{LINEAGE_FILE} differ); publish one family at a time."
        )
    lineage = lineages[folders[0]]
    nested = MatGPT2Config(**lineage["nested_config"])
    by_plan = {}
    for folder in folders:
        config = AutoConfig.from_pretrained(folder)
        width = config.n_inner if config.n_inner is not None else 4 * config.n_embd
        plan = tuple(width) if isinstance(width, list) else (width,) * config.n_layer
        shape = ("n_layer", "n_embd", "n_head", "vocab_size", "n_positions")
        if not isinstance(config, (GPT2Config, MatGPT2Config)) or any(
            getattr(config, key) != getattr(nested, key) for key in shape
        ):
            raise ValueError(f"{folder} is not a student of the nested model its {LINEAGE_FILE} describes.")
        if isinstance(config, MatGPT2Config) and not (folder / "modeling_matgpt2.py").is_file():
            raise FileNotFoundError(f"{folder} is a mixed student without its modeling files; extract it again.")
        by_plan[check_plan(nested, plan)] = folder
    return lineage, nested, by_plan


def _stage(
    family: _Family, staging: Path, endpoint: str, results: dict | None, revision: str | None, license: str | None
) -> dict[str, Path]:
    """Write each repo's folder under `staging/<name>`: the student's files and its card. Returns repo id -> folder."""
    model = tokenizer = None
    if family.nested_dir is not None:
        model = MatGPT2LMHeadModel.from_pretrained(family.nested_dir)
        tokenizer = load_tokenizer(family.nested_dir)
    folders = {}
    for member in family.members:
        folder = staging / member.repo_id.split("/")[1]
        source = family.folders[member.repo_id]
        if source is None:
            save_student(extract_student(model, list(member.plan)), folder, tokenizer, lineage=family.lineage)
        else:
            shutil.copytree(source, folder, ignore=shutil.ignore_patterns(".*", "README.md", "__pycache__"))
        pin = revision
        if len(set(member.plan)) > 1:  # remote code: the card pins the tag of exactly these files
            pin = _content_tag(folder)
        evaluated = _evaluated(results, member.plan)
        card = model_card(
            member,
            family.members,
            family.config,
            family.lineage,
            endpoint,
            task_results=evaluated["results"] if evaluated else None,
            lm_eval_version=(results or {}).get("lm_eval_version"),
            revision=pin,
            license=license,
        )
        card.save(folder / "README.md")
        folders[member.repo_id] = folder
    return folders


def _evaluated(results: dict | None, plan: tuple[int, ...]) -> dict | None:
    """The evaluated student of `hf-matta eval`'s results whose plan is `plan`, if any."""
    if not results:
        return None
    from .evaluation import results_for_plan

    return results_for_plan(results, plan)


def _content_tag(folder: Path) -> str:
    """A tag naming the content of every file but the card: the same files always get the same tag."""
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and p.name != "README.md"):
        digest.update(f"{path.relative_to(folder).as_posix()}\0{_sha256(path)}\n".encode())
    return f"matta-{digest.hexdigest()[:12]}"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _push_student(
    api: HfApi, token: str, member: FamilyMember, folder: Path, revision: str | None, private: bool
) -> Published:
    """Create the repo (and branch) if needed, then commit the files that differ from the Hub's, all in one commit."""
    repo_id, branch = member.repo_id, revision or "main"
    status = "updated"
    try:
        head = api.repo_info(repo_id, revision=branch, token=token).sha
    except RepositoryNotFoundError:
        api.create_repo(repo_id, private=private, exist_ok=True, token=token)
        status = "created"
        head = None
    except RevisionNotFoundError:
        head = None
    if head is None:
        if branch != "main":
            api.create_branch(repo_id, branch=branch, exist_ok=True, token=token)
        head = api.repo_info(repo_id, revision=branch, token=token).sha
    remote = {
        entry.path: entry.lfs.sha256 if entry.lfs is not None else entry.blob_id
        for entry in api.list_repo_tree(repo_id, revision=head, recursive=True, token=token)
        if isinstance(entry, RepoFile)
    }
    local = sorted(p for p in folder.rglob("*") if p.is_file())
    changed = []
    for path in local:
        name = path.relative_to(folder).as_posix()
        known = remote.get(name)
        if known is None or known not in (_sha256(path), git_hash(path.read_bytes())):
            changed.append(CommitOperationAdd(path_in_repo=name, path_or_fileobj=str(path)))
    commit = None
    if changed:
        info = api.create_commit(
            repo_id,
            operations=changed,
            commit_message=f"Publish {repo_id.split('/')[1]} (FFN {format_plan(member.plan)})",
            commit_description=f"{len(changed)} of {len(local)} files changed; written by hf_matta {__version__}.",
            revision=branch,
            parent_commit=head,  # fails, instead of overwriting, if someone pushed since the comparison
            token=token,
        )
        commit = head = info.oid
    elif status == "updated":
        status = "unchanged"
    if len(set(member.plan)) > 1:
        api.create_tag(repo_id, tag=_content_tag(folder), revision=head, exist_ok=True, token=token)
    return Published(repo_id, member.plan, status, f"{api.endpoint}/{repo_id}", commit)


def _collect(
    api: HfApi, token: str, namespace: str, title: str, members: Sequence[FamilyMember], private: bool
) -> str:
    """Create (or find) the collection `title` in `namespace` and add every member not in it yet."""
    collection = api.create_collection(title, namespace=namespace, private=private, exists_ok=True, token=token)
    present = {item.item_id for item in collection.items}
    for member in sorted(members, key=lambda m: (m.parameters, m.plan)):
        if member.repo_id not in present:
            note = f"{human_count(member.parameters)} parameters, FFN {format_plan(member.plan)} ({member.role})"
            api.add_collection_item(collection.slug, member.repo_id, "model", note=note, exists_ok=True, token=token)
    return collection.url


def _progress_so_far(doing: str, published: Sequence[Published]) -> str:
    done = ", ".join(f"{item.repo_id} ({item.status})" for item in published) or "nothing"
    return f"{doing} (done before: {done}; run the same command again to finish, finished repos are skipped)"


def _commit_note(item: Published) -> str:
    return f" (commit {item.commit[:10]})" if item.commit else ""


def _count_files(folder: Path) -> int:
    return sum(1 for path in folder.rglob("*") if path.is_file())


__all__ = [
    "DEFAULT_NAME_TEMPLATE",
    "LINEAGE_FILE",
    "PublishError",
    "Published",
    "build_lineage",
    "check_hub_access",
    "publish_students",
    "read_lineage",
    "repo_names",
    "write_lineage",
]
