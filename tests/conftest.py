"""Shared fixtures: tiny in-process models, as transformers' GPT2ModelTester builds them. Nothing is downloaded."""

import os

import pytest
import torch


os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

VOCAB = 99


def tiny_kwargs(**overrides) -> dict:
    """Config kwargs of a tiny GPT-2: 2 layers, hidden 32, 2 heads, vocab 99, no dropout."""
    kwargs = dict(
        n_layer=2,
        n_embd=32,
        n_head=2,
        vocab_size=VOCAB,
        n_positions=64,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=VOCAB - 1,
        eos_token_id=VOCAB - 1,
    )
    kwargs.update(overrides)
    return kwargs


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    """Tiny models gain nothing from a second thread; on 2 shared cores two threads wait on each other (measured:
    the loss tests 13 s on one thread vs 39 s on two, Shampoo's small matrix ops 10x slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def input_ids() -> torch.LongTensor:
    return torch.randint(0, VOCAB - 1, (2, 12))
