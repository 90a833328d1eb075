"""Model cards of published students, built with `huggingface_hub`'s `ModelCard` / `ModelCardData`.

A card says where the student comes from (teacher -> TA -> student, base model, data, the training run, from the
lineage record saved at training time), what it is (per-layer FFN widths, parameters and FLOPs per token relative to
the TA), how well it does (lm-eval results as `model-index` entries, when `hf-matta eval` results are given), how to
load it (no remote code for uniform students; remote code pinned to a tag for mixed ones) and its siblings.

Cards are deterministic (no dates, no timings): publishing the same family twice gives byte-identical cards, which is
what lets `hf_matta.hub` skip unchanged repos.
"""

from collections.abc import Sequence
from dataclasses import dataclass

from huggingface_hub import EvalResult, ModelCard, ModelCardData

from .models.matgpt2 import MatGPT2Config
from .widths import count_flops_per_token, count_parameters, format_plan, uniform_plans


# The license of a student whose base model is unknown or absent: the package's own (pyproject.toml).
PACKAGE_LICENSE = "apache-2.0"
CARD_TAGS = ["matta", "matformer", "mix-n-match", "distillation", "gpt2"]
# Licenses of the base models the recipes grow from, as their Hub cards declare them.
KNOWN_LICENSES = {
    f"{namespace}{name}": "mit"
    for namespace in ("", "openai-community/")
    for name in ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")
}
# lm-eval task -> (Hub dataset id, pretty name, split) for `model-index`; other tasks are named by themselves.
TASK_DATASETS = {
    "lambada_openai": ("EleutherAI/lambada_openai", "LAMBADA (OpenAI)", "test"),
    "agieval_sat_math": ("dmayhem93/agieval-sat-math", "AGIEval SAT Math", "test"),
}
METRIC_NAMES = {"acc": "accuracy", "acc_norm": "normalized accuracy", "perplexity": "perplexity"}
PAPER = "[MatTA](https://arxiv.org/abs/2505.23337) (Matryoshka teaching assistants, Verma et al., KDD 2025)"


@dataclass(frozen=True)
class FamilyMember:
    """One student of a published family: its repo, per-layer FFN widths, size and role."""

    repo_id: str
    plan: tuple[int, ...]
    parameters: int
    flops_per_token: int
    role: str


def family_member(config: MatGPT2Config, repo_id: str, plan: Sequence[int]) -> FamilyMember:
    """The member of `config`'s family that serves `plan` (one width per layer) from `repo_id`."""
    plan = tuple(plan)
    uniform = len(set(plan)) == 1
    if plan == tuple(config.n_inner):
        role = "TA"
    elif uniform and plan[0] == config.student_width:
        role = "student"
    elif uniform and plan in uniform_plans(config):
        role = "granularity"
    else:
        role = "Mix'n'Match"
    return FamilyMember(repo_id, plan, count_parameters(config, plan), count_flops_per_token(config, plan), role)


def human_count(count: int) -> str:
    """`354823168` -> `355M`, `1310720` -> `1.31M`, `10496` -> `10.5K` (three significant digits)."""
    for factor, suffix in ((10**9, "B"), (10**6, "M"), (10**3, "K")):
        if count >= factor:
            return f"{count / factor:.3g}{suffix}"
    return str(count)


@dataclass(frozen=True)
class Score:
    """One evaluation number of a student: lm-eval's task, metric label (`acc`, `exact_match,strict-match`), value
    and standard error (None where lm-eval gave none)."""

    task: str
    metric: str
    value: float
    stderr: float | None


def scores(task_results: dict[str, dict[str, float | None]] | None) -> list[Score]:
    """A student's `results` from `hf-matta eval`'s results.json (`hf_matta.evaluation.results_for_plan`) as scores."""
    if not task_results:
        return []
    from .evaluation import metric_labels, stderr_label  # lm-eval loads only when there are results to show

    return [
        Score(task, label, float(metrics[label]), metrics.get(stderr_label(label)))
        for task, metrics in task_results.items()
        for label in metric_labels(metrics)
        if isinstance(metrics[label], (int, float)) and not isinstance(metrics[label], bool)
    ]


