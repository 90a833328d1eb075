"""hf_matta.data: sources, held-out split, packing, the tokenisation cache, the tokenizer, and every input error."""

import json
import sys

import datasets
import pytest
from datasets import IterableDataset
from transformers import PreTrainedTokenizerFast

from hf_matta import data
from hf_matta.data import (
    DataArguments,
    _linux_docs,
    _python_docs,
    check_block_size,
    load_corpus,
    load_or_train_tokenizer,
    tokenize_and_pack,
)


DOCUMENTS = [f"Document {i}: the quick brown fox jumps over the lazy dog {i} times. " * (1 + i % 3) for i in range(40)]


@pytest.fixture(autouse=True)
def datasets_cache(tmp_path, monkeypatch):
    """Every test gets its own `datasets` cache (the built-in corpus file and the Arrow caches land there)."""
    cache = tmp_path / "datasets_cache"
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", cache)
    return cache


@pytest.fixture(scope="module")
def tokenizer():
    return data.train_bpe_tokenizer(DOCUMENTS, vocab_size=300)


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


@pytest.fixture
def corpus_file(tmp_path):
    return write_jsonl(tmp_path / "corpus.jsonl", [{"text": doc} for doc in DOCUMENTS])


def test_packing_is_the_token_stream_cut_into_blocks(corpus_file, tokenizer):
    args = DataArguments(train_file=str(corpus_file), block_size=16, validation_split_percentage=0)
    raw = load_corpus(args)
    blocks = tokenize_and_pack(raw, tokenizer, args)["train"]
    stream = [t for doc in raw["train"]["text"] for t in tokenizer(doc)["input_ids"] + [tokenizer.eos_token_id]]
    assert len(blocks) == len(stream) // 16  # every full block, nothing padded
    assert [t for block in blocks["input_ids"] for t in block] == stream[: len(blocks) * 16]
    assert blocks["labels"] == blocks["input_ids"]


def test_validation_is_held_out_by_document_and_seeded(corpus_file):
    args = DataArguments(train_file=str(corpus_file), validation_split_percentage=25)
    raw, again, other_seed = load_corpus(args, seed=0), load_corpus(args, seed=0), load_corpus(args, seed=1)
    train, validation = set(raw["train"]["text"]), set(raw["validation"]["text"])
    assert len(raw["validation"]) == 10 and len(raw["train"]) == 30
    assert not train & validation and train | validation == set(DOCUMENTS)
    assert list(again["validation"]["text"]) == list(raw["validation"]["text"])
    assert list(other_seed["validation"]["text"]) != list(raw["validation"]["text"])


def test_validation_file_is_used_as_given(tmp_path, corpus_file):
    validation = write_jsonl(tmp_path / "validation.jsonl", [{"text": "one held-out line"}, {"text": "another"}])
    raw = load_corpus(DataArguments(train_file=str(corpus_file), validation_file=str(validation)))
    assert list(raw["validation"]["text"]) == ["one held-out line", "another"]
    assert len(raw["train"]) == len(DOCUMENTS)


def test_builtin_corpus_loads_offline():
    raw = load_corpus(DataArguments(builtin_corpus="pydoc_data.topics", validation_split_percentage=10))
    assert len(raw["train"]) + len(raw["validation"]) == len(data.BUILTIN_CORPORA["pydoc_data.topics"]())
    assert sum(len(text) for text in raw["train"]["text"]) > 300_000


@pytest.mark.parametrize(
    "limits, blocks",
    [
        (dict(max_train_samples=5), 5),
        (dict(max_train_tokens=100), 7),  # ceil(100 / 16) blocks
        (dict(max_train_samples=3, max_train_tokens=100), 3),  # the tighter limit
    ],
)
def test_token_budget_and_sample_limits(corpus_file, tokenizer, limits, blocks):
    args = DataArguments(train_file=str(corpus_file), block_size=16, validation_split_percentage=0, **limits)
    limited = tokenize_and_pack(load_corpus(args), tokenizer, args)["train"]
    unlimited_args = DataArguments(train_file=str(corpus_file), block_size=16, validation_split_percentage=0)
    unlimited = tokenize_and_pack(load_corpus(unlimited_args), tokenizer, unlimited_args)["train"]
    assert len(unlimited) > 10 * blocks
    assert limited["input_ids"] == unlimited["input_ids"][:blocks]  # the first blocks, in order


