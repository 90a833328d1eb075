"""The paper's quality claims at a scale two CPU cores can run: is the MatTA family elastic (a TA ahead of its
student, Mix'n'Match students on or below the curve of models trained alone), and is its student better than one
distilled from the teacher alone? Every claim is decided by the script, over seeds, against tuned baselines.

    .venv/bin/python benchmarks/quality.py                         # --setting smallest: from scratch, fast
    apt-get install python3.11-doc                                 # once: the capacity setting's corpus
    .venv/bin/python benchmarks/quality.py --setting capacity      # the paper's setting in miniature (hours)
    .venv/bin/python benchmarks/quality.py --setting narrow        # capacity bound from scratch (about 2 h)
    .venv/bin/python benchmarks/quality.py --setting grown         # narrow's widths, grown from a plateau (1.5 h)
    apt-get install linux-doc-6.1                                  # once: grown_linux's corpus
    .venv/bin/python benchmarks/quality.py --setting grown_linux   # grown, on 2.3 x the text (about 2 h)
    .venv/bin/python benchmarks/quality.py --steps 100 --trials 2 --seeds 1 --out /tmp/q.md   # a quick look

Five settings (`SETTINGS`):
- `smallest`, from scratch on `pydoc_data.topics` (Python's own help() text, 0.13 M training tokens): about 0.6
  tokens per parameter, so no model is short of capacity; it is fast, and shows what MatTA does to a student that
  is short of data.
- `capacity`, the paper's setting in miniature, where capacity binds: `python-docs` (the sources of Python's
  documentation, `apt-get install python3.11-doc`, 4.2 M tokens at a 1024-token BPE, the largest English corpus
  installable offline here). A student is pre-trained alone on 2/3 of the training documents, as GPT-2 Medium was
  before the paper grew it; it is then grown into a TA with `MatGPT2LMHeadModel.from_gpt2` (new FFN neurons with
  zero output, so the TA starts as the student) and every arm continues from it on the other third, text no arm
  has seen: CE-continued, KD-continued, MatTA, and KD-alone models of every size grown the same way.
- `narrow`, capacity bound from scratch on `python-docs`: a 2 x 128 student whose FFN (32) is too narrow for the
  2 M tokens it sees, in a TA of FFN 1024; a model of the TA's size alone beats one of the student's by 20 % here
  (CE, seed 0), where the other settings' widths pay 2-5 %. Five trials per arm over the learning rate, every
  other knob at the arm's defaults (MatTA trains the ladder's three widths between student and TA too, one sampled
  per step, `extra_widths="sample"`, and steps the FFN neurons beyond the student's width twice as far as the rest,
  `ta_neuron_lr_scale=2`, as `narrow_probes.py` chose), and KD alone tuned the same way at every size of the ladder.
- `grown`, the paper's recipe at `narrow`'s widths: the FFN-32 student is pre-trained alone until its tune loss
  plateaus (`PLATEAU`: the step shrinks at each evaluation that does not improve, Transformers' `reduce_lr_on_plateau`,
  and `EarlyStoppingCallback` ends the run), meant to leave width, not tokens, as what it lacks (RESULTS.md says what
  it lacks instead), then grown into the TA of FFN 1024 and continued as in `capacity`. Five trials per arm over the
  learning rate; MatTA at gpt2m.yaml's grown schedule (every term on, the distillation term ramped in over 10 %) with
  `narrow`'s extra widths and TA-only step.
- `grown_linux`, `grown` on the Linux kernel's documentation (`linux-docs`, `apt-get install linux-doc-6.1`, 9.8 M
  tokens, 2.3 x python-docs), where the plateaued student has not learnt its text by heart and a model of the TA's
  width trained alone is 27 % lower: capacity binds. The teacher is a model of the TA's shape trained to its own
  plateau (`teacher_until_plateau`); every arm continues for 1000 steps (2 M tokens, none seen twice; 3000 steps with
  four trials per arm take over six hours on two cores), three trials per arm: the two best steps of a 3000-step
  tuning at seed 0 and the step below (CE 1e-3 to 4e-3, KD 2e-3 to 8e-3 at every size); MatTA at KD's step with the
  TA-only neurons at 2 x it and the TA's term weighted 1, 2 or 8, chosen by its family's tune-split perplexity
  (`choose_matta_by="family"`).

What runs (every training run is `hf_matta.trainer.MatTATrainer` on data from `hf_matta.data`; every arm of a
setting gets the same tokens and schedule: linear warm-up over 10 % of the steps, cosine decay, AdamW unless Shampoo):
1. Data: a ByteLevel BPE trained on the training documents; `held_out` % of the documents held out and split, by
   document, into a tune half (arms are tuned on it) and a test half (every reported perplexity).
2. Teacher: a wider GPT-2 trained with CE on the (pre-)training blocks and frozen; for `capacity` and `grown`, also
   the pre-trained student.
3. Tuning, the same number of trials per arm (`--trials`; the first is the arm's defaults, the others distinct random
   draws from its grid): CE: learning rate. KD: learning rate, gamma, tau_T. MatTA: from KD's best learning rate, gamma
   and tau_T, its own knobs: the TA-first phase, the student's ramp, w_A, w_D, tau_D, detach, and whether the widths
   between student and TA train. Chosen by the student's tune-split perplexity at seed 0 (MatTA's, with
   `choose_matta_by="family"`, by its family's: the geometric mean over the ladder's widths). With `tune_each_size`
   (every setting but `capacity`), KD alone at every wider size of the ladder gets KD's trials too, chosen by its own
   tune-split perplexity; in `capacity` (not re-run since) it takes the student's choice.
4. Seeds (`--seeds`): CE and KD students, MatTA, KD-alone models at every size of the Mix'n'Match ladder (student,
   three in between, TA), KD at MatTA's FLOPs, MatTA at the family's FLOPs (trained for as many steps as cost the
   KD-alone models of every ladder size together: what one run gives for the compute of training each size alone),
   and the {KD, MatTA} x {AdamW, Shampoo} 2 x 2 (Shampoo's learning rate: the better of the AdamW arm's x 1 or x 2
   on seed 0). `smallest` adds the sharing ablation (a separate TA trained online with the same loss).
5. Mix'n'Match on every MatTA seed: uniform plans (every layer at one ladder width), block plans (a centred block of
   k layers at the TA's width, the others at the student's: exactly the ladder's parameter counts), both with the
   TA-only neurons in trained order and reordered by importance
   (`MatGPT2LMHeadModel.reorder_neurons_by_importance`), and the greedy search (`mix_n_match(..., "search")` on the
   tune split); the uniform plans of MatTA at the family's FLOPs too.

Runs go to `--jobs` worker processes (one CPU thread each by default); each run's result is cached as JSON under
`--work`, so an interrupted benchmark resumes where it stopped. The script writes its tables, the claims it decides
from them, the date, commit, machine and exact command into `--out` (benchmarks/RESULTS.md).
"""

import argparse
import functools
import hashlib
import itertools
import json
import math
import random
import statistics
import sys
import threading
import time
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path

import torch

from hf_matta.pipeline.report import provenance, write_section
from hf_matta.training_args import ADDED_FIELDS, without_added_fields


ROOT = Path(__file__).resolve().parent.parent

LEARNING_RATES = [1e-3, 2e-3, 4e-3, 8e-3, 1.6e-2]  # the python-docs settings' grid, from scratch or continued


def _learning_rate_grids(**matta) -> dict:
    """Tuning grids that vary the learning rate only (`LEARNING_RATES`): KD at gamma 0.5, tau_T 1, MatTA at `matta`."""
    return dict(
        ce=dict(learning_rate=LEARNING_RATES),
        kd=dict(learning_rate=LEARNING_RATES, teacher_weight=[0.5], teacher_temperature=[1.0]),
        matta=dict(learning_rate=LEARNING_RATES, **{knob: [value] for knob, value in matta.items()}),
    )


