"""hf_matta.teacher_cache: the one-time teacher pass (sharded, resumable, refused when it does not match), and training
from it (the loss of a live teacher restricted to the same top-k tokens, without running a teacher)."""

import json
import re
import types

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from hf_matta import teacher_cache
from hf_matta.losses import TopKLogProbs, matta_loss
from hf_matta.pipeline import parse_args, run_pipeline, stages
from hf_matta.pipeline.arguments import TeacherArguments
from hf_matta.teacher_cache import TOP_K_INDICES, TOP_K_LOG_PROBS, TeacherCache, build_teacher_cache
from hf_matta.trainer import MatTATrainer

from .conftest import tiny_kwargs
from .test_pipeline import datasets_cache, tiny_config, write_config  # noqa: F401 (a fixture, used by name)
from .test_trainer import _args, _collate, _sequences, _student


K = 5


@pytest.fixture(scope="module")
def teacher() -> GPT2LMHeadModel:
    torch.manual_seed(1)
    return GPT2LMHeadModel(GPT2Config(**tiny_kwargs())).eval()


def _rows(n: int = 10, seed: int = 0) -> list[dict]:
    """Packed blocks of 16 tokens, labels = input_ids."""
    return [{**row, "labels": row["input_ids"]} for row in _sequences(n, seed=seed)]


def test_cache_holds_the_teachers_top_k_per_row(tmp_path, teacher):
    rows = _rows(10)
    cache = build_teacher_cache(teacher, rows, tmp_path / "cache", top_k=K, temperature=2.0, batch_size=4,
                                shard_rows=3)  # fmt: skip
    assert len(cache) == 10 and sorted(p.name for p in (tmp_path / "cache").glob("shard-*")) == [
        "shard-00000.safetensors", "shard-00001.safetensors", "shard-00002.safetensors", "shard-00003.safetensors"
    ]  # fmt: skip
    input_ids = torch.tensor([row["input_ids"] for row in rows])
    with torch.no_grad():
        live = TopKLogProbs.from_logits(teacher(input_ids).logits, K, temperature=2.0)
    for i in range(10):
        indices, log_probs = cache[i]
        assert torch.equal(indices, live.indices[i])
        torch.testing.assert_close(log_probs, live.log_probs[i])
    assert cache.temperature == 2.0 and cache.top_k == K


def test_an_interrupted_build_resumes_where_it_stopped(tmp_path, teacher):
    rows = _rows(10)

    def stop_after_two(done: int, total: int) -> None:
        if done == 2:
            raise KeyboardInterrupt

    folder = tmp_path / "cache"
    with pytest.raises(KeyboardInterrupt):
        build_teacher_cache(teacher, rows, folder, top_k=K, shard_rows=3, progress=stop_after_two)
    with pytest.raises(ValueError, match="incomplete: 2 of 4 shards are missing"):
        TeacherCache(folder)
    first = (folder / "shard-00000.safetensors").stat().st_mtime_ns
    done = []
    cache = build_teacher_cache(teacher, rows, folder, top_k=K, shard_rows=3, progress=lambda d, t: done.append(d))
    assert done == [3, 4]  # only the two missing shards were computed
    assert (folder / "shard-00000.safetensors").stat().st_mtime_ns == first
    fresh = build_teacher_cache(teacher, rows, tmp_path / "fresh", top_k=K, shard_rows=3)
    for i in range(10):
        assert all(torch.equal(a, b) for a, b in zip(cache[i], fresh[i]))


def test_a_resumed_build_on_other_rows_is_refused(tmp_path, teacher):
    """Resuming skips the recorded shards only when their rows are the dataset's: else the cache would mix rows."""

    def stop_after_one(done: int, total: int) -> None:
        if done == 1:
            raise KeyboardInterrupt

    folder = tmp_path / "cache"
    with pytest.raises(KeyboardInterrupt):
        build_teacher_cache(teacher, _rows(10), folder, top_k=K, shard_rows=3, progress=stop_after_one)
    message = f"rows 0..2 of the dataset differ .*: delete {re.escape(str(folder))} to rebuild it .*teacher_cache_dir"
    with pytest.raises(ValueError, match=message):
        build_teacher_cache(teacher, _rows(10, seed=7), folder, top_k=K, shard_rows=3)