def eval_results(student_scores: Sequence[Score]) -> list[EvalResult]:
    """Scores as `model-index` entries, one per task and metric (standard errors stay in the card's prose)."""
    entries = []
    for score in student_scores:
        dataset_type, dataset_name, split = TASK_DATASETS.get(score.task, (score.task, score.task, None))
        metric, _, filter_name = score.metric.partition(",")
        name = METRIC_NAMES.get(metric, metric) + (f" ({filter_name})" if filter_name else "")
        entries.append(
            EvalResult(
                task_type="text-generation",
                task_name=score.task,
                dataset_type=dataset_type,
                dataset_name=dataset_name,
                dataset_split=split,
                metric_type=metric,
                metric_name=name,
                metric_value=score.value,
            )
        )
    return entries


def model_card(
    member: FamilyMember,
    family: Sequence[FamilyMember],
    config: MatGPT2Config,
    lineage: dict | None,
    endpoint: str,
    *,
    task_results: dict[str, dict[str, float | None]] | None = None,
    lm_eval_version: str | None = None,
    revision: str | None = None,
    license: str | None = None,
) -> ModelCard:
    """The model card of `member`, one of `family` (the students published together), all cut from the nested model
    whose config is `config` and whose training run `lineage` describes (None: not recorded).

    `endpoint` is the Hub the repos live on (links); `revision` the branch or, for a mixed student, the tag that the
    loading snippet pins; `license` overrides the base model's (or the package's) license.
    """
    lineage = lineage or {}
    base_model = _hub_id(lineage.get("base_model"))
    license, license_source = _license(license, base_model)
    datasets = lineage.get("data", {}).get("datasets")
    student_scores = scores(task_results)
    evaluations = eval_results(student_scores)
    data = ModelCardData(
        library_name="transformers",
        pipeline_tag="text-generation",
        base_model=base_model,
        base_model_relation="finetune" if base_model else None,
        license=license,
        datasets=datasets if isinstance(datasets, list) and datasets else None,
        tags=CARD_TAGS + (["custom_code"] if len(set(member.plan)) > 1 else []),
        model_name=member.repo_id.split("/")[-1] if evaluations else None,
        eval_results=evaluations or None,
    )
    ta = family_member(config, "", config.n_inner)
    sections = [
        _intro(member, ta),
        _lineage_section(member, family, lineage, base_model, ta, endpoint),
        _widths_section(member, ta, config),
        _training_section(lineage),
        _evaluation_section(student_scores, lm_eval_version),
        _loading_section(member, revision),
        _family_section(member, family, endpoint),
        f"## License\n\n`{license}`: {license_source}.",
    ]
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n\n".join(sections) + "\n")


def _hub_id(value: str | None) -> str | None:
    """A Hub model id from the lineage (`"local"` and None name no Hub model)."""
    return value if value and value != "local" else None


def _license(override: str | None, base_model: str | None) -> tuple[str, str]:
    """The card's license and where it comes from, in words."""
    if override:
        return override, "chosen by the publisher"
    if base_model in KNOWN_LICENSES:
        return KNOWN_LICENSES[base_model], f"the license of the base model {base_model}"
    reason = f"the license of {base_model} is not known to hf_matta" if base_model else "there is no base model"
    return PACKAGE_LICENSE, f"hf_matta's default license ({reason}); check it suits the teacher and the data"


def _link(repo_id: str, endpoint: str) -> str:
    return f"[{repo_id}]({endpoint}/{repo_id})"


def _intro(member: FamilyMember, ta: FamilyMember) -> str:
    kind = "a uniform" if len(set(member.plan)) == 1 else "a Mix'n'Match (per-layer)"
    what = {
        "TA": "the teaching assistant (TA) itself: the nested model at full width",
        "student": "the student the run trained, nested inside its TA",
        "granularity": "one of the trained granularities between the student and the TA",
        "Mix'n'Match": "a Mix'n'Match student: each layer at one of the trained granularities",
    }[member.role]
    return (
        f"# {member.repo_id.split('/')[-1]}\n\n"
        f"A GPT-2 language model with {kind} choice of FFN widths ({format_plan(member.plan)}), "
        f"{human_count(member.parameters)} parameters ({member.parameters / ta.parameters:.1%} of its TA). It is "
        f"{what}. It was cut out of one nested model trained with {PAPER}, without further training: its weights "
        "are the first neurons of each FFN layer of the TA, everything else shared."
    )


