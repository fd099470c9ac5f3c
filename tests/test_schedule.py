"""The 2026 record's stage schedule (--stage-schedule 2026, issue 26): the pure function against the record's numbers
written out here (record #89, f411b3d3: TRAINING_STAGES and TrainingSchedule, 1270 + 15 steps), scaled to the default
run's length, off = the 2025 schedules, bad values; and runs that use it: step lines, resume across a stage
boundary, two processes."""
from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch

from conftest import cfg, one_and_two_processes, run, stopped_and_resumed, tiny_args

import model as M  # noqa: E402


def record_hp(**overrides) -> M.Hyperparameters:
    """The record's run: 1270 scheduled + 15 extension steps, batches of 8 x 2048 tokens on 8 GPUs to start."""
    return M.Hyperparameters(**dict(dict(stage_schedule="2026", num_iterations=1285, cooldown_frac=0.60,
                                         lr_floor=0.15, rank_equivalents=8, train_seq_len=16 * 1024), **overrides))


def test_record_boundaries_batches_and_tokens() -> None:
    """The record's 1285 steps and about 339M tokens."""
    hp = record_hp()
    assert hp.tokens_per_step == 8 * 2048 * 8
    assert M.schedule_lengths(hp) == (1270, 15)
    # round(1270 / 3) = 423, round(2 * 1270 / 3) = 847; the extension runs 1270 .. 1285
    assert M.stage_boundaries(hp) == [(0, 423), (423, 847), (847, 1270), (1270, 1285)]
    mults = [M.batch_mult(step, hp) for step in range(1285)]
    assert mults == [1] * 423 + [2] * 424 + [3] * 423 + [3] * 15  # 8, 16, 24 x 2048 x 8 tokens
    assert M.tokens_through(1285, hp) == (423 * 8 + 424 * 16 + 423 * 24 + 15 * 24) * 2048 * 8 == 338_821_120
    assert M.tokens_through(423, hp) == 423 * 131072 and M.tokens_through(424, hp) == 423 * 131072 + 262144


def test_record_learning_rate() -> None:
    """The stage's multiplier (1, 1.52, 1.73) until the cooldown starts at int(1270 * 0.4) = 508, then linear to
    0.15 at step 1270, and 0.15 through the extension."""
    hp = record_hp()

    def want(step: int) -> float:
        peak = 1.0 if step < 423 else 1.52 if step < 847 else 1.73
        if step < 508:
            return peak
        t = min(1.0, (step - 508) / (1270 - 508))
        return peak * (1 - t) + 0.15 * t

    for step in (0, 1, 422, 423, 507, 508, 509, 600, 846, 847, 1000, 1269, 1270, 1284):
        assert M.get_lr(step, hp) == pytest.approx(want(step), abs=1e-12), step
    assert M.get_lr(1270, hp) == M.get_lr(1284, hp) == pytest.approx(0.15)
    assert M.get_lr(507, hp) == 1.52 and M.get_lr(0, hp) == 1.0


def test_record_windows_and_loss_weights() -> None:
    hp = record_hp()
    long = {0: 3, 422: 3, 423: 7, 846: 7, 847: 11, 1269: 11, 1270: 13, 1284: 13, 1285: 13}
    assert {step: M.get_window_size_blocks(step, hp) for step in long} == long
    for stage in M.STAGES_2026:  # the record's short windows are half its long ones, as short_window derives them
        assert M.short_window(stage.windows[1]) == stage.windows[0]
    # multi-token weights (record #53) and the prefix-token weight (#88), linear within each stage
    weights = {0: ((1.0, 0.5, 0.25), 0.25), 211: ((1.0, 0.5, 0.25 * (1 - 211 / 423)), 0.25),
               423: ((1.0, 0.5), 0.25), 635: ((1.0, 0.25), 0.125), 846: ((1.0, 0.5 / 424), 0.25 / 424),
               847: ((1.0,), 0.0), 1280: ((1.0,), 0.0)}
    for step, (mtp, prefix) in weights.items():
        point = M.stage_at(step, hp)
        assert point.mtp_weights == pytest.approx(mtp, abs=1e-12) and point.prefix_weight == pytest.approx(prefix), step
    assert [M.stage_at(s, hp).stage for s in (0, 422, 423, 846, 847, 1269, 1270, 1284)] == [0, 0, 1, 1, 2, 2, 3, 3]
    assert M.mtp_weights_at(900, hp) == [1.0, 0.0, 0.0]  # padded: a fixed shape for the compiled loss


