"""Corpora, tokenizer and packing: raw text in, fixed-length blocks of token ids out (`input_ids`, `labels`).

Three sources, one pipeline:
- a Hub dataset (`dataset_name`, optionally `streaming`),
- local `.txt` / `.jsonl` files (`train_file`, `validation_file`),
- a corpus already on the machine (`builtin_corpus`): `pydoc_data.topics`, which ships with Python, so the default
  runs offline, or the larger `python-docs` and `linux-docs`, which Debian's documentation packages install.

Documents are tokenised, joined with the end-of-text token between them and cut into blocks of `block_size` tokens:
no padding, every token counts (`labels = input_ids`; the model shifts them). When no validation file or split
exists, a share of the documents is held out (split by document, before tokenisation, so no text leaks).
Tokenisation runs through `datasets.map` with a fingerprint of (data, tokenizer, block size), so a second run with
the same inputs reads the Arrow cache instead of tokenising again. Every input is checked, with an error that names
the bad value, before any tokenisation or training starts.
"""

import copy
import hashlib
import json
import os
import pickle
import re
import sys
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import datasets
import torch
from datasets import Dataset, DatasetDict, IterableDataset, IterableDatasetDict, load_dataset
from datasets.exceptions import DatasetGenerationError
from datasets.fingerprint import Hasher
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from .files import atomic_folder, is_empty_folder, write_text_atomic


EOS_TOKEN = "<|endoftext|>"  # GPT-2's only special token: document separator, bos, eos and unk at once
_TOKENIZE_BATCH = 1000  # documents per `map` batch; each batch drops < block_size tokens at its end
_LOCAL_FORMATS = {".txt": "text", ".text": "text", ".jsonl": "json", ".json": "json"}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json")  # any one marks a saved tokenizer


def _pydoc_topics() -> list[str]:
    """The topics of Python's own `help()`: about 0.47 MB of English prose and code, one document per topic."""
    from pydoc_data.topics import topics

    return [topics[name] for name in sorted(topics)]


def _python_docs(root: Path = Path("/usr/share/doc")) -> list[str]:
    """The reStructuredText sources of Python's documentation as Debian's `python3.X-doc` package installs them: about
    11 MB of English prose and code in some 500 documents (4.2 M tokens at a 1024-token BPE), several million tokens
    for models to train on without repeating, offline. One document per source file, in path order."""
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    roots = sorted(root.glob("python3*/html/_sources"), key=lambda sources: version not in str(sources))
    if not roots:
        raise FileNotFoundError(
            "builtin_corpus='python-docs' reads the sources of Python's documentation, which are not installed: "
            f"`apt-get install {version}-doc` (Debian, Ubuntu) puts them in {root}/{version}/html/_sources."
        )
    return [path.read_text(errors="replace") for path in sorted(roots[0].rglob("*.txt"))]


def _linux_docs(root: Path = Path("/usr/share/doc")) -> list[str]:
    """The reStructuredText sources of the Linux kernel's documentation as Debian's `linux-doc-6.X` package installs
    them, less the translations (`translations/`: Chinese, Japanese, Korean, Italian, Spanish): 21 MB of English prose
    in some 2800 documents (9.8 M tokens at a 1024-token BPE, 2.3 x `python-docs`), offline. One document per source
    file, in path order, from the newest kernel version installed."""
    roots = sorted(root.glob("linux-doc-*/html/_sources"), key=lambda sources: _version(sources.parent.parent.name))
    if not roots:
        raise FileNotFoundError(
            "builtin_corpus='linux-docs' reads the sources of the Linux kernel's documentation, which are not "
            "installed: `apt-get install linux-doc-6.1` (Debian 12; `apt-cache search linux-doc` lists the versions) "
            f"puts them in {root}/linux-doc-6.1/html/_sources."
        )
    sources = roots[-1]
    paths = sorted(path for path in sources.rglob("*.txt") if path.relative_to(sources).parts[0] != "translations")
    return [path.read_text(errors="replace") for path in paths]


def _version(name: str) -> tuple[int, ...]:
    """`linux-doc-6.10` -> (6, 10): version order, in which 6.10 comes after 6.9."""
    return tuple(int(part) for part in re.findall(r"\d+", name))