def _lineage_section(
    member: FamilyMember,
    family: Sequence[FamilyMember],
    lineage: dict,
    base_model: str | None,
    ta: FamilyMember,
    endpoint: str,
) -> str:
    if not lineage:
        return "## Lineage\n\nThe training run of this model did not record its lineage (no `matta_lineage.json`)."
    teacher = lineage.get("teacher")
    if teacher is None:
        teacher_text = "no teacher (the TA learned from the labels alone)"
    elif teacher == "local":
        pretrain = lineage.get("teacher_pretraining")
        teacher_text = "a local teacher" + (
            f" (GPT-2 `{pretrain['shape']}`, pre-trained on the same data for {pretrain['steps']} steps)"
            if pretrain
            else ""
        )
    else:
        teacher_text = _link(teacher, endpoint)
    ta_repo = next((m.repo_id for m in family if m.plan == ta.plan), None)
    ta_text = f"TA ({_link(ta_repo, endpoint)})" if ta_repo and ta_repo != member.repo_id else "TA"
    chain = f"teacher: {teacher_text} -> {ta_text} -> **this model**"
    if member.role == "TA":
        chain = f"teacher: {teacher_text} -> **this model (the TA)** -> its nested students"
    base = (
        f"grown from {_link(base_model, endpoint)} (`MatGPT2LMHeadModel.from_gpt2`: pretrained neurons first, "
        "new FFN neurons added for the TA)"
        if base_model
        else ("a local pretrained GPT-2" if lineage.get("base_model") == "local" else "trained from scratch")
    )
    return f"## Lineage\n\n{chain}\n\nThe nested model was {base}."


def _widths_section(member: FamilyMember, ta: FamilyMember, config: MatGPT2Config) -> str:
    rows = ["| layers | FFN width | of the TA's |", "|---|---|---|"]
    start = 0
    for idx in range(1, len(member.plan) + 1):  # runs of equal widths, one row each
        if idx == len(member.plan) or member.plan[idx] != member.plan[start]:
            layers = str(start) if idx - start == 1 else f"{start}-{idx - 1}"
            share = member.plan[start] / ta.plan[start]
            rows.append(f"| {layers} | {member.plan[start]} | {share:.0%} |")
            start = idx
    sizes = [
        f"| | parameters | FLOPs per token (forward, {config.n_positions} tokens of context) |",
        "|---|---|---|",
        f"| this model | {member.parameters:,} ({member.parameters / ta.parameters:.1%}) | "
        f"{member.flops_per_token:,} ({member.flops_per_token / ta.flops_per_token:.1%}) |",
        f"| TA | {ta.parameters:,} (100%) | {ta.flops_per_token:,} (100%) |",
    ]
    return (
        f"## Per-layer FFN widths\n\n{config.n_layer} layers, hidden size {config.n_embd}, {config.n_head} heads, "
        f"vocabulary {config.vocab_size}, context {config.n_positions}; trained granularities "
        f"{', '.join(map(str, config.mat_widths))}.\n\n" + "\n".join(rows) + "\n\n" + "\n".join(sizes)
    )


