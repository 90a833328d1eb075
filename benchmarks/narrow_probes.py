"""Probes of the narrow setting's misses, run after `quality.py --setting narrow` (they reuse its data, teacher,
defaults and run cache), seed 0 each:

    .venv/bin/python benchmarks/quality.py --setting narrow     # first: data, teacher and the arms (about 2 h)
    .venv/bin/python benchmarks/narrow_probes.py                # then these probes (about 30 min on 2 cores)

1. Two MatTA variants against the defaults, with their Mix'n'Match families: the paper's schedule (every term on from
   step 0, the distillation term ramped in over 10 %) instead of the TA first (does letting the TA go first matter
   where width binds?), and the TA's term weighted 2 (does it bring the wide members to the curve of models trained
   alone, which they miss by about 3 %, and at what cost to the student?).
2. How far distillation can take a student of this width: KD alone at the TA's width (the benchmark's own seed-0 run,
   saved), then KD students taught by it instead of the benchmark's weaker teacher (gamma 0.5 and 0.9). If they end
   where MatTA's student does, the TA gives its student what a teacher of the TA's quality can, and a MatTA student
   10 % below the KD student would have to beat distillation itself.

Writes a section of benchmarks/RESULTS.md; runs are cached under `--work`, like quality.py's.
"""

import argparse
import sys
import time
from pathlib import Path

from quality import SETTINGS, Runner, ladder, trials

from hf_matta.pipeline.report import provenance, write_section


ROOT = Path(__file__).resolve().parent.parent
VARIANTS = {  # the MatTA defaults, then these changes to them
    "paper: all on, distill ramp 10 %": dict(ta_first_steps=0.0, student_warmup_steps=0.0, distill_warmup_steps=0.1),
    "TA first, TA's term weighted 2": dict(ta_weight=2.0),
}
GAMMAS = (0.5, 0.9)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
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
    started = time.perf_counter()
    runner = Runner(setting, args.work, data, args.jobs, 1)
    S, A = setting["student_ffn"], setting["ta_ffn"]
    kd = trials(setting, "kd", 1)[0]  # the narrow setting runs every arm at its defaults
    matta = trials(setting, "matta", 1, base=kd)[0]

    kd_runs = [runner.spec("kd", kd, 0), runner.spec("kd", kd, 0, widths=[A], save="kd_ta")]
    variants = [matta, *({**matta, **change} for change in VARIANTS.values())]
    matta_runs = [runner.spec("matta", hp, 0, mix_n_match=True) for hp in variants]
    alone_runs = [runner.spec("kd", kd, 0, widths=[w]) for w in ladder(setting)]  # quality.py's seed 0
    first = runner.run_all([runner.teacher_spec(), *kd_runs, *alone_runs, *matta_runs])
    base, kd_student, kd_ta = first[:3]
    alone, (default, *others) = first[3 : 3 + len(alone_runs)], first[3 + len(alone_runs) :]
    taught = runner.run_all(
        [runner.spec("kd", {**kd, "teacher_weight": gamma}, 0, teacher="kd_ta") for gamma in GAMMAS]
    )
    runner.pool.shutdown()
    teacher = next(iter(base["test_ppl"].values()))
    minutes = sum(result["seconds"] for result in (kd_student, kd_ta, default, *others, *taught)) / 60
    middle = ladder(setting)[1:-1]  # the Mix'n'Match widths between student and TA
    lines = [
        "## Narrow-setting probes: `narrow_probes.py`",
        "",
        *provenance("benchmarks/narrow_probes.py", time.perf_counter() - started, f"{args.jobs} jobs x 1 thread"),
        "- The narrow setting of `quality.py` (its data, defaults and cached runs), seed 0; test perplexity on the "
        f"same 1024 test blocks. Training runs: {minutes:.1f} process-minutes in all (cached runs are not run again).",
        "",
        "### MatTA's defaults (TA first) against the paper's schedule and a heavier TA term",
        "",
        "| MatTA | student | " + " | ".join(f"uniform {w}" for w in middle) + " | TA | search monotone |",
        "|---|---|" + "---|" * len(middle) + "---|---|",
    ]
    rows = [("TA first 40 %, ramps 30 % (default)", default), *zip(VARIANTS, others)]
    for name, result in rows:
        ppl = result["test_ppl"]
        search = sorted(result["mix_n_match"]["search"], key=lambda point: point["params"])
        monotone = all(b["ppl"] < a["ppl"] for a, b in zip(search, search[1:]))
        cells = " | ".join(f"{ppl[str(w)]:.2f}" for w in middle)
        lines.append(f"| {name} | {ppl[str(S)]:.2f} | {cells} | {ppl[str(A)]:.2f} | {'yes' if monotone else 'no'} |")
    kd_cells = " | ".join(f"{result['test_ppl'][str(w)]:.2f}" for w, result in zip(ladder(setting), alone))
    lines.append(f"| (KD alone at each width, seed 0) | {kd_cells} | - |")
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


if __name__ == "__main__":
    main(sys.argv[1:])
