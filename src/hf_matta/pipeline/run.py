"""Running the stages in order, resumably.

Every stage that completes writes `output_dir/stages/<stage>.json` (atomically, last): its outputs, its arguments,
a fingerprint of those and of every stage before it, the time it took. A run then:
- skips a stage whose record matches the config (and says so), so that a run killed in any stage, run again, starts
  at the first stage that had not completed, without retraining;
- runs again a cheap stage (extract, evaluate, publish, report) whose arguments changed, and every stage after it;
- refuses to redo an expensive stage (teacher, train) whose arguments changed, naming the differences: retraining
  is asked for explicitly (`--stage train`) or goes to another `output_dir`;
- with `--stage NAME`, runs that stage alone from the recorded outputs of the stages before it, and drops the records
  of the stages after it (they run again next time); with `--stop_after NAME`, stops after that stage.

The output folder is locked for the run: a second run into it at the same time is refused. Under a distributed
launch every process runs the teacher and train stages; the later stages run on the main process only.
"""

import contextlib
import datetime
import enum
import fcntl
import hashlib
import json
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ..data import DataArguments
from ..files import write_json_atomic
from ..training_args import ADDED_FIELDS, without_added_fields
from .arguments import STAGES, PipelineArguments, training_fingerprint_fields
from .check import check_run
from .report import report_stage
from .stages import Run, evaluate_stage, extract_stage, publish_stage, teacher_stage, train_stage


RECORDS_DIR = "stages"
LOCK_FILE = ".hf_matta.lock"
EXPENSIVE_STAGES = ("teacher", "train")
MAIN_PROCESS_STAGES = ("extract", "evaluate", "publish", "report")
STAGE_FUNCTIONS: dict[str, Callable[[Run], dict]] = {
    "teacher": teacher_stage,
    "train": train_stage,
    "extract": extract_stage,
    "evaluate": evaluate_stage,
    "publish": publish_stage,
    "report": report_stage,
}


@dataclass
class _Step:
    """What the run does with one stage: `run` it, `skip` it (its record matches), `use` its record (`--stage`
    runs a later one), `drop` its record (`--stage` ran an earlier one), or `wait` (after `stop_after`)."""

    stage: str
    action: str
    fingerprint: str
    arguments: dict
    reason: str = ""


def stage_arguments(args: PipelineArguments, stage: str) -> dict:
    """The arguments a stage's outputs depend on (beyond the stages before it), as JSON values; a training field
    added later is left out at the value runs had before it (`without_added_fields`), so their records still match."""
    model, data, training = asdict(args.model), asdict(args.data), args.training
    own = {
        "teacher": lambda: {
            "teacher_model_name_or_path": training.teacher_model_name_or_path,
            **asdict(args.teacher),
            "data": data,
            "tokenizer": {key: model[key] for key in ("tokenizer_name_or_path", "tokenizer_vocab_size")},
        },
        "train": lambda: {
            "model": model,
            "data": data,
            "training": without_added_fields(
                {name: getattr(training, name) for name in training_fingerprint_fields()}
            ),
        },
        "extract": lambda: asdict(args.extract),
        "evaluate": lambda: asdict(args.evaluate),
        "publish": lambda: asdict(args.publish),
        "report": lambda: {},
    }[stage]()
    return json.loads(json.dumps(own, default=_json_value))


def _json_value(value: Any) -> Any:
    """Transformers' option enums as their values; anything else JSON cannot hold as its text."""
    return value.value if isinstance(value, enum.Enum) else str(value)


def record_path(output_dir: str | os.PathLike, stage: str) -> Path:
    """Where a stage's completion record lives."""
    return Path(output_dir) / RECORDS_DIR / f"{stage}.json"


def read_record(output_dir: str | os.PathLike, stage: str) -> dict | None:
    """A stage's completion record, or None when the stage has not completed."""
    path = record_path(output_dir, stage)
    return json.loads(path.read_text()) if path.is_file() else None


def recorded_data(output_dir: str | os.PathLike) -> tuple[DataArguments, int] | None:
    """The data arguments and seed a completed train stage in `output_dir` used (so that its validation split can be
    drawn again, exactly), or None when the folder holds no such record."""
    record = read_record(output_dir, "train")
    if record is None:
        return None
    return DataArguments(**record["arguments"]["data"]), record["arguments"]["training"]["seed"]


