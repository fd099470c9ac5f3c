"""pretraining.py end to end, in subprocesses: exact resume, warm-up steps undone, a real Shakespeare run (torchrun
parity: tests/test_torchrun.py; bad input: tests/test_bad_input.py)."""
from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest
import torch

from conftest import final_weights, read_metrics, run, tiny_args


pytestmark = pytest.mark.slow


def test_resume_is_bitwise_exact(shard_dir: Path, tmp_path: Path) -> None:
    """6 steps straight equal 3 steps + --resume + 3 steps, bit for bit (weights and optimizer state)."""
    full = run([sys.executable, "pretraining.py", *tiny_args(shard_dir, tmp_path / "a", "full")])
    assert full.returncode == 0, full.stderr
    # resume from the step-3 checkpoint, copied into a fresh log dir so it writes its own step-6 checkpoint
    half_dir = tmp_path / "b" / "half"
    half_dir.mkdir(parents=True)
    shutil.copy(tmp_path / "a" / "full" / "state_step000003.pt", half_dir)
    resumed = run([sys.executable, "pretraining.py", "--resume", str(half_dir / "state_step000003.pt")])
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed_from" in resumed.stdout
    a = torch.load(tmp_path / "a" / "full" / "state_step000006.pt", weights_only=True)
    b = torch.load(half_dir / "state_step000006.pt", weights_only=True)
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    for opt_a, opt_b in zip(a["optimizers"], b["optimizers"]):
        for idx, state in opt_a["state"].items():
            for key, value in state.items():
                assert torch.equal(value, opt_b["state"][idx][key]), (idx, key)
    assert a["data_position"] == b["data_position"]
    assert a["val_loss"] == b["val_loss"]
    # the losses logged after the resume point equal the uninterrupted run's
    train_a, _ = read_metrics(tmp_path / "a" / "full")
    train_b, _ = read_metrics(half_dir)
    assert train_b == train_a[3:]


def test_warm_up_steps_are_undone(shard_dir: Path, tmp_path: Path) -> None:
    """Warm-up steps (run to compile kernels off the clock) leave no trace: same losses and weights, bitwise."""
    plain = run([sys.executable, "pretraining.py", *tiny_args(shard_dir, tmp_path, "plain")])
    warmed = run([sys.executable, "pretraining.py", *tiny_args(shard_dir, tmp_path, "warm", "--warmup-steps", "2")])
    assert plain.returncode == 0 and warmed.returncode == 0, plain.stderr + warmed.stderr
    assert "warm-up: 2 steps run and undone" in warmed.stdout
    assert read_metrics(tmp_path / "plain") == read_metrics(tmp_path / "warm")
    a, b = final_weights(tmp_path / "plain"), final_weights(tmp_path / "warm")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_shakespeare_run_lowers_val_loss(tmp_path: Path, shakespeare_data: Path) -> None:
    """A short run of a small model on the real Shakespeare shards cuts the validation loss well below init."""
    result = run([sys.executable, "pretraining.py", "--preset", "shakespeare", "--log-dir", str(tmp_path),
                  "--run-id", "real", "--num-layers", "2", "--model-dim", "64", "--num-heads", "2", "--head-dim",
                  "32", "--num-iterations", "30", "--val-loss-every", "30", "--val-tokens", "8192",
                  "--val-seq-len", "1024", "--train-seq-len", "1024", "--rank-equivalents", "1", "--compile", "off"],
                 timeout=600)  # 1024-token steps keep it short where training runs in fp32 (AVX2-only CPUs)
    assert result.returncode == 0, result.stderr
    _, val = read_metrics(tmp_path / "real")
    assert val[0] == pytest.approx(10.826, abs=0.01)  # ln(50304): uniform logits from the zero-init lm_head
    assert val[-1] < 7.0, val
