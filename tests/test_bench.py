"""bench.py's arithmetic: the FLOP count behind MFU, the training benchmark's bookkeeping on a tiny model, the
tracker benchmark's rows, the decode benchmark's bytes per token, MBU and paired timing, and the provenance of its
figures. The timings themselves are printed by bench.py, never asserted (gpu_check.py and compare.py have their own
test files).

    python -m pytest -q tests/test_bench.py
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from conftest import tiny_hparams

import bench
import inference as I
import model as M

# -----------------------------------------------------------------------------
# training: the FLOPs behind MFU, the step's three parts, the trackers' cost


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


def test_optimizer_benchmark_rows_are_ratios_to_plain_muon(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each setting's optimizer time (orthogonalisation + rest) and step time over plain Muon's, plain Muon's being
    the mean of its first and last run; every switch setting is a valid config on the tiny model."""
    seen = []

    def fake(shape: str, device: torch.device, steps: int, warmup: int, compile: str, overrides: dict) -> dict:
        tiny_hparams(**overrides).validate()
        seen.append(overrides)
        ms = 10.0 + len(seen)  # the n-th run takes 10 + n ms
        return dict(newton_schulz_ms=ms / 2, optimizer_rest_ms=ms / 2, step_ms=10 * ms)

    monkeypatch.setattr(bench, "train_shape_process", fake)
    rows = bench.bench_optimizer(torch.device("cpu"), steps=1, warmup=0)
    assert [r["setting"] for r in rows] == [name for name, _ in bench.OPTIMIZER_SETTINGS] + ["Muon (2025)"]
    assert seen[0] == seen[-1] == {} and seen[-2] == bench.OPTIMIZER_SETTINGS[-1][1]
    plain = (11.0 + 10.0 + len(rows)) / 2  # plain Muon: the first run and the last
    for n, row in enumerate(rows, 1):
        assert row["optimizer_ms"] == 10.0 + n
        assert row["optimizer_vs_muon"] == round((10.0 + n) / plain, 3)
        assert row["step_vs_muon"] == round((10.0 + n) / plain, 3)


