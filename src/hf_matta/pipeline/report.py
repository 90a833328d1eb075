"""The run's report: `output_dir/report.md` and `output_dir/elastic_curve.png`, written from the stages' JSON files.

Every number in the report is read from a file beside it (`stages/*.json`, `eval/validation.json`,
`eval/results.json`, `eval/teacher_results.json`, `matta_summary.json`), never recomputed, so the two always agree.
`provenance` and `write_section` are also what the benchmarks use to write their results files.
"""

import datetime
import json
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

from .. import __version__
from ..files import write_text_atomic
from .arguments import STAGES


REPORT_FILE = "report.md"
CURVE_FILE = "elastic_curve.png"
VALIDATION_TASK = "validation"  # the validation perplexity, shown as one more panel of the elastic curve
_ROLE_ORDER = {"student": 0, "member": 1, "ta": 2, "baseline": 3, "teacher": 4}


def shareable_path(path: str | os.PathLike | None) -> str | None:
    """A path as a file meant to be read elsewhere may hold it: as given when relative, else only its last part (an
    absolute path names this machine's folders, and often its user)."""
    if path is None:
        return None
    return str(path) if not Path(path).is_absolute() else Path(path).name


def source_commit(*paths: str | os.PathLike) -> str | None:
    """The short git commit of the checkout hf_matta runs from, noting uncommitted changes to the package or to
    `paths` (relative to the checkout's root); None outside a git checkout (an installed wheel)."""
    package = Path(__file__).parents[1]
    root = package.parents[1]
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=package, capture_output=True, text=True, timeout=10
        )
        watched = [str(package), *(str(root / path) for path in paths)]
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no", "--", *watched],
            cwd=package, capture_output=True, text=True, timeout=10,
        )  # fmt: skip
    except (OSError, subprocess.TimeoutExpired):
        return None
    if commit.returncode != 0:
        return None
    return commit.stdout.strip() + (" with uncommitted changes" if dirty.stdout.strip() else "")


