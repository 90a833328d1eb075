"""Cached teacher targets: one pass of the teacher over the training set stores its top-k log-probabilities per token,
and training reads them instead of running the teacher.

It pays where the teacher's forward is paid more than once per token (a run of several epochs pays it once) or where
the teacher is expensive beside its student (GPT-2 XL teaching GPT-2 Medium); it also removes the teacher's weights
and its vocabulary-sized logits from the training step's memory. The KL against a top-k teacher keeps the rest of the
vocabulary as one bucket (`hf_matta.losses`, module docstring, says why this and not renormalising).

    cache = build_teacher_cache(teacher, train_dataset, "outputs/teacher_cache", top_k=64)
    args = MatTATrainingArguments(..., teacher_cache_dir="outputs/teacher_cache")   # no teacher needed to train

The folder: `manifest.json` (k, temperature, rows, sequence length, vocabulary, the teacher's fingerprint and name
and, for every finished shard, a digest of the input ids it was computed on) and `shard-00000.safetensors`, ..., each
holding `indices` `(rows, T, k)` int32 and `log_probs` `(rows, T, k)` float32 for `shard_rows` consecutive rows of the
dataset. A shard is written under a temporary name and renamed when whole, then recorded in the manifest, so an
interrupted build resumes at the first unrecorded shard; a build asked with other settings, another teacher or other
rows than the folder holds is refused (the rows of every recorded shard are compared with its digest). Training
checks the digests against its dataset before the first step. The rows must be packed blocks of one length with no
padding (what `hf_matta.data.tokenize_and_pack` makes). Size on disk: 8 x k bytes per token (k = 64: 512 bytes,
against 201 kB for a token's fp32 logits over GPT-2's 50257 tokens).
"""

import hashlib
import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from .files import atomic_file, write_json_atomic
from .losses import TopKLogProbs


TOP_K_INDICES = "teacher_top_k_indices"  # batch keys that carry the cached targets, (B, T, k) each
TOP_K_LOG_PROBS = "teacher_top_k_log_probs"
BATCH_KEYS = (TOP_K_INDICES, TOP_K_LOG_PROBS)
_MANIFEST = "manifest.json"
_FORMAT = 1
_SETTINGS = ("top_k", "temperature", "num_rows", "seq_len", "vocab_size", "shard_rows", "teacher")


def teacher_fingerprint(teacher: nn.Module) -> str:
    """A digest of the teacher's parameter names, shapes, dtypes and bytes: the same weights give the same digest."""
    digest = hashlib.sha256()
    for name, tensor in sorted(teacher.state_dict().items()):
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype};".encode())
        digest.update(tensor.view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:32]


def _input_ids(dataset: Sequence, start: int, end: int) -> torch.LongTensor:
    """Rows `start..end` of the dataset's `input_ids`, `(rows, T)`; every row must have the same length."""
    rows = [torch.as_tensor(dataset[i]["input_ids"]) for i in range(start, end)]
    lengths = {row.numel() for row in rows}
    if len(lengths) != 1:
        raise ValueError(
            f"rows {start}..{end - 1} of the dataset have input_ids of lengths {sorted(lengths)[:5]}: the teacher "
            "cache needs packed blocks of one length (hf_matta.data.tokenize_and_pack), with no padding."
        )
    return torch.stack(rows).long()


def _digest(input_ids: torch.Tensor) -> str:
    return hashlib.sha256(input_ids.to(torch.int64).numpy().tobytes()).hexdigest()[:32]


def _shard_file(folder: Path, shard: int) -> Path:
    return folder / f"shard-{shard:05d}.safetensors"


def _other_rows_error(folder: Path, start: int, end: int, rows: str) -> ValueError:
    """The error for rows that differ from those a shard of the cache at `folder` was computed on."""
    return ValueError(
        f"rows {start}..{end - 1} of {rows} differ from those the teacher cache at {folder} was built on (another "
        f"tokenizer, block size, split or order?): delete {folder} to rebuild it for these rows, or choose another "
        "teacher_cache_dir."
    )


