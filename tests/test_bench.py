"""bench.py's arithmetic: the FLOP count behind MFU, the ablation's time-to-loss, and the training benchmark's
bookkeeping on a tiny model. The timings themselves are printed by bench.py, never asserted."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import tiny_hparams

import bench
import model as M
import runs as R


@pytest.mark.parametrize("row, window", [(256, 128), (256, 256), (256, 1024), (1000, 1), (7, 3)])
def test_mean_keys_per_query_counts_the_causal_window(row: int, window: int) -> None:
    brute = sum(min(i + 1, window) for i in range(row)) / row
    assert bench.mean_keys_per_query(row, window) == pytest.approx(brute)


def test_model_flops_count_every_matmul_weight_and_the_attended_keys() -> None:
    """6 FLOPs per weight of every matrix the tokens pass through (blocks and lm_head, not the embedding tables),
    plus 12 * heads * head_dim * keys per attention layer, with half windows on the short layers."""
    hp = tiny_hparams(num_layers=4)
    model = M.GPT.from_hparams(hp)
    dim, hidden = hp.model_dim, hp.num_heads * hp.head_dim
    per_block = 3 * hidden * dim + hidden * dim + 2 * 4 * dim * dim  # qkv, out projection, MLP in and out
    vocab = M.next_multiple_of_n(hp.vocab_size, n=128)
    window_blocks = 2
    keys = [bench.mean_keys_per_query(hp.row_len, (window_blocks if long else 1) * M.BLOCK_SIZE)
            for long in M.long_window_layers(hp.num_layers)]
    expected = 6 * (hp.num_layers * per_block + vocab * dim) + sum(12 * hidden * k for k in keys)
    assert bench.model_flops_per_token(model, hp, window_blocks) == pytest.approx(expected)


def test_train_benchmark_times_the_three_parts_of_a_step(monkeypatch: pytest.MonkeyPatch) -> None:
    """On a tiny config: the step splits into forward+backward, Newton-Schulz and the rest; FLOPs and tokens agree."""
    monkeypatch.setattr(bench, "train_config",
                        lambda shape, device, compile, overrides: tiny_hparams(**(overrides or {})))
    row = bench.bench_train_shape("shakespeare", torch.device("cpu"), steps=2, warmup=1)
    hp = tiny_hparams()
    assert row["tokens_per_step"] == hp.tokens_per_step and row["dtype"] == "float32"
    parts = row["fwd_bwd_ms"] + row["newton_schulz_ms"] + row["optimizer_rest_ms"]
    assert row["newton_schulz_ms"] > 0 and parts == pytest.approx(row["step_ms"], abs=0.2)
    assert row["tokens_per_s"] == pytest.approx(hp.tokens_per_step / (row["step_ms"] / 1000), rel=0.01)
    assert row["peak_memory_mib"] > 0
    with_terms = bench.bench_train_shape("shakespeare", torch.device("cpu"), steps=1, warmup=0,
                                         overrides=dict(z_loss=1e-4, label_smoothing=0.1))
    assert with_terms["tokens_per_step"] == hp.tokens_per_step and with_terms["tokens_per_s"] > 0


def test_tracker_benchmark_times_each_sink_against_console(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """bench_trackers logs through real RunLogs: one row per sink set, the first (console only) the 1.0x baseline,
    and W&B offline under WANDB_MODE=offline (no network)."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    rows = bench.bench_trackers(calls=3)
    assert [r["trackers"] for r in rows] == ["console + metrics.jsonl", "tensorboard", "wandb", "tensorboard,wandb"]
    assert rows[0]["vs_console"] == 1.0 and all(r["ms_per_step"] > 0 for r in rows)


def write_run(run_dir: Path, optimizer: str, points: list[tuple[int, float, float]], **fields: object) -> Path:
    """A finished run as pretraining.py leaves it: run.json and metrics.jsonl (step, seconds, val loss)."""
    run_dir.mkdir(parents=True)
    hp = M.Hyperparameters(**dict(M.PRESETS["shakespeare"], preset="shakespeare", optimizer=optimizer, **fields))
    (run_dir / R.RUN_INFO).write_text(json.dumps(dict(script="pretraining.py", hyperparameters=hp.to_dict())))
    rows = [dict(step=s, val_loss=v, train_time_ms=1000 * t) for s, t, v in points]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return run_dir