def provenance(script: str, seconds: float, parallelism: str) -> list[str]:
    """Markdown lines: when, at which commit, on what machine, with which exact command a result was made."""
    cpu = next(
        (line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "?"
    )
    import torch  # imported here: the report itself does not need it

    return [
        f"Written by `{script}` on {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC in "
        f"{seconds / 60:.1f} min; do not edit by hand. Command:",
        "",
        f"    .venv/bin/python {script} {' '.join(sys.argv[1:])}".rstrip(),
        "",
        f"- Commit {source_commit(script) or 'unknown'}; torch {torch.__version__}; {os.cpu_count()} CPU cores "
        f"({cpu}), {platform.platform()}; {parallelism}; load average at the end {os.getloadavg()[0]:.1f}.",
    ]


def write_section(path: Path, name: str, text: str) -> None:
    """Put `text` into the markdown file `path` between markers named `name`, replacing that section if present
    and leaving the rest of the file (other sections, prose) as it is."""
    begin, end = f"<!-- BEGIN {name} -->", f"<!-- END {name} -->"
    block = f"{begin}\n{text.rstrip()}\n{end}\n"
    current = path.read_text() if path.is_file() else "# Benchmark results\n\n"
    if begin in current and end in current:
        head, rest = current.split(begin, 1)
        current = head + block + rest.split(end, 1)[1].lstrip("\n")
    else:
        current = current.rstrip("\n") + "\n\n" + block
    path.write_text(current)


def _read(output_dir: Path, relative: str | None) -> Any:
    return None if relative is None else json.loads((output_dir / relative).read_text())


def report_rows(output_dir: Path, outputs: dict[str, dict]) -> tuple[list[dict], list[str]]:
    """One row per model (students ascending in size, then the baseline and the teacher): name, role, plan,
    parameters, validation perplexity, lm-eval results, and the repo it went to; and the tasks."""
    evaluate = outputs["evaluate"]
    models = _read(output_dir, evaluate["validation"])["models"]
    rows = {row["name"]: {**row, "results": {}, "repo": None} for row in models}
    tasks = list(evaluate["tasks"])
    for key in ("results", "teacher_results"):
        results = _read(output_dir, evaluate.get(key))
        for entry in (results or {}).get("students", []):
            name = "teacher" if key == "teacher_results" else entry["name"]
            rows[name]["results"] = entry["results"]
    for item in outputs.get("publish", {}).get("published", []):
        rows[item["name"]]["repo"] = item
    # the family (student, members, TA) by size, then the baseline, then the teacher
    ordered = sorted(rows.values(), key=lambda row: (max(_ROLE_ORDER[row["role"]] - 2, 0), row["parameters"]))
    return ordered, tasks


def report_stage(run) -> dict:
    """Write report.md and elastic_curve.png into the output folder from what the stages recorded."""
    from ..evaluation import format_number, metric_labels, plot_elastic_curve, stderr_label

    output_dir, outputs = run.output_dir, run.outputs
    rows, tasks = report_rows(output_dir, outputs)
    columns = [
        (task, label)
        for task in tasks
        for label in metric_labels(next(row["results"][task] for row in rows if task in row["results"]))
    ]
    train = outputs["train"]["summary"]
    validation = _read(output_dir, outputs["evaluate"]["validation"])
    results = _read(output_dir, outputs["evaluate"].get("results"))
    scores = f"; lm-eval {results['lm_eval_version']} scores ± their standard errors" if results else ""
    config = run.args.run.config or "command-line arguments"
    lines = [
        f"# MatTA run: `{Path(config).name}`",
        "",
        f"{datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC; hf_matta {__version__} "
        f"(commit {source_commit() or 'unknown'}); {train['processes']} training process(es) "
        f"({train['distributed_type']}); {os.cpu_count()} CPU cores, load average {os.getloadavg()[0]:.1f}. "
        f"Config `{shareable_path(config)}`; everything below is in `{shareable_path(output_dir)}` (the numbers come "
        "from the JSON files there).",
        "",
        "## Models",
        "",
        f"Validation perplexity on the held-out split ({validation['blocks']} blocks of {validation['block_size']} "
        f"tokens), measured on every model{scores}.",
        "",
        "| model | role | plan (FFN per layer) | parameters | validation ppl | "
        + "".join(f"{task} {label} | " for task, label in columns)
        + "repo |",
        "|---|---|---|---:|---:|" + "---:|" * len(columns) + "---|",
    ]
    for row in rows:
        plan = row.get("plan_text") or "-"
        cells = []
        for task, label in columns:
            values = row["results"].get(task)
            value, stderr = (None, None) if values is None else (values.get(label), values.get(stderr_label(label)))
            cells.append("-" if value is None else f"{format_number(value)} ± {format_number(stderr)}")
        repo = row["repo"]
        where = "-" if repo is None else f"[{repo['repo_id']}]({repo['location']}) ({repo['status']})"
        lines.append(
            f"| {row['name']} | {row['role']} | {plan} | {row['parameters']:,} | {row['perplexity']:.2f} | "
            + "".join(f"{cell} | " for cell in cells)
            + f"{where} |"
        )
    for task, reason in outputs["evaluate"]["skipped_tasks"].items():
        lines.append(f"\n{task}: not run ({reason}).")
    lines += ["", f"![elastic curve]({CURVE_FILE})", "", *_training_lines(outputs), "", *_time_lines(run)]
    text = "\n".join(lines) + "\n"
    write_text_atomic(output_dir / REPORT_FILE, text)
    plot_elastic_curve(_curve_results(rows, tasks, output_dir, outputs), output_dir / CURVE_FILE)
    return {"report": REPORT_FILE, "elastic_curve": CURVE_FILE}


def _curve_results(rows: list[dict], tasks: list[str], output_dir: Path, outputs: dict) -> dict:
    """The models as `hf_matta.evaluation.plot_elastic_curve` reads results, validation perplexity as a task of its
    own (the teacher is left out: it is not a member of the family)."""
    results = _read(output_dir, outputs["evaluate"].get("results"))
    task_info = dict(results["task_info"]) if results else {}
    task_info[VALIDATION_TASK] = {"higher_is_better": {"perplexity": False}}
    students = [
        {**row, "results": {**row["results"], VALIDATION_TASK: {"perplexity": row["perplexity"]}}}
        for row in rows
        if row["role"] != "teacher"
    ]
    return {"tasks": [VALIDATION_TASK, *tasks], "students": students, "task_info": task_info}


def _training_lines(outputs: dict) -> list[str]:
    """The train stage's summary (and the baseline's, and the teacher's pre-training)."""
    train = outputs["train"]
    lines = [
        "## Training",
        "",
        "| model | FFN | parameters | ppl at start | ppl at end |",
        "|---|---:|---:|---:|---:|",
    ]
    summaries = [("MatTA", train["summary"])]
    if train["baseline"] is not None:
        summaries.append(("baseline", train["baseline"]["summary"]))
    for label, summary in summaries:
        for name, row in summary["widths"].items():
            start = "-" if row["start_ppl"] is None else f"{row['start_ppl']:.2f}"
            end = "-" if row["end_ppl"] is None else f"{row['end_ppl']:.2f}"
            lines.append(f"| {label} {name} | {row['ffn_width']} | {row['parameters']:,} | {start} | {end} |")
    summary = train["summary"]
    lines += [
        "",
        f"{summary['steps']} steps, {summary['train_tokens']:,} tokens at {summary['tokens_per_second']:,.0f} "
        f"tokens/s, final train loss {summary['train_loss']:.4f}.",
        *(f"{line[0].upper()}{line[1:]}." for line in teaching_lines(summary)),
    ]
    teacher = outputs["teacher"]
    if teacher["teacher"] is not None:
        how = "pre-trained by this run" if teacher["pretrained"] else "used as it was"
        lines.append(f"Teacher `{shareable_path(teacher['teacher'])}`, {how}.")
    return lines


TA_LEAD_GOAL = 0.05  # "clearly ahead": the TA's validation perplexity at least 5 % below its student's


def teaching_lines(summary: dict) -> list[str]:
    """Whether the TA is teaching anything: the collapse diagnostics, and what it means when the TA does not lead."""
    found, widths = summary.get("diagnostics") or {}, summary["widths"]
    ends = [row["end_ppl"] for row in widths.values()]
    if "kl_ta_student" not in found or "TA" not in widths or None in ends:
        return []  # a baseline (no TA), or no validation split
    lead = 1 - widths["TA"]["end_ppl"] / widths["student"]["end_ppl"]
    lines = [
        f"is the TA teaching? KL(TA || student) {found['kl_ta_student']:.4f} nats/token; its extra FFN neurons' "
        f"output against the student neurons' (mean over layers): cosine {found['ffn_cos']:.2f}, centred "
        f"{found['ffn_centered_cos']:.2f}, norm ratio {found['ffn_norm_ratio']:.2f}",
    ]
    if lead >= TA_LEAD_GOAL:
        return [*lines, f"the TA leads its student by {100 * lead:.1f} % lower perplexity: the family is elastic"]
    redundant = found["ffn_centered_cos"] > 0.5
    tokens_per_parameter = summary["train_tokens"] / widths["student"]["parameters"]
    return [
        *lines,
        f"the TA is not clearly ahead of its student ({100 * lead:.1f} % lower perplexity, goal "
        f"{100 * TA_LEAD_GOAL:.0f} %)" + (": its extra neurons repeat the student's direction" if redundant else "")
        + f". With {tokens_per_parameter:.1f} training tokens per student parameter the student is not short of "
        "capacity and distillation hands it what the TA learnt. A TA leads only where a model of its size alone "
        "clearly beats one of the student's after the same tokens and the student's width binds: "
        "benchmarks/RESULTS.md measures such a regime (quality.py --setting grown_linux: a pre-trained student "
        "grown into its TA, as in the paper; --setting narrow: from scratch)",
    ]


def _time_lines(run) -> list[str]:
    """Time per stage, from the records (a stage skipped by this run shows the run that did it)."""
    from .run import read_record

    lines = ["## Time per stage", "", "| stage | completed | seconds |", "|---|---|---:|"]
    total = 0.0
    for stage in STAGES[:-1]:
        record = read_record(run.output_dir, stage)
        if record is not None:
            total += record["seconds"]
            lines.append(f"| {stage} | {record['completed']} | {record['seconds']:.1f} |")
    lines.append(f"| all but the report | | {total:.1f} |")
    return lines


__all__ = ["provenance", "report_rows", "report_stage", "shareable_path", "source_commit", "write_section"]