def build_teacher_cache(
    teacher: nn.Module,
    dataset: Sequence,
    folder: str | os.PathLike,
    top_k: int = 64,
    temperature: float = 1.0,
    batch_size: int = 8,
    shard_rows: int = 1024,
    device: str | torch.device | None = None,
    progress: Callable[[int, int], None] | None = None,
    teacher_name: str | None = None,
) -> "TeacherCache":
    """One pass of `teacher` over `dataset` (rows with `input_ids`), storing the top-`top_k` log-probabilities of
    softmax(logits / `temperature`) at every position in `folder`; resumes a build that was interrupted there.

    Args:
        teacher: the frozen teacher (run in eval mode under `no_grad`, `batch_size` rows at a time, on `device`,
            default: where its weights are).
        dataset: the training rows, in the order training indexes them.
        temperature: the teacher temperature training will use (`teacher_temperature`); the tail bucket's mass is
            known only at this temperature.
        progress: called with (shards done, shards in all) after each shard.
        teacher_name: the teacher's path or Hub id, recorded in the manifest (`TeacherCache.teacher_name`) so that a
            run can tell which teacher a cache holds without loading it; default: `teacher.name_or_path`.
    Returns the finished cache.
    """
    folder = Path(folder)
    if not hasattr(dataset, "__len__"):
        raise TypeError(
            f"the teacher cache is indexed by row: give a map-style dataset, not a {type(dataset).__name__} (a "
            "stream)."
        )
    num_rows = len(dataset)
    for name, value, low in (("top_k", top_k, 1), ("batch_size", batch_size, 1), ("shard_rows", shard_rows, 1)):
        if value < low:
            raise ValueError(f"{name}={value} must be >= {low}.")
    if not temperature > 0:
        raise ValueError(f"temperature={temperature} must be > 0.")
    if num_rows == 0:
        raise ValueError("the dataset is empty: there is nothing to cache.")
    vocab_size = teacher.config.vocab_size
    if top_k > vocab_size:
        raise ValueError(f"top_k={top_k} is larger than the teacher's vocabulary ({vocab_size} tokens).")
    settings = {
        "top_k": top_k, "temperature": float(temperature), "num_rows": num_rows,
        "seq_len": _input_ids(dataset, 0, 1).shape[-1], "vocab_size": vocab_size, "shard_rows": shard_rows,
        "teacher": teacher_fingerprint(teacher),
    }  # fmt: skip
    teacher_name = teacher_name or getattr(teacher, "name_or_path", None) or None
    manifest = _start_manifest(folder, settings, teacher_name)
    device = torch.device(device) if device is not None else next(teacher.parameters()).device
    was_training = teacher.training
    teacher.eval()
    num_shards = -(-num_rows // shard_rows)
    try:
        for shard in range(num_shards):
            key = f"{shard:05d}"
            start, end = shard * shard_rows, min(num_rows, (shard + 1) * shard_rows)
            input_ids = _input_ids(dataset, start, end)  # (rows, T)
            digest = _digest(input_ids)
            if key in manifest["shards"] and _shard_file(folder, shard).is_file():
                if manifest["shards"][key] != digest:  # a resume on other rows would make a mixed cache
                    raise _other_rows_error(folder, start, end, "the dataset")
                continue
            if input_ids.shape[-1] != settings["seq_len"]:
                raise ValueError(
                    f"rows {start}..{end - 1} hold {input_ids.shape[-1]} tokens, row 0 holds {settings['seq_len']}: "
                    "the teacher cache needs packed blocks of one length."
                )
            parts = [_top_k(teacher, input_ids[i : i + batch_size].to(device), top_k, temperature)
                     for i in range(0, len(input_ids), batch_size)]  # fmt: skip
            tensors = {
                "indices": torch.cat([part.indices for part in parts]).to(torch.int32).contiguous(),
                "log_probs": torch.cat([part.log_probs for part in parts]).float().contiguous(),
            }
            with atomic_file(_shard_file(folder, shard)) as tmp:  # an interrupt leaves no half-written shard
                save_file(tensors, str(tmp))
            manifest["shards"][key] = digest
            write_json_atomic(folder / _MANIFEST, manifest)
            if progress is not None:
                progress(len(manifest["shards"]), num_shards)
    finally:
        teacher.train(was_training)
    return TeacherCache(folder)


@torch.no_grad()
def _top_k(teacher: nn.Module, input_ids: torch.LongTensor, k: int, temperature: float) -> TopKLogProbs:
    """The teacher's top-k log-probabilities on one batch, on the CPU."""
    logits = teacher(input_ids=input_ids, use_cache=False).logits  # (B, T, V)
    top = TopKLogProbs.from_logits(logits, k, temperature)
    return TopKLogProbs(top.indices.cpu(), top.log_probs.cpu(), temperature)


def _start_manifest(folder: Path, settings: dict, teacher_name: str | None) -> dict:
    """The manifest of a build: a new one, or the one a previous build left, if it was asked with the same
    settings (otherwise refused, naming what differs); `teacher_name` is recorded in it (the same weights, as the
    fingerprint says, may be given under another name)."""
    path = folder / _MANIFEST
    if path.is_file():
        manifest = json.loads(path.read_text())
        differing = {
            name: (manifest.get(name), settings[name]) for name in _SETTINGS if manifest.get(name) != settings[name]
        }
        if differing:
            described = "; ".join(f"{name}: {old!r} there, {new!r} now" for name, (old, new) in differing.items())
            raise ValueError(
                f"{folder} holds a teacher cache built with other settings ({described}): it is left as it is; "
                "choose another folder, or delete this one to rebuild it."
            )
        if manifest.get("teacher_name") != teacher_name:
            manifest["teacher_name"] = teacher_name
            write_json_atomic(path, manifest)
        return manifest
    if folder.exists() and any(folder.iterdir()):
        raise FileExistsError(f"{folder} exists, is not empty and holds no teacher cache: choose another folder.")
    manifest = {"format": _FORMAT, **settings, "teacher_name": teacher_name, "shards": {}}
    write_json_atomic(path, manifest)
    return manifest


class TeacherCache:
    """A finished teacher cache (`build_teacher_cache`): the cached top-k targets of every dataset row.

    `cache[i]` is `(indices, log_probs)` of row `i`, `(T, k)` each (int64, float32), read from the shard files as
    memory maps. `teacher_name` is the path or Hub id of the teacher that built it (None if it had none).
    """

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        path = self.folder / _MANIFEST
        if not path.is_file():
            raise FileNotFoundError(
                f"{self.folder} holds no teacher cache ({_MANIFEST} is missing): build one with "
                "hf_matta.teacher_cache.build_teacher_cache."
            )
        manifest = json.loads(path.read_text())
        if manifest.get("format") != _FORMAT:
            raise ValueError(
                f"{path} is a teacher cache of format {manifest.get('format')!r}; this hf_matta reads {_FORMAT}."
            )
        self.manifest = manifest
        self.top_k, self.temperature = manifest["top_k"], manifest["temperature"]
        self.num_rows, self.shard_rows = manifest["num_rows"], manifest["shard_rows"]
        self.teacher_name = manifest.get("teacher_name")
        num_shards = -(-self.num_rows // self.shard_rows)
        missing = [shard for shard in range(num_shards) if f"{shard:05d}" not in manifest["shards"]
                   or not _shard_file(self.folder, shard).is_file()]  # fmt: skip
        if missing:
            raise ValueError(
                f"the teacher cache at {self.folder} is incomplete: {len(missing)} of {num_shards} shards are missing "
                f"(first: {missing[0]}); run build_teacher_cache again with the same settings to finish it."
            )
        self._handles: dict[int, object] = {}

    def __len__(self) -> int:
        return self.num_rows

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not 0 <= index < self.num_rows:
            raise IndexError(f"row {index} is outside the teacher cache's {self.num_rows} rows.")
        shard, row = divmod(index, self.shard_rows)
        if shard not in self._handles:
            self._handles[shard] = safe_open(str(_shard_file(self.folder, shard)), framework="pt")
        handle = self._handles[shard]
        return handle.get_slice("indices")[row].long(), handle.get_slice("log_probs")[row]

    def __getstate__(self) -> dict:
        """Pickled (for DataLoader workers) without its open files; each worker opens its own."""
        return {**self.__dict__, "_handles": {}}

    def check_dataset(self, dataset: Sequence) -> None:
        """Refuse a dataset other than the one the cache was built on (its row count, length or input ids)."""
        if len(dataset) != self.num_rows:
            raise ValueError(
                f"the training set has {len(dataset)} rows but the teacher cache at {self.folder} was built on "
                f"{self.num_rows}: delete {self.folder} to rebuild it for this training set, or choose another "
                "teacher_cache_dir."
            )
        for key, digest in sorted(self.manifest["shards"].items()):
            start = int(key) * self.shard_rows
            end = min(self.num_rows, start + self.shard_rows)
            if _digest(_input_ids(dataset, start, end)) != digest:
                raise _other_rows_error(self.folder, start, end, "the training set")

    def targets(self, batch: dict) -> TopKLogProbs | None:
        """The cached teacher targets a collated batch carries (`TeacherTargetsCollator`), or None."""
        if TOP_K_INDICES not in batch:
            return None
        return TopKLogProbs(batch[TOP_K_INDICES].long(), batch[TOP_K_LOG_PROBS], self.temperature)


class CachedTeacherDataset(torch.utils.data.Dataset):
    """`dataset` whose rows also carry their cached teacher targets (under `BATCH_KEYS`)."""

    def __init__(self, dataset: Sequence, cache: TeacherCache):
        self.dataset, self.cache = dataset, cache

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict:
        indices, log_probs = self.cache[index]
        return {**self.dataset[index], TOP_K_INDICES: indices, TOP_K_LOG_PROBS: log_probs}


class TeacherTargetsCollator:
    """A data collator that stacks the cached teacher targets of the rows carrying them, `(B, T, k)`, and collates
    the rest of each row with the collator it wraps (rows without targets, e.g. evaluation rows, pass through)."""

    def __init__(self, collator: Callable[[list[dict]], dict]):
        self.collator = collator

    def __call__(self, features: list[dict]) -> dict:
        if not features or TOP_K_INDICES not in features[0]:
            return self.collator(features)
        cached = {key: torch.stack([torch.as_tensor(row[key]) for row in features]) for key in BATCH_KEYS}
        rest = [{key: value for key, value in row.items() if key not in BATCH_KEYS} for row in features]
        batch = self.collator(rest)
        return {**batch, **cached}


__all__ = [
    "BATCH_KEYS",
    "CachedTeacherDataset",
    "TeacherCache",
    "TeacherTargetsCollator",
    "build_teacher_cache",
    "teacher_fingerprint",
]
