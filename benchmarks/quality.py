"""The paper's quality claims at a scale two CPU cores can run: student alone, KD, MatTA, their optimizers, the
parameter-sharing ablation and the Mix'n'Match curve, with validation perplexity over seeds.

    .venv/bin/python benchmarks/quality.py                      # --setting smallest: under 30 min on 2 idle cores
    .venv/bin/python benchmarks/quality.py --setting small      # wider models, longer budgets, 6 trials per arm
    .venv/bin/python benchmarks/quality.py --steps 200 --trials 2 --seeds 1 --out /tmp/q.md   # a quick look

What runs (every training run is `hf_matta.trainer.MatTATrainer` on data from `hf_matta.data`; every arm gets the
same token budget, steps x batch x block, and the same schedule: linear warm-up over 10 % of the steps, cosine decay):
1. Data: Python's own `pydoc_data.topics` (the only corpus installed here: Debian's python3.11-doc and jargon-text are
   not), a ByteLevel BPE trained on the training documents, blocks of `block` tokens; `validation_split_percentage` of
   the documents held out, whose blocks are split in two: even blocks tune the arms, odd blocks are the test set on
   which every reported perplexity is measured.
2. Teacher: a wider GPT-2 pre-trained first on the same training blocks, with the recipe's
   `recipes/train_gpt2m.py:pretrain_teacher` (Transformers' plain Trainer), for `teacher_steps` steps.
3. Tuning, the same number of trials per arm (`--trials`, the first trial is the defaults, the others are drawn
   at random from the grid, seeded): CE alone: learning rate. KD: learning rate, gamma, tau_T. MatTA starts from KD's
   best learning rate, gamma and tau_T and tunes its own knobs: w_D, its warm-up, tau_D, the TA's FFN width as a
   multiple of the student's, and the detach option. Chosen by the student's tune-split perplexity at seed 0.
4. Seeds: every tuned arm with `--seeds` seeds: CE student alone, KD student, MatTA (student and TA), a model of the
   TA's size trained alone (CE), and with Shampoo (`hf_matta.optim`'s ScalableShampoo, the tuned settings, the
   better on seed 0 of AdamW's learning rate x 1 or x 2) KD and MatTA: the 2 x 2 of {KD, MatTA} x {AdamW, Shampoo}.
5. Parameter-sharing ablation: MatTA's loss and trainer with a TA that shares no weights with the student (a
   separate model of the TA's shape trained online in the same step).
6. Mix'n'Match: the tuned MatTA model (seed 0) extracted (`hf_matta.extract.extract_student`) at its block plans
   (`mix_n_match(..., "block")`), against models of exactly the same parameter count (a uniform FFN width) trained
   alone with KD's tuned settings for the same tokens; plotted to `--plot`.
7. Budget: KD and MatTA (tuned, seed 0) again with `budget_multipliers` x the steps.

Runs go to `--jobs` worker processes (one CPU thread each by default); each run's result is cached as JSON under
`--work`, so an interrupted benchmark resumes where it stopped. The script writes the tables, the claims it can
decide from them, the date, commit, machine and its exact command into `--out` (benchmarks/RESULTS.md).
"""

import argparse
import dataclasses
import datetime
import hashlib
import importlib.util
import json
import math
import os
import platform
import random
import statistics
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

import torch


ROOT = Path(__file__).resolve().parent.parent

SETTINGS = {
    # steps x batch x block = tokens per run; the corpus holds about 150 k training tokens at a 1024-token BPE.
    "smallest": dict(
        vocab=1024, block=64, batch=8, steps=250, n_layer=4, n_embd=64, n_head=4, student_ffn=128, ta_ratio=4,
        teacher="n_layer=4,n_embd=128,n_head=4", teacher_steps=500, trials=3, seeds=3, mnm_seeds=1,
        budget_multipliers=[3], shampoo_block=128,
    ),
    "small": dict(
        vocab=2048, block=128, batch=16, steps=600, n_layer=4, n_embd=128, n_head=4, student_ffn=256, ta_ratio=4,
        teacher="n_layer=6,n_embd=256,n_head=8", teacher_steps=1200, trials=6, seeds=3, mnm_seeds=2,
        budget_multipliers=[2, 4], shampoo_block=256,
    ),
}  # fmt: skip
VALIDATION_PERCENT = 15
# Shampoo (Adam-grafted) tends to want a larger step than AdamW (benchmarks/optimizers.md: 4e-3 vs 2e-3): each Shampoo
# arm picks, on seed 0, the better of AdamW's tuned learning rate times these.
SHAMPOO_LR_MULTIPLIERS = (1, 2)
DEFAULTS = {
    "ce": dict(learning_rate=2e-3),
    "kd": dict(learning_rate=2e-3, teacher_weight=0.5, teacher_temperature=1.0),
    "matta": dict(distill_weight=1.0, distill_warmup_steps=0.0, distill_temperature=1.0, ta_ratio=4, detach=True),
}
GRIDS = {
    "ce": dict(learning_rate=[1e-3, 2e-3, 4e-3, 8e-3]),
    "kd": dict(
        learning_rate=[1e-3, 2e-3, 4e-3, 8e-3], teacher_weight=[0.25, 0.5, 0.75, 0.9], teacher_temperature=[1.0, 2.0, 4.0]
    ),
    "matta": dict(
        distill_weight=[0.25, 0.5, 1.0, 2.0], distill_warmup_steps=[0.0, 0.25, 0.5], distill_temperature=[1.0, 2.0, 4.0],
        ta_ratio=[2, 4, 8], detach=[True, False],
    ),
}  # fmt: skip