# The grown setting's MatTA, its default and its only trial but for the learning rate: gpt2m.yaml's grown schedule
# (every term on from step 0, the distillation term ramped in over 10 %) with narrow's extra widths and TA-only step.
GROWN_MATTA = dict(
    ta_first_steps=0.0, student_warmup_steps=0.0, distill_warmup_steps=0.1, ta_weight=1.0, distill_weight=1.0,
    distill_temperature=1.0, detach_ta_targets=True, extra_widths="sample", ta_neuron_lr_scale=2.0,
)
SETTINGS = {
    "smallest": dict(
        corpus="pydoc_data.topics", held_out=20, vocab=1024, block=64, batch=8, steps=250, n_layer=4, n_embd=64,
        n_head=4, student_ffn=128, ta_ffn=512, teacher="n_layer=4,n_embd=128,n_head=4", teacher_steps=500,
        trials=4, seeds=3, shampoo_block=128, grow=False, sharing_ablation=True, shampoo=True,
        tune_each_size=True,  # KD alone at every ladder size tuned at that size (see `narrow`)
    ),
    # d = 128: at d = 64 the FFN's width hardly matters on this corpus (one epoch, CE: FFN 128 -> 512 lowers test ppl
    # by 2 %, 31.4 -> 30.8), at d = 128 it does (21.4 -> 20.2, 5.4 %): a TA can only lead where width pays.
    "capacity": dict(
        corpus="python-docs", held_out=6, vocab=1024, block=128, batch=16, steps=600, n_layer=4, n_embd=128,
        n_head=4, student_ffn=128, ta_ffn=512, teacher="n_layer=6,n_embd=192,n_head=6", teacher_steps=1800,
        pretrain_steps=1225, continue_fraction=1 / 3, trials=3, seeds=3, shampoo_block=128, grow=True,
        sharing_ablation=False, shampoo=False,
        # continued training of a pre-trained model: smaller steps, and MatTA's trials start from the paper's
        # schedule (every term on, the distillation term ramped in over the first 10 %)
        grids=dict(ce=dict(learning_rate=[5e-4, 1e-3, 2e-3]), kd=dict(learning_rate=[5e-4, 1e-3, 2e-3])),
        defaults=dict(
            ce=dict(learning_rate=1e-3), kd=dict(learning_rate=1e-3, teacher_weight=0.5, teacher_temperature=1.0),
            matta=dict(ta_first_steps=0.0, student_warmup_steps=0.0, distill_warmup_steps=0.1),
        ),
    ),
    # Capacity bound from scratch: a 2 x 128 student whose FFN (32) is too narrow for 2 M tokens of python-docs, in a TA
    # of FFN 1024. Exploration (seed 0, CE alone, 1000 steps): FFN 32 -> 1024 lowers test ppl 47.0 -> 37.7 (20 %),
    # where the other settings' widths pay 2-5 %; MatTA's default schedule left its TA 6.6 % below its student.
    "narrow": dict(
        corpus="python-docs", held_out=6, vocab=1024, block=128, batch=16, steps=1000, n_layer=2, n_embd=128,
        n_head=4, student_ffn=32, ta_ffn=1024, teacher="n_layer=4,n_embd=128,n_head=4", teacher_steps=1000,
        trials=5, seeds=3, shampoo_block=128, grow=False, sharing_ablation=False, shampoo=False,
        # two layers, but a ladder of five widths: three Mix'n'Match sizes between student and TA
        ladder_steps=4,
        # the best learning rate grows with the width (seed 0, tune split: KD 2e-3 at FFN 32, 4e-3 at 280 and 528,
        # 8e-3 at 776 and 1024; MatTA 4e-3), so the TA and every size between are judged against KD alone tuned at
        # their own width
        tune_each_size=True,
        # five trials per arm over the learning rate, every other knob at the arm's defaults (a MatTA trial is 10-19
        # min on one core; the schedules were compared over 3 seeds by narrow_probes.py instead)
        grids=_learning_rate_grids(
            ta_first_steps=0.4, student_warmup_steps=0.3, distill_warmup_steps=0.3, ta_weight=1.0, distill_weight=1.0,
            distill_temperature=1.0, detach_ta_targets=True, extra_widths="sample", ta_neuron_lr_scale=2.0,
        ),
        # Mix'n'Match needs the widths between student and TA trained: untrained, the middle one measured as the
        # student (seed 0: 39.89 at 528 vs 39.81 at 32); trained ("all", ladder [32, 528, 1024]) the uniform family
        # was monotone (40.33 -> 36.74 -> 36.73). One of the three sampled per step keeps the step's FLOPs those of
        # "all" on that 3-width ladder.
        # The FFN neurons beyond the student's width step twice as far as the rest (`ta_neuron_lr_scale`): KD alone's
        # best step doubles twice from the student's width to the TA's, and MatTA runs one step for both. At MatTA's
        # tuned step (4e-3, narrow_probes.py, 3 seeds) x 2 made the family lower on the tune split in 3 of 3 seeds
        # (by 0.01, 0.02 and 0.47 ppl: two ties and a win; the TA lower by 0.35-0.80 on the test split in every
        # seed, the student higher by 0.54-1.16), x 4 was worse (seed 0).
        defaults=dict(matta=dict(extra_widths="sample", ta_neuron_lr_scale=2.0)),
    ),
    # The paper's recipe at the narrow setting's widths: the student pre-trained alone until its tune loss stops
    # improving (`pretrain_until_plateau`, at most `pretrain_steps`), issue 12's recipe for a student whose width
    # binds; then grown into a TA of FFN 1024 with `from_gpt2` and continued on documents no model has seen. The
    # teacher is trained longer than narrow's (4000 steps) so that it stays ahead of a plateaued student.
    "grown": dict(
        corpus="python-docs", held_out=6, vocab=1024, block=128, batch=16, steps=600, n_layer=2, n_embd=128,
        n_head=4, student_ffn=32, ta_ffn=1024, teacher="n_layer=4,n_embd=128,n_head=4", teacher_steps=4000,
        pretrain_steps=20000, pretrain_until_plateau=True, continue_fraction=1 / 3, trials=5, seeds=3,
        shampoo_block=128, grow=True, sharing_ablation=False, shampoo=False, ladder_steps=4, tune_each_size=True,
        # five trials per arm over the learning rate, as in narrow, every other knob at the arm's defaults (with three
        # and four, KD alone at the TA's width chose the grid's top); MatTA at GROWN_MATTA (a grown TA starts equal to
        # its student: nothing to hold the student's terms back for)
        grids=_learning_rate_grids(**GROWN_MATTA),
        defaults=dict(matta=GROWN_MATTA),
    ),
    # The grown setting on a corpus 2.3 x larger, `linux-docs` (9.8 M tokens; `apt-get install linux-doc-6.1`), on
    # which the plateaued student has not learnt its pre-training text by heart (20.77 on it against 22.72 test, seed
    # 0; python-docs: 13.13 against 20.48) and a model of the TA's width trained alone to its own plateau is 27 % lower
    # (16.52): width binds. Explored at seed 0 before it was a setting (RESULTS.md, the grown setting's reading):
    # - 600 continued steps are too few for the grown TA's new neurons (CE at FFN 1024, best of 4 steps: 2 % below the
    #   student); 3000 (2 epochs of the continuation split) are enough (17.65 against 22.11, 20 %);
    # - the grown setting's teacher (4 x 128, 4000 steps) ends at 23.77, behind the plateaued student: the teacher here
    #   is a model of the TA's shape trained to its plateau, as the student was;
    # - MatTA (no teacher, the TA-only neurons at 2 x the step) left the TA 15.8 % below its student at 1e-3, 5.8 %
    #   above the CE model of its width at 4e-3: MatTA is tuned over its step and the TA-only neurons' (1 or 2 x), and
    #   the trial is chosen by the family's tune-split perplexity, not the student's alone (a grown student hardly
    #   moves with either; the family is what Mix'n'Match publishes).
    # Tuned at seed 0 over 3000 continued steps in session 12 (RESULTS.md, "At 3000 steps"): CE's student chose 2e-3
    # (of 1e-3 to 1.6e-2), KD's 4e-3 (8e-3 tied on the tune split), KD alone at FFN 280 8e-3 (4e-3 within 0.3 %),
    # MatTA x 1 for the TA-only neurons at 4e-3 (its family 20.11 on the tune split against 20.66 at x 2). At 3000
    # steps the full benchmark (four trials per arm, KD tuned at five sizes, three seeds, KD at MatTA's FLOPs) is about
    # 13 process-hours (session 12's run times), over six on two cores: more than a working session, and its cache does
    # not outlive one. So every arm continues for 1000 steps (2 M tokens, two thirds of the continuation split: no
    # block seen twice) with three trials per arm: CE's and KD's two best steps from that tuning (KD's at every size)
    # and the step below them, as a shorter continuation from a plateau may want a smaller one (CE's student continued
    # 1000 steps, tune ppl: 24.00 at 2e-3, 24.71 at 4e-3, both above its plateau's 23.54). KD's student chose the
    # grid's bottom, 2e-3 (a seed-0 check at 1e-3: tune 23.21 against 23.24, test 22.28 against 22.31). MatTA's
    # three trials, at KD's step with the TA-only neurons at 2 x it (each part at the step KD alone chose for a
    # model of its width, 2e-3 at FFN 32 and 4e-3 at every wider one): the TA's term weighted 1, 2 and 8. Session
    # 15's third trial was one step for every neuron (family 22.23 on the tune split, against 21.66 at 2 x);
    # w_A = 3 (21.33) was a seed-0 probe of session 15, 8 (21.29) one of session 16, and 8 replaced it (sessions
    # 13-14 also ran 4e-3 and 8e-3 at 1 x, 8e-3 worst at every width, and 2e-3 with the TA-only neurons at 4 x,
    # worse on the tune split than 2 x: RESULTS.md's reading). About 2 hours on two cores from an empty cache.
    # `--steps 3000` runs the longer continuation with the same grids.
    "grown_linux": dict(
        corpus="linux-docs", held_out=6, vocab=1024, block=128, batch=16, steps=1000, n_layer=2, n_embd=128,
        n_head=4, student_ffn=32, ta_ffn=1024, teacher="n_layer=2,n_embd=128,n_head=4,n_inner=1024",
        teacher_steps=20000, teacher_until_plateau=True, pretrain_steps=20000, pretrain_until_plateau=True,
        continue_fraction=1 / 3, trials=3, seeds=3, shampoo_block=128, grow=True, sharing_ablation=False,
        shampoo=False, ladder_steps=4, tune_each_size=True, choose_matta_by="family",
        grids=dict(
            ce=dict(learning_rate=[1e-3, 2e-3, 4e-3]),
            kd=dict(learning_rate=[2e-3, 4e-3, 8e-3], teacher_weight=[0.5], teacher_temperature=[1.0]),
            matta={**{knob: [value] for knob, value in GROWN_MATTA.items()}, "ta_weight": [1.0, 8.0]},
        ),
        defaults=dict(kd=dict(learning_rate=4e-3), matta={**GROWN_MATTA, "ta_weight": 2.0}),
    ),
}  # fmt: skip
# "Until its tune loss plateaus": evaluated on the first PLATEAU_BLOCKS tune blocks every `eval_steps`; an evaluation
# that does not beat the best by `threshold` nats multiplies the step by `factor` (`reduce_lr_on_plateau`), and
# `patience` of them in a row stop the run (`EarlyStoppingCallback`): the step has shrunk `factor ** patience` times.
PLATEAU = dict(eval_steps=250, threshold=0.003, factor=0.3, patience=3)
PLATEAU_BLOCKS = 256
TUNE_BLOCKS, TEST_BLOCKS = 512, 1024  # held-out blocks measured per run (the first ones of each split)
SHAMPOO_LR_MULTIPLIERS = (1, 2)  # Shampoo (Adam-grafted) tends to want a larger step (benchmarks/optimizers.md)
DEFAULTS = {
    "ce": dict(learning_rate=2e-3),
    "kd": dict(learning_rate=2e-3, teacher_weight=0.5, teacher_temperature=1.0),
    # The TA alone for 40 % of the steps, then the student's and the distillation terms ramped in over 30 %: the
    # schedule that lifted the student most in the first measurements (issue 12).
    "matta": dict(
        ta_first_steps=0.4, student_warmup_steps=0.3, distill_warmup_steps=0.3, ta_weight=1.0, distill_weight=1.0,
        distill_temperature=1.0, detach_ta_targets=True, extra_widths="none",
    ),
}
GRIDS = {
    "ce": dict(learning_rate=[1e-3, 2e-3, 4e-3, 8e-3]),
    "kd": dict(
        learning_rate=[1e-3, 2e-3, 4e-3, 8e-3], teacher_weight=[0.25, 0.5, 0.75, 0.9],
        teacher_temperature=[1.0, 2.0, 4.0],
    ),
    "matta": dict(
        ta_first_steps=[0.0, 0.2, 0.4], student_warmup_steps=[0.0, 0.1, 0.3], distill_warmup_steps=[0.0, 0.1, 0.3],
        ta_weight=[1.0, 2.0], distill_weight=[0.5, 1.0, 2.0], distill_temperature=[1.0, 2.0],
        detach_ta_targets=[True, False], extra_widths=["none", "all"],
    ),
}  # fmt: skip