def test_head_benchmark_rows_are_ratios_to_the_whole_head(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each head setting's tokens/s and peak memory over the whole head's (the mean of its first and last run);
    every setting is a valid config on the tiny model, and a real step runs with the extra targets attached."""
    seen = []

    def fake(shape: str, device: torch.device, steps: int, warmup: int, compile: str, overrides: dict) -> dict:
        tiny_hparams(**overrides).validate()
        seen.append(overrides)
        return dict(tokens_per_s=1000 + len(seen), peak_memory_mib=100 * len(seen), compile="off")

    monkeypatch.setattr(bench, "train_shape_process", fake)
    rows = bench.bench_head(torch.device("cpu"), steps=1, warmup=0)
    assert [r["setting"] for r in rows] == [name for name, _ in bench.HEAD_SETTINGS] + ["whole head"]
    assert seen[0] == seen[-1] == {}
    whole, whole_mib = (1001 + 1000 + len(rows)) / 2, (100 + 100 * len(rows)) / 2
    for n, row in enumerate(rows, 1):
        assert row["vs_whole"] == round((1000 + n) / whole, 3)
        assert row["memory_vs_whole"] == round(100 * n / whole_mib, 3)
    monkeypatch.undo()
    monkeypatch.setattr(bench, "train_config",
                        lambda shape, device, compile, overrides: tiny_hparams(**(overrides or {})))
    row = bench.bench_train_shape("shakespeare", torch.device("cpu"), steps=1, warmup=0,
                                  overrides=bench.HEAD_SETTINGS[-1][1])
    assert row["tokens_per_s"] > 0


def test_arch_benchmark_rows_are_ratios_to_the_2025_gpt(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each architecture setting's tokens/s and peak memory over the 2025 GPT's (the mean of its first and last
    run); every setting is a valid config of the shakespeare shape, and a real step runs with the bigram table's
    row-wise update and the paired heads."""
    seen = []

    def fake(shape: str, device: torch.device, steps: int, warmup: int, compile: str, overrides: dict) -> dict:
        bench.train_config(shape, device, compile, overrides)  # validates
        seen.append(overrides)
        return dict(tokens_per_s=1000 + len(seen), peak_memory_mib=100 * len(seen), compile="off",
                    optimizer_rest_ms=1.0)

    monkeypatch.setattr(bench, "train_shape_process", fake)
    rows = bench.bench_arch(torch.device("cpu"), steps=1, warmup=0)
    assert [r["setting"] for r in rows] == [name for name, _ in bench.ARCH_SETTINGS] + ["2025 GPT"]
    assert seen[0] == seen[-1] == {}
    base = (1001 + 1000 + len(rows)) / 2
    assert [r["vs_2025"] for r in rows] == [round((1000 + n) / base, 3) for n in range(1, len(rows) + 1)]
    monkeypatch.undo()
    monkeypatch.setattr(bench, "train_config", lambda shape, device, compile, overrides: tiny_hparams(
        **dict(overrides or {}, bigram_rows=97, bigram_update="rows", paired_head_layers="1")))
    row = bench.bench_train_shape("shakespeare", torch.device("cpu"), steps=1, warmup=0)
    assert row["tokens_per_s"] > 0


def test_tracker_benchmark_times_each_sink_against_console(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """bench_trackers logs through real RunLogs: one row per sink set, the first (console only) the 1.0x baseline,
    and W&B offline under WANDB_MODE=offline (no network)."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    rows = bench.bench_trackers(calls=3)
    assert [r["trackers"] for r in rows] == ["console + metrics.jsonl", "tensorboard", "wandb", "tensorboard,wandb"]
    assert rows[0]["vs_console"] == 1.0 and all(r["ms_per_step"] > 0 for r in rows)


# -----------------------------------------------------------------------------
# decode: bandwidth, bytes per token, MBU


def test_bandwidth_is_the_bytes_read_over_the_median_time(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(bench, "median_seconds", lambda fn, repeats: (fn(), 0.005)[1])
    assert bench.bench_bandwidth(torch.device("cpu"), repeats=1, mib=64) == round(64 * 2**20 / 0.005 / 1e9, 2)


@pytest.mark.parametrize("context, window_blocks, keys", [(10, 2, 128), (128, 2, 128), (129, 2, 256),
                                                         (300, 2, 384), (300, 1, 256), (1000, 3, 512)])
def test_decode_keys_are_the_ring_slots_a_step_reads(context: int, window_blocks: int, keys: int) -> None:
    """By hand: occupied slots in whole 128-token blocks, at most the ring's window_blocks + 1 blocks."""
    assert bench.decode_keys(context, window_blocks) == keys
    model = M.GPT.from_hparams(tiny_hparams())
    cache = I.KVCache(model, 1, context - 1)
    with torch.no_grad():
        I.prefill(model, torch.full((1, context - 1), 5), cache, window_blocks)
    ring = I.RingCache(cache, window_blocks)
    ring.advance(torch.tensor([5]))  # the token at position context - 1
    assert ring.used == keys  # what the step attends over
    eager = I.RingCache(cache, window_blocks)
    eager.advance(torch.tensor([5]), whole_blocks=False)  # eager steps read the filled slots only
    assert eager.used == bench.decode_keys(context, window_blocks, whole_blocks=False) == min(context, keys)


@pytest.mark.parametrize("batch", [1, 8])
@pytest.mark.parametrize("weights, per_weight, scale_bytes", [("fp32", 4, 0), ("bf16", 2, 0), ("int8", 1, 2)])
def test_decode_bytes_per_token_by_hand(batch: int, weights: str, per_weight: int, scale_bytes: int) -> None:
    """The 2-layer, 64-wide model (2 heads of 32, one value-embedding table), counted by hand per weight format:
    matrices at 4, 2 or 1 bytes (int8 adds a bf16 scale per output row), scalars and embedding rows at 4."""
    model = M.GPT.from_hparams(tiny_hparams())
    weights_per_layer = 3 * 64 * 64 + 64 * 64 + 64 * 256 + 256 * 64  # qkv, out, MLP in and out
    rows_per_layer = 3 * 64 + 64 + 256 + 64  # their output rows
    matrices = 2 * weights_per_layer + 50304 * 64  # lm_head over the padded vocabulary
    scales = (2 * rows_per_layer + 50304) * scale_bytes
    scalars = 2 * (2 + 2) + 1  # two lambda pairs per layer, one skip weight
    keys = bench.decode_keys(300, 2)
    read = bench.decode_bytes_per_token(model, 300, 2, batch, weights)
    assert read["weights"] == (matrices * per_weight + scales + scalars * 4) / batch
    assert read["cache_and_embeddings"] == 2 * 2 * 64 * keys * 4 + 2 * 64 * 4  # K and V of 2 layers; 2 embedding rows
    assert read["total"] == read["weights"] + read["cache_and_embeddings"]


def test_decode_rows_report_mbu_against_the_measured_bandwidth(monkeypatch: pytest.MonkeyPatch) -> None:
    """bench_decode on the tiny model: MBU = bytes per token x tokens/s / bandwidth, per row and path; the
    baselines measured in the same run are in every row."""
    tiny = {k: v for k, v in vars(tiny_hparams()).items() if k in M.PRESETS["shakespeare"] or k.startswith("num_")
            or k in ("head_dim", "model_dim", "no_attn_layer", "window_max", "row_len")}
    monkeypatch.setattr(bench, "SHAPES", {"tiny": ("shakespeare", tiny)})
    paths = [("fp32", "fp32", False), ("int8", "int8", False)]
    rows = bench.bench_decode(torch.device("cpu"), repeats=1, new_tokens=8, bandwidth=10.0, paths=paths)
    assert [(r["batch"], r["path"]) for r in rows] == [(1, "fp32"), (1, "int8"), (8, "fp32"), (8, "int8")]
    for r in rows:
        assert r["mbu"] == pytest.approx(r["bytes_per_token"] * r["tokens_per_s"] / 10e9, abs=1e-3)
        assert r["bytes_per_token"] > r["weight_bytes_per_token"] > 0
        assert r["vs_hf"] == pytest.approx(r["tokens_per_s"] / r["hf_kv"], abs=0.01)
        assert min(r["hf_kv"], r["hf_recompute"], r["ours_recompute"], r["kv_cache_before"]) > 0
        assert r["first_call_s"] > 0
        assert (r["vs_kv_cache_paired"] is None) == (r["path"] != "fp32")  # the eager fp32 path only
        assert r["path"] != "fp32" or r["vs_kv_cache_paired"] > 0
    assert rows[1]["weight_bytes_per_token"] < rows[0]["weight_bytes_per_token"] / 3  # int8: a quarter, plus scales


def test_paired_speedup_alternates_the_order_and_takes_the_median(monkeypatch: pytest.MonkeyPatch) -> None:
    clock, calls = [0.0], []

    def timed(name: str, seconds: float):
        def f() -> None:
            calls.append(name)
            clock[0] += seconds
        return f

    monkeypatch.setattr(bench.time, "perf_counter", lambda: clock[0])
    assert bench.paired_speedup(timed("fast", 1.0), timed("slow", 3.0), pairs=4) == 3.0
    assert calls == ["fast", "slow"] + ["fast", "slow", "slow", "fast"] * 2  # a warm-up call each, then pairs


# -----------------------------------------------------------------------------
# provenance: where a set of figures came from


def test_provenance_names_the_commit_and_the_cpu() -> None:
    import re

    p = bench.provenance()
    assert set(p) == {"date", "commit", "cpu", "cpu_features", "python"}
    assert p["commit"] is None or re.fullmatch(r"[0-9a-f]{7,40}(\+changes)?", p["commit"])  # None: not a checkout
    assert p["cpu"] and set(p["cpu_features"]) <= set(bench.CPU_FEATURES)


@pytest.mark.parametrize("argv, message", [
    (["--only", "gpu"], "argument --only: invalid choice: 'gpu'"),
    (["--only", "peer"], "argument --only: invalid choice: 'peer'"),
    (["--ablation", "logs/run"], "unrecognized arguments: --ablation logs/run")])
def test_bench_runs_benchmarks_only(argv: list[str], message: str, capsys: pytest.CaptureFixture) -> None:
    """The GPU check is gpu_check.py and the ablation and peer comparison are compare.py: bench.py refuses them in
    one line with exit 2, before any benchmark starts."""
    assert "peer" not in bench.BENCHMARKS and "gpu" not in bench.BENCHMARKS
    with pytest.raises(SystemExit) as exit_info:
        bench.main(argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.startswith("bench.py: error: ") and message in err
    assert err.count("\n") == 1