def test_second_run_reads_the_tokenisation_cache(corpus_file, tokenizer, monkeypatch):
    args = DataArguments(train_file=str(corpus_file), block_size=16, validation_split_percentage=20)
    first = tokenize_and_pack(load_corpus(args), tokenizer, args)
    calls = []
    original = data._tokenize_and_pack
    monkeypatch.setattr(data, "_tokenize_and_pack", lambda *a, **k: calls.append(1) or original(*a, **k))
    tokenizer.save_pretrained(corpus_file.parent / "tok")
    fresh_tokenizer = PreTrainedTokenizerFast.from_pretrained(corpus_file.parent / "tok")  # same content, new object
    second = tokenize_and_pack(load_corpus(args), fresh_tokenizer, args)
    assert calls == []  # nothing tokenised again
    assert second["train"].cache_files == first["train"].cache_files
    assert second["train"]["input_ids"] == first["train"]["input_ids"]
    tokenize_and_pack(load_corpus(args), fresh_tokenizer, DataArguments(**{**vars(args), "block_size": 8}))
    assert calls  # another block size is another cache entry


def test_tokenizer_is_trained_once_then_reused(tmp_path, corpus_file, monkeypatch):
    corpus = load_corpus(DataArguments(train_file=str(corpus_file), validation_split_percentage=0))["train"]
    trained = load_or_train_tokenizer(tmp_path / "tok", corpus, "text", vocab_size=300)
    assert len(trained) == 300 and trained.eos_token == data.EOS_TOKEN
    assert trained.decode(trained(DOCUMENTS[3])["input_ids"]) == DOCUMENTS[3]  # byte-level: lossless
    monkeypatch.setattr(data, "train_bpe_tokenizer", lambda *a, **k: pytest.fail("trained again"))
    reused = load_or_train_tokenizer(tmp_path / "tok", corpus, "text", vocab_size=300)
    assert reused.get_vocab() == trained.get_vocab()


def test_dataset_with_its_own_splits_keeps_train_and_validation(tmp_path):
    folder = tmp_path / "hub_like"
    folder.mkdir()
    for split, rows in {"train": DOCUMENTS[:30], "validation": DOCUMENTS[30:35], "test": DOCUMENTS[35:]}.items():
        write_jsonl(folder / f"{split}.jsonl", [{"text": doc} for doc in rows])
    raw = load_corpus(DataArguments(dataset_name=str(folder)))
    assert sorted(raw) == ["train", "validation"]  # the test split is never tokenised
    assert list(raw["validation"]["text"]) == DOCUMENTS[30:35]


def test_streamed_dataset_holds_out_its_first_documents(tmp_path, tokenizer):
    folder = tmp_path / "hub_like"
    folder.mkdir()
    write_jsonl(folder / "train.jsonl", [{"text": doc} for doc in DOCUMENTS])
    args = DataArguments(
        dataset_name=str(folder), streaming=True, streaming_validation_documents=4, block_size=16, max_train_samples=6
    )
    raw = load_corpus(args)
    assert [row["text"] for row in raw["validation"]] == DOCUMENTS[:4]
    assert next(iter(raw["train"]))["text"] == DOCUMENTS[4]
    blocks = tokenize_and_pack(raw, tokenizer, args)
    assert isinstance(blocks["train"], IterableDataset)
    rows = list(blocks["train"])
    assert len(rows) == 6 and all(len(row["input_ids"]) == 16 and row["labels"] == row["input_ids"] for row in rows)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(), ValueError, "exactly one text source"),
        (dict(train_file="a.txt", builtin_corpus="pydoc_data.topics"), ValueError, "exactly one text source"),
        (dict(builtin_corpus="shakespeare"), ValueError, "builtin_corpus='shakespeare' is unknown"),
        (dict(train_file="a.csv"), ValueError, "train_file='a.csv' has an unknown extension"),
        (dict(train_file="a.txt", streaming=True), ValueError, "streaming=True streams a Hub dataset"),
        (dict(builtin_corpus="pydoc_data.topics", validation_file="v.txt"), ValueError, "validation_file='v.txt'"),
        (dict(train_file="a.jsonl", validation_file="v.txt"), ValueError, "differ in format"),
        (dict(train_file="a.txt", block_size=1), ValueError, "block_size=1"),
        (dict(train_file="a.txt", validation_split_percentage=100), ValueError, "validation_split_percentage=100"),
        (dict(train_file="a.txt", max_train_tokens=0), ValueError, "max_train_tokens=0"),
        (dict(train_file="a.txt", preprocessing_num_workers=0), ValueError, "preprocessing_num_workers=0"),
    ],
)
def test_invalid_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        DataArguments(**kwargs)


