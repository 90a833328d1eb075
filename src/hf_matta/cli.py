"""The `hf-matta` command: one subcommand per job, each a function that adds its parser to `COMMANDS`.

    hf-matta plans MODEL_DIR [--budgets 10M,20M] [--strategy uniform|block|search] [--data DATA]
    hf-matta extract MODEL_DIR --plan 64 --plan 32,128,64 --out DIR [--overwrite]
    hf-matta extract MODEL_DIR --budgets 10M,20M [--strategy ...] [--data DATA] --out DIR
    hf-matta publish MODEL_DIR --org ORG [--plan ... | --budgets ...] [--collection TITLE] [--dry-run --out DIR]
    hf-matta eval STUDENT [STUDENT ...] [--tasks agieval_sat_math,lambada_openai] [--data-dir DIR] [--baseline MODEL]
    hf-matta run CONFIG [--check] [--push] [--stage NAME] [--FIELD VALUE ...]

MODEL_DIR is a trained nested model (a `MatGPT2LMHeadModel` folder, as the training recipe saves it). Every argument is
checked before the model's weights are loaded; every output folder before anything is written. `run` is the whole
pipeline (`hf_matta.pipeline`): its options are the config's fields, the same names as the recipe's.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from .widths import STRATEGIES, parse_budget, parse_plan


# Torch, transformers and the commands' modules are imported by the command that runs: `hf-matta --help` and
# argument errors answer without them.
if TYPE_CHECKING:
    import torch

    from .extract import PlanPoint
    from .models.matgpt2 import MatGPT2Config, MatGPT2LMHeadModel


def _budgets_argument(text: str) -> list[int]:
    """argparse type of `--budgets 10M,20M`."""
    try:
        return [parse_budget(part) for part in text.split(",")]
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _plan_argument(text: str) -> int | list[int]:
    """argparse type of `--plan 64` / `--plan 32,128,64` / `--plan 64x3,128x2`."""
    try:
        return parse_plan(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _at_least(minimum: int) -> Callable[[str], int]:
    """argparse type of a whole number of at least `minimum` (`--max-blocks`, `--batch-size`, `--block-size`)."""

    def whole_number(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        return value

    return whole_number


def _add_model_and_data_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model_dir", metavar="MODEL_DIR", type=Path, help="Folder of a trained nested MatGPT2 model.")
    parser.add_argument(
        "--strategy",
        choices=STRATEGIES,
        default="uniform",
        help="How budgets become plans: uniform (every layer at one granularity; the students are stock GPT-2), "
        "block (a centred block of layers one granularity wider) or search (greedy, measured on --data). "
        "Default: uniform.",
    )
    parser.add_argument(
        "--data",
        help="Held-out text to measure validation loss on: a .txt/.jsonl file (all of it is held out), a built-in "
        "corpus name (its validation split, as training holds it out), or a .pt file with a (N, T) tensor of token "
        "ids. Default, for a folder written by `hf-matta run`: that run's own validation split. Needed by --strategy "
        "search.",
    )
    parser.add_argument(
        "--block-size",
        "--block_size",
        type=_at_least(2),
        help="Tokens per held-out block (default: the training run's, else the model's context, at most 1024).",
    )
    parser.add_argument(
        "--max-blocks", type=_at_least(1), default=32, help="Held-out blocks to measure on (default 32)."
    )
    parser.add_argument(
        "--validation-split-percentage",
        "--validation_split_percentage",
        type=float,
        help="For a built-in corpus: the share of documents held out. Default: the training run's (recorded in "
        "MODEL_DIR by `hf-matta run`), else the config's default, so that the measured documents are ones "
        "training never saw.",
    )
    parser.add_argument(
        "--seed", type=int, help="For a built-in corpus: the seed that drew the split (default: the training run's)."
    )
    parser.add_argument("--batch-size", type=_at_least(1), default=8, help="Blocks per forward pass (default 8).")


def add_plans_command(subparsers: argparse._SubParsersAction) -> None:
    """`hf-matta plans`: a table of plans for budgets, with parameters and validation loss."""
    parser = subparsers.add_parser(
        "plans",
        help="List Mix'n'Match plans for parameter budgets, with parameter counts and validation loss.",
        description="Print a table of plans (per-layer FFN widths) with parameter counts and, given --data, "
        "validation loss. Without --budgets, every plan of the strategy (for search, its whole path).",
    )
    _add_model_and_data_arguments(parser)
    parser.add_argument("--budgets", type=_budgets_argument, help="Parameter budgets, e.g. 10M,20M or 1.5K,30000.")
    parser.set_defaults(run=run_plans)


def add_extract_command(subparsers: argparse._SubParsersAction) -> None:
    """`hf-matta extract`: one standalone student folder per plan or budget."""
    parser = subparsers.add_parser(
        "extract",
        help="Write standalone students (one folder each) for plans or parameter budgets.",
        description="Extract students from a nested model: a uniform plan becomes a stock GPT2LMHeadModel, a "
        "mixed plan a MatGPT2LMHeadModel with per-layer widths (loads with trust_remote_code=True). Each goes to "
        "OUT/ffn<plan> with safetensors weights, generation config and the model's tokenizer.",
    )
    _add_model_and_data_arguments(parser)
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument(
        "--plan",
        action="append",
        type=_plan_argument,
        help="A student's FFN widths: 64 (all layers), 32,128,64 (one per layer) or 64x3,128x2. Repeat for more.",
    )
    which.add_argument("--budgets", type=_budgets_argument, help="Parameter budgets; one student per budget.")
    parser.add_argument("--out", type=Path, required=True, help="Folder to write the student folders into.")
    parser.add_argument("--overwrite", action="store_true", help="Replace student folders that already exist.")
    parser.add_argument(
        "--zero-pad",
        action="store_true",
        help="Write mixed plans as stock GPT2LMHeadModels, for engines that run no custom code: every FFN as wide "
        "as the plan's widest layer, the extra neurons zero (identical logits); the extra parameters and FLOPs are "
        "printed.",
    )
    parser.set_defaults(run=run_extract)


def add_eval_command(subparsers: argparse._SubParsersAction) -> None:
    """`hf-matta eval`: lm-eval-harness tasks on students; the work is `hf_matta.evaluation.evaluate_students`."""
    parser = subparsers.add_parser(
        "eval",
        help="Run lm-eval-harness tasks (SAT Math, LAMBADA, any other) on students; write a table and a plot.",
        description="Evaluate students with lm-eval-harness and write OUTPUT_DIR/results.json, results.md and "
        "elastic_curve.png (score against parameters). A nested MatGPT2 folder stands for its plans (every "
        "granularity, or --plan), extracted in memory. Offline: --data-dir DIR for the two default tasks, or "
        "--tasks lambada_heldout (last words of the training corpus' held-out split; needs no data).",
    )
    parser.add_argument(
        "students", nargs="+", metavar="STUDENT", help="A student folder, a Hub id, or a nested MatGPT2 folder."
    )
    parser.add_argument(
        "--plan", action="append", type=_plan_argument, help="A plan of the nested model(s) to evaluate (repeat)."
    )
    parser.add_argument(
        "--tasks", default="agieval_sat_math,lambada_openai", help="lm-eval task names, comma-separated."
    )
    parser.add_argument(
        "--data-dir",
        help="Folder with lambada_test.jsonl and sat-math.lm-eval.jsonl or sat-math.jsonl (AGIEval's raw schema): "
        "the default tasks read these instead of the Hub.",
    )
    parser.add_argument("--limit", type=float, help="Documents per task (a fraction below 1); for quick checks.")
    parser.add_argument("--num-fewshot", type=int, help="Few-shot examples (default: each task's own).")
    parser.add_argument(
        "--batch-size", default="8", type=lambda text: int(text) if text.isdigit() else text, help="Or 'auto'."
    )
    parser.add_argument("--device", help="cpu, cuda, cuda:N (default: CUDA when available).")
    parser.add_argument("--dtype", default="auto", help="auto (the checkpoint's), float32, bfloat16 or float16.")
    parser.add_argument("--output-dir", type=Path, default=Path("eval_results"), help="Default: ./eval_results.")
    parser.add_argument(
        "--baseline", help="A model folder / Hub id, or an evaluated student's name: relative improvements over it."
    )
    parser.add_argument("--overwrite", action="store_true", help="Replace results already in --output-dir.")
    parser.add_argument("--trust-remote-code", action="store_true", help="Load models that need their own code.")
    parser.add_argument(
        "--bootstrap-iters",
        type=int,
        default=100_000,
        help="lm-eval's resamples for the standard error of perplexity (default 100000, lm-eval's; about 100 s per "
        "model for LAMBADA on 2 busy cores; 0 skips every standard error).",
    )
    parser.set_defaults(run=run_eval)


def run_eval(args: argparse.Namespace) -> int:
    """Evaluate, print the table, the elapsed time and where the files are."""
    from .evaluation import evaluate_students, results_markdown  # lm-eval and matplotlib load for this command only

    results = evaluate_students(
        args.students,
        args.tasks,
        plans=args.plan,
        data_dir=args.data_dir,
        limit=args.limit,
        num_fewshot=args.num_fewshot,
        batch_size=args.batch_size,
        device=args.device,
        dtype=args.dtype,
        output_dir=args.output_dir,
        baseline=args.baseline,
        overwrite=args.overwrite,
        trust_remote_code=args.trust_remote_code,
        bootstrap_iters=args.bootstrap_iters,
    )
    print(results_markdown(results))
    print(
        f"{len(results['students'])} models x {len(results['tasks'])} tasks in {results['run']['seconds']:.1f} s; "
        f"results.json, results.md and elastic_curve.png in {args.output_dir}"
    )
    return 0


def add_publish_command(subparsers: argparse._SubParsersAction) -> None:
    """`hf-matta publish`: every student in its own Hub repo with a model card (or, dry run, the repo folders)."""
    parser = subparsers.add_parser(
        "publish",
        help="Publish students to the Hub, one repo each with a model card (or write the repo folders: --dry-run).",
        description="Publish a MatTA family: MODEL_DIR is a trained nested model (students are extracted for --plan "
        "or --budgets; default: every trained granularity), a student folder, or a folder of student folders. Each "
        "student goes to ORG/<name> in one commit (weights, config, generation config, tokenizer, card); repos the "
        "Hub already holds unchanged are skipped. The token comes from HF_TOKEN or `hf auth login`.",
    )
    _add_model_and_data_arguments(parser)
    parser.add_argument("--org", required=True, help="Namespace (user or organization) that owns the repos.")
    which = parser.add_mutually_exclusive_group()
    which.add_argument(
        "--plan", action="append", type=_plan_argument, help="A student's FFN widths, as for extract. Repeatable."
    )
    which.add_argument("--budgets", type=_budgets_argument, help="Parameter budgets; one student per budget.")
    parser.add_argument(
        "--name-template",
        help="Repo names from {base} (base model, or matgpt2), {params} (e.g. 1.31M) and {plan} (e.g. ffn256). "
        "Default: {base}-matta-{params}-{plan}.",
    )
    parser.add_argument("--private", action="store_true", help="Create the repos and the collection private.")
    parser.add_argument("--revision", help="Branch to commit to (created from main if missing). Default: main.")
    parser.add_argument("--collection", metavar="TITLE", help="Gather the family in this collection of ORG.")
    parser.add_argument("--results", type=Path, help="results.json of hf-matta eval: model-index entries in cards.")
    parser.add_argument("--license", help="License id of the cards (default: the base model's, else apache-2.0).")
    parser.add_argument("--dry-run", action="store_true", help="Write the repo folders to --out; no network.")
    parser.add_argument("--out", type=Path, help="With --dry-run: folder receiving one folder per repo.")
    parser.add_argument("--overwrite", action="store_true", help="With --dry-run: replace --out if it holds files.")
    parser.set_defaults(run=run_publish)


def run_publish(args: argparse.Namespace) -> int:
    """Choose the plans (for a nested model), then `hf_matta.hub.publish_students`; a Hub failure exits with 1."""
    from .extract import mix_n_match, smallest_plan
    from .hub import PublishError, check_hub_access, publish_students
    from .widths import check_budgets

    if args.dry_run != (args.out is not None):
        raise ValueError("--dry-run and --out go together: --dry-run --out DIR writes the repo folders to DIR.")
    plans = args.plan  # checked against the nested model by publish_students
    if plans is None and (args.budgets is not None or args.strategy != "uniform"):
        if not (args.model_dir / "config.json").is_file():
            raise ValueError(f"--budgets and --strategy choose students of a nested model; {args.model_dir} has none.")
        config = _load_config(args.model_dir)
        if args.budgets:
            check_budgets(config, args.budgets, smallest_plan(config, args.strategy))
        if args.strategy == "search":
            if not args.dry_run:
                check_hub_access(args.org)  # a missing or rejected token fails before the search's passes
            model, input_ids = _load_model_and_data(args, config)
            points = mix_n_match(model, "search", args.budgets, input_ids, args.batch_size)
        else:
            points = mix_n_match(config, args.strategy, args.budgets)
        plans = [point.widths for point in points]
    try:
        publish_students(
            args.model_dir,
            args.org,
            plans,
            push=not args.dry_run,
            out_dir=args.out,
            overwrite=args.overwrite,
            name_template=args.name_template,
            private=args.private,
            revision=args.revision,
            collection=args.collection,
            results=args.results,
            license=args.license,
        )
    except PublishError as error:
        print(f"hf-matta publish: error: {error}", file=sys.stderr)
        return 1
    return 0


def add_run_command(subparsers: argparse._SubParsersAction) -> None:
    """`hf-matta run`: listed here; its options are the pipeline's whole vocabulary, parsed by `hf_matta.pipeline`."""
    subparsers.add_parser(
        "run",
        add_help=False,
        help="Run the MatTA pipeline from a config: teacher, train, extract, evaluate, publish (a dry run unless "
        "--push), report. `hf-matta run --help` lists every field.",
    )


