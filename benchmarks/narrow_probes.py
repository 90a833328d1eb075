"""Probes of the narrow setting's misses, run after `quality.py --setting narrow` (they reuse its data, teacher,
defaults, seeds and run cache):

    .venv/bin/python benchmarks/quality.py --setting narrow     # first: data, teacher and the arms (about 2 h)
    .venv/bin/python benchmarks/narrow_probes.py                # then these probes (about 3 h on 2 cores)

1. MatTA variants against the defaults, with their Mix'n'Match families: the paper's schedule (every term on from step
   0, the distillation term ramped in over 10 %: does letting the TA go first matter where width binds?), the TA's term
   weighted 2 (does it bring the wide members to the curve of models trained alone, which they miss by about 3 %, and
   at what cost to the student?), the TA alone for 60 % instead of 40 %, and a Mix'n'Match plan mixing widths across
   layers trained each step instead of a uniform middle width (`extra_widths="mixed"`: plans that mix widths are never
   trained otherwise, and are far off the curve), 3 seeds each. Each against KD alone at each width and the same seed,
   and, to decide whether a variant should replace the defaults, the family's geometric mean perplexity on the tune
   split (never the test split).
2. Training 3 x longer (seeds 0 and 1): does the TA's lead, and the cost of nesting, grow or shrink with more tokens?
   And is the TA-first phase a share of training or a number of steps: the default (40 %) against the 1000-step run's
   400 steps, and the paper's schedule, at 3000 steps (seed 0).
3. How far distillation can take a student of this width: KD alone at the TA's width (the benchmark's own seed-0 run,
   saved), then KD students taught by it instead of the benchmark's weaker teacher (gamma 0.5 and 0.9). If they end
   where MatTA's student does, the TA gives its student what a teacher of the TA's quality can, and a MatTA student
   10 % below the KD student would have to beat distillation itself.
4. At quality.py's tuned learning rates (probes 1-3 run at the arms' default 2e-3, before quality.py tuned it): its
   tuned MatTA against KD alone tuned at every width, and at MatTA's tuned learning rate (3 seeds each, with their
   Mix'n'Match families): the TA-only FFN neurons' step at 1, 2 and 4 times the learning rate (`ta_neuron_lr_scale`;
   KD alone's best step grows with the width, from 2e-3 at the student's to 8e-3 at the TA's), the TA's term
   weighted 2, the variant that brought the TA closest to KD alone at 2e-3, and a mixed plan trained per step, the
   one that made plans mixing widths across layers usable there.

Writes a section of benchmarks/RESULTS.md; runs are cached under `--work`, like quality.py's.
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

from quality import (
    SETTINGS, Runner, _mean_std, _model_config, against_curve, family_ppl, ladder, monotone, trials, tune,
)  # fmt: skip

from hf_matta.pipeline.report import provenance, write_section
from hf_matta.widths import count_parameters


ROOT = Path(__file__).resolve().parent.parent
VARIANTS = {  # the MatTA defaults, then these changes to them, and the seeds each runs (quality.py runs the defaults')
    "paper: all on, distill ramp 10 %": (
        dict(ta_first_steps=0.0, student_warmup_steps=0.0, distill_warmup_steps=0.1), (0, 1, 2)
    ),
    "TA first, TA's term weighted 2": (dict(ta_weight=2.0), (0, 1, 2)),
    "TA first for 60 %": (dict(ta_first_steps=0.6), (0, 1, 2)),
    "a mixed plan per step instead of a uniform width": (dict(extra_widths="mixed"), (0, 1, 2)),
}
SEEDS = (0, 1, 2)  # quality.py's seeds of the narrow setting: its defaults' and KD alone's runs are cached
GAMMAS = (0.5, 0.9)
LONGER = 3  # the longer-training probe: 3 x the steps (1.6 epochs)
LONGER_SEEDS = (0, 1)  # of the defaults and KD trained that long; the other schedules: seed 0
LONGER_VARIANTS = {  # MatTA's schedules trained that long: is the default's TA-first phase a share or a step count?
    "TA first 400 steps, ramps 300 (the 1000-step run's)": dict(
        ta_first_steps=400, student_warmup_steps=300, distill_warmup_steps=300
    ),
    "paper: all on, distill ramp 10 %": VARIANTS["paper: all on, distill ramp 10 %"][0],
}
DEFAULT = "TA first 40 %, ramps 30 % (default)"
TUNED = "quality.py's tuned MatTA"
# the step of the TA-only FFN neurons (`ta_neuron_lr_scale`) at MatTA's tuned learning rate: KD alone's best step grows
# with the width (quality.py's per-size tuning: 2e-3 at FFN 32, 8e-3 at 1024), while MatTA runs one for both ends
STEP_SCALES = {1.0: SEEDS, 2.0: SEEDS, 4.0: (0,)}  # x 4: one seed (its tune-split family the worst of the three)


def open_narrow(description: str, argv: list[str] | None) -> tuple[argparse.Namespace, dict, Runner]:
    """A narrow-setting script's command line (`--work`, `--jobs`, `--out`), the setting, and a Runner on the data
    and teacher quality.py left in `--work` (the script exits saying what to run first when they are missing)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--work", type=Path, default=ROOT / "outputs" / "quality" / "narrow")
    parser.add_argument("--jobs", type=int, default=2, help="parallel training processes (default 2)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "RESULTS.md")
    args = parser.parse_args(argv)
    setting = SETTINGS["narrow"]
    data = args.work / f"blocks-{setting['corpus']}-{setting['vocab']}-{setting['block']}.pt"
    if not (data.is_file() and (args.work / "models" / "teacher").is_dir()):
        raise SystemExit(
            f"{args.work} has no narrow-setting data or teacher: run `python benchmarks/quality.py --setting narrow` "
            "first (or pass its --work folder)."
        )
    return args, setting, Runner(setting, args.work, data, args.jobs, 1)


def main(argv: list[str] | None = None) -> None:
    args, setting, runner = open_narrow(__doc__.split("\n\n")[0], argv)
    started = time.perf_counter()
    S, A = setting["student_ffn"], setting["ta_ffn"]
    # every arm at its defaults (learning rate 2e-3), every neuron at one step: the probes came before quality.py
    # tuned the learning rate, and before the TA-only neurons' step (`ta_neuron_lr_scale`) existed
    kd = trials(setting, "kd", 1)[0]
    matta = {**trials(setting, "matta", 1, base=kd)[0], "ta_neuron_lr_scale": 1.0}

    kd_runs = [runner.spec("kd", kd, 0), runner.spec("kd", kd, 0, widths=[A], save="kd_ta")]
    variants = {DEFAULT: (matta, SEEDS)}
    variants.update({name: ({**matta, **change}, seeds) for name, (change, seeds) in VARIANTS.items()})
    matta_runs = {
        (name, seed): runner.spec("matta", hp, seed, mix_n_match=True)
        for name, (hp, seeds) in variants.items()
        for seed in seeds
    }
    alone_runs = {(w, seed): runner.spec("kd", kd, seed, widths=[w]) for w in ladder(setting) for seed in SEEDS}
    first = runner.run_all([runner.teacher_spec(), *kd_runs, *alone_runs.values(), *matta_runs.values()])
    base, kd_student, kd_ta = first[:3]
    alone = dict(zip(alone_runs, first[3 : 3 + len(alone_runs)]))
    matta_results = dict(zip(matta_runs, first[3 + len(alone_runs) :]))
    # quality.py's tuned arms (its tuning is cached), and the TA's term weighted 2 at MatTA's tuned learning rate
    tuned = tune(setting, runner)
    best = tuned.best["matta"]
    scale = best.get("ta_neuron_lr_scale", 1.0)
    tuned_variants = {TUNED: (best, SEEDS)}
    tuned_variants.update({
        f"{TUNED}, TA-only neurons' step x {k:g}": ({**best, "ta_neuron_lr_scale": k}, seeds)
        for k, seeds in STEP_SCALES.items() if k != scale
    })  # fmt: skip
    tuned_variants[f"{TUNED}, TA's term weighted 2, one step"] = (
        {**best, "ta_weight": 2.0, "ta_neuron_lr_scale": 1.0}, SEEDS
    )
    tuned_variants[f"{TUNED}, a mixed plan per step"] = ({**best, "extra_widths": "mixed"}, SEEDS)
    tuned_specs = {
        (name, seed): runner.spec("matta", hp, seed, mix_n_match=True)
        for name, (hp, seeds) in tuned_variants.items()
        for seed in seeds
    }
    for w in ladder(setting):
        tuned_specs.update({(w, seed): runner.spec("kd", tuned.best_kd_at[w], seed, widths=[w]) for seed in SEEDS})
    tuned_results = dict(zip(tuned_specs, runner.run_all(list(tuned_specs.values()))))
    taught = runner.run_all(
        [runner.spec("kd", {**kd, "teacher_weight": gamma}, 0, teacher="kd_ta") for gamma in GAMMAS]
    )
    steps = LONGER * setting["steps"]
    longer_schedules = {DEFAULT: (matta, LONGER_SEEDS)}
    longer_schedules.update({name: ({**matta, **change}, (0,)) for name, change in LONGER_VARIANTS.items()})
    longer_specs = {  # the longest runs first: they start first
        (name, seed): runner.spec("matta", hp, seed, steps=steps)
        for name, (hp, seeds) in longer_schedules.items()
        for seed in seeds
    }
    for seed in LONGER_SEEDS:
        longer_specs["kd_ta", seed] = runner.spec("kd", kd, seed, steps=steps, widths=[A])
        longer_specs["kd", seed] = runner.spec("kd", kd, seed, steps=steps)
    longer = dict(zip(longer_specs, runner.run_all(list(longer_specs.values()))))
    runner.pool.shutdown()
    teacher = next(iter(base["test_ppl"].values()))
    variant_runs = [result for (name, _), result in matta_results.items() if name != DEFAULT]
    variant_runs += [
        tuned_results[name, seed] for name, (_, seeds) in list(tuned_variants.items())[1:] for seed in seeds
    ]
    probes = [kd_student, kd_ta, *taught, *longer.values(), *variant_runs]
    minutes = sum(result["seconds"] for result in probes) / 60
    middle = ladder(setting)[1:-1]  # the Mix'n'Match widths between student and TA
    default = matta_results[DEFAULT, 0]
    lines = [
        "## Narrow-setting probes: `narrow_probes.py`",
        "",
        *provenance("benchmarks/narrow_probes.py", time.perf_counter() - started, f"{args.jobs} jobs x 1 thread"),
        "- The narrow setting of `quality.py` (its data, teacher and cached runs); test perplexity on the same 1024 "
        f"test blocks. Every run here, KD alone included, is at the arms' default learning rate ({kd['learning_rate']}"
        "; the probes came before quality.py tuned it), every MatTA neuron at that one step, until the section at "
        "quality.py's tuned learning rates: they compare schedules with one another, not with the tuned arms. "
        f"Training runs: {minutes:.1f} process-minutes in all (cached runs are not run again).",
        "",
        "### MatTA's defaults (TA first 40 %) against the paper's schedule, a heavier TA term, a longer TA-first "
        "phase and mixed-plan training, seed 0",
        "",
        "| MatTA | student | " + " | ".join(f"uniform {w}" for w in middle) + " | TA | search monotone |",
        "|---|---|" + "---|" * len(middle) + "---|---|",
    ]
    for name in variants:
        result = matta_results[name, 0]
        ppl = result["test_ppl"]
        search = "yes" if monotone(result["mix_n_match"]["search"]) else "no"
        cells = " | ".join(f"{ppl[str(w)]:.2f}" for w in middle)
        lines.append(f"| {name} | {ppl[str(S)]:.2f} | {cells} | {ppl[str(A)]:.2f} | {search} |")
    kd_cells = " | ".join(f"{alone[w, 0]['test_ppl'][str(w)]:.2f}" for w in ladder(setting))
    lines.append(f"| (KD alone at each width, seed 0) | {kd_cells} | - |")
    lines += [
        "",
        "### Over seeds: where each schedule puts the student and the TA",
        "",
        "Each seed's runs against KD alone at the same seed (quality.py's runs); a percentage is the mean over seeds "
        "of the per-seed ratio, with its range. The uniform members are the widths between student and TA and the TA.",
    ]
    lines += _over_seeds(variants, matta_results, alone, ladder(setting), DEFAULT)
    better = _lower_in_every_seed(variants, matta_results, DEFAULT)
    lines += [
        "",
        "The family on the tune split is the geometric mean perplexity of the five uniform members on the tune blocks "
        "(documents apart from the test ones), a choice that weighs every member (quality.py tunes MatTA on its "
        "student's tune perplexity alone). "
        + (
            f"Lower than the defaults' in every seed: {', '.join(better)}."
            if better
            else "No variant's family is lower than the defaults' in every seed it ran: the defaults stay."
        ),
        "",
        f"### At quality.py's tuned learning rates (MatTA {best['learning_rate']}, KD alone tuned at each width)",
        "",
        "quality.py's tuned MatTA and KD alone at every width (each at the learning rate its own tune perplexity "
        "chose), and, at MatTA's tuned learning rate: the FFN neurons beyond the student's width at other multiples "
        "of the step (`ta_neuron_lr_scale`: KD alone's best step grows with the width, MatTA's one step serves both "
        "ends), the variant that brought the TA closest to KD alone at 2e-3, the TA's term weighted 2 (every "
        "neuron at one step), and the one that made the mixed plans usable, a mixed plan trained per step. Columns "
        "as above; the last column decides whether a variant replaces quality.py's default, as above.",
    ]
    lines += _over_seeds(tuned_variants, tuned_results, tuned_results, ladder(setting), TUNED)
    tuned_better = _lower_in_every_seed(tuned_variants, tuned_results, TUNED)
    lines += [
        "",
        (
            f"Lower on the tune split than quality.py's tuned MatTA in every seed: {', '.join(tuned_better)}."
            if tuned_better
            else "No variant's family is lower on the tune split than quality.py's tuned MatTA's in every seed."
        )
        + f" quality.py's narrow setting runs the TA-only neurons' step at x {scale:g}.",
        "",
        "### Mix'n'Match families against the KD-alone curve",
        "",
        "Each family's members (quality.py's: uniform plans, block plans, the greedy search's path, and both after "
        "reordering by importance) against KD alone at the same seed, the curve through its sizes (log-linear "
        "between them): the worst member of each seed, as the mean over seeds and its range; and in how many seeds "
        "the family is monotone. The probes at 2e-3 against KD alone at 2e-3, then the tuned runs against KD alone "
        "tuned at every width.",
    ]
    lines += _families(variants, matta_results, alone, setting, list(default["mix_n_match"]))
    lines += _families(tuned_variants, tuned_results, tuned_results, setting, list(default["mix_n_match"]))
    lines += [
        "",
        f"### Trained {LONGER} x longer ({steps} steps, {steps * setting['batch'] * setting['block'] / 1e6:.1f} M "
        "tokens)",
        "",
        "| steps | MatTA schedule | seed | MatTA student | MatTA TA | TA below its student | KD student | KD alone at "
        "the TA's width | TA above KD alone | MatTA student vs KD student |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    rows = [(setting["steps"], DEFAULT, seed, matta_results[DEFAULT, seed], alone[S, seed], alone[A, seed])
            for seed in LONGER_SEEDS]  # fmt: skip
    rows += [
        (steps, name, seed, longer[name, seed], longer["kd", seed], longer["kd_ta", seed])
        for name, (_, seeds) in longer_schedules.items()
        for seed in seeds
    ]
    for count, name, seed, matta_run, kd_run, kd_ta_run in rows:
        student, ta = matta_run["test_ppl"][str(S)], matta_run["test_ppl"][str(A)]
        kd_s, kd_a = kd_run["test_ppl"][str(S)], kd_ta_run["test_ppl"][str(A)]
        lines.append(
            f"| {count} | {name} | {seed} | {student:.2f} | {ta:.2f} | {(1 - ta / student) * 100:.1f} % | "
            f"{kd_s:.2f} | {kd_a:.2f} | {(ta / kd_a - 1) * 100:+.1f} % | {(student / kd_s - 1) * 100:+.1f} % |"
        )
    lines += [
        "",
        "### How far distillation takes a student of FFN 32",
        "",
        "| student | teacher (test ppl) | gamma | student test ppl |",
        "|---|---|---|---|",
        f"| KD (the benchmark's arm) | the benchmark's, 4 x 128 CE ({teacher:.2f}) | {kd['teacher_weight']} | "
        f"{kd_student['test_ppl'][str(S)]:.2f} |",
        *(
            f"| KD | KD alone at FFN {A} ({kd_ta['test_ppl'][str(A)]:.2f}) | {gamma} | "
            f"{result['test_ppl'][str(S)]:.2f} |"
            for gamma, result in zip(GAMMAS, taught)
        ),
        f"| MatTA (default schedule) | its TA ({default['test_ppl'][str(A)]:.2f}) and the benchmark's teacher | "
        f"{kd['teacher_weight']} | {default['test_ppl'][str(S)]:.2f} |",
        "",
    ]
    text = "\n".join(lines)
    write_section(args.out, "narrow_probes", text)
    print(text)


def _over_seeds(variants: dict, matta: dict, alone: dict, widths: list[int], reference: str) -> list[str]:
    """The "over seeds" table, header and rows: each variant's seeds (`matta[name, seed]`) against KD alone at every
    width and the same seed (`alone[width, seed]`), and its tune-split family against `reference`'s."""
    S, A = widths[0], widths[-1]
    rows = [
        "",
        "| MatTA | seeds | student | TA | TA below its student | TA above KD alone at its width | student vs KD "
        "student | uniform members above KD alone | uniform family monotone | family on the tune split | below the "
        "default's (tune) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, (_, seeds) in variants.items():
        runs = [matta[name, seed]["test_ppl"] for seed in seeds]
        kd_alone = [{w: alone[w, seed]["test_ppl"][str(w)] for w in widths} for seed in seeds]
        falling = sum(all(ppl[str(b)] < ppl[str(a)] for a, b in zip(widths, widths[1:])) for ppl in runs)
        family = [family_ppl(matta[name, seed]["tune_ppl"]) for seed in seeds]
        below = "-" if name == reference else f"{_below(matta, name, reference, seeds)} of {len(seeds)}"
        members = [_ratio([ppl[str(w)] for ppl in runs], [kd[w] for kd in kd_alone]) for w in widths[1:]]
        rows.append(
            f"| {name} | {len(seeds)} | {_mean_std([ppl[str(S)] for ppl in runs])} | "
            f"{_mean_std([ppl[str(A)] for ppl in runs])} | "
            f"{_percent([1 - ppl[str(A)] / ppl[str(S)] for ppl in runs])} | "
            f"{_percent([ppl[str(A)] / kd[A] - 1 for ppl, kd in zip(runs, kd_alone)])} | "
            f"{_percent([ppl[str(S)] / kd[S] - 1 for ppl, kd in zip(runs, kd_alone)])} | "
            f"{min(members) * 100:+.1f} to {max(members) * 100:+.1f} % | {falling} of {len(seeds)} | "
            f"{_mean_std(family)} | {below} |"
        )
    return rows


def _families(variants: dict, matta: dict, alone: dict, setting: dict, kinds: list[str]) -> list[str]:
    """The Mix'n'Match table, header and rows: per variant and family kind, the worst member's distance to the
    KD-alone curve (`alone[w, seed]`) over seeds, and in how many seeds the family is monotone."""
    widths = ladder(setting)
    params = [count_parameters(_model_config(setting, [w]), w) for w in widths]
    rows = ["", "| MatTA | " + " | ".join(kinds) + " |", "|---|" + "---|" * len(kinds)]
    for name, (_, seeds) in variants.items():
        cells = []
        for kind in kinds:
            curves = [[alone[w, seed]["test_ppl"][str(w)] for w in widths] for seed in seeds]
            checks = [against_curve(matta[name, seed]["mix_n_match"][kind], params, curve)
                      for seed, curve in zip(seeds, curves)]  # fmt: skip
            falling = sum(ordered for _, ordered in checks)
            cells.append(f"{_percent([worst for worst, _ in checks])}, monotone {falling} of {len(seeds)}")
        rows.append(f"| {name} | " + " | ".join(cells) + " |")
    return rows


def _lower_in_every_seed(variants: dict, matta: dict, reference: str) -> list[str]:
    """The variants whose family is lower on the tune split than `reference`'s in every seed they ran: the rule that
    replaces a default."""
    return [
        name for name, (_, seeds) in variants.items()
        if name != reference and _below(matta, name, reference, seeds) == len(seeds)
    ]  # fmt: skip


def _below(matta: dict, name: str, reference: str, seeds) -> int:
    """In how many of `seeds` the family of `name` is lower on the tune split than the family of `reference`."""
    return sum(family_ppl(matta[name, s]["tune_ppl"]) < family_ppl(matta[reference, s]["tune_ppl"]) for s in seeds)


def _ratio(values: list[float], baselines: list[float]) -> float:
    """The mean over seeds of value / baseline - 1."""
    return statistics.mean(value / baseline - 1 for value, baseline in zip(values, baselines))


def _percent(fractions: list[float]) -> str:
    """Per-seed fractions as their mean in %, with their range."""
    mean = statistics.mean(fractions) * 100
    if len(fractions) == 1:
        return f"{mean:+.1f} %"
    return f"{mean:+.1f} % ({min(fractions) * 100:+.1f} to {max(fractions) * 100:+.1f})"


if __name__ == "__main__":
    main(sys.argv[1:])