BUILTIN_CORPORA: dict[str, Callable[[], list[str]]] = {
    "pydoc_data.topics": _pydoc_topics,
    "python-docs": _python_docs,
    "linux-docs": _linux_docs,
}


@dataclass
class DataArguments:
    """Where the text comes from and how it becomes training blocks.

    Exactly one source: `dataset_name` (a Hub dataset), `train_file` (local text or JSON lines) or `builtin_corpus`.
    """

    _argument_group_name = "data"  # its section of `--help` (HfArgumentParser)

    dataset_name: str | None = field(
        default=None, metadata={"help": "Hub dataset id, e.g. `HuggingFaceFW/fineweb-edu` (loaded with `datasets`)."}
    )
    dataset_config_name: str | None = field(
        default=None, metadata={"help": "Configuration (subset) of the Hub dataset, e.g. `sample-10BT`."}
    )
    streaming: bool = field(
        default=False,
        metadata={
            "help": "Stream the Hub dataset instead of downloading it whole (for web-scale corpora). Streamed data "
            "is tokenised on the fly and not cached; training then needs `max_steps` or `max_train_tokens`."
        },
    )
    train_file: str | None = field(
        default=None, metadata={"help": "Local training text: a `.txt` file (one line per row) or `.jsonl`."}
    )
    validation_file: str | None = field(
        default=None, metadata={"help": "Local validation text in the same format as `train_file`."}
    )
    builtin_corpus: str | None = field(
        default=None,
        metadata={
            "help": f"A corpus already on this machine, for offline runs: one of {sorted(BUILTIN_CORPORA)} "
            "(`pydoc_data.topics` ships with Python; `python-docs` and `linux-docs` need Debian's python3.X-doc and "
            "linux-doc-6.X packages)."
        },
    )
    text_column: str = field(default="text", metadata={"help": "Column that holds the documents' text."})
    block_size: int = field(
        default=1024,
        metadata={"help": "Tokens per training sequence; documents are packed into blocks of this length."},
    )
    validation_split_percentage: float = field(
        default=5.0,
        metadata={
            "help": "Percentage of the training documents held out for validation when there is no validation "
            "file or split. 0 disables validation."
        },
    )
    streaming_validation_documents: int = field(
        default=1000,
        metadata={"help": "When streaming without a validation split: the first N documents are held out."},
    )
    max_train_samples: int | None = field(
        default=None, metadata={"help": "Keep at most this many training blocks (for quick runs)."}
    )
    max_train_tokens: int | None = field(
        default=None,
        metadata={
            "help": "Token budget: keep the first ceil(max_train_tokens / block_size) training blocks. With "
            "streaming and no `max_steps`, the recipe derives `max_steps` from it."
        },
    )
    max_eval_samples: int | None = field(
        default=None, metadata={"help": "Keep at most this many validation blocks."}
    )
    preprocessing_num_workers: int | None = field(
        default=None, metadata={"help": "Processes for tokenisation (`datasets.map(num_proc=...)`)."}
    )
    overwrite_cache: bool = field(
        default=False, metadata={"help": "Tokenise again even if the `datasets` cache holds the result."}
    )

    def __post_init__(self):
        sources = {
            "dataset_name": self.dataset_name,
            "train_file": self.train_file,
            "builtin_corpus": self.builtin_corpus,
        }
        given = {name: value for name, value in sources.items() if value is not None}
        if len(given) != 1:
            raise ValueError(
                f"Give exactly one text source, got {given or 'none'}: set one of dataset_name (Hub), "
                f"train_file (local .txt/.jsonl) or builtin_corpus ({sorted(BUILTIN_CORPORA)})."
            )
        if self.builtin_corpus is not None and self.builtin_corpus not in BUILTIN_CORPORA:
            raise ValueError(
                f"builtin_corpus={self.builtin_corpus!r} is unknown; choose one of {sorted(BUILTIN_CORPORA)}."
            )
        if self.streaming and self.dataset_name is None:
            raise ValueError(
                "streaming=True streams a Hub dataset: set dataset_name, or drop streaming for local files."
            )
        if self.validation_file is not None and self.train_file is None:
            raise ValueError(f"validation_file={self.validation_file!r} needs a train_file next to it.")
        for name in ("train_file", "validation_file"):
            path = getattr(self, name)
            if path is not None and Path(path).suffix not in _LOCAL_FORMATS:
                raise ValueError(f"{name}={path!r} has an unknown extension; use one of {sorted(_LOCAL_FORMATS)}.")
        if self.validation_file is not None and (
            _LOCAL_FORMATS[Path(self.validation_file).suffix] != _LOCAL_FORMATS[Path(self.train_file).suffix]
        ):
            raise ValueError(
                f"validation_file={self.validation_file!r} and train_file={self.train_file!r} differ in format: "
                "give both as text (.txt) or both as JSON lines (.jsonl)."
            )
        if self.block_size < 2:
            raise ValueError(f"block_size={self.block_size} must be at least 2 (a token and the one that follows).")
        if not 0 <= self.validation_split_percentage < 100:
            raise ValueError(f"validation_split_percentage={self.validation_split_percentage} must be in [0, 100).")
        for name in ("streaming_validation_documents", "max_train_samples", "max_train_tokens", "max_eval_samples"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ValueError(f"{name}={value} must be positive (or unset for no limit).")
        if self.preprocessing_num_workers is not None and self.preprocessing_num_workers < 1:
            raise ValueError(f"preprocessing_num_workers={self.preprocessing_num_workers} must be at least 1.")

    @property
    def max_train_blocks(self) -> int | None:
        """The tighter of `max_train_samples` and the token budget, in blocks."""
        limits = [self.max_train_samples]
        if self.max_train_tokens is not None:
            limits.append(-(-self.max_train_tokens // self.block_size))
        limits = [limit for limit in limits if limit is not None]
        return min(limits) if limits else None


def check_block_size(block_size: int, n_positions: int) -> None:
    """Refuse blocks longer than the model's context, before any data is tokenised."""
    if block_size > n_positions:
        raise ValueError(
            f"block_size={block_size} is larger than the model's context n_positions={n_positions}: "
            f"set block_size <= {n_positions}."
        )


def load_corpus(data_args: DataArguments, seed: int = 42) -> DatasetDict | IterableDatasetDict:
    """Raw documents as a `train` split and, unless validation is disabled, a `validation` split.

    Raises before loading anything heavy: a missing file, and after loading: a text column that does not exist
    (the error lists the ones that do) or a corpus with no text.
    """
    if data_args.dataset_name is not None:
        raw = load_dataset(data_args.dataset_name, data_args.dataset_config_name, streaming=data_args.streaming)
    else:
        if data_args.builtin_corpus is not None:
            data_files = {"train": str(_write_builtin_corpus(data_args.builtin_corpus, data_args.text_column))}
        else:
            data_files = {"train": data_args.train_file}
            if data_args.validation_file is not None:
                data_files["validation"] = data_args.validation_file
        for split, path in data_files.items():
            if not Path(path).is_file():
                raise FileNotFoundError(f"{split} file {path!r} does not exist; check the {split}_file path.")
            if Path(path).stat().st_size == 0:
                raise ValueError(f"{split} file {path!r} is empty; give a file with text in it.")
        builder = _LOCAL_FORMATS[Path(data_files["train"]).suffix]
        try:
            raw = load_dataset(builder, data_files=data_files)
        except DatasetGenerationError as error:  # says neither which file nor where: find the line
            for split, path in data_files.items():
                check_text_file(path, f"{split}_file", data_args.text_column)
            files = list(data_files.values())
            raise ValueError(f"the data files {files} could not be read: {error.__cause__}") from error
    if "train" not in raw:
        raise ValueError(f"dataset {data_args.dataset_name!r} has no 'train' split, only {sorted(raw)}.")
    raw = type(raw)({split: raw[split] for split in ("train", "validation") if split in raw})  # no "test" etc.
    for split, dataset in raw.items():
        _check_text_column(dataset, data_args.text_column, source=_describe_source(data_args))
        feature = (dataset.features or {}).get(data_args.text_column)
        if feature is not None and getattr(feature, "dtype", None) not in ("string", "large_string"):
            if data_args.dataset_name is None:  # a local file: name the first line that is not text
                check_text_file(data_files[split], f"{split}_file", data_args.text_column)
            raise ValueError(
                f"text_column={data_args.text_column!r} of {_describe_source(data_args)} holds {feature}, not text; "
                "set text_column to the column that holds the documents."
            )
    if "validation" not in raw and data_args.validation_split_percentage > 0:
        raw = _hold_out_validation(raw["train"], data_args, seed)
    if not data_args.streaming:
        _check_not_empty(raw["train"], data_args.text_column, source=_describe_source(data_args))
    return raw


def check_text_file(
    path: str | os.PathLike, name: str = "train_file", text_column: str = "text", head_bytes: int | None = None
) -> None:
    """Check a local `.txt` / `.jsonl` data file line by line, raising an error that names the file, the line and
    what to do: it exists and holds text, is UTF-8 without NUL bytes, and (JSON lines) every line is a JSON object
    whose `text_column` is a string.

    `head_bytes` reads only the head of the file (what `--check` does, in seconds); without it the whole file is read
    (what `load_corpus` does when `datasets` could not read a file, to say where and why).
    """
    file = Path(path)
    where = f"{name}={str(path)!r}"
    if not file.is_file():
        raise FileNotFoundError(f"{where} does not exist; check the path.")
    json_lines = _LOCAL_FORMATS.get(file.suffix) == "json"

    def text_of(raw: bytes, number: int, cut: bool = False) -> str:
        if b"\x00" in raw:
            raise ValueError(f"{where} is binary (line {number} holds NUL bytes), not text; give a text file")
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as error:
            if cut and error.start >= len(raw) - 3:  # a character cut in two by the end of the head
                return raw[: error.start].decode("utf-8")
            raise ValueError(
                f"{where}: line {number} is not UTF-8 text (byte {raw[error.start : error.start + 1]!r} at column "
                f"{error.start + 1}); convert the file to UTF-8, e.g. `iconv -f latin1 -t utf-8`."
            ) from None

    def check_row(text: str, number: int) -> None:
        try:
            row = json.loads(text)
        except json.JSONDecodeError as error:
            raise ValueError(
                f"{where}: line {number} is not JSON ({error.msg}, column {error.colno}); give one JSON object a line."
            ) from None
        if not isinstance(row, dict) or text_column not in row:
            keys = sorted(row) if isinstance(row, dict) else f"a JSON {type(row).__name__}"
            raise ValueError(
                f"{where}: line {number} has no {text_column!r} field ({keys}); set text_column to the field that "
                "holds the text."
            )
        if not isinstance(row[text_column], str | None):
            raise ValueError(
                f"{where}: line {number}: {text_column!r} is {json.dumps(row[text_column])[:40]}, not a string; "
                "every line's text must be a string."
            )

    has_text = False
    with open(file, "rb") as f:
        if head_bytes is None:
            lines, partial = f, None
        else:
            head = f.read(head_bytes)
            lines = head.splitlines(keepends=True)
            partial = lines.pop() if lines and f.read(1) else None  # the head ends inside this line
        number = 0
        for number, raw in enumerate(lines, 1):
            text = text_of(raw, number)
            has_text = has_text or bool(text.strip())
            if json_lines and text.strip():
                check_row(text, number)
        if partial is not None:
            has_text = has_text or bool(text_of(partial, number + 1, cut=True).strip())
    if not has_text:
        raise ValueError(f"{where} is empty; give a file with text in it.")


def load_tokenizer(name_or_path: str | os.PathLike) -> PreTrainedTokenizerBase | None:
    """The tokenizer saved with a model or on its own: a local folder's (any kind `AutoTokenizer` reads, e.g. GPT-2's
    `vocab.json` + `merges.txt`) or a Hub repo's; None when the folder or repo holds none (or does not exist)."""
    path = Path(name_or_path)
    if path.is_dir():
        if not any((path / name).is_file() for name in TOKENIZER_FILES):
            return None
        return AutoTokenizer.from_pretrained(path)
    try:
        return AutoTokenizer.from_pretrained(str(name_or_path))
    except (OSError, ValueError):  # no such repo, no tokenizer files in it, or not a valid repo id
        return None


def load_or_train_tokenizer(
    path: str | os.PathLike, corpus: Dataset | IterableDataset, text_column: str, vocab_size: int
) -> PreTrainedTokenizerBase:
    """The tokenizer saved at `path`, or a ByteLevel BPE trained on `corpus` and saved there (seconds on 0.5 MB).

    A saved one is reused as it is: delete the folder to train a new one (for example after changing the corpus).
    The folder is written atomically, so an interrupted run leaves no half-saved tokenizer to be reused; a folder that
    holds other files but no tokenizer is refused rather than overwritten.
    """
    path = Path(path)
    tokenizer = load_tokenizer(path) if path.is_dir() else None
    if tokenizer is not None:
        return tokenizer
    if not is_empty_folder(path):
        raise FileExistsError(
            f"tokenizer folder {str(path)!r} holds files ({sorted(p.name for p in path.iterdir())[:5]}) but no "
            "tokenizer: give a folder with a saved tokenizer, or a new or empty one to receive a trained BPE."
        )
    tokenizer = train_bpe_tokenizer((row[text_column] for row in corpus), vocab_size)
    with atomic_folder(path, replace=True) as tmp:
        save_tokenizer(tokenizer, tmp)
    return tokenizer


def save_tokenizer(
    tokenizer: PreTrainedTokenizerBase, folder: str | os.PathLike, model_max_length: int | None = None
) -> None:
    """`tokenizer.save_pretrained(folder)` under the policy of every tokenizer hf_matta saves: one that loads without
    remote code on transformers 4.x and 5.x and knows its model.

    - a pad token: the eos token when it has none (GPT-2's convention; batching pipelines need one);
    - `model_max_length`: the model's context (`n_positions`), when given;
    - `tokenizer_config.json` names the class `PreTrainedTokenizerFast` where transformers 5 writes
      `TokenizersBackend` (the same class under its 5.x name, unknown to 4.x), and holds none of the keys that record
      how this machine loaded it (`is_local`, `local_files_only`), so the files do not depend on where they were
      loaded from. The caller's tokenizer is left as it was.
    """
    tokenizer = copy.deepcopy(tokenizer)
    for key in ("is_local", "local_files_only"):
        tokenizer.init_kwargs.pop(key, None)
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    if model_max_length is not None:
        tokenizer.model_max_length = model_max_length
    tokenizer.save_pretrained(folder)
    config_file = Path(folder) / "tokenizer_config.json"
    config = json.loads(config_file.read_text())
    if config.get("tokenizer_class") == "TokenizersBackend":
        config["tokenizer_class"] = "PreTrainedTokenizerFast"
        write_text_atomic(config_file, json.dumps(config, indent=2, sort_keys=True, ensure_ascii=False) + "\n")


def train_bpe_tokenizer(texts: Iterable[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """A GPT-2-style byte-level BPE tokenizer trained on `texts`, with `<|endoftext|>` as bos, eos, unk and pad."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    alphabet = pre_tokenizers.ByteLevel.alphabet()  # 256 byte symbols: any text encodes, nothing is unknown
    if vocab_size <= len(alphabet):
        raise ValueError(
            f"tokenizer vocab_size={vocab_size} leaves no room for merges: the byte alphabet alone has "
            f"{len(alphabet)} symbols plus {EOS_TOKEN}; use at least {len(alphabet) + 2}."
        )
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[EOS_TOKEN], initial_alphabet=alphabet, show_progress=False
    )
    backend.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token=EOS_TOKEN, eos_token=EOS_TOKEN, unk_token=EOS_TOKEN, pad_token=EOS_TOKEN
    )


def tokenize_and_pack(
    raw: DatasetDict | IterableDatasetDict, tokenizer: PreTrainedTokenizerFast, data_args: DataArguments
) -> DatasetDict | IterableDatasetDict:
    """Every split as blocks of `block_size` tokens (`input_ids`, and `labels` equal to them), cached by `datasets`.

    Raises when a split holds fewer tokens than one block, naming the split, its token count and the block size.
    """
    if tokenizer.eos_token_id is None:
        raise ValueError(f"tokenizer {tokenizer.name_or_path!r} has no eos token to separate documents; set one.")
    packed = {}
    for split, dataset in raw.items():
        pack = partial(
            _tokenize_and_pack,
            tokenizer=tokenizer,
            text_column=data_args.text_column,
            block_size=data_args.block_size,
        )
        if isinstance(dataset, IterableDataset):
            blocks = dataset.map(pack, batched=True, batch_size=_TOKENIZE_BATCH, remove_columns=_columns(dataset))
        else:
            blocks = dataset.map(
                pack,
                batched=True,
                batch_size=_TOKENIZE_BATCH,
                remove_columns=dataset.column_names,
                num_proc=data_args.preprocessing_num_workers,
                load_from_cache_file=not data_args.overwrite_cache,
                # An explicit fingerprint: hashing the tokenizer object is unstable across runs (its truncation
                # and padding state changes once it has been called), which would silently defeat the cache.
                new_fingerprint=Hasher.hash(
                    [dataset._fingerprint, _tokenizer_digest(tokenizer), data_args.text_column, data_args.block_size]
                ),
                desc=f"Tokenising and packing {split} into blocks of {data_args.block_size}",
            )
            if len(blocks) == 0:
                tokens = sum(len(ids) for ids in tokenizer(list(dataset[data_args.text_column]))["input_ids"])
                raise ValueError(
                    f"the {split} split has {tokens} tokens, fewer than one block of block_size="
                    f"{data_args.block_size}: lower block_size or give more text."
                )
        limit = data_args.max_train_blocks if split == "train" else data_args.max_eval_samples
        if limit is not None:
            if isinstance(blocks, IterableDataset):
                blocks = blocks.take(limit)
            else:
                blocks = blocks.select(range(min(limit, len(blocks))))
        packed[split] = blocks
    return type(raw)(packed)


def load_heldout_blocks(
    data: str,
    tokenizer: PreTrainedTokenizerBase | None,
    block_size: int,
    max_blocks: int | None = None,
    validation_split_percentage: float = DataArguments.validation_split_percentage,
    seed: int = 42,
) -> torch.LongTensor:
    """Held-out token blocks (N, T) to measure a model on.

    `data` is a `.pt` file holding a (N, T) tensor of token ids, a `.txt`/`.jsonl` file (all of it held out) or the
    name of a built-in corpus (the validation split that `validation_split_percentage` and `seed` draw, as
    `load_corpus` draws it for training). Text goes through `load_corpus` and `tokenize_and_pack`.
    """
    if data.endswith(".pt"):
        if not Path(data).is_file():
            raise FileNotFoundError(f"--data {data!r} does not exist; give a .pt file of token ids or a text file.")
        try:
            input_ids = torch.load(data, weights_only=True)
        except (EOFError, RuntimeError, KeyError, pickle.UnpicklingError) as error:
            raise ValueError(
                f"--data {data!r} is not a tensor file written by torch.save (empty, truncated or another format: "
                f"{type(error).__name__} {error}); save the token ids with torch.save(tensor, path)."
            ) from None
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.is_floating_point():
            raise ValueError(f"--data {data!r} must hold a 2-D integer tensor of token ids (N, T).")
        if input_ids.numel() == 0:
            raise ValueError(f"--data {data!r} holds no tokens (shape {tuple(input_ids.shape)}); give some blocks.")
        return input_ids[:max_blocks].long()
    if tokenizer is None:
        raise ValueError(f"--data {data!r} is text, but there is no tokenizer to read it; give token ids (.pt).")
    if data in BUILTIN_CORPORA:
        data_args = DataArguments(
            builtin_corpus=data,
            block_size=block_size,
            validation_split_percentage=validation_split_percentage,
            max_eval_samples=max_blocks,
        )
        return split_blocks(data_args, tokenizer, seed)
    data_args = DataArguments(
        train_file=data, block_size=block_size, validation_split_percentage=0, max_train_samples=max_blocks
    )
    return split_blocks(data_args, tokenizer, seed, split="train")


def split_blocks(
    data_args: DataArguments, tokenizer: PreTrainedTokenizerBase, seed: int = 42, split: str = "validation"
) -> torch.LongTensor:
    """One split of a corpus as token blocks (N, T), loaded, held out and packed exactly as training does it (the
    same `DataArguments` and seed give the same documents and blocks)."""
    blocks = tokenize_and_pack(load_corpus(data_args, seed=seed), tokenizer, data_args)
    if split not in blocks:
        raise ValueError(
            f"{_describe_source(data_args)} has no {split} split (validation_split_percentage="
            f"{data_args.validation_split_percentage}, no validation file); hold some documents out."
        )
    return torch.tensor([row["input_ids"] for row in blocks[split]], dtype=torch.long)


def _tokenize_and_pack(
    batch: dict[str, list], tokenizer: PreTrainedTokenizerFast, text_column: str, block_size: int
) -> dict[str, list[list[int]]]:
    """One `map` batch: tokenise each document, append eos, concatenate, cut into full blocks."""
    stream = []
    for ids in tokenizer(batch[text_column])["input_ids"]:
        stream.extend(ids)
        stream.append(tokenizer.eos_token_id)
    n_blocks = len(stream) // block_size  # the tail shorter than a block is dropped, never padded
    blocks = [stream[i * block_size : (i + 1) * block_size] for i in range(n_blocks)]
    return {"input_ids": blocks, "labels": [list(block) for block in blocks]}


def _tokenizer_digest(tokenizer: PreTrainedTokenizerFast) -> str:
    """A hash of the tokenizer's vocabulary, merges and normalisation, ignoring its call-time state."""
    state = json.loads(tokenizer.backend_tokenizer.to_str())
    state.pop("truncation", None)
    state.pop("padding", None)
    return hashlib.sha256(json.dumps(state, sort_keys=True).encode()).hexdigest()


def _write_builtin_corpus(name: str, text_column: str) -> Path:
    """The built-in corpus as a JSON-lines file in the `datasets` cache, so `load_dataset` caches it like any file.

    The file name carries a hash of the text (it differs between Python versions); writing goes through a temporary
    file and a rename, so processes that start together never read half a file.
    """
    documents = BUILTIN_CORPORA[name]()
    lines = "".join(json.dumps({text_column: document}) + "\n" for document in documents)
    digest = hashlib.sha256(lines.encode()).hexdigest()[:16]
    path = Path(datasets.config.HF_DATASETS_CACHE) / "hf_matta_corpora" / f"{name}-{digest}.jsonl"
    if not path.is_file():
        write_text_atomic(path, lines)
    return path


def _hold_out_validation(
    train: Dataset | IterableDataset, data_args: DataArguments, seed: int
) -> DatasetDict | IterableDatasetDict:
    """Split documents into train and validation: a seeded random share, or the first N of a stream."""
    if isinstance(train, IterableDataset):
        n = data_args.streaming_validation_documents
        return IterableDatasetDict({"train": train.skip(n), "validation": train.take(n)})
    if len(train) < 2:
        raise ValueError(
            f"{_describe_source(data_args)} has {len(train)} document(s): too few to hold out a validation split; "
            "give a validation_file or set validation_split_percentage=0."
        )
    split = train.train_test_split(test_size=data_args.validation_split_percentage / 100, seed=seed)
    return DatasetDict({"train": split["train"], "validation": split["test"]})


def _check_text_column(dataset: Dataset | IterableDataset, text_column: str, source: str) -> None:
    columns = _columns(dataset)
    if text_column not in columns:
        raise ValueError(f"text_column={text_column!r} is not a column of {source}; its columns are {columns}.")


def _check_not_empty(dataset: Dataset, text_column: str, source: str) -> None:
    for batch in dataset.iter(batch_size=_TOKENIZE_BATCH):  # stops at the first batch with text
        if any(text and text.strip() for text in batch[text_column]):
            return
    raise ValueError(f"{source} holds no text ({len(dataset)} rows, all empty); give a corpus with text in it.")


def _columns(dataset: Dataset | IterableDataset) -> list[str]:
    """Column names; a stream without declared features reveals them from its first row."""
    if dataset.column_names is not None:
        return list(dataset.column_names)
    first: Iterator = iter(dataset)
    return list(next(first, {}))


def _describe_source(data_args: DataArguments) -> str:
    if data_args.dataset_name is not None:
        return f"dataset_name={data_args.dataset_name!r}"
    if data_args.builtin_corpus is not None:
        return f"builtin_corpus={data_args.builtin_corpus!r}"
    return f"train_file={data_args.train_file!r}"


__all__ = [
    "BUILTIN_CORPORA",
    "DataArguments",
    "check_block_size",
    "check_text_file",
    "load_corpus",
    "load_heldout_blocks",
    "load_or_train_tokenizer",
    "load_tokenizer",
    "save_tokenizer",
    "split_blocks",
    "tokenize_and_pack",
    "train_bpe_tokenizer",
]
