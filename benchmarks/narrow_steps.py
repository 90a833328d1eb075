"""The wide end of the narrow setting: can MatTA's TA reach KD alone at its width (3 % or closer) at the tuned step?

    .venv/bin/python benchmarks/quality.py --setting narrow     # first: its data and teacher (and its tables)
    .venv/bin/python benchmarks/narrow_steps.py                 # then these runs (about 2 h on 2 cores)

quality.py's tuned MatTA (learning rate 4e-3, the FFN neurons beyond the student's width at twice that step,
`ta_neuron_lr_scale=2`) ends with its TA 3.3 % above KD alone at the TA's width, its one missed goal at the wide end.
KD alone's best step grows with the width (quality.py's tuning: 2e-3 at FFN 32, 4e-3 at 280 and 528, 8e-3 at 776
and 1024). Four ways to give the wide end more, each with its Mix'n'Match family:
1. every parameter at KD alone's step for the TA's width (8e-3; the TA-only neurons then at 1.6e-2);
2. the TA's term weighted 2 (`ta_weight=2`), at the tuned step: the shared weights follow the TA more;
3. each part at KD alone's step for its width: 2e-3 for the student and the shared weights, x 4 (8e-3) for the
   TA-only neurons;
4. the TA's term weighted 1.5, between the default and 2;
and one for the members between student and TA, which the default trains one per step (`extra_widths="sample"`):
5. every width between trained every step (`extra_widths="all"`): as many steps for each member as KD alone takes;
6. both: every width every step with the TA's term weighted 2.
Every run against KD alone at every ladder width and the same seed, each at its own tuned step (re-run here); the
family's geometric mean perplexity on the tune split decides whether a variant would replace quality.py's default,
as in `narrow_probes.py`.

Writes a section of benchmarks/RESULTS.md; runs are cached under `--work` with quality.py's (its cached tuned MatTA
and KD-alone seeds are these runs: the same specifications, so the same keys).
"""

import sys
import time

from narrow_probes import _families, _lower_in_every_seed, _over_seeds, open_narrow
from quality import ladder, step_flops, trials

from hf_matta.pipeline.report import provenance, write_section


# quality.py's narrow tuning (benchmarks/RESULTS.md, 5 trials at seed 0 per arm and width): not re-tuned here
MATTA_LR = 4e-3
KD_LR = {32: 2e-3, 280: 4e-3, 528: 4e-3, 776: 8e-3, 1024: 8e-3}
SEEDS = (0, 1, 2)
TUNED = "quality.py's tuned MatTA (4e-3, TA-only neurons x 2)"
VARIANTS = {  # changes to the tuned MatTA, and the seeds each runs (fewer where the first seeds were worse everywhere)
    "every parameter at 8e-3 (TA-only neurons x 2)": (dict(learning_rate=8e-3), (0, 1)),
    "the TA's term weighted 2": (dict(ta_weight=2.0), SEEDS),
    "2e-3, TA-only neurons x 4 (8e-3)": (dict(learning_rate=2e-3, ta_neuron_lr_scale=4.0), (0,)),
    "the TA's term weighted 1.5": (dict(ta_weight=1.5), SEEDS),
    "every width between trained every step": (dict(extra_widths="all"), SEEDS),
    "every width every step, the TA's term weighted 2": (dict(extra_widths="all", ta_weight=2.0), SEEDS),
}


def main(argv: list[str] | None = None) -> None:
    args, setting, runner = open_narrow(__doc__.split("\n\n")[0], argv)
    started = time.perf_counter()
    widths = ladder(setting)
    if sorted(KD_LR) != widths:
        raise SystemExit(f"KD_LR names widths {sorted(KD_LR)}, the narrow ladder is {widths}: update KD_LR.")
    kd = trials(setting, "kd", 1)[0]
    tuned = {**trials(setting, "matta", 1, base=kd)[0], "learning_rate": MATTA_LR}
    variants = {TUNED: (tuned, SEEDS)}
    variants.update({name: ({**tuned, **change}, seeds) for name, (change, seeds) in VARIANTS.items()})
    specs = {
        (name, seed): runner.spec("matta", hp, seed, mix_n_match=True)
        for name, (hp, seeds) in variants.items()
        for seed in seeds
    }
    for w in widths:
        hp = {**kd, "learning_rate": KD_LR[w]}
        specs.update({(w, seed): runner.spec("kd", hp, seed, widths=[w]) for seed in SEEDS})
    results = dict(zip(specs, runner.run_all(list(specs.values()))))
    runner.pool.shutdown()
    minutes = sum(result["seconds"] for result in results.values()) / 60
    better = _lower_in_every_seed(variants, results, TUNED)
    lines = [
        "## The narrow setting's wide end: `narrow_steps.py`",
        "",
        *provenance("benchmarks/narrow_steps.py", time.perf_counter() - started, f"{args.jobs} jobs x 1 thread"),
        "- quality.py's narrow setting (its data and teacher); test perplexity on the same 1024 test blocks. MatTA at "
        f"quality.py's tuned learning rate ({MATTA_LR}) and KD alone at each width at its own "
        f"({', '.join(f'{w}: {lr:g}' for w, lr in KD_LR.items())}), all re-run here. Training runs: {minutes:.1f} "
        "process-minutes in all (cached runs are not run again).",
        "",
        "### Where each variant puts the student, the TA and the members between",
        "",
        "Each seed's runs against KD alone at the same seed; a percentage is the mean over seeds of the per-seed "
        "ratio, with its range. The uniform members are the widths between student and TA and the TA.",
    ]
    lines += _over_seeds(variants, results, results, widths, TUNED)
    lines += [
        "",
        "The family on the tune split is the geometric mean perplexity of the five uniform members on the tune "
        "blocks. "
        + (
            f"Lower than the tuned MatTA's in every seed: {', '.join(better)}."
            if better
            else "No variant's family is lower than the tuned MatTA's in every seed it ran: the default stays."
        ),
        "",
        "Training FLOPs (`quality.step_flops`) against the tuned MatTA's: "
        + "; ".join(f"{name}: {ratio:.2f} x" for name, ratio in _flop_ratios(setting, variants).items())
        + ".",
        "",
        "### Mix'n'Match families against the KD-alone curve",
        "",
        "The worst member of each seed against the curve through KD alone's sizes at the same seed (log-linear "
        "between them), as the mean over seeds and its range; and in how many seeds the family is monotone.",
    ]
    kinds = list(results[TUNED, 0]["mix_n_match"])
    lines += _families(variants, results, results, setting, kinds)
    text = "\n".join(lines)
    write_section(args.out, "narrow_steps", text)
    print(text)


def _flop_ratios(setting: dict, variants: dict) -> dict[str, float]:
    """Each variant's training FLOPs as a multiple of the tuned MatTA's (the one that differs: every width trained
    every step instead of one sampled)."""
    flops = {name: step_flops(setting, "matta", hp, setting["steps"]) for name, (hp, _) in variants.items()}
    return {name: value / flops[TUNED] for name, value in flops.items() if name != TUNED}


if __name__ == "__main__":
    main(sys.argv[1:])