def test_ablation_reports_time_to_the_reference_loss(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """The reference's final loss 4.0 is reached by the other run between its validations at 30 s (5.0) and
    60 s (3.0): at 45 s by linear interpolation, 1.5x the reference's 30 s; a run that never gets there says so."""
    ref = write_run(tmp_path / "muon", "muon", [(0, 0, 10.0), (10, 30, 4.0)])
    slow = write_run(tmp_path / "adamw", "adamw", [(0, 0, 10.0), (10, 30, 5.0), (20, 60, 3.0)])
    never = write_run(tmp_path / "never", "adamw", [(0, 0, 10.0), (10, 30, 6.0)])
    rows = bench.ablation([ref, slow, never], png=None)
    assert [r["seconds_to_reference"] for r in rows] == [30.0, 45.0, None]
    assert [r["final_val_loss"] for r in rows] == [4.0, 3.0, 6.0]
    assert rows[1]["tokens"] == 20 * M.Hyperparameters(**M.PRESETS["shakespeare"]).tokens_per_step
    out = capsys.readouterr().out
    assert "at 45 s (1.5x)" in out and "reaches 4.0000 at never" in out


def test_ablation_labels_name_the_loss_modifiers(tmp_path: Path) -> None:
    """A loss-modifier ablation's rows say which terms each run had, with their weights."""
    plain = write_run(tmp_path / "none", "muon", [(0, 0, 10.0), (75, 30, 4.6)])
    smooth = write_run(tmp_path / "ls", "muon", [(0, 0, 10.0), (75, 31, 4.7)], label_smoothing=0.1, z_loss=1e-4)
    labels = [r["label"] for r in bench.ablation([plain, smooth], png=None)]
    assert labels == ["Muon + Adam, 75 steps", "Muon + Adam, label smoothing 0.1, z-loss 0.0001, 75 steps"]


# -----------------------------------------------------------------------------
# decode: bandwidth, bytes per token, MBU


def test_bandwidth_is_the_bytes_read_over_the_median_time(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(bench, "median_seconds", lambda fn, repeats: (fn(), 0.005)[1])
    assert bench.bench_bandwidth(torch.device("cpu"), repeats=1, mib=64) == round(64 * 2**20 / 0.005 / 1e9, 2)


@pytest.mark.parametrize("context, window_blocks, keys", [(10, 2, 10), (128, 2, 128), (300, 2, 300 - 128),
                                                         (300, 1, 300 - 256), (1000, 3, 1000 - 640)])
def test_decode_keys_are_the_long_window_the_cache_reads(context: int, window_blocks: int, keys: int) -> None:
    """By hand: the query's block keeps window_blocks - 1 earlier full blocks and itself (one document)."""
    assert bench.decode_keys(context, window_blocks) == keys


@pytest.mark.parametrize("batch", [1, 8])
def test_decode_bytes_per_token_by_hand(batch: int) -> None:
    """The 2-layer, 64-wide model (2 heads of 32, one value-embedding table): counted by hand in fp32."""
    model = M.GPT.from_hparams(tiny_hparams())
    per_layer = 3 * 64 * 64 + 64 * 64 + 64 * 256 + 256 * 64 + 2 + 2  # qkv, out, MLP in and out, two lambda pairs
    matrices = 2 * per_layer + 50304 * 64 + 1  # lm_head over the padded vocabulary, one skip weight
    keys = bench.decode_keys(300, 2)
    read = bench.decode_bytes_per_token(model, 300, 2, batch)
    assert read["weights"] == matrices * 4 / batch
    assert read["cache_and_embeddings"] == 2 * 2 * 64 * keys * 4 + 2 * 64 * 4  # K and V of 2 layers; 2 embedding rows
    assert read["total"] == read["weights"] + read["cache_and_embeddings"]


def test_decode_rows_report_mbu_against_the_measured_bandwidth(monkeypatch: pytest.MonkeyPatch) -> None:
    """bench_decode on the tiny model: MBU = bytes per token x tokens/s / bandwidth, per row."""
    tiny = {k: v for k, v in vars(tiny_hparams()).items() if k in M.PRESETS["shakespeare"] or k.startswith("num_")
            or k in ("head_dim", "model_dim", "no_attn_layer", "window_max", "row_len")}
    monkeypatch.setattr(bench, "SHAPES", {"tiny": ("shakespeare", tiny)})
    rows = bench.bench_decode(torch.device("cpu"), repeats=1, new_tokens=8, bandwidth=10.0)
    assert [r["batch"] for r in rows] == [1, 8]
    for r in rows:
        assert r["mbu"] == pytest.approx(r["bytes_per_token"] * r["ours_kv"] / 10e9, abs=1e-3)
        assert r["bytes_per_token"] > r["weight_bytes_per_token"] > 0