@pytest.mark.parametrize(
    "content, kwargs, error, match",
    [
        (None, dict(), FileNotFoundError, r"train file '.*missing\.txt' does not exist"),
        ("", dict(), ValueError, r"train file '.*corpus\.txt' is empty"),
        ("\n  \n\n", dict(), ValueError, r"holds no text"),
        ('{"content": "hi"}\n', dict(suffix=".jsonl"), ValueError,
         r"text_column='text' is not a column .*\['content'\]"),
        ("far too short\n", dict(block_size=64, validation_split_percentage=0), ValueError,
         r"has \d+ tokens, fewer than one block of block_size=64"),
    ],
)
def test_bad_input_is_named_before_training(tmp_path, tokenizer, content, kwargs, error, match):
    suffix = kwargs.pop("suffix", ".txt")
    path = tmp_path / ("missing.txt" if content is None else f"corpus{suffix}")
    if content is not None:
        path.write_text(content)
    args = DataArguments(train_file=str(path), **kwargs)
    with pytest.raises(error, match=match):
        tokenize_and_pack(load_corpus(args), tokenizer, args)


def test_block_size_above_context_is_refused():
    check_block_size(64, 64)
    with pytest.raises(ValueError, match=r"block_size=128 is larger than the model's context n_positions=64"):
        check_block_size(128, 64)


def test_too_small_tokenizer_vocabulary_is_refused():
    with pytest.raises(ValueError, match="vocab_size=200 leaves no room"):
        data.train_bpe_tokenizer(DOCUMENTS, vocab_size=200)


def test_python_docs_reads_every_source_in_path_order(tmp_path):
    sources = tmp_path / f"python{sys.version_info.major}.{sys.version_info.minor}" / "html" / "_sources"
    (sources / "library").mkdir(parents=True)
    (sources / "library" / "os.rst.txt").write_text(":mod:`os` --- Miscellaneous operating system interfaces")
    (sources / "glossary.rst.txt").write_text("Glossary\n========")
    assert _python_docs(tmp_path) == ["Glossary\n========", ":mod:`os` --- Miscellaneous operating system interfaces"]
    with pytest.raises(FileNotFoundError, match=r"apt-get install python3\.\d+-doc"):
        _python_docs(tmp_path / "missing")


def test_linux_docs_reads_the_newest_kernel_version_without_translations(tmp_path):
    for version in ("6.9", "6.10"):
        sources = tmp_path / f"linux-doc-{version}" / "html" / "_sources"
        (sources / "translations" / "zh_CN").mkdir(parents=True)
        (sources / "translations" / "zh_CN" / "index.rst.txt").write_text("中文翻译")
        (sources / "admin-guide").mkdir()
        (sources / "admin-guide" / "sysctl.rst.txt").write_text(f"sysctl, kernel {version}")
        (sources / "index.rst.txt").write_text(f"The Linux Kernel documentation, {version}")
    assert _linux_docs(tmp_path) == ["sysctl, kernel 6.10", "The Linux Kernel documentation, 6.10"]
    with pytest.raises(FileNotFoundError, match=r"apt-get install linux-doc-6\.1"):
        _linux_docs(tmp_path / "missing")