def _training_section(lineage: dict) -> str:
    if not lineage:
        return "## Training\n\nNot recorded."
    training, loss, data, package = (lineage.get(key, {}) for key in ("training", "loss", "data", "package"))
    datasets = data.get("datasets")
    data_text = ", ".join(f"`{d}`" for d in datasets) if isinstance(datasets, list) else "local data"
    if data.get("description"):
        data_text += f" ({data['description']})"
    version = package.get("version", "?") + (f", commit `{package['commit'][:12]}`" if package.get("commit") else "")
    optimizer = f"`{training.get('optimizer')}`, learning rate {training.get('learning_rate')}"
    if training.get("ta_neuron_lr_scale", 1) != 1:
        optimizer += f" (x {training['ta_neuron_lr_scale']} for the FFN neurons beyond the student's width)"
    rows = [
        ("data", data_text),
        ("optimizer steps", f"{training.get('steps', '?'):,}" if "steps" in training else "?"),
        ("training tokens", f"{training['tokens']:,}" if "tokens" in training else "?"),
        ("optimizer", optimizer),
        ("tokens per step", f"{training['tokens_per_step']:,}" if "tokens_per_step" in training else "?"),
        (
            "loss weights",
            f"student {loss.get('student_weight')}, TA {loss.get('ta_weight')}, distillation "
            f"{loss.get('distill_weight')} (warm-up {loss.get('distill_warmup_steps')}), teacher share "
            f"{loss.get('teacher_weight')}",
        ),
        (
            "temperatures",
            f"teacher {loss.get('teacher_temperature')}, distillation {loss.get('distill_temperature')}",
        ),
        ("trained widths", f"extra widths `{loss.get('extra_widths')}`, schedule `{loss.get('width_schedule')}`"),
        ("software", f"hf_matta {version}"),
    ]
    table = "\n".join(f"| {name} | {value} |" for name, value in rows)
    return (
        f"## Training\n\nOne MatTA run trained the TA and its nested students together.\n\n| | |\n|---|---|\n{table}"
    )


def _evaluation_section(student_scores: Sequence[Score], lm_eval_version: str | None) -> str:
    if not student_scores:
        return "## Evaluation\n\nNo evaluation results were given when this card was written (`hf-matta eval`)."
    from .evaluation import format_number  # the numbers as hf-matta eval's own table writes them

    rows = [
        f"| {s.task} | {s.metric} | {format_number(s.value)} | {format_number(s.stderr)} |" for s in student_scores
    ]
    version = f" {lm_eval_version}" if lm_eval_version else ""
    return (
        f"## Evaluation\n\nSelf-reported, with lm-evaluation-harness{version} (`hf-matta eval`); also in this card's "
        "`model-index` metadata.\n\n| task | metric | value | stderr |\n|---|---|---|---|\n" + "\n".join(rows)
    )


def _loading_section(member: FamilyMember, revision: str | None) -> str:
    repo_id = member.repo_id
    if len(set(member.plan)) == 1:
        pin = f', revision="{revision}"' if revision else ""
        code = (
            "from transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
            f'model = AutoModelForCausalLM.from_pretrained("{repo_id}"{pin})\n'
            f'tokenizer = AutoTokenizer.from_pretrained("{repo_id}"{pin})'
        )
        note = "A stock `GPT2LMHeadModel`: no custom code."
    else:
        code = (
            "from transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
            "model = AutoModelForCausalLM.from_pretrained(\n"
            f'    "{repo_id}",\n'
            "    trust_remote_code=True,  # runs modeling_matgpt2.py from this repo: read it first\n"
            f'    revision="{revision}",  # the tag of the code and weights this card describes\n'
            ")\n"
            f'tokenizer = AutoTokenizer.from_pretrained("{repo_id}", revision="{revision}")'
        )
        note = (
            "Per-layer widths need `MatGPT2LMHeadModel`, whose code (`modeling_matgpt2.py`, "
            "`configuration_matgpt2.py`, torch and transformers only) ships in this repo. Pinning the revision "
            "keeps later pushes of other code from running on your machine. With hf_matta installed, `import "
            "hf_matta` and load without `trust_remote_code`: the installed class runs, no code from the repo."
        )
    return f"## How to load\n\n```python\n{code}\n```\n\n{note}"


def _family_section(member: FamilyMember, family: Sequence[FamilyMember], endpoint: str) -> str:
    rows = ["| model | FFN widths | parameters | role |", "|---|---|---|---|"]
    for sibling in sorted(family, key=lambda m: (m.parameters, m.plan)):
        name = _link(sibling.repo_id, endpoint) + (" (this model)" if sibling == member else "")
        rows.append(f"| {name} | {format_plan(sibling.plan)} | {human_count(sibling.parameters)} | {sibling.role} |")
    return "## The family\n\nAll cut from the same nested model:\n\n" + "\n".join(rows)


__all__ = ["FamilyMember", "Score", "eval_results", "family_member", "human_count", "model_card", "scores"]