def test_scaled_to_the_default_run() -> None:
    """75 steps: round(75 * 15 / 1285) = 1 extension step, stages of round(74 / 3) = 25 and round(148 / 3) = 49."""
    hp = M.Hyperparameters(**dict(M.PRESETS["shakespeare2026"], stage_schedule="2026"))
    assert M.schedule_lengths(hp) == (74, 1)
    assert M.stage_boundaries(hp) == [(0, 25), (25, 49), (49, 74), (74, 75)]
    assert M.tokens_through(75, hp) == (25 + 24 * 2 + 25 * 3 + 3) * 8192


def test_off_is_the_2025_schedules() -> None:
    """Without a stage schedule: the record's LR (1.0, then linear to 0.1), its growing window, fixed batches."""
    hp = M.Hyperparameters(**M.PRESETS["shakespeare"])
    for step in range(hp.num_iterations + 1):
        w = min((1 - step / 75) / 0.4, 1.0)
        assert M.get_lr(step, hp) == w * 1.0 + (1 - w) * 0.1
        assert M.get_window_size_blocks(step, hp) == max(1, math.ceil(256 * (step / 75) / 128))
        assert M.batch_mult(step, hp) == 1 and M.tokens_through(step, hp) == step * 8192


@pytest.mark.parametrize("argv,message", [
    (["--stage-schedule", "2025"], "--stage-schedule='2025' must be empty (none) or one of 2026"),
    (["--lr-floor", "1.5"], "--lr-floor=1.5 must be in [0, 1] (a multiplier of the peak LR)"),
    (["--lr-floor", "nan"], "--lr-floor=nan must be in [0, 1] (a multiplier of the peak LR)"),
    (["--stage-schedule", "2026", "--num-iterations", "2"],
     "--stage-schedule=2026 has 3 stages of at least one step each: --num-iterations=2 is too short"),
])
def test_bad_schedule_values(argv: list[str], message: str) -> None:
    with pytest.raises(M.ConfigError) as e:
        cfg("--preset", "shakespeare", *argv).validate()
    assert str(e.value) == message


# -----------------------------------------------------------------------------
# Runs: 8 steps are stages [0, 3), [3, 5), [5, 8) of 1, 2 and 3 batches (round(8 * 15 / 1285) = 0 extension steps),
# with multi-token prediction and the prefix-token target

STAGED = ("--stage-schedule", "2026", "--mtp", "true", "--prefix-token", "true", "--num-iterations", "8",
          "--val-loss-every", "4")


def step_lines(out: str) -> list[str]:
    return [line for line in out.splitlines() if line.startswith("step:") and "train_loss" in line]


@pytest.mark.slow
def test_staged_run_logs_its_stages_and_resumes_across_a_boundary(shard_dir: Path, tmp_path: Path,
                                                                  shakespeare_data: Path) -> None:
    """shakespeare_data: the verified GPT-2 ranks the prefix table is built from."""
    # resumed at step 4 (mid-stage 2; stage 3 starts at 5): the same losses, weights and data position
    a, b, full, again = stopped_and_resumed(shard_dir, tmp_path, STAGED, stop=4, end=8)
    lines = step_lines(full.stdout)
    assert len(lines) == 8
    for line, (stage, batch, window) in zip(lines, [(1, 512, 3)] * 3 + [(2, 1024, 7)] * 2 + [(3, 1536, 11)] * 3):
        assert f" stage:{stage} batch:{batch} window:{window} lr_mult:" in line, line
        assert " (ce:" in line, line  # with --mtp the loss is the weighted sum; the next-token part is logged
    assert "budget:8,192 tokens" in full.stdout  # 3 * 1 + 2 * 2 + 3 * 3 = 16 batches of 512 tokens
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert a["data_position"] == b["data_position"] and a["val_loss"] == b["val_loss"]
    assert step_lines(again.stdout)[0].split(" train_time")[0] == lines[4].split(" train_time")[0]
    # the data position is 16 global batches in: what the larger batches consumed
    plain = run([sys.executable, "pretraining.py", *tiny_args(shard_dir, tmp_path, "plain", "--num-iterations",
                                                              "16", "--val-loss-every", "0")])
    assert plain.returncode == 0, plain.stderr
    assert torch.load(tmp_path / "plain" / "state_step000016.pt", weights_only=True)["data_position"] == \
        a["data_position"]


@pytest.mark.slow
def test_staged_run_two_processes_follow_one(shard_dir: Path, tmp_path: Path, shakespeare_data: Path) -> None:
    one_and_two_processes(shard_dir, tmp_path, STAGED)