def run_pipeline(argv: Sequence[str]) -> int:
    """`hf-matta run CONFIG [options]`: the pipeline, with the config as its positional argument."""
    from .pipeline import main as pipeline_main  # torch, transformers and the trainer load for this command only

    return pipeline_main(list(argv), prog="hf-matta run")


COMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [
    add_run_command,
    add_plans_command,
    add_extract_command,
    add_eval_command,
    add_publish_command,
]


def build_parser() -> argparse.ArgumentParser:
    """The `hf-matta` parser with every subcommand in `COMMANDS`."""
    parser = argparse.ArgumentParser(prog="hf-matta", description="MatTA for Hugging Face Transformers.")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add_command in COMMANDS:
        add_command(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run `hf-matta`; a bad input exits with status 2 and a message that names it."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["run"]:  # parses its own options (every field of the pipeline's arguments)
        return run_pipeline(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except (ValueError, FileExistsError, FileNotFoundError) as error:
        parser.exit(2, f"hf-matta {args.command}: error: {error}\n")


def run_plans(args: argparse.Namespace) -> int:
    """Print the plans table."""
    from .extract import mix_n_match, smallest_plan
    from .widths import check_budgets

    config = _load_config(args.model_dir)
    if args.budgets:
        check_budgets(config, args.budgets, smallest_plan(config, args.strategy))
    model, input_ids = _load_model_and_data(args, config)
    points = mix_n_match(model or config, args.strategy, args.budgets, input_ids, args.batch_size)
    _print_table(points, args.budgets)
    return 0


def run_extract(args: argparse.Namespace) -> int:
    """Extract and save the students (each with the nested model's lineage record, for its card), one line each."""
    from .data import load_tokenizer
    from .extract import extract_student, mix_n_match, save_student, smallest_plan, validation_loss
    from .hub import read_lineage
    from .models.matgpt2 import MatGPT2LMHeadModel
    from .widths import check_budgets, check_plan, count_flops_per_token, count_parameters, format_plan, plan_name

    config = _load_config(args.model_dir)
    if args.plan is not None:
        plans = [check_plan(config, plan) for plan in args.plan]
    else:
        check_budgets(config, args.budgets, smallest_plan(config, args.strategy))
        # uniform and block plans are arithmetic on the config; search needs the weights and the held-out data
        if args.strategy == "search":
            plans = None
        else:
            plans = [point.widths for point in mix_n_match(config, args.strategy, args.budgets)]
    if plans is not None:
        _check_out_dirs(args, plans)
    model, input_ids = _load_model_and_data(args, config, need_model=True)
    if plans is None:
        plans = [point.widths for point in mix_n_match(model, "search", args.budgets, input_ids, args.batch_size)]
        _check_out_dirs(args, plans)
    tokenizer, lineage = load_tokenizer(args.model_dir), read_lineage(args.model_dir)
    for widths in dict.fromkeys(plans):  # two budgets can share a plan: extract it once
        student = extract_student(model, widths, zero_pad=args.zero_pad)
        out_dir = save_student(student, args.out / plan_name(widths), tokenizer, args.overwrite, lineage)
        loading = "needs trust_remote_code=True" if isinstance(student, MatGPT2LMHeadModel) else "stock GPT-2"
        summary = (
            f"{out_dir}: {type(student).__name__} ({loading}), plan {format_plan(widths)}, "
            f"{count_parameters(config, widths):,} parameters"
        )
        if args.zero_pad and len(set(widths)) > 1:
            padded = [max(widths)] * config.n_layer
            extra_params = count_parameters(config, padded) / count_parameters(config, widths) - 1
            extra_flops = count_flops_per_token(config, padded) / count_flops_per_token(config, widths) - 1
            summary += (
                f", zero-padded to FFN {max(widths)}: {count_parameters(config, padded):,} stored parameters "
                f"(+{extra_params:.1%}), +{extra_flops:.1%} FLOPs per token"
            )
        if input_ids is not None:
            summary += f", val loss {validation_loss(model, input_ids, widths, args.batch_size):.4f}"
        print(summary)
    return 0


def _load_config(model_dir: Path) -> MatGPT2Config:
    """The nested model's config, refusing anything that is not a MatGPT2 folder."""
    from transformers import AutoConfig

    from .models.matgpt2 import MatGPT2Config

    if not model_dir.is_dir():
        raise FileNotFoundError(f"MODEL_DIR {str(model_dir)!r} is not a folder; give the folder of a trained model.")
    config = AutoConfig.from_pretrained(model_dir)
    if not isinstance(config, MatGPT2Config):
        raise ValueError(
            f"{model_dir} holds a {config.model_type!r} model; hf-matta needs a nested MatGPT2 model "
            "(model_type 'matgpt2'), such as the training recipe saves."
        )
    return config


def _load_model_and_data(
    args: argparse.Namespace, config: MatGPT2Config, need_model: bool = False
) -> tuple[MatGPT2LMHeadModel | None, torch.LongTensor | None]:
    """The nested model (only when weights are needed) and the held-out blocks: --data, or the validation split of
    the run that trained MODEL_DIR when `hf-matta run` recorded it there."""
    from .data import load_heldout_blocks, load_tokenizer, split_blocks
    from .extract import load_nested_model
    from .pipeline.run import recorded_data

    recorded = recorded_data(args.model_dir)  # (DataArguments, seed) of the training run, or None
    if args.strategy == "search" and args.data is None and recorded is None and getattr(args, "plan", None) is None:
        raise ValueError("--strategy search measures validation loss: give held-out text with --data.")
    input_ids = None
    if args.data is not None or recorded is not None:
        block_size = args.block_size or (recorded[0].block_size if recorded else min(config.n_positions, 1024))
        tokenizer = load_tokenizer(args.model_dir)
        if args.data is None:  # the training run's own held-out documents
            data_args = dataclasses.replace(recorded[0], block_size=block_size, max_eval_samples=args.max_blocks)
            input_ids = split_blocks(data_args, tokenizer, recorded[1])
        else:  # the split and seed of the training run when known, unless given
            split = {}
            if recorded is not None:
                split = {"validation_split_percentage": recorded[0].validation_split_percentage, "seed": recorded[1]}
            given = {"validation_split_percentage": args.validation_split_percentage, "seed": args.seed}
            split.update({name: value for name, value in given.items() if value is not None})
            input_ids = load_heldout_blocks(args.data, tokenizer, block_size, args.max_blocks, **split)
        low, high = int(input_ids.min()), int(input_ids.max())
        if low < 0 or high >= config.vocab_size:
            raise ValueError(
                f"held-out token ids range from {low} to {high}, outside the model's vocabulary (0 to "
                f"{config.vocab_size - 1}); give token ids of MODEL_DIR's tokenizer, or text."
            )
        if input_ids.shape[1] > config.n_positions:
            raise ValueError(
                f"held-out blocks of {input_ids.shape[1]} tokens are longer than the model's context "
                f"n_positions={config.n_positions}; use --block-size {config.n_positions} or less."
            )
    model = None
    if need_model or input_ids is not None:
        model = load_nested_model(args.model_dir)  # a corrupted weights file or non-finite weights are named
    return model, input_ids


def _check_out_dirs(args: argparse.Namespace, plans: Sequence[Sequence[int]]) -> None:
    """Refuse, before any extraction, a student folder that is MODEL_DIR or holds it (even with --overwrite: replacing
    it would delete the model being extracted), or that already holds files (unless --overwrite)."""
    from .widths import plan_name

    folders = [args.out / plan_name(widths) for widths in plans]
    source = args.model_dir.resolve()
    for folder in folders:
        if folder.resolve() == source or folder.resolve() in source.parents:
            raise ValueError(
                f"student folder {folder} is MODEL_DIR {args.model_dir} or holds it: writing the student there would "
                "delete the model it is extracted from; choose another --out."
            )
    if args.overwrite:
        return
    taken = [str(folder) for folder in folders if folder.is_dir() and any(folder.iterdir())]
    if taken:
        raise FileExistsError(f"student folders exist and are not empty: {taken}; pass --overwrite to replace them.")


def _print_table(points: Sequence[PlanPoint], budgets: Sequence[int] | None) -> None:
    """One row per plan: (budget,) plan, parameters, validation loss."""
    from .widths import format_plan

    rows = [("budget",) * bool(budgets) + ("plan", "params", "val_loss")]
    for idx, point in enumerate(points):
        loss = "-" if point.val_loss is None else f"{point.val_loss:.4f}"
        budget = (f"{budgets[idx]:,}",) if budgets else ()
        rows.append((*budget, format_plan(point.widths), f"{point.params:,}", loss))
    widths = [max(len(row[col]) for row in rows) for col in range(len(rows[0]))]
    for row in rows:  # numbers right-aligned, the first column left-aligned
        print("  ".join(cell.rjust(w) if col else cell.ljust(w) for col, (cell, w) in enumerate(zip(row, widths))))


if __name__ == "__main__":
    sys.exit(main())