# ---------------------------------------------------------------------------------------------------------------
# One training run (in a worker process)
# ---------------------------------------------------------------------------------------------------------------


def _recipe():
    """recipes/train_gpt2m.py as a module (it is a script, not part of the package)."""
    spec = importlib.util.spec_from_file_location("train_gpt2m", ROOT / "recipes" / "train_gpt2m.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _blocks(ids: torch.Tensor) -> list[dict]:
    """Token blocks (N, T) as the examples `default_data_collator` stacks."""
    return [{"input_ids": row, "labels": row} for row in ids]


def _training_args(run: dict, out_dir: Path):
    from hf_matta.training_args import MatTATrainingArguments

    hp = run["hp"]
    fields = dict(
        output_dir=str(out_dir), use_cpu=True, report_to="none", save_strategy="no", eval_strategy="no",
        logging_strategy="no", disable_tqdm=True, dataloader_num_workers=0, seed=run["seed"], data_seed=run["seed"],
        max_steps=run["steps"], per_device_train_batch_size=run["batch"], per_device_eval_batch_size=32,
        learning_rate=hp["learning_rate"], lr_scheduler_type="cosine", warmup_steps=max(1, run["steps"] // 10),
        weight_decay=0.1, optimizer=run["optimizer"], teacher_weight=hp.get("teacher_weight", 0.5),
        teacher_temperature=hp.get("teacher_temperature", 1.0), distill_weight=hp.get("distill_weight", 1.0),
        distill_warmup_steps=hp.get("distill_warmup_steps", 0.0),
        distill_temperature=hp.get("distill_temperature", 1.0), detach_ta_targets=hp.get("detach", True),
        max_preconditioner_dim=run.get("shampoo_block", 1024), extra_widths=hp.get("extra_widths", "none"),
    )  # fmt: skip
    return MatTATrainingArguments(**fields)


def _model_config(shape: dict, widths: list[int]):
    """The MatGPT2 config of a run's shape (`n_layer`, `n_embd`, `n_head`, `vocab`, `block`) at nested `widths`."""
    from hf_matta import MatGPT2Config

    return MatGPT2Config(
        n_layer=shape["n_layer"], n_embd=shape["n_embd"], n_head=shape["n_head"], vocab_size=shape["vocab"],
        n_positions=shape["block"], resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0,
        eos_token_id=0, mat_widths=widths,
    )  # fmt: skip


def _separate_ta_class():
    """A nested-config MatGPT2 whose full-width (TA) forward runs a separate model: the no-sharing ablation.

    The trainer, loss and evaluation see the same interface as for the nested model; only the TA's weights differ.
    The student uses the first `student_width` FFN neurons of its own weights (the rest are never used).
    """
    from hf_matta import MatGPT2Config, MatGPT2LMHeadModel

    class SeparateTAModel(MatGPT2LMHeadModel):
        def __init__(self, config: MatGPT2Config, ta_config: MatGPT2Config):
            super().__init__(config)
            self.separate_ta = MatGPT2LMHeadModel(ta_config)

        def forward(self, input_ids=None, labels=None, ffn_widths=None, **kwargs):
            # The signature names `labels`: Trainer drops the batch keys that forward's signature does not name.
            if ffn_widths is None or ffn_widths == self.config.mat_widths[-1]:
                return self.separate_ta(input_ids, labels=labels, **kwargs)
            return super().forward(input_ids, labels=labels, ffn_widths=ffn_widths, **kwargs)

    return SeparateTAModel


def _loss_on(model, ids: torch.Tensor, batch_size: int = 32) -> float:
    """Mean next-token loss of any causal LM (stock GPT-2 or MatGPT2) on blocks (N, T)."""
    model.eval()
    with torch.no_grad():
        total = sum(model(batch, labels=batch).loss.item() * len(batch) for batch in ids.split(batch_size))
    return total / len(ids)


def train_run(run: dict) -> dict:
    """One training run described by `run` (a JSON-able dict); returns its test/tune perplexities per width."""
    torch.set_num_threads(run["threads"])
    from transformers import GPT2LMHeadModel, PrinterCallback, default_data_collator, set_seed

    from hf_matta import MatGPT2LMHeadModel
    from hf_matta.extract import validation_loss
    from hf_matta.trainer import MatTATrainer

    data = torch.load(run["data"], weights_only=True)
    out_dir = Path(run["work"]) / "tmp" / run["key"]
    start = time.perf_counter()
    if run["kind"] == "teacher":
        recipe = _recipe()
        from transformers import PreTrainedTokenizerFast

        tokenizer = PreTrainedTokenizerFast.from_pretrained(run["tokenizer"])
        shape = run["shape"]
        model_args = recipe.ModelArguments(
            config_overrides=f"n_layer={shape['n_layer']},n_embd={shape['n_embd']}",
            mat_widths=[shape["student_ffn"]], tokenizer_name_or_path=run["tokenizer"],
            teacher_pretrain_config=f"{run['teacher']},n_positions={shape['block']},resid_pdrop=0.0,embd_pdrop=0.0,"
            "attn_pdrop=0.0", teacher_pretrain_steps=run["steps"], teacher_pretrain_learning_rate=run["hp"]["learning_rate"],
        )  # fmt: skip
        set_seed(run["seed"])
        recipe.pretrain_teacher(
            model_args, _training_args(run, out_dir), tokenizer, {"train": _blocks(data["train"])}, shape["block"],
            run["teacher_dir"],
        )
        teacher = GPT2LMHeadModel.from_pretrained(run["teacher_dir"])
        return {
            "tune_ppl": {"teacher": math.exp(_loss_on(teacher, data["tune"]))},
            "test_ppl": {"teacher": math.exp(_loss_on(teacher, data["test"]))},
            "params": {"teacher": sum(p.numel() for p in teacher.parameters())},
            "seconds": time.perf_counter() - start,
        }

    set_seed(run["seed"])
    widths = run["widths"]
    config = _model_config(run["shape"], widths)
    if run["kind"] == "separate_ta":
        model = _separate_ta_class()(config, _model_config(run["shape"], widths[-1:]))
    else:
        model = MatGPT2LMHeadModel(config)
    teacher = None
    if run["hp"].get("teacher_weight", 0) > 0:
        teacher = GPT2LMHeadModel.from_pretrained(run["teacher_dir"])
    args = _training_args(run, out_dir)
    trainer = MatTATrainer(
        model=model, args=args, train_dataset=_blocks(data["train"]), data_collator=default_data_collator,
        teacher_model=teacher,
    )  # fmt: skip
    trainer.remove_callback(PrinterCallback)
    train_metrics = trainer.train().metrics
    result = {"seconds": time.perf_counter() - start}
    for split in ("tune", "test"):
        result[f"{split}_ppl"] = {str(w): math.exp(validation_loss(model, data[split], w, 32)) for w in widths}
    result["train_tokens_per_s"] = run["steps"] * run["batch"] * run["shape"]["block"] / train_metrics["train_runtime"]
    if run.get("mix_n_match"):
        strategy = run["mix_n_match"] if isinstance(run["mix_n_match"], str) else "block"
        result["mix_n_match"] = _mix_n_match(model, data["test"], strategy)
    return result


def _mix_n_match(model, test_ids: torch.Tensor, strategy: str) -> list[dict]:
    """Every plan of a strategy (`block`, `uniform`) of the trained nested model, extracted as a standalone model and measured on the test set;
    the extracted model's loss must equal the nested model's at that plan."""
    from hf_matta.extract import extract_student, mix_n_match

    points = []
    for point in mix_n_match(model, strategy, input_ids=test_ids, batch_size=32):
        student = extract_student(model, list(point.widths))
        loss = _loss_on(student, test_ids)
        if abs(loss - point.val_loss) > 1e-4:
            raise RuntimeError(f"extracted plan {point.widths}: loss {loss} differs from the nested {point.val_loss}")
        params = sum(p.numel() for p in student.parameters())
        points.append({"widths": list(point.widths), "params": params, "ppl": math.exp(loss)})
    return points


# ---------------------------------------------------------------------------------------------------------------
# The benchmark: data, the runs it needs, in stages, and the report
# ---------------------------------------------------------------------------------------------------------------


def prepare_data(setting: dict, work: Path) -> tuple[Path, Path]:
    """Tokenizer and token blocks (train, tune, test) saved under `work`; returns their paths."""
    from hf_matta.data import DataArguments, load_corpus, load_or_train_tokenizer, tokenize_and_pack

    data_args = DataArguments(
        builtin_corpus="pydoc_data.topics", block_size=setting["block"], validation_split_percentage=VALIDATION_PERCENT
    )
    raw = load_corpus(data_args, seed=0)
    tokenizer_dir = work / f"tokenizer-{setting['vocab']}"
    tokenizer = load_or_train_tokenizer(tokenizer_dir, raw["train"], data_args.text_column, setting["vocab"])
    blocks = tokenize_and_pack(raw, tokenizer, data_args)
    train = torch.tensor(blocks["train"]["input_ids"])
    held_out = torch.tensor(blocks["validation"]["input_ids"])
    path = work / f"blocks-{setting['vocab']}-{setting['block']}.pt"
    torch.save({"train": train, "tune": held_out[0::2], "test": held_out[1::2]}, path)
    return path, tokenizer_dir


class Runner:
    """Runs training runs in worker processes, caching each result as JSON under `work/runs/`."""

    def __init__(self, setting: dict, work: Path, data: Path, tokenizer: Path, jobs: int, threads: int):
        self.setting, self.work, self.jobs = setting, work, jobs
        self.base = dict(
            data=str(data), tokenizer=str(tokenizer), work=str(work), threads=threads,
            teacher_dir=str(work / "teacher"), batch=setting["batch"],
            shape={key: setting[key] for key in ("n_layer", "n_embd", "n_head", "vocab", "block", "student_ffn")},
        )  # fmt: skip
        (work / "runs").mkdir(parents=True, exist_ok=True)
        self.pool = ProcessPoolExecutor(max_workers=jobs, mp_context=get_context("spawn"))

    def spec(self, kind: str, hp: dict, seed: int = 0, optimizer: str = "adamw", steps: int | None = None, **extra):
        """A run description; `key` hashes everything that changes its result."""
        ratio = hp.get("ta_ratio", 1)
        student = extra.pop("width", self.setting["student_ffn"])
        widths = [student] if kind in ("ce", "kd", "teacher") else [student, student * ratio]
        widths = extra.pop("widths", widths)
        run = dict(
            self.base, kind=kind, hp=hp, seed=seed, optimizer=optimizer, steps=steps or self.setting["steps"],
            widths=widths, teacher=self.setting["teacher"], **extra,
        )  # fmt: skip
        if optimizer == "shampoo":
            run["shampoo_block"] = self.setting["shampoo_block"]
        identity = {k: v for k, v in run.items() if k not in ("threads", "work", "teacher_dir")}
        run["key"] = f"{kind}-{hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:12]}"
        return run

    def run_all(self, runs: list[dict]) -> list[dict]:
        """Results of `runs`, from the cache or computed in parallel; printed as they finish."""
        results: dict[str, dict] = {}
        pending = {}
        for run in runs:
            path = self.work / "runs" / f"{run['key']}.json"
            if path.is_file():
                results[run["key"]] = json.loads(path.read_text())
            elif run["key"] not in pending:
                pending[run["key"]] = (run, self.pool.submit(train_run, run))
        for key, (run, future) in pending.items():
            result = future.result()
            (self.work / "runs" / f"{key}.json").write_text(json.dumps(result, indent=1))
            results[key] = result
            print(f"  {key:<22} {run['optimizer']:<7} seed {run['seed']} {json.dumps(run['hp'])} -> "
                  f"test ppl {json.dumps({k: round(v, 2) for k, v in result['test_ppl'].items()})} "
                  f"({result['seconds']:.0f} s)", flush=True)  # fmt: skip
        return [results[run["key"]] for run in runs]


def trials(arm: str, count: int, base: dict | None = None) -> list[dict]:
    """`count` hyperparameter settings of an arm: its defaults, then distinct random draws from its grid."""
    grid = GRIDS[arm]
    rng = random.Random(f"trials:{arm}")
    settings = [{**(base or {}), **DEFAULTS[arm]}]
    combos = [dict(zip(grid, values)) for values in _product(list(grid.values()))]
    rng.shuffle(combos)
    for combo in combos:
        if len(settings) == count:
            break
        candidate = {**(base or {}), **combo}
        if candidate not in settings:
            settings.append(candidate)
    return settings


def _product(lists: list[list]) -> list[tuple]:
    out = [()]
    for values in lists:
        out = [prefix + (value,) for prefix in out for value in values]
    return out


def _mean_std(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"


def _student(result: dict, width: int) -> float:
    return result["test_ppl"][str(width)]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--setting", choices=sorted(SETTINGS), default="smallest")
    for name in ("steps", "trials", "seeds", "teacher_steps"):
        parser.add_argument(f"--{name.replace('_', '-')}", type=int, help=f"override the setting's {name}")
    parser.add_argument("--jobs", type=int, default=2, help="parallel training processes (default 2)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads per process (default 1)")
    parser.add_argument("--work", type=Path, help="cache folder (default outputs/quality/<setting>)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "RESULTS.md")
    parser.add_argument("--plot", type=Path, default=ROOT / "benchmarks" / "quality_mix_n_match.png")
    args = parser.parse_args(argv)
    setting = dict(SETTINGS[args.setting])
    for name in ("steps", "trials", "seeds", "teacher_steps"):
        if getattr(args, name) is not None:
            if getattr(args, name) < 1:
                raise SystemExit(f"--{name.replace('_', '-')} {getattr(args, name)} must be at least 1.")
            setting[name] = getattr(args, name)
    if args.jobs < 1 or args.threads < 1:
        raise SystemExit(f"--jobs {args.jobs} and --threads {args.threads} must be at least 1.")
    work = args.work or ROOT / "outputs" / "quality" / args.setting
    work.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    print(f"quality --setting {args.setting}: {json.dumps(setting)}", flush=True)

    data, tokenizer = prepare_data(setting, work)
    blocks = torch.load(data, weights_only=True)
    runner = Runner(setting, work, data, tokenizer, args.jobs, args.threads)
    seeds = list(range(setting["seeds"]))
    S = setting["student_ffn"]

    print("stage 1: teacher, and CE trials", flush=True)
    teacher_run = runner.spec("teacher", {"learning_rate": 2e-3}, steps=setting["teacher_steps"])
    ce_trials = trials("ce", setting["trials"])
    teacher_result, *ce_results = runner.run_all(
        [teacher_run, *(runner.spec("ce", hp) for hp in ce_trials)]
    )
    print("stage 2: KD trials", flush=True)
    kd_trials = trials("kd", setting["trials"])
    kd_results = runner.run_all([runner.spec("kd", hp) for hp in kd_trials])
    best_ce = ce_trials[min(range(len(ce_trials)), key=lambda i: ce_results[i]["tune_ppl"][str(S)])]
    best_kd = kd_trials[min(range(len(kd_trials)), key=lambda i: kd_results[i]["tune_ppl"][str(S)])]
    print("stage 3: MatTA trials (from KD's best learning rate, gamma, tau_T)", flush=True)
    matta_trials = trials("matta", setting["trials"], base=best_kd)
    matta_results = runner.run_all([runner.spec("matta", hp) for hp in matta_trials])
    best_matta = matta_trials[min(range(len(matta_trials)), key=lambda i: matta_results[i]["tune_ppl"][str(S)])]
    ta_width = S * best_matta["ta_ratio"]
    L = setting["n_layer"]

    print("stage 4: Shampoo's learning rate (AdamW's tuned one x 1 and x 2, seed 0)", flush=True)
    shampoo_hp, shampoo_trials = {}, []
    for kind, best in (("kd", best_kd), ("matta", best_matta)):
        candidates = [{**best, "learning_rate": best["learning_rate"] * m} for m in SHAMPOO_LR_MULTIPLIERS]
        trial_results = runner.run_all([runner.spec(kind, hp, 0, "shampoo") for hp in candidates])
        shampoo_trials += trial_results
        shampoo_hp[kind] = candidates[min(range(len(candidates)), key=lambda i: trial_results[i]["tune_ppl"][str(S)])]
    print("stage 5: seeds, Shampoo, no-sharing ablation, Mix'n'Match baselines, budgets", flush=True)
    groups = {
        "ce": [runner.spec("ce", best_ce, seed) for seed in seeds],
        "kd": [runner.spec("kd", best_kd, seed) for seed in seeds],
        "matta": [runner.spec("matta", best_matta, seed, mix_n_match=seed == 0) for seed in seeds],
        "ta_alone": [runner.spec("ce", best_ce, seed, width=ta_width) for seed in seeds],
        "kd_shampoo": [runner.spec("kd", shampoo_hp["kd"], seed, "shampoo") for seed in seeds],
        "matta_shampoo": [runner.spec("matta", shampoo_hp["matta"], seed, "shampoo") for seed in seeds],
        "separate_ta": [runner.spec("separate_ta", best_matta, seed) for seed in seeds],
        "mnm_kd": [
            runner.spec("kd", best_kd, seed, width=S + k * (ta_width - S) // L)
            for k in range(1, L + 1)
            for seed in range(setting["mnm_seeds"])
        ],
        "matta_all_widths": [
            runner.spec(
                "matta", {**best_matta, "extra_widths": "all"}, 0, mix_n_match="uniform",
                widths=[S + k * (ta_width - S) // L for k in range(L + 1)],
            )
        ],  # fmt: skip
        "budget": [
            runner.spec(kind, hp, 0, steps=setting["steps"] * m)
            for m in setting["budget_multipliers"]
            for kind, hp in (("kd", best_kd), ("matta", best_matta))
        ],
    }
    flat = [run for runs in groups.values() for run in runs]
    results_flat = runner.run_all(flat)
    by_key = {run["key"]: result for run, result in zip(flat, results_flat)}
    results = {name: [by_key[run["key"]] for run in runs] for name, runs in groups.items()}
    runner.pool.shutdown()
    elapsed = time.perf_counter() - started
    every_result = [teacher_result, *ce_results, *kd_results, *matta_results, *shampoo_trials, *results_flat]
    run_minutes = sum(result["seconds"] for result in every_result) / 60

    report = Report(setting, args, blocks, teacher_result, elapsed, run_minutes)
    report.tuning("CE alone", ce_trials, ce_results, S, best_ce)
    report.tuning("KD", kd_trials, kd_results, S, best_kd)
    report.tuning("MatTA", matta_trials, matta_results, S, best_matta)
    report.main_table(results, S, ta_width)
    report.two_by_two(results, S, shampoo_hp)
    report.sharing(results, S, ta_width)
    report.mix_n_match(results, groups["mnm_kd"], S, ta_width, args.plot)
    report.budgets(groups["budget"], results["budget"], results, S)
    report.claims()
    write_section(args.out, f"quality --setting {args.setting}", report.text())
    print(report.text())
    print(f"written to {args.out} ({elapsed / 60:.1f} min)")


def provenance(script: str, seconds: float, parallelism: str) -> list[str]:
    """Markdown lines: when, at which commit, on what machine, with which exact command a result was made."""
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    dirty = subprocess.run(
        ["git", "status", "--porcelain", "--", script, "src"], cwd=ROOT, capture_output=True, text=True
    ).stdout.strip()
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "?")
    return [
        f"Written by `{script}` on {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC in {seconds / 60:.1f} min; "
        "do not edit by hand. Command:",
        "",
        f"    .venv/bin/python {script} {' '.join(sys.argv[1:])}".rstrip(),
        "",
        f"- Commit {commit.stdout.strip()}{' with uncommitted changes to the script or src/' if dirty else ''}; "
        f"torch {torch.__version__}; {os.cpu_count()} CPU cores ({cpu}), {platform.platform()}; {parallelism}; "
        f"load average at the end {os.getloadavg()[0]:.1f}.",
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


class Report:
    """The markdown report, section by section; `claims()` states which of the paper's claims held."""

    def __init__(self, setting, args, blocks, teacher_result, elapsed, run_minutes):
        self.setting, self.lines, self.verdicts = setting, [], []
        tokens = setting["steps"] * setting["batch"] * setting["block"]
        s = setting
        self.lines += [
            f"## Quality: `quality.py --setting {args.setting}`",
            "",
            *provenance("benchmarks/quality.py", elapsed, f"{args.jobs} jobs x {args.threads} thread(s)"),
            f"- Training runs: {run_minutes:.1f} "
            f"process-minutes in all, about {run_minutes / args.jobs:.1f} min of wall time on {args.jobs} workers from "
            "an empty cache (runs found in the cache are not run again, so a resumed invocation is shorter).",
            f"- Corpus: `pydoc_data.topics` (Python {platform.python_version()}), ByteLevel BPE of {s['vocab']} "
            f"tokens, blocks of {s['block']}: {len(blocks['train'])} training blocks "
            f"({blocks['train'].numel():,} tokens), {len(blocks['tune'])} tune and {len(blocks['test'])} test blocks "
            f"({VALIDATION_PERCENT} % of the documents held out). Every perplexity below is on the test blocks.",
            f"- Student: {s['n_layer']} layers x {s['n_embd']}, {s['n_head']} heads, FFN {s['student_ffn']}. "
            f"Teacher: GPT-2 {s['teacher']}, {teacher_result['params']['teacher'] / 1e6:.2f} M parameters, "
            f"pre-trained for {s['teacher_steps']} steps: test ppl {teacher_result['test_ppl']['teacher']:.2f}.",
            f"- Budget per run: {s['steps']} steps x {s['batch']} x {s['block']} = {tokens:,} tokens "
            f"({tokens / blocks['train'].numel():.1f} epochs); AdamW (weight decay 0.1) unless marked Shampoo; "
            f"{s['trials']} tuning trials per arm; {s['seeds']} seeds (mean ± std).",
            "",
        ]

    def tuning(self, name, settings, results, width, best):
        keys = list(settings[0])
        self.lines += [f"### Tuning: {name} ({len(settings)} trials, seed 0, student tune-split ppl)", ""]
        self.lines += ["| " + " | ".join(keys) + " | tune ppl | |", "|" + "---|" * (len(keys) + 2)]
        for hp, result in zip(settings, results):
            mark = "chosen" if hp == best else ""
            row = " | ".join(str(hp[k]) for k in keys)
            self.lines.append(f"| {row} | {result['tune_ppl'][str(width)]:.2f} | {mark} |")
        self.lines.append("")

    def main_table(self, results, S, ta_width):
        from hf_matta.widths import count_parameters

        self.results, self.S, self.ta_width = results, S, ta_width
        rows = [
            ("Student alone (CE)", S, [_student(r, S) for r in results["ce"]]),
            ("KD student", S, [_student(r, S) for r in results["kd"]]),
            ("MatTA student", S, [_student(r, S) for r in results["matta"]]),
            ("MatTA TA", ta_width, [_student(r, ta_width) for r in results["matta"]]),
            ("TA-size model alone (CE)", ta_width, [_student(r, ta_width) for r in results["ta_alone"]]),
        ]
        self.lines += ["### Main comparison (AdamW)", "", "| model | FFN | params | test ppl | per seed |", "|---|---|---|---|---|"]
        for name, width, values in rows:
            params = count_parameters(_model_config(self.setting, [width]), width)
            self.lines.append(
                f"| {name} | {width} | {params / 1e6:.3f} M | {_mean_std(values)} | "
                f"{', '.join(f'{v:.2f}' for v in values)} |"
            )
        self.lines.append("")
        ce, kd, matta = rows[0][2], rows[1][2], rows[2][2]
        self._verdict("MatTA student better than the KD student", kd, matta)
        self._verdict("KD student better than the student alone", ce, kd)
        self._verdict("MatTA TA as good as the TA-size model trained alone", rows[4][2], rows[3][2])

    def two_by_two(self, results, S, shampoo_hp):
        cells = {
            ("KD", "AdamW"): [_student(r, S) for r in results["kd"]],
            ("KD", "Shampoo"): [_student(r, S) for r in results["kd_shampoo"]],
            ("MatTA", "AdamW"): [_student(r, S) for r in results["matta"]],
            ("MatTA", "Shampoo"): [_student(r, S) for r in results["matta_shampoo"]],
        }
        base = statistics.mean(math.log(v) for v in cells[("KD", "AdamW")])
        gain = {key: base - statistics.mean(math.log(v) for v in values) for key, values in cells.items()}
        self.lines += [
            "### {KD, MatTA} x {AdamW, Shampoo} (student test ppl)",
            "",
            "| | AdamW | Shampoo |",
            "|---|---|---|",
            f"| KD | {_mean_std(cells[('KD', 'AdamW')])} | {_mean_std(cells[('KD', 'Shampoo')])} |",
            f"| MatTA | {_mean_std(cells[('MatTA', 'AdamW')])} | {_mean_std(cells[('MatTA', 'Shampoo')])} |",
            "",
            f"Shampoo (blocks of {self.setting['shampoo_block']}, preconditioner every 10 steps from step 10, Adam "
            f"grafting) learning rates, the better of AdamW's x {SHAMPOO_LR_MULTIPLIERS} on seed 0: KD "
            f"{shampoo_hp['kd']['learning_rate']:g}, MatTA {shampoo_hp['matta']['learning_rate']:g}.",
            "",
            "Gains over KD + AdamW in mean log-perplexity (nats; positive is better): MatTA alone "
            f"{gain[('MatTA', 'AdamW')]:+.4f}, Shampoo alone {gain[('KD', 'Shampoo')]:+.4f}, both "
            f"{gain[('MatTA', 'Shampoo')]:+.4f}, against a sum of {gain[('MatTA', 'AdamW')] + gain[('KD', 'Shampoo')]:+.4f}.",
            "",
        ]
        both, added = gain[("MatTA", "Shampoo")], gain[("MatTA", "AdamW")] + gain[("KD", "Shampoo")]
        self.verdicts.append(
            f"- MatTA and Shampoo super-additive (gain of both > sum of gains): "
            f"{'held' if both > added and both > 0 else 'not held'} ({both:+.4f} vs {added:+.4f} nats; single "
            "seed-mean comparison, no error bar)."
        )
        self._verdict("Shampoo better than AdamW for MatTA", cells[("MatTA", "AdamW")], cells[("MatTA", "Shampoo")])

    def sharing(self, results, S, ta_width):
        nested, separate = results["matta"], results["separate_ta"]
        self.lines += [
            "### Parameter sharing: nested TA vs a separate TA trained online with the same loss",
            "",
            "| TA | student test ppl | TA test ppl |",
            "|---|---|---|",
            f"| nested (shares all but FFN neurons {S}..{ta_width}) | {_mean_std([_student(r, S) for r in nested])} | "
            f"{_mean_std([_student(r, ta_width) for r in nested])} |",
            f"| separate (shares nothing) | {_mean_std([_student(r, S) for r in separate])} | "
            f"{_mean_std([_student(r, ta_width) for r in separate])} |",
            "",
        ]
        self._verdict(
            "nesting (sharing) gives a better student than a separate TA",
            [_student(r, S) for r in separate],
            [_student(r, S) for r in nested],
        )

    def mix_n_match(self, results, mnm_runs, S, ta_width, plot_path):
        points = results["matta"][0]["mix_n_match"]
        all_widths = {p["widths"][0]: p for p in results["matta_all_widths"][0]["mix_n_match"]}
        alone: dict[int, list[float]] = {}
        for run, result in zip(mnm_runs, results["mnm_kd"]):
            alone.setdefault(run["widths"][0], []).append(_student(result, run["widths"][0]))
        alone[S] = [_student(r, S) for r in results["kd"]]
        L = self.setting["n_layer"]
        self.lines += [
            "### Mix'n'Match: extracted MatTA students vs same-size models trained alone with KD",
            "",
            "Plan k widens a centred block of k layers to the TA's FFN; a uniform FFN width of "
            f"{S} + k x ({ta_width} - {S}) / {L} has exactly its parameter count. MatTA: seed 0; KD alone: "
            f"{self.setting['mnm_seeds']} seed(s) (the student size: the KD arm's seeds). The last column is a second "
            "MatTA model (seed 0, same tuned settings) whose granularities are all the uniform widths, every one trained "
            "each step as a student of the TA (`extra_widths='all'`), extracted at that uniform width.",
            "",
            "| plan (FFN per layer) | params | MatTA extracted ppl | uniform FFN | KD alone ppl | MatTA, all widths "
            "trained |",
            "|---|---|---|---|---|---|",
        ]
        wins = wins_all = 0
        for k, point in enumerate(points):
            width = S + k * (ta_width - S) // L
            kd = alone.get(width)
            kd_text = _mean_std(kd) if kd else "-"
            wins += bool(kd) and point["ppl"] < statistics.mean(kd)
            trained = all_widths[width]["ppl"]
            wins_all += bool(kd) and trained < statistics.mean(kd)
            self.lines.append(
                f"| {'/'.join(map(str, point['widths']))} | {point['params'] / 1e6:.3f} M | {point['ppl']:.2f} | "
                f"{width} | {kd_text} | {trained:.2f} |"
            )
        self.lines += ["", f"![Mix'n'Match curve]({plot_path.name})", ""]
        self.verdicts.append(
            f"- Extracted MatTA students beat same-size KD models: at {wins} of {len(points)} sizes with two trained "
            f"granularities (block plans), at {wins_all} of {len(points)} with every width trained (seed 0 vs KD's "
            "seed mean)."
        )
        _plot(points, list(all_widths.values()), alone, results, S, self.setting, plot_path)

    def budgets(self, runs, budget_results, results, S):
        self.lines += [
            "### Longer budgets (tuned settings, seed 0)",
            "",
            "| steps | KD student ppl | MatTA student ppl | MatTA TA ppl |",
            "|---|---|---|---|",
            f"| {self.setting['steps']} | {_student(results['kd'][0], S):.2f} | "
            f"{_student(results['matta'][0], S):.2f} | {_student(results['matta'][0], self.ta_width):.2f} |",
        ]
        for i in range(0, len(runs), 2):
            kd, matta = budget_results[i], budget_results[i + 1]
            self.lines.append(
                f"| {runs[i]['steps']} | {_student(kd, S):.2f} | {_student(matta, S):.2f} | "
                f"{_student(matta, self.ta_width):.2f} |"
            )
        self.lines.append("")

    def _verdict(self, claim: str, baseline: list[float], method: list[float]) -> None:
        """Held / not held / within noise: the difference of means against twice its standard error."""
        diff = statistics.mean(baseline) - statistics.mean(method)
        se = math.sqrt(sum(statistics.variance(v) / len(v) for v in (baseline, method) if len(v) > 1))
        if se == 0:
            word = "held" if diff > 0 else "not held"
        elif abs(diff) <= 2 * se:
            word = "within noise"
        else:
            word = "held" if diff > 0 else "not held (the opposite holds)"
        self.verdicts.append(f"- {claim}: {word} (ppl {statistics.mean(method):.2f} vs {statistics.mean(baseline):.2f}, "
                             f"difference {diff:+.2f}, 2 x standard error {2 * se:.2f}).")  # fmt: skip

    def claims(self):
        self.lines += ["### Claims, decided from the tables above", "", *self.verdicts, ""]

    def text(self) -> str:
        return "\n".join(self.lines)


def _plot(points, all_widths, alone, results, S, setting, path: Path) -> None:
    """Perplexity against parameters: the extracted MatTA family, the same sizes trained alone with KD."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from hf_matta.widths import count_parameters

    fig, ax = plt.subplots(figsize=(6, 4), dpi=90)
    ax.plot([p["params"] / 1e6 for p in points], [p["ppl"] for p in points], "o-", label="MatTA, block plans (seed 0)")
    ax.plot([p["params"] / 1e6 for p in all_widths], [p["ppl"] for p in all_widths], "D-",
            label="MatTA, all widths trained (seed 0)")  # fmt: skip
    sizes = sorted(alone)
    ax.errorbar(
        [count_parameters(_model_config(setting, [w]), w) / 1e6 for w in sizes],
        [statistics.mean(alone[w]) for w in sizes],
        yerr=[statistics.stdev(alone[w]) if len(alone[w]) > 1 else 0 for w in sizes],
        fmt="s--", label="trained alone with KD",
    )  # fmt: skip
    ce = [_student(r, S) for r in results["ce"]]
    ax.plot([points[0]["params"] / 1e6], [statistics.mean(ce)], "^", label="student alone (CE)")
    ax.set_xlabel("parameters (M)")
    ax.set_ylabel("test perplexity")
    ax.set_title("Mix'n'Match: extracted students vs trained alone")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


if __name__ == "__main__":
    main(sys.argv[1:])