def test_an_interrupted_shard_write_leaves_no_temporary_file(tmp_path, teacher, monkeypatch):
    """An interrupt while a shard is written removes its temporary file; one left by a killed build (a process that
    no longer runs) is removed when the build resumes."""

    def interrupted(tensors: dict, filename: str) -> None:
        with open(filename, "wb") as file:
            file.write(b"half a shard")
        raise KeyboardInterrupt

    folder = tmp_path / "cache"
    with monkeypatch.context() as patch:
        patch.setattr(teacher_cache, "save_file", interrupted)
        with pytest.raises(KeyboardInterrupt):
            build_teacher_cache(teacher, _rows(4), folder, top_k=K, shard_rows=2)
    assert sorted(path.name for path in folder.iterdir()) == ["manifest.json"]
    (folder / ".shard-00000.safetensors.tmp-999999999").write_bytes(b"left by a killed build")
    build_teacher_cache(teacher, _rows(4), folder, top_k=K, shard_rows=2)
    assert sorted(path.name for path in folder.iterdir()) == [
        "manifest.json", "shard-00000.safetensors", "shard-00001.safetensors"
    ]  # fmt: skip


REBUILDS = [  # (what differs in a second build into the same folder, text the error must hold)
    (dict(top_k=K + 1), "top_k: 5 there, 6 now"),
    (dict(temperature=2.0), "temperature: 1.0 there, 2.0 now"),
    (dict(rows=9), "num_rows: 10 there, 9 now"),
    (dict(other_teacher=True), "teacher: "),
]


@pytest.mark.parametrize("change,message", REBUILDS)
def test_a_build_with_other_settings_is_refused(tmp_path, teacher, change, message):
    build_teacher_cache(teacher, _rows(10), tmp_path / "cache", top_k=K, shard_rows=4)
    other = GPT2LMHeadModel(GPT2Config(**tiny_kwargs())) if change.get("other_teacher") else teacher
    kwargs = dict(top_k=change.get("top_k", K), temperature=change.get("temperature", 1.0), shard_rows=4)
    with pytest.raises(ValueError, match=message):
        build_teacher_cache(other, _rows(change.get("rows", 10)), tmp_path / "cache", **kwargs)


def test_rows_of_different_lengths_are_refused(tmp_path, teacher):
    rows = [{"input_ids": [1, 2, 3]}, {"input_ids": [1, 2]}]
    with pytest.raises(ValueError, match="packed blocks of one length"):
        build_teacher_cache(teacher, rows, tmp_path / "cache", top_k=K)


def _cached_trainer(tmp_path, cache_dir, rows, **overrides) -> MatTATrainer:
    settings = dict(
        per_device_train_batch_size=4, max_steps=6, learning_rate=1e-2, logging_steps=2, save_strategy="no",
        seed=0, disable_tqdm=True, teacher_weight=0.5, teacher_cache_dir=str(cache_dir),
    )  # fmt: skip
    return MatTATrainer(
        model=_student(), args=_args(tmp_path / "out", **{**settings, **overrides}), train_dataset=rows,
        data_collator=_collate,
    )


def test_cached_targets_give_the_live_teachers_top_k_loss(tmp_path, teacher):
    """The trainer's loss on a batch of cached rows is the loss with the live teacher restricted to its top-k."""
    rows = _rows(8)
    build_teacher_cache(teacher, rows, tmp_path / "cache", top_k=K, temperature=1.5, shard_rows=3)
    trainer = _cached_trainer(tmp_path, tmp_path / "cache", rows, teacher_temperature=1.5, extra_widths="all")
    batch = next(iter(trainer.get_train_dataloader()))
    assert batch["teacher_top_k_indices"].shape == (4, 16, K)
    loss, logits = trainer.matta_loss(trainer.model, batch)
    with torch.no_grad():
        live = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    expected = matta_loss(
        logits[16], batch["labels"], ta_logits=logits[64], teacher_logits=TopKLogProbs.from_logits(live, K, 1.5),
        extra_logits={32: logits[32]}, teacher_weight=0.5, teacher_temperature=1.5,
    )  # fmt: skip
    torch.testing.assert_close(loss.total, expected.total)
    for name in expected.terms:
        torch.testing.assert_close(loss.terms[name], expected.terms[name])


def test_training_reads_the_cache_and_runs_no_teacher(tmp_path, teacher):
    rows = _rows(16)
    build_teacher_cache(teacher, rows, tmp_path / "cache", top_k=K, shard_rows=5)
    trainer = _cached_trainer(tmp_path, tmp_path / "cache", rows)
    assert trainer.teacher is None
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logs) == 3 and all({"loss_student", "loss_ta", "loss_distill"} <= entry.keys() for entry in logs)
    assert logs[-1]["loss_student"] < logs[0]["loss_student"]


CACHE_MISMATCHES = [  # (trainer settings or other rows, text the error must hold)
    (dict(teacher_temperature=2.0), "temperature 1.0, but teacher_temperature=2.0"),
    (dict(rows_seed=7), "rows 0..4 of the training set differ from those the teacher cache"),
    (dict(rows=9), "the training set has 9 rows but the teacher cache"),
]