def plan_stages(args: PipelineArguments) -> list[_Step]:
    """What this run does with each stage, decided from the records before anything runs."""
    output_dir, only = args.training.output_dir, args.run.stage
    steps, previous, upstream_ran = [], "", False
    for index, stage in enumerate(STAGES):
        arguments = stage_arguments(args, stage)
        fingerprint = hashlib.sha256(json.dumps([arguments, previous], sort_keys=True).encode()).hexdigest()[:16]
        record = read_record(output_dir, stage)
        if only is not None:
            target = STAGES.index(only)
            if index < target:
                if record is None:
                    raise ValueError(
                        f"--stage {only} runs from the outputs of the {stage} stage, which has not completed in "
                        f"{output_dir}: run without --stage first."
                    )
                step = _Step(stage, "use", record["fingerprint"], arguments)
                if record["arguments"] != arguments:
                    step.reason = f"recorded with other arguments ({_differences(record['arguments'], arguments)})"
            elif index == target:
                step = _Step(stage, "run", fingerprint, arguments, f"asked for with --stage {only}")
            else:
                step = _Step(stage, "drop", fingerprint, arguments)
        elif record is not None and record["fingerprint"] == fingerprint and not upstream_ran:
            step = _Step(stage, "skip", fingerprint, arguments)
        elif record is not None and not upstream_ran and stage in EXPENSIVE_STAGES:
            changes = _differences(record["arguments"], arguments) or "the stages before it were run again"
            raise ValueError(
                f"the {stage} stage has completed in {output_dir} with other arguments ({changes}). To run it again "
                f"there, replacing its outputs, pass --stage {stage} (the stages after it then run on the next run); "
                "or set another output_dir."
            )
        elif args.run.stop_after is not None and index > STAGES.index(args.run.stop_after):
            step = _Step(stage, "wait", fingerprint, arguments, f"stop_after={args.run.stop_after}")
        else:
            reason = "not completed yet" if record is None else "its arguments or the stages before it changed"
            step = _Step(stage, "run", fingerprint, arguments, reason)
            upstream_ran = True
        steps.append(step)
        previous = step.fingerprint
    return steps


def _differences(old: Any, new: Any, prefix: str = "") -> str:
    """`max_steps: 120 -> 200, ...` between two argument dicts (nested ones flattened; a field of `ADDED_FIELDS`
    missing on one side has the value it is left out at)."""
    if isinstance(old, dict) and isinstance(new, dict):
        parts = [
            _differences(old.get(key, ADDED_FIELDS.get(key)), new.get(key, ADDED_FIELDS.get(key)), f"{prefix}{key}.")
            for key in sorted({*old, *new})
        ]
        return ", ".join(part for part in parts if part)
    return "" if old == new else f"{prefix.rstrip('.')}: {old!r} -> {new!r}"


def run_pipeline(args: PipelineArguments, log: Callable[[str], None] | None = None) -> dict[str, dict]:
    """Check the run, then run its stages in order (see the module's docstring); returns each stage's outputs.

    With `args.run.check`, stops after the checks and reports what a run would do with each stage.
    """
    log = log or _print
    check_run(args)
    run = Run(args, log)
    if args.run.check:
        steps = plan_stages(args)
        log(f"check passed: {args.run.config or 'the arguments'} is valid")
        for step in steps:
            log(f"  {step.stage:<9} would {step.action}" + (f" ({step.reason})" if step.reason else ""))
        return {"check": {"stages": {step.stage: step.action for step in steps}}}
    run.output_dir.mkdir(parents=True, exist_ok=True)
    with _output_lock(run):
        steps = plan_stages(args)
        _wait_for_everyone()  # every process decided from the same records
        for step in steps:
            if step.stage in MAIN_PROCESS_STAGES and not run.is_main_process:
                break
            _do(run, step)
    return run.outputs


def _do(run: Run, step: _Step) -> None:
    """Carry out one step of the plan."""
    log, path = run.log, record_path(run.output_dir, step.stage)
    if step.action in ("skip", "use"):
        record = read_record(run.output_dir, step.stage)
        run.outputs[step.stage] = record["outputs"]
        note = f"; {step.reason}" if step.reason else ""
        verb = "skipped" if step.action == "skip" else "used as recorded"
        log(f"stage {step.stage}: completed {record['completed']} in {record['seconds']:.1f} s, {verb}{note}")
        return
    if step.action == "wait":
        log(f"stage {step.stage}: not run ({step.reason})")
        return
    if step.action == "drop":
        if run.is_main_process and path.is_file():
            path.unlink()
            log(f"stage {step.stage}: its record is dropped; it runs again on the next run")
        return
    log(f"stage {step.stage}: running ({step.reason})")
    start = time.perf_counter()
    outputs = STAGE_FUNCTIONS[step.stage](run) if step.stage in STAGE_FUNCTIONS else {}
    seconds = time.perf_counter() - start
    run.outputs[step.stage] = outputs
    if run.is_main_process:
        write_json_atomic(
            path,
            {
                "stage": step.stage,
                "completed": f"{datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M:%S} UTC",
                "seconds": seconds,
                "fingerprint": step.fingerprint,
                "arguments": step.arguments,
                "outputs": outputs,
            },
        )
    log(f"stage {step.stage}: done in {seconds:.1f} s")


@contextlib.contextmanager
def _output_lock(run: Run) -> Iterator[None]:
    """Hold an exclusive lock on the output folder (main process; released by the OS even if the process dies)."""
    if not run.is_main_process:
        yield
        return
    path = run.output_dir / LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = path.read_text().strip() or "?"
            raise ValueError(
                f"another run (process {holder}) is writing to {run.output_dir}: wait for it to finish, or give this "
                "run another output_dir."
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        yield
    finally:
        os.close(fd)  # releases the lock


def _wait_for_everyone() -> None:
    from accelerate import PartialState

    PartialState().wait_for_everyone()


def _print(line: str) -> None:
    print(f"[hf-matta] {line}", flush=True)


__all__ = [
    "STAGE_FUNCTIONS",
    "plan_stages",
    "read_record",
    "record_path",
    "recorded_data",
    "run_pipeline",
    "stage_arguments",
]