def ladder(setting: dict) -> list[int]:
    """The Mix'n'Match ladder: student, `ladder_steps` - 1 evenly spaced widths in between (default n_layer - 1),
    TA. With n_layer steps, a uniform width S + k (A - S) / L has exactly the parameters of the block plan with k
    layers at the TA's width and the others at the student's."""
    S, A = setting["student_ffn"], setting["ta_ffn"]
    steps = setting.get("ladder_steps", setting["n_layer"])
    return [S + k * (A - S) // steps for k in range(steps + 1)]


# ---------------------------------------------------------------------------------------------------------------
# One training run (in a worker process)
# ---------------------------------------------------------------------------------------------------------------


def _blocks(ids: torch.Tensor) -> list[dict]:
    """Token blocks (N, T) as the examples `default_data_collator` stacks."""
    return [{"input_ids": row, "labels": row} for row in ids]


def _training_args(run: dict, out_dir: Path):
    from hf_matta.training_args import MatTATrainingArguments

    hp = dict(run["hp"])
    knobs = [*DEFAULTS["matta"], *ADDED_FIELDS, "teacher_weight", "teacher_temperature"]
    matta = {key: hp[key] for key in knobs if key in hp}
    schedule = dict(lr_scheduler_type="cosine", warmup_steps=max(1, run["steps"] // 10), eval_strategy="no")
    if run.get("plateau"):  # the step shrinks when the tune loss stops improving, and the run stops (PLATEAU)
        schedule = dict(
            lr_scheduler_type="reduce_lr_on_plateau", eval_strategy="steps", eval_steps=PLATEAU["eval_steps"],
            metric_for_best_model="loss", lr_scheduler_kwargs=dict(
                factor=PLATEAU["factor"], patience=0, threshold=PLATEAU["threshold"], threshold_mode="abs"
            ),
        )  # fmt: skip
    return MatTATrainingArguments(
        output_dir=str(out_dir), use_cpu=True, report_to="none", save_strategy="no", logging_strategy="no",
        disable_tqdm=True, dataloader_num_workers=0, seed=run["seed"], data_seed=run["seed"], max_steps=run["steps"],
        per_device_train_batch_size=run["batch"], per_device_eval_batch_size=32, learning_rate=hp["learning_rate"],
        weight_decay=0.1, optimizer=run["optimizer"], max_preconditioner_dim=run.get("shampoo_block", 1024),
        **schedule, **matta,
    )  # fmt: skip


def _model_config(shape: dict, widths: list[int]):
    """The MatGPT2 config of a run's shape (`n_layer`, `n_embd`, `n_head`, `vocab`, `block`) at nested `widths`."""
    from hf_matta import MatGPT2Config

    return MatGPT2Config(
        n_layer=shape["n_layer"], n_embd=shape["n_embd"], n_head=shape["n_head"], vocab_size=shape["vocab"],
        n_positions=shape["block"], resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0,
        eos_token_id=0, activation_function="gelu", mat_widths=widths,
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


def _build_model(run: dict):
    """The run's model: grown from a saved pre-trained student, or initialised from its shape."""
    from transformers import GPT2LMHeadModel

    from hf_matta import MatGPT2LMHeadModel

    widths = run["widths"]
    if run.get("init"):
        pretrained = GPT2LMHeadModel.from_pretrained(Path(run["work"]) / "models" / run["init"])
        return MatGPT2LMHeadModel.from_gpt2(pretrained, mat_widths=widths, student_width=widths[0])
    config = _model_config(run["shape"], widths)
    if run["kind"] == "separate_ta":
        return _separate_ta_class()(config, _model_config(run["shape"], widths[-1:]))
    return MatGPT2LMHeadModel(config)


def train_run(run: dict) -> dict:
    """One training run described by `run` (a JSON-able dict); returns its tune/test perplexities per width, the
    collapse diagnostics of a nested model, and its Mix'n'Match curves when asked."""
    torch.set_num_threads(run["threads"])
    from transformers import EarlyStoppingCallback, GPT2LMHeadModel, PrinterCallback, default_data_collator, set_seed

    from hf_matta.extract import extract_student, validation_loss
    from hf_matta.trainer import MatTATrainer

    data = torch.load(run["data"], weights_only=True)
    start = time.perf_counter()
    set_seed(run["seed"])
    model = _build_model(run)
    teacher = None
    if run["hp"].get("teacher_weight", 0) > 0:
        teacher = GPT2LMHeadModel.from_pretrained(Path(run["work"]) / "models" / run.get("teacher", "teacher"))
    plateau = {}
    if run.get("plateau"):
        plateau = dict(
            eval_dataset=_blocks(data["tune"][:PLATEAU_BLOCKS]),
            callbacks=[EarlyStoppingCallback(PLATEAU["patience"], PLATEAU["threshold"])],
        )
    trainer = MatTATrainer(
        model=model, args=_training_args(run, Path(run["work"]) / "tmp" / run["key"]),
        train_dataset=_blocks(data[run["split"]]), data_collator=default_data_collator, teacher_model=teacher,
        **plateau,
    )  # fmt: skip
    trainer.remove_callback(PrinterCallback)
    train_metrics = trainer.train().metrics
    result = {"seconds": time.perf_counter() - start}
    if run.get("plateau"):
        result["steps_run"] = trainer.state.global_step
    tune, test = data["tune"][:TUNE_BLOCKS], data["test"][:TEST_BLOCKS]
    for split, ids in (("tune", tune), ("test", test)):
        result[f"{split}_ppl"] = {str(w): math.exp(validation_loss(model, ids, w, 32)) for w in run["widths"]}
    result["train_tokens_per_s"] = run["steps"] * run["batch"] * run["shape"]["block"] / train_metrics["train_runtime"]
    if len(run["widths"]) > 1 and run["kind"] != "separate_ta":
        metrics = trainer.evaluate(eval_dataset=_blocks(test))
        result["diagnostics"] = {
            key.removeprefix("eval_"): value for key, value in metrics.items() if "kl_" in key or "ffn_" in key
        }
    if run.get("mix_n_match"):
        result["mix_n_match"] = _mix_n_match(model, tune, test, run)
    if run.get("save"):
        extract_student(model, run["widths"][-1]).save_pretrained(Path(run["work"]) / "models" / run["save"])
    return result


def _mix_n_match(model, tune_ids: torch.Tensor, test_ids: torch.Tensor, run: dict) -> dict:
    """Every Mix'n'Match family of a trained nested model, measured on the test split (extracted students, whose
    loss must equal the nested model's at their plan): uniform and block plans as trained and with the TA-only
    neurons reordered by importance, and the greedy search's path (searched on the tune split)."""
    from hf_matta.extract import extract_student, mix_n_match, validation_loss
    from hf_matta.widths import block_plans

    widths = run["widths"]
    S, A, L = widths[0], widths[-1], run["shape"]["n_layer"]
    two_level = _model_config(run["shape"], [S, A])

    def measure(plans: list[tuple[int, ...]]) -> list[dict]:
        points = []
        for plan in plans:
            student = extract_student(model, list(plan))
            loss = validation_loss(student, test_ids, batch_size=32)
            nested = validation_loss(model, test_ids, list(plan), 32)
            if abs(loss - nested) > 1e-4:
                raise RuntimeError(f"extracted plan {plan}: loss {loss} differs from the nested model's {nested}")
            params = sum(p.numel() for p in student.parameters())
            points.append({"widths": list(plan), "params": params, "ppl": math.exp(loss)})
        return points

    uniform = [(width,) * L for width in widths]
    blocks = block_plans(two_level)
    families = {"uniform": measure(uniform), "block": measure(blocks)}
    search = mix_n_match(model, "search", input_ids=tune_ids, batch_size=32)
    families["search"] = measure([point.widths for point in search])
    model.reorder_neurons_by_importance(tune_ids[:64])
    families["uniform_reordered"] = measure(uniform)
    families["block_reordered"] = measure(blocks)
    return families


# ---------------------------------------------------------------------------------------------------------------
# The benchmark: data, the runs it needs, in stages, and the report
# ---------------------------------------------------------------------------------------------------------------


def prepare_data(setting: dict, work: Path) -> tuple[Path, dict]:
    """Token blocks of every split saved under `work`; returns their path and each split's document count.

    Held-out documents are split in two by document (tune, test); with `grow`, the training documents too
    (pre-training, continuation), so that continuation text is new to every model.
    """
    from datasets import DatasetDict

    from hf_matta.data import DataArguments, load_corpus, load_or_train_tokenizer, tokenize_and_pack

    data_args = DataArguments(
        builtin_corpus=setting["corpus"], block_size=setting["block"], validation_split_percentage=setting["held_out"]
    )
    raw = load_corpus(data_args, seed=0)
    held_out = raw["validation"].train_test_split(test_size=0.5, seed=0)
    splits = {"train": raw["train"], "tune": held_out["train"], "test": held_out["test"]}
    if setting["grow"]:
        train = raw["train"].train_test_split(test_size=setting["continue_fraction"], seed=0)
        splits.update(pretrain=train["train"], resume=train["test"])
    tokenizer = load_or_train_tokenizer(work / f"tokenizer-{setting['vocab']}", raw["train"], "text", setting["vocab"])
    blocks = tokenize_and_pack(DatasetDict(splits), tokenizer, data_args)
    path = work / f"blocks-{setting['corpus']}-{setting['vocab']}-{setting['block']}.pt"
    torch.save({split: torch.tensor(blocks[split]["input_ids"]) for split in splits}, path)
    return path, {split: len(documents) for split, documents in splits.items()}


class Runner:
    """Runs training runs in worker processes, caching each result as JSON under `work/runs/`."""

    def __init__(self, setting: dict, work: Path, data: Path, jobs: int, threads: int):
        self.setting, self.work, self.jobs = setting, work, jobs
        self.shape = _shape(setting)
        self.base = dict(data=str(data), work=str(work), threads=threads, batch=setting["batch"])
        (work / "runs").mkdir(parents=True, exist_ok=True)
        self.pool = ProcessPoolExecutor(max_workers=jobs, mp_context=get_context("spawn"))
        self.futures: dict[str, Future] = {}  # by run key: every run started
        self.saved, self.lock = set(), threading.Lock()  # the keys cached by this runner

    def spec(self, kind: str, hp: dict, seed: int = 0, optimizer: str = "adamw", **extra) -> dict:
        """A run description; `key` hashes everything that changes its result (a trainer field added later, at the
        value runs had before it existed, is left out of `hp`: `without_added_fields`). Defaults: the setting's
        student (nested in the ladder for MatTA), its training split and steps; grown from the pre-trained student
        with `grow`."""
        S = self.setting["student_ffn"]
        hp = without_added_fields(hp)
        widths = extra.pop("widths", ladder(self.setting) if kind in ("matta", "separate_ta") else [S])
        grow = self.setting["grow"]
        run = dict(
            self.base, kind=kind, hp=hp, seed=seed, optimizer=optimizer, steps=self.setting["steps"], widths=widths,
            shape=self.shape, split="resume" if grow else "train", init="student" if grow else None,
        )  # fmt: skip
        run.update(extra)
        if optimizer == "shampoo":
            run["shampoo_block"] = self.setting["shampoo_block"]
        identity = {k: v for k, v in run.items() if k not in ("threads", "work")}
        run["key"] = f"{kind}-{hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:12]}"
        return run

    def teacher_spec(self) -> dict:
        """The teacher's run: a wider GPT-2 trained with CE on the (pre-)training blocks, saved as `teacher`; with
        `teacher_until_plateau`, until its tune loss plateaus (`PLATEAU`, at most `teacher_steps`)."""
        shape, ffn = _teacher_shape(self.setting)
        split = "pretrain" if self.setting["grow"] else "train"
        return self.spec(
            "ce", {"learning_rate": 2e-3}, widths=[ffn], shape=shape, split=split, init=None,
            steps=self.setting["teacher_steps"], save="teacher",
            **({"plateau": True} if self.setting.get("teacher_until_plateau") else {}),
        )  # fmt: skip

    def start(self, runs: list[dict]) -> list[dict]:
        """Starts the runs not cached or started yet in the workers, and returns `runs` (for `finish`). Each result
        is cached and printed as soon as it finishes: an interrupted benchmark loses only the runs in flight."""
        for run in runs:
            if run["key"] not in self.futures and not self._path(run).is_file():
                self.futures[run["key"]] = future = self.pool.submit(train_run, run)
                future.add_done_callback(functools.partial(self._cache, run))
        return runs

    def finish(self, runs: list[dict]) -> list[dict]:
        """The results of started `runs`, once every one has finished (a failed run raises its error here)."""
        for run in runs:
            if run["key"] in self.futures:
                self._save(run, self.futures[run["key"]].result())
        return [json.loads(self._path(run).read_text()) for run in runs]

    def run_all(self, runs: list[dict]) -> list[dict]:
        """Results of `runs`, from the cache or computed in parallel."""
        return self.finish(self.start(runs))

    def _path(self, run: dict) -> Path:
        return self.work / "runs" / f"{run['key']}.json"

    def _cache(self, run: dict, future: Future) -> None:
        if future.exception() is None:
            self._save(run, future.result())

    def _save(self, run: dict, result: dict) -> None:
        """Caches and prints a result once (from the worker's callback or from `finish`, whichever comes first)."""
        with self.lock:
            if run["key"] in self.saved:
                return
            partial = self._path(run).with_suffix(".partial")  # renamed when whole: a killed write caches nothing
            partial.write_text(json.dumps(result, indent=1))
            partial.replace(self._path(run))
            self.saved.add(run["key"])
        print(f"  {run['key']:<22} {run['optimizer']:<7} seed {run['seed']} {json.dumps(run['hp'])} -> "
              f"test ppl {json.dumps({k: round(v, 2) for k, v in result['test_ppl'].items()})} "
              f"({result['seconds']:.0f} s)", flush=True)  # fmt: skip


def trials(setting: dict, arm: str, count: int, base: dict | None = None) -> list[dict]:
    """`count` hyperparameter settings of an arm: its defaults, then distinct random draws from its grid (both as
    the setting overrides them)."""
    grid = {**GRIDS[arm], **setting.get("grids", {}).get(arm, {})}
    rng = random.Random(f"trials:{arm}")
    settings = [{**(base or {}), **arm_defaults(setting, arm)}]
    combos = [dict(zip(grid, values)) for values in _product(list(grid.values()))]
    rng.shuffle(combos)
    for combo in combos:
        if len(settings) == count:
            break
        candidate = {**(base or {}), **combo}
        if candidate not in settings:
            settings.append(candidate)
    return settings


def arm_defaults(setting: dict, arm: str) -> dict:
    """An arm's default hyperparameters, as the setting overrides them."""
    return {**DEFAULTS[arm], **setting.get("defaults", {}).get(arm, {})}


def _product(lists: list[list]) -> list[tuple]:
    out = [()]
    for values in lists:
        out = [prefix + (value,) for prefix in out for value in values]
    return out


def _best(settings: list[dict], results: list[dict], width: int) -> dict:
    return settings[min(range(len(settings)), key=lambda i: results[i]["tune_ppl"][str(width)])]


def family_ppl(ppl: dict[str, float]) -> float:
    """A family's perplexity: the geometric mean of its members' (a nested run's `tune_ppl`, one per width)."""
    return math.exp(statistics.mean(math.log(value) for value in ppl.values()))


def _shape(setting: dict) -> dict:
    """The student's shape: the keys `_model_config` reads."""
    return {key: setting[key] for key in ("n_layer", "n_embd", "n_head", "vocab", "block")}


def _teacher_shape(setting: dict) -> tuple[dict, int]:
    """The teacher's shape, the student's with the setting's `teacher` overrides (`n_layer=4,n_embd=128,...`), and
    its FFN width: `n_inner` among the overrides, else 4 x n_embd."""
    overrides = {key: int(value) for key, value in (pair.split("=") for pair in setting["teacher"].split(","))}
    ffn = overrides.pop("n_inner", None)
    shape = {**_shape(setting), **overrides}
    return shape, ffn or 4 * shape["n_embd"]


def step_flops(setting: dict, kind: str, hp: dict, steps: int, width: int | None = None) -> float:
    """Training FLOPs of a run: 3 x forward for every trained model per token (forward and backward), 1 x for the
    teacher's forward; MatTA's student forward is skipped during its TA-first phase. A run of another kind trains
    one model, at FFN `width` (default: the student's)."""
    from hf_matta.widths import count_flops_per_token

    shape = _shape(setting)
    tokens = setting["batch"] * setting["block"]

    def forward(shape: dict, width: int) -> int:
        return count_flops_per_token(_model_config(shape, [width]), seq_len=setting["block"]) * tokens

    teacher = forward(*_teacher_shape(setting)) if hp.get("teacher_weight", 0) > 0 else 0
    if kind != "matta":
        return steps * (3 * forward(shape, width or setting["student_ffn"]) + teacher)
    widths = ladder(setting)
    extras = widths[1:-1] if hp.get("extra_widths") in ("all", "sample") else []
    # "sample" trains one of the extras per step: their mean cost
    share = 1 / len(extras) if extras and hp.get("extra_widths") == "sample" else 1
    ta_first = hp.get("ta_first_steps", 0)
    ta_only = int(ta_first) if ta_first >= 1 else math.ceil(steps * ta_first)
    ta = 3 * forward(shape, widths[-1]) + teacher
    students = 3 * forward(shape, widths[0]) + share * sum(3 * forward(shape, width) for width in extras)
    if hp.get("extra_widths") == "mixed":  # one plan per step, any but the uniform student and TA: their mean cost
        config = _model_config(shape, widths)
        plans = [plan for plan in itertools.product(widths, repeat=shape["n_layer"]) if plan[1:] != plan[:-1]
                 or plan[0] not in (widths[0], widths[-1])]  # fmt: skip
        if plans:  # none with one layer and no width in between: the trainer then trains no plan
            mixed = statistics.mean(count_flops_per_token(config, list(plan), setting["block"]) for plan in plans)
            students += 3 * mixed * tokens
    return ta_only * ta + (steps - ta_only) * (ta + students)


@dataclass
class Tuned:
    """Stages 1-3: the base runs' results, every arm's trials with their seed-0 results, and what was chosen."""

    base: list[dict]  # the teacher's run (and the pre-trained student's, for `grow`)
    trials: dict[str, tuple[list[dict], list[dict]]]  # "ce", "kd", "matta": (settings, results); KD at the student
    kd_sizes: dict[int, list[dict]]  # with `tune_each_size`: KD's trials at every wider ladder size, their results
    best: dict[str, dict]  # "ce", "kd", "matta": the chosen setting (by the student's tune-split perplexity)
    best_kd_at: dict[int, dict]  # KD's setting at every size of the ladder


def tune(setting: dict, runner: Runner) -> Tuned:
    """Stages 1-3: the teacher (and pre-trained student), then the same number of trials for CE, KD (at every ladder
    size with `tune_each_size`) and MatTA (from KD's best learning rate, gamma and tau_T), all at seed 0."""
    S, sizes = setting["student_ffn"], ladder(setting)
    print("stage 1: the teacher; beside it the pre-trained student, then CE trials", flush=True)
    lr = {"learning_rate": 2e-3}  # from scratch (the continued arms of `capacity` tune smaller steps)
    teacher = runner.start([runner.teacher_spec()])  # the longest run: what does not need it goes on meanwhile
    student = []
    if setting["grow"]:
        pretrain = runner.spec(
            "ce", lr, split="pretrain", init=None, steps=setting["pretrain_steps"], save="student",
            **({"plateau": True} if setting.get("pretrain_until_plateau") else {}),
        )  # fmt: skip
        student = runner.run_all([pretrain])
    ce_trials = trials(setting, "ce", setting["trials"])
    ce_runs = runner.start([runner.spec("ce", hp) for hp in ce_trials])
    base_results = runner.finish(teacher) + student
    wider = sizes[1:] if setting.get("tune_each_size") else []
    print("stage 2: KD trials" + (", and at every wider size of the ladder" if wider else ""), flush=True)
    kd_trials = trials(setting, "kd", setting["trials"])
    kd_runs = runner.start([runner.spec("kd", hp) for hp in kd_trials])
    size_runs = runner.start([runner.spec("kd", hp, widths=[w]) for w in wider for hp in kd_trials])
    ce_results, kd_results = runner.finish(ce_runs), runner.finish(kd_runs)
    best_ce, best_kd = _best(ce_trials, ce_results, S), _best(kd_trials, kd_results, S)
    print("stage 3: MatTA trials (from KD's best learning rate, gamma, tau_T)", flush=True)
    matta_trials = trials(setting, "matta", setting["trials"], base=best_kd)
    # with Mix'n'Match, so that the chosen trial is also stage 5's seed-0 run (one run, not two)
    matta_results = runner.run_all([runner.spec("matta", hp, mix_n_match=True) for hp in matta_trials])
    size_results = runner.finish(size_runs)
    size_trials = {w: size_results[i * len(kd_trials) : (i + 1) * len(kd_trials)] for i, w in enumerate(wider)}
    best_kd_at = {w: best_kd for w in sizes} | {w: _best(kd_trials, got, w) for w, got in size_trials.items()}
    if setting.get("choose_matta_by") == "family":
        family = [family_ppl(result["tune_ppl"]) for result in matta_results]
        best_matta = matta_trials[family.index(min(family))]
    else:
        best_matta = _best(matta_trials, matta_results, S)
    return Tuned(
        base=base_results,
        trials={"ce": (ce_trials, ce_results), "kd": (kd_trials, kd_results), "matta": (matta_trials, matta_results)},
        kd_sizes=size_trials, best={"ce": best_ce, "kd": best_kd, "matta": best_matta}, best_kd_at=best_kd_at,
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--setting", choices=sorted(SETTINGS), default="smallest")
    for name in ("steps", "trials", "seeds", "teacher_steps", "pretrain_steps"):
        parser.add_argument(f"--{name.replace('_', '-')}", type=int, help=f"override the setting's {name}")
    parser.add_argument("--jobs", type=int, default=2, help="parallel training processes (default 2)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads per process (default 1)")
    parser.add_argument("--work", type=Path, help="cache folder (default outputs/quality/<setting>)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "RESULTS.md")
    parser.add_argument("--plot", type=Path, help="Mix'n'Match plot (default benchmarks/quality_<setting>.png)")
    args = parser.parse_args(argv)
    setting = dict(SETTINGS[args.setting])
    for name in ("steps", "trials", "seeds", "teacher_steps", "pretrain_steps"):
        if getattr(args, name) is not None:
            if getattr(args, name) < 1:
                raise SystemExit(f"--{name.replace('_', '-')} {getattr(args, name)} must be at least 1.")
            setting[name] = getattr(args, name)
    if args.jobs < 1 or args.threads < 1:
        raise SystemExit(f"--jobs {args.jobs} and --threads {args.threads} must be at least 1.")
    plot = args.plot or ROOT / "benchmarks" / f"quality_{args.setting}.png"
    work = args.work or ROOT / "outputs" / "quality" / args.setting
    work.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    print(f"quality --setting {args.setting}: {json.dumps(setting)}", flush=True)

    data, documents = prepare_data(setting, work)
    blocks = torch.load(data, weights_only=True)
    runner = Runner(setting, work, data, args.jobs, args.threads)
    seeds = list(range(setting["seeds"]))
    S, A = setting["student_ffn"], setting["ta_ffn"]
    sizes = ladder(setting)

    tuned = tune(setting, runner)
    base_results, best_kd, best_matta = tuned.base, tuned.best["kd"], tuned.best["matta"]

    print("stage 4: Shampoo's learning rate (the AdamW arm's x 1 and x 2, seed 0)", flush=True)
    shampoo_hp, shampoo_trials = {}, []
    for kind, best in (("kd", best_kd), ("matta", best_matta)) if setting["shampoo"] else ():
        candidates = [{**best, "learning_rate": best["learning_rate"] * m} for m in SHAMPOO_LR_MULTIPLIERS]
        trial_results = runner.run_all([runner.spec(kind, hp, 0, "shampoo") for hp in candidates])
        shampoo_trials += trial_results
        shampoo_hp[kind] = _best(candidates, trial_results, S)

    print("stage 5: seeds of CE, KD at every size, MatTA (+ Mix'n'Match), KD at MatTA's FLOPs, Shampoo", flush=True)
    matta_flops = step_flops(setting, "matta", best_matta, setting["steps"])
    flop_steps = round(setting["steps"] * matta_flops / step_flops(setting, "kd", best_kd, setting["steps"]))
    # The family's price: one MatTA run against KD alone at every ladder size; MatTA again at the FLOPs of the latter
    family_flops = (
        matta_flops, sum(step_flops(setting, "kd", tuned.best_kd_at[w], setting["steps"], w) for w in sizes)
    )
    family_steps = round(setting["steps"] * family_flops[1] / matta_flops)
    groups = {
        "ce": [runner.spec("ce", tuned.best["ce"], seed) for seed in seeds],
        "matta": [runner.spec("matta", best_matta, seed, mix_n_match=True) for seed in seeds],
        **{f"kd_{w}": [runner.spec("kd", tuned.best_kd_at[w], seed, widths=[w]) for seed in seeds] for w in sizes},
        "kd_flops": [runner.spec("kd", best_kd, seed, steps=flop_steps) for seed in seeds],
        "matta_family_flops": [
            runner.spec("matta", best_matta, seed, mix_n_match=True, steps=family_steps) for seed in seeds
        ],
    }
    if setting["shampoo"]:
        groups["kd_shampoo"] = [runner.spec("kd", shampoo_hp["kd"], seed, "shampoo") for seed in seeds]
        groups["matta_shampoo"] = [runner.spec("matta", shampoo_hp["matta"], seed, "shampoo") for seed in seeds]
    if setting["sharing_ablation"]:
        groups["separate_ta"] = [runner.spec("separate_ta", best_matta, seed) for seed in seeds]
    flat = [run for runs in groups.values() for run in runs]
    results_flat = runner.run_all(flat)
    by_key = {run["key"]: result for run, result in zip(flat, results_flat)}
    results = {name: [by_key[run["key"]] for run in runs] for name, runs in groups.items()}
    runner.pool.shutdown()
    elapsed = time.perf_counter() - started
    trial_results = [result for _, results in tuned.trials.values() for result in results]
    size_results = [result for results in tuned.kd_sizes.values() for result in results]
    every_result = [*base_results, *trial_results, *size_results, *shampoo_trials, *results_flat]
    run_minutes = sum(result["seconds"] for result in every_result) / 60

    report = Report(setting, args, blocks, documents, base_results, elapsed, run_minutes, work / "models")
    for arm, name in (("ce", "CE alone"), ("kd", "KD"), ("matta", "MatTA")):
        by_family = arm == "matta" and setting.get("choose_matta_by") == "family"
        report.tuning(name, *tuned.trials[arm], S, tuned.best[arm], by_family)
        if arm == "kd" and tuned.kd_sizes:
            report.tuning_by_size(tuned.trials["kd"][0], tuned.kd_sizes, tuned.best_kd_at)
    report.main_table(results, S, A, flop_steps)
    report.diagnostics(results["matta"], *tuned.trials["matta"])
    report.mix_n_match(results, sizes, plot, family_flops, family_steps)
    if setting["shampoo"]:
        report.two_by_two(results, S, shampoo_hp)
    if setting["sharing_ablation"]:
        report.sharing(results, S, A)
    report.claims()
    write_section(args.out, f"quality --setting {args.setting}", report.text())
    print(report.text())
    print(f"written to {args.out} ({elapsed / 60:.1f} min)")


def _saved_model_ppl(path: Path, blocks: dict) -> float:
    """Perplexity of the saved pre-trained student on the first TEST_BLOCKS blocks of its own pre-training split."""
    from transformers import GPT2LMHeadModel

    from hf_matta.extract import validation_loss

    model = GPT2LMHeadModel.from_pretrained(path)
    return math.exp(validation_loss(model, blocks["pretrain"][:TEST_BLOCKS], batch_size=32))


def _mean_std(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"


def _ppl(results: list[dict], width: int) -> list[float]:
    return [result["test_ppl"][str(width)] for result in results]


def _log_interpolate(x: float, xs: list[float], ys: list[float]) -> float:
    """The curve through (xs, ys) at x, linear in (x, log y) between neighbours."""
    for (x0, y0), (x1, y1) in zip(zip(xs, ys), zip(xs[1:], ys[1:])):
        if x0 <= x <= x1:
            t = (x - x0) / (x1 - x0) if x1 > x0 else 0.0
            return math.exp((1 - t) * math.log(y0) + t * math.log(y1))
    raise ValueError(f"{x} is outside [{xs[0]}, {xs[-1]}]")


def monotone(points: list[dict]) -> bool:
    """Whether a Mix'n'Match family (`points` with `params` and `ppl`) falls with size: more parameters, lower
    perplexity."""
    points = sorted(points, key=lambda point: point["params"])
    return all(b["ppl"] < a["ppl"] for a, b in zip(points, points[1:]))


def against_curve(points: list[dict], params: list[int], kd: list[float]) -> tuple[float, bool]:
    """A Mix'n'Match family against the KD-alone curve through (params, kd): its worst member's excess over the
    curve (ppl / curve - 1; <= 0 when every member is at or below it), and whether it is `monotone`."""
    worst = max(point["ppl"] / _log_interpolate(point["params"], params, kd) - 1 for point in points)
    return worst, monotone(points)


class Report:
    """The markdown report, section by section; `claims()` states which of the paper's claims held."""

    def __init__(self, setting, args, blocks, documents, base_results, elapsed, run_minutes, models: Path):
        self.setting, self.lines, self.verdicts = setting, [], []
        s = setting
        tokens = s["steps"] * s["batch"] * s["block"]
        train_split = "resume" if s["grow"] else "train"
        teacher = base_results[0]
        teacher_ppl = next(iter(teacher["test_ppl"].values()))
        self.lines += [
            f"## Quality: `quality.py --setting {args.setting}`",
            "",
            *provenance("benchmarks/quality.py", elapsed, f"{args.jobs} jobs x {args.threads} thread(s)"),
            f"- Training runs: {run_minutes:.1f} process-minutes in all (about {run_minutes / args.jobs:.1f} min of "
            f"wall time on {args.jobs} workers from an empty cache; cached runs are not run again).",
            f"- Corpus: `{s['corpus']}`, ByteLevel BPE of {s['vocab']} tokens, blocks of {s['block']}; documents: "
            + ", ".join(f"{split} {count}" for split, count in documents.items())
            + "; blocks: " + ", ".join(f"{split} {len(ids):,}" for split, ids in blocks.items())
            + f". Tune and test are disjoint sets of documents; every perplexity below is on the first {TEST_BLOCKS} "
            f"test blocks ({min(TEST_BLOCKS, len(blocks['test'])) * s['block']:,} tokens).",
            f"- Student: {s['n_layer']} layers x {s['n_embd']}, {s['n_head']} heads, FFN {s['student_ffn']}; TA: FFN "
            f"{s['ta_ffn']}; Mix'n'Match ladder {ladder(s)}. Teacher: GPT-2 {s['teacher']}, trained for "
            f"{teacher.get('steps_run', s['teacher_steps'])} steps"
            + (" (until its tune loss plateaued, as the student's)" if s.get("teacher_until_plateau") else "")
            + f": test ppl {teacher_ppl:.2f}.",
        ]
        if s["grow"]:
            self.lines.append(self._pre_trained_student(base_results[1], blocks, models / "student"))
        self.lines += [
            f"- Budget per run: {s['steps']} steps x {s['batch']} x {s['block']} = {tokens:,} tokens "
            f"({tokens / blocks[train_split].numel():.2f} epochs of the {train_split} split); AdamW (weight decay "
            f"0.1) unless marked Shampoo; {s['trials']} tuning trials per arm; {s['seeds']} seeds (mean ± std).",
            "",
        ]

    def _pre_trained_student(self, result: dict, blocks: dict, saved: Path) -> str:
        """The pre-trained student's line (settings with `grow`); with the plateau rule, also its perplexity on its
        own pre-training blocks: how much of its plateau is memorised text."""
        s = self.setting
        steps = result.get("steps_run", s["pretrain_steps"])
        until, fit = "", ""
        if s.get("pretrain_until_plateau"):
            until = (
                f" until its tune loss plateaued ({PLATEAU['patience']} evaluations in a row, every "
                f"{PLATEAU['eval_steps']} steps, not {PLATEAU['threshold']} nats below the best; the step x "
                f"{PLATEAU['factor']} at each; at most {s['pretrain_steps']} steps)"
            )
            fit = f"; on the first {TEST_BLOCKS} of its own pre-training blocks {_saved_model_ppl(saved, blocks):.2f}"
        return (
            f"- Pre-trained student: CE for {steps} steps on the pre-training documents{until}, "
            f"{steps * s['batch'] / len(blocks['pretrain']):.1f} epochs: test ppl "
            f"{next(iter(result['test_ppl'].values())):.2f}{fit}. Every arm starts from it (grown into wider models "
            "with `from_gpt2`) and continues on the continuation documents."
        )

    def tuning(self, name, settings, results, width, best, by_family=False):
        """An arm's trials and their tune-split perplexity (the student's; with `by_family`, the family's too, which
        chose)."""
        keys = list(settings[0])
        chosen_by = "family (geometric mean of the ladder's widths)" if by_family else "student"
        self.lines += [f"### Tuning: {name} ({len(settings)} trials, seed 0, {chosen_by} tune-split ppl)", ""]
        columns = ["tune ppl", *(["family tune ppl"] if by_family else []), ""]
        self.lines += ["| " + " | ".join(keys + columns) + " |", "|" + "---|" * (len(keys) + len(columns))]
        for hp, result in zip(settings, results):
            cells = [*(str(hp[k]) for k in keys), f"{result['tune_ppl'][str(width)]:.2f}"]
            cells += [f"{family_ppl(result['tune_ppl']):.2f}"] if by_family else []
            self.lines.append("| " + " | ".join([*cells, "chosen" if hp == best else ""]) + " |")
        self.lines.append("")

    def tuning_by_size(self, settings, results_by_size, best_by_size):
        """KD alone's trials at every wider size of the ladder: one column of tune-split perplexities per size."""
        keys, sizes = list(settings[0]), list(results_by_size)
        self.lines += [
            f"### Tuning: KD alone at each wider size ({len(settings)} trials each, seed 0, tune ppl at that size)",
            "",
            "| " + " | ".join([*keys, *(f"FFN {w}" for w in sizes)]) + " |",
            "|" + "---|" * (len(keys) + len(sizes)),
        ]
        for index, hp in enumerate(settings):
            cells = [
                f"{results_by_size[w][index]['tune_ppl'][str(w)]:.2f}" + (" chosen" if hp == best_by_size[w] else "")
                for w in sizes
            ]
            self.lines.append("| " + " | ".join([*(str(hp[k]) for k in keys), *cells]) + " |")
        self.lines.append("")

    def main_table(self, results, S, A, flop_steps):
        from hf_matta.widths import count_parameters

        self.results = results
        rows = [
            ("Student alone (CE)", S, _ppl(results["ce"], S)),
            ("KD student", S, _ppl(results[f"kd_{S}"], S)),
            (f"KD student at MatTA's FLOPs ({flop_steps} steps)", S, _ppl(results["kd_flops"], S)),
            ("MatTA student", S, _ppl(results["matta"], S)),
            ("MatTA TA", A, _ppl(results["matta"], A)),
            ("KD alone at the TA's size", A, _ppl(results[f"kd_{A}"], A)),
        ]
        self.lines += [
            "### Main comparison (AdamW)",
            "",
            "| model | FFN | params | test ppl | per seed |",
            "|---|---|---|---|---|",
        ]
        for name, width, values in rows:
            params = count_parameters(_model_config(self.setting, [width]), width)
            self.lines.append(
                f"| {name} | {width} | {params / 1e6:.3f} M | {_mean_std(values)} | "
                f"{', '.join(f'{v:.2f}' for v in values)} |"
            )
        self.lines.append("")
        ce, kd, kd_flops, student, ta, kd_ta = (values for _, _, values in rows)
        self._margin("TA at least 5 % below its student", student, ta, 0.05)
        self._margin("TA within 3 % of KD alone at the TA's size", kd_ta, ta, -0.03)
        self._margin("MatTA student at least 10 % below the KD student at equal tokens", kd, student, 0.10)
        self._verdict("MatTA student better than the KD student at equal FLOPs", kd_flops, student)
        self._verdict("KD student better than the student alone", ce, kd)

    def diagnostics(self, matta, settings, trial_results):
        """Whether the TA teaches: KL(TA || student) and the TA-only neurons' FFN output against the student's."""
        layers = range(self.setting["n_layer"])
        self.lines += [
            "### Is the TA teaching? Collapse diagnostics on the test split",
            "",
            "KL(TA || student) in nats per token; per layer, three measures of the TA-only neurons' FFN output "
            "against the student neurons' (`hf_matta.diagnostics`): the mean per-token cosine (near 1: parallel), "
            "the pooled cosine once each part's mean over tokens is removed (near 1: the token-dependent parts are "
            "parallel too, the TA-only neurons are redundant), and the ratio of their norms (near 0: they add "
            "nothing).",
            "",
            "| run | KL(TA \\|\\| student) | "
            + " | ".join(f"layer {i}: cos / centred cos / norm ratio" for i in layers)
            + " |",
            "|" + "---|" * (len(layers) + 2),
        ]
        rows = [(f"tuned MatTA, seed {index}", result) for index, result in enumerate(matta)]
        varied = [key for key in settings[0] if len({str(hp[key]) for hp in settings}) > 1]
        varied = varied or list(DEFAULTS["matta"])  # the knobs the trials differ in
        rows += [
            ("trial: " + ", ".join(f"{k}={hp[k]}" for k in varied), result) for hp, result in zip(settings, trial_results)
        ]
        for label, result in rows:
            found = result["diagnostics"]
            cells = [
                f"{found[f'ffn_cos_l{i}']:.2f} / {found[f'ffn_centered_cos_l{i}']:.2f} / "
                f"{found[f'ffn_norm_ratio_l{i}']:.2f}"
                for i in layers
            ]
            self.lines.append(f"| {label} | {found['kl_ta_student']:.4f} | " + " | ".join(cells) + " |")
        self.lines.append("")

    def mix_n_match(self, results, sizes, plot_path, family_flops: tuple[float, float], family_steps: int):
        """Every family of every MatTA seed against KD alone at the ladder sizes (3 seeds); `family_flops`: the
        training FLOPs of one MatTA run and of KD alone at every ladder size, summed; MatTA's uniform family again
        after `family_steps`, the steps at which its run costs the latter."""
        from hf_matta.widths import count_parameters

        params = [count_parameters(_model_config(self.setting, [w]), w) for w in sizes]
        kd = [statistics.mean(_ppl(results[f"kd_{w}"], w)) for w in sizes]
        families = results["matta"][0]["mix_n_match"]
        self.lines += [
            "### Mix'n'Match: extracted MatTA students against KD alone at the same sizes",
            "",
            "Uniform plans put every layer at one ladder width; block plans widen a centred block of k layers to the "
            "TA's width, the others at the student's (the same parameter counts as the ladder); `reordered`: the "
            "TA-only neurons sorted by importance on 64 tune blocks (student and TA unchanged); `search`: the greedy "
            "path on the tune split; `uniform, family's FLOPs`: the uniform plans of MatTA trained for "
            f"{family_steps} steps instead of {self.setting['steps']}, the FLOPs of KD alone at every size of the "
            "table. Mean ± std over the MatTA seeds; KD alone: mean ± std over its seeds.",
            "",
            "| params | KD alone | " + " | ".join(families) + " | uniform, family's FLOPs |",
            "|---|---|" + "---|" * (len(families) + 1),
        ]
        columns = [("matta", family) for family in families] + [("matta_family_flops", "uniform")]
        for index, width in enumerate(sizes):
            cells = []
            for group, family in columns:
                values = [
                    point["ppl"] for result in results[group] for point in result["mix_n_match"][family]
                    if point["params"] == params[index]
                ]  # fmt: skip
                cells.append(_mean_std(values) if values else "-")
            kd_cell = _mean_std(_ppl(results[f"kd_{width}"], width))
            self.lines.append(f"| {params[index] / 1e6:.3f} M | {kd_cell} | " + " | ".join(cells) + " |")
        matta_flops, kd_flops = family_flops
        self.lines += [
            "",
            f"Training FLOPs (`step_flops`): one MatTA run, which gives every plan above, {matta_flops:.3g}; "
            f"KD alone at each of the {len(sizes)} ladder sizes, {kd_flops:.3g} in all "
            f"({matta_flops / kd_flops:.2f} x).",
            "",
            f"![Mix'n'Match curve]({plot_path.name})",
            "",
        ]
        for group, family in columns:
            checks = [against_curve(result["mix_n_match"][family], params, kd) for result in results[group]]
            below, monotone = [worst <= 0 for worst, _ in checks], [ordered for _, ordered in checks]
            name = f"`{family}`" + (f" at the family's FLOPs ({family_steps} steps)" if group != "matta" else "")
            self.verdicts.append(
                f"- Mix'n'Match {name}: at or below the KD-alone curve at every size in {sum(below)} of "
                f"{len(below)} seeds (worst member {100 * max(worst for worst, _ in checks):+.1f} % against the "
                f"curve); monotone (more parameters, lower perplexity) in {sum(monotone)} of {len(monotone)} seeds."
            )
        _plot(results, sizes, params, kd, self.setting, plot_path, family_steps)

    def two_by_two(self, results, S, shampoo_hp):
        cells = {
            ("KD", "AdamW"): _ppl(results[f"kd_{S}"], S),
            ("KD", "Shampoo"): _ppl(results["kd_shampoo"], S),
            ("MatTA", "AdamW"): _ppl(results["matta"], S),
            ("MatTA", "Shampoo"): _ppl(results["matta_shampoo"], S),
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
            f"grafting) learning rates, the better of the AdamW arm's x {SHAMPOO_LR_MULTIPLIERS} on seed 0: KD "
            f"{shampoo_hp['kd']['learning_rate']:g}, MatTA {shampoo_hp['matta']['learning_rate']:g}.",
            "",
            "Gains over KD + AdamW in mean log-perplexity (nats; positive is better): MatTA alone "
            f"{gain[('MatTA', 'AdamW')]:+.4f}, Shampoo alone {gain[('KD', 'Shampoo')]:+.4f}, both "
            f"{gain[('MatTA', 'Shampoo')]:+.4f}, against a sum of "
            f"{gain[('MatTA', 'AdamW')] + gain[('KD', 'Shampoo')]:+.4f}.",
            "",
        ]
        both, added = gain[("MatTA", "Shampoo")], gain[("MatTA", "AdamW")] + gain[("KD", "Shampoo")]
        self.verdicts.append(
            f"- MatTA and Shampoo super-additive (gain of both > sum of gains): "
            f"{'held' if both > added and both > 0 else 'not held'} ({both:+.4f} vs {added:+.4f} nats; single "
            "seed-mean comparison, no error bar)."
        )
        self._verdict("Shampoo better than AdamW for MatTA", cells[("MatTA", "AdamW")], cells[("MatTA", "Shampoo")])

    def sharing(self, results, S, A):
        nested, separate = results["matta"], results["separate_ta"]
        self.lines += [
            "### Parameter sharing: nested TA vs a separate TA trained online with the same loss",
            "",
            "| TA | student test ppl | TA test ppl |",
            "|---|---|---|",
            f"| nested (shares all but FFN neurons {S}..{A}) | {_mean_std(_ppl(nested, S))} | "
            f"{_mean_std(_ppl(nested, A))} |",
            f"| separate (shares nothing) | {_mean_std(_ppl(separate, S))} | {_mean_std(_ppl(separate, A))} |",
            "",
        ]
        claim = "nesting (sharing) gives a better student than a separate TA"
        self._verdict(claim, _ppl(separate, S), _ppl(nested, S))

    @staticmethod
    def _difference(baseline: list[float], method: list[float]) -> tuple[float, float]:
        """Mean relative perplexity reduction of `method` against `baseline`, and its standard error."""
        reduction = 1 - statistics.mean(method) / statistics.mean(baseline)
        variance = sum(
            statistics.variance(values) / len(values) / statistics.mean(values) ** 2
            for values in (baseline, method)
            if len(values) > 1
        )
        return reduction, (1 - reduction) * math.sqrt(variance)

    def _margin(self, claim: str, baseline: list[float], method: list[float], margin: float) -> None:
        """A claim on the relative reduction (1 - method / baseline): met when it is at least `margin` (a negative
        margin: no worse than that), stated with twice its standard error."""
        reduction, se = self._difference(baseline, method)
        word = "held" if reduction >= margin else "not held"
        self.verdicts.append(
            f"- {claim}: {word} (ppl {statistics.mean(method):.2f} vs {statistics.mean(baseline):.2f}: "
            f"{100 * reduction:+.1f} % lower, 2 x standard error {200 * se:.1f} points; goal {100 * margin:+.0f} %)."
        )

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
        self.verdicts.append(
            f"- {claim}: {word} (ppl {statistics.mean(method):.2f} vs {statistics.mean(baseline):.2f}, difference "
            f"{diff:+.2f}, 2 x standard error {2 * se:.2f})."
        )

    def claims(self):
        self.lines += ["### Claims, decided from the tables above", "", *self.verdicts, ""]

    def text(self) -> str:
        return "\n".join(self.lines)


def _plot(results, sizes, params, kd, setting, path: Path, family_steps: int) -> None:
    """Perplexity against parameters: the extracted MatTA families (seed 0), the uniform one at the KD family's
    FLOPs (`family_steps`), and KD alone at the ladder sizes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=90)
    kd_std = [statistics.stdev(_ppl(results[f"kd_{w}"], w)) if len(results[f"kd_{w}"]) > 1 else 0 for w in sizes]
    ax.errorbar([p / 1e6 for p in params], kd, yerr=kd_std, fmt="s--", color="black", label="KD alone (seed mean)")
    for family, points in results["matta"][0]["mix_n_match"].items():
        points = sorted(points, key=lambda point: point["params"])
        sizes_m, ppls = [p["params"] / 1e6 for p in points], [p["ppl"] for p in points]
        ax.plot(sizes_m, ppls, "o-", label=f"MatTA {family} (seed 0)")
    points = sorted(results["matta_family_flops"][0]["mix_n_match"]["uniform"], key=lambda point: point["params"])
    ax.plot([p["params"] / 1e6 for p in points], [p["ppl"] for p in points], "D:", color="gray",
            label=f"MatTA uniform, {family_steps} steps: KD alone's FLOPs at every size (seed 0)")  # fmt: skip
    ce = statistics.mean(_ppl(results["ce"], sizes[0]))
    ax.plot([params[0] / 1e6], [ce], "^", color="red", label="student alone (CE)")
    ax.set_xlabel("parameters (M)")
    ax.set_ylabel("test perplexity")
    ax.set_title(f"Mix'n'Match ({setting['corpus']}): extracted students vs trained alone")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


if __name__ == "__main__":
    main(sys.argv[1:])