@pytest.mark.parametrize("change,message", CACHE_MISMATCHES)
def test_a_cache_that_does_not_match_the_run_is_refused(tmp_path, teacher, change, message):
    build_teacher_cache(teacher, _rows(10), tmp_path / "cache", top_k=K, shard_rows=5)
    rows = _rows(change.pop("rows", 10), seed=change.pop("rows_seed", 0))
    with pytest.raises(ValueError, match=message):
        _cached_trainer(tmp_path, tmp_path / "cache", rows, **change)


def test_cached_targets_keep_their_dtype_when_deepspeed_casts_the_batch(tmp_path, monkeypatch):
    """Under DeepSpeed, Trainer casts a batch's floating tensors to the engine's dtype (here a fake bf16 engine): the
    cached log-probabilities only move to the device, or bf16 rounding would bias the tail mass 1 - sum p."""
    trainer = MatTATrainer(model=_student(), args=_args(tmp_path), train_dataset=_rows(4), data_collator=_collate)
    engine_dtype = types.SimpleNamespace(dtype=lambda: torch.bfloat16)
    state = types.SimpleNamespace(deepspeed_plugin=types.SimpleNamespace(hf_ds_config=engine_dtype))
    monkeypatch.setattr(trainer, "is_deepspeed_enabled", True)
    monkeypatch.setattr(trainer, "accelerator", types.SimpleNamespace(state=state))
    log_probs = torch.randn(2, 16, 20).log_softmax(-1)[..., :K]  # k = 5 of 20 tokens: a tail is left
    batch = {
        **_collate(_rows(2)), "scores": torch.rand(2, 16), TOP_K_INDICES: torch.zeros(2, 16, K, dtype=torch.long),
        TOP_K_LOG_PROBS: log_probs,
    }  # fmt: skip
    prepared = trainer._prepare_inputs(batch)
    assert prepared["scores"].dtype == torch.bfloat16  # the fake engine casts the rest of the batch
    assert prepared["input_ids"].dtype == prepared[TOP_K_INDICES].dtype == torch.long
    assert prepared[TOP_K_LOG_PROBS].dtype == torch.float32 and torch.equal(prepared[TOP_K_LOG_PROBS], log_probs)


STAGE_TEACHERS = [  # (the run's teacher, from the folder {tmp}, and teacher_cache_top_k; text of the error or None)
    ("{tmp}/teacher-a", K, None),
    ("{tmp}/sub/../teacher-a", K, None),  # the same folder by another name
    ("teacher-b", K, "of the teacher '.*teacher-a', but this run asks for the top-5 of teacher_model_name_or_path="
                     "'teacher-b'"),
    ("{tmp}/teacher-a", K + 1, "holds the top-5 targets .* asks for the top-6 .*: delete .* or choose another"),
]  # fmt: skip


@pytest.mark.parametrize("name,top_k,message", STAGE_TEACHERS)
def test_the_train_stage_refuses_a_finished_cache_of_another_teacher_or_top_k(tmp_path, teacher, name, top_k, message):
    for folder in ("teacher-a", "sub"):
        (tmp_path / folder).mkdir()
    rows = _rows(4)
    build_teacher_cache(teacher, rows, tmp_path / "cache", top_k=K, teacher_name=f"{tmp_path}/teacher-a")
    training = _args(tmp_path / "out", teacher_cache_dir=str(tmp_path / "cache"),
                     teacher_model_name_or_path=name.format(tmp=tmp_path))  # fmt: skip
    lines = []
    run = types.SimpleNamespace(
        args=types.SimpleNamespace(training=training, teacher=TeacherArguments(teacher_cache_top_k=top_k)),
        log=lines.append,
    )
    if message is None:
        stages._ensure_teacher_cache(run, rows)
        assert lines == []  # reused as it is: nothing built
        return
    with pytest.raises(ValueError, match=message):
        stages._ensure_teacher_cache(run, rows)


@pytest.mark.usefixtures("datasets_cache")
def test_the_train_stage_builds_the_cache_once_and_trains_from_it(tmp_path):
    """`hf-matta run` with teacher_cache_dir: the train stage builds the cache from the (pre-trained) teacher, then
    the MatTA run and the baseline both train from it."""
    config = tiny_config(tmp_path, teacher_cache_dir=str(tmp_path / "cache"), teacher_cache_top_k=7, baseline=True,
                         max_steps=4)  # fmt: skip
    lines = []
    run_pipeline(parse_args([str(write_config(tmp_path / "run.yaml", config))], config_positional=True),
                 log=lines.append)  # fmt: skip
    assert sum("building the teacher cache" in line for line in lines) == 1
    cache = TeacherCache(tmp_path / "cache")
    assert cache.top_k == 7 and len(cache) == 64  # the run's max_train_samples blocks
    summary = json.loads((tmp_path / "run" / "matta_summary.json").read_text())
    for row in summary["widths"].values():
        assert row["end_ppl"] < row["start_ppl"]
    assert (tmp_path / "run" / "baseline" / "matta_summary.json").is_file()
