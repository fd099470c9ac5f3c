"""bench.py's arithmetic: the FLOP count behind MFU, the ablation's time-to-loss, and the training benchmark's
bookkeeping on a tiny model; the GPU check's pytest-output parser, summary table, time limits and its refusal
without CUDA. The timings themselves are printed by bench.py, never asserted."""
from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import REPO_DIR, run_script, tiny_hparams

import bench
import inference as I
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
# GPU check (--only gpu): its bookkeeping on CPU; the parts themselves need a GPU

FINISHED = """\
============================= test session starts ==============================
collecting ... collected 6 items

tests/test_cuda.py::test_compiled_flex_attention_matches_sdpa_forward_and_backward[1] PASSED [ 16%]
tests/test_cuda.py::test_gpu_model_loss_matches_cpu_model FAILED         [ 33%]
tests/test_cuda.py::test_fp8_head_loss_close_to_bf16_head SKIPPED (FP8 needs compute capability >= 8.9) [ 50%]
tests/test_cuda.py::test_compiled_training_steps_lower_the_loss ERROR    [ 66%]
tests/test_cuda.py::test_kv_cache_generation_matches_reference_on_gpu PASSED [ 83%]
tests/test_cuda.py::test_bf16_embeddings_train_and_checkpoint_on_gpu PASSED [100%]

=================================== FAILURES ===================================
E       assert 0.5 < 0.001
============================== slowest durations ===============================
41.20s call     tests/test_cuda.py::test_compiled_training_steps_lower_the_loss
2.50s setup    tests/test_cuda.py::test_compiled_training_steps_lower_the_loss
1.25s call     tests/test_cuda.py::test_gpu_model_loss_matches_cpu_model
=========================== short test summary info ============================
FAILED tests/test_cuda.py::test_gpu_model_loss_matches_cpu_model - assert 0.5 < 0.001
ERROR tests/test_cuda.py::test_compiled_training_steps_lower_the_loss - torch._dynamo.exc.BackendCompilerFailed: boom
SKIPPED [1] tests/test_cuda.py:53: FP8 needs compute capability >= 8.9
============= 1 failed, 3 passed, 1 skipped, 1 error in 52.61s =============
"""


def test_pytest_output_gives_counts_failures_skips_and_seconds() -> None:
    found = bench.parse_pytest_output(FINISHED)
    assert found["summary"] == "1 failed, 3 passed, 1 skipped, 1 error in 52.61s"
    assert (found["passed"], found["failed"], found["skipped"], found["errors"]) == (3, 1, 1, 1)
    assert found["failures"] == [
        dict(test="tests/test_cuda.py::test_gpu_model_loss_matches_cpu_model", outcome="failed",
             message="assert 0.5 < 0.001"),
        dict(test="tests/test_cuda.py::test_compiled_training_steps_lower_the_loss", outcome="error",
             message="torch._dynamo.exc.BackendCompilerFailed: boom")]
    assert found["skips"] == [dict(count=1, where="tests/test_cuda.py:53",
                                   reason="FP8 needs compute capability >= 8.9")]
    assert found["durations"] == {"tests/test_cuda.py::test_compiled_training_steps_lower_the_loss": 43.7,
                                  "tests/test_cuda.py::test_gpu_model_loss_matches_cpu_model": 1.25}
    assert found["running"] is None


def test_pytest_output_of_a_killed_run_counts_what_ended_and_names_the_running_test() -> None:
    """Killed at its limit: no summary, so the verbose result lines give the counts, and the last line (a test id
    with no outcome yet) the test it was killed in."""
    killed = "\n".join(FINISHED.splitlines()[:6]) + "\ntests/test_cuda.py::test_compiled_training_steps_lower_the_loss "
    found = bench.parse_pytest_output(killed)
    assert found["summary"] is None
    assert (found["passed"], found["failed"], found["skipped"], found["errors"]) == (1, 1, 1, 0)
    assert found["failures"] == [dict(test="tests/test_cuda.py::test_gpu_model_loss_matches_cpu_model",
                                      outcome="failed", message="")]
    assert found["running"] == "tests/test_cuda.py::test_compiled_training_steps_lower_the_loss"
    part = bench.pytest_part(dict(returncode=-9, timed_out=True, stdout=killed, stderr="", seconds=240.0))
    assert part["status"] == "timeout"
    assert part["error"] == "killed at its limit in tests/test_cuda.py::test_compiled_training_steps_lower_the_loss"


@pytest.mark.parametrize("returncode, status", [(0, "ok"), (1, "failed"), (2, "error"), (5, "error")])
def test_pytest_part_is_ok_only_when_pytest_exits_0(returncode: int, status: str) -> None:
    part = bench.pytest_part(dict(returncode=returncode, timed_out=False, stdout=FINISHED, stderr="", seconds=5.0))
    assert part["status"] == status and part["passed"] == 3


def test_error_line_and_last_json_read_a_child_s_output() -> None:
    trace = ("Traceback (most recent call last):\n  File \"bench.py\", line 1\n"
             "torch.OutOfMemoryError: CUDA out of memory\n")
    assert bench.error_line(trace) == "torch.OutOfMemoryError: CUDA out of memory"
    assert bench.error_line("just a line\n\n") == "just a line" and bench.error_line("") == "(no output)"
    assert bench.last_json('log line\n{"a": 1}\n') == {"a": 1}
    assert bench.last_json('noise\n{\n  "rows": [\n    {"b": 2}\n  ]\n}\n') == {"rows": [{"b": 2}]}
    with pytest.raises(ValueError, match="no JSON result"):
        bench.last_json("only log lines\n")
    part = bench.script_part(dict(returncode=1, timed_out=False, stdout="", stderr=trace, seconds=3.0), bench.last_json)
    assert part["status"] == "error" and part["error"] == "torch.OutOfMemoryError: CUDA out of memory"
    ok = dict(returncode=0, timed_out=False, stdout='{"bandwidth_gbs": 4000.0, "decode": [{"batch": 1}]}\n',
              stderr="decode ...\n", seconds=30.0)
    assert bench.script_part(ok, bench.decode_figures) == dict(seconds=30.0, returncode=0, status="ok",
                                                               bandwidth_gbs=4000.0, rows=[{"batch": 1}],
                                                               log_tail="decode ...\n")
    unreadable = bench.script_part(dict(ok, stdout="no result\n"), bench.last_json)
    assert unreadable["status"] == "error" and "could not be read (ValueError: no JSON result" in unreadable["error"]


def gpu_results() -> dict:
    """What gpu_check records on an H200 where one test failed and decode ran out of time."""
    train = dict(status="ok", seconds=131.0, tokens_per_s=470_000, vs_record=0.977, record_tokens_per_s_per_gpu=481_189,
                 gpu="NVIDIA H200", step_ms=836.6, micro_batches=8, micro_batch_tokens=49_152, fwd_bwd_ms=700.0,
                 newton_schulz_ms=90.0, optimizer_rest_ms=46.6, first_step_s=95.3, compile_s=94.5, mfu=0.402,
                 matmul_bf16_tflops=788.0, peak_memory_mib=61_000, compile_fallbacks=[])
    tests = dict(status="failed", seconds=150.0, **bench.parse_pytest_output(FINISHED))
    return dict(budget_s=450, seconds=400.0, preflight=["dotenv is not installed: ..."],
                machine=dict(gpu="NVIDIA H200", capability="9.0", memory_gib=139.8, torch="2.11.0", cuda="13.0"),
                parts=dict(tests=tests, train=train,
                           decode=dict(status="skipped", seconds=0.0, error="out of time: 12 s of the budget left")))


def test_gpu_summary_gives_each_part_one_line_with_its_figures() -> None:
    lines = bench.gpu_summary(gpu_results(), Path("gpu_check.json")).splitlines()
    assert lines[0].startswith("GPU check: NVIDIA H200 (compute capability 9.0, 139.8 GiB), torch 2.11.0, CUDA 13.0")
    assert lines[0].endswith("400 s of a 450 s budget") and lines[1] == "warning: dotenv is not installed: ..."
    tests, train, decode = lines[3:6]
    assert tests.split()[:3] == ["tests", "failed", "150.0"]
    assert "3 passed, 1 failed, 1 skipped, 1 error; failed test_gpu_model_loss_matches_cpu_model (assert 0.5" in tests
    assert "error test_compiled_training_steps_lower_the_loss" in tests
    assert "skipped: FP8 needs compute capability >= 8.9" in tests
    assert "470,000 tok/s = 0.98x the record's 481,189 per H100 (on an NVIDIA H200)" in train
    assert "first step 95.3 s (compile ~94 s, cold cache); MFU 40% of 788 TFLOP/s bf16; peak 61,000 MiB" in train
    assert decode.split()[:2] == ["decode", "skipped"] and decode.endswith("out of time: 12 s of the budget left")
    assert lines[-1] == "everything, with each part's output: gpu_check.json"
    json.dumps(gpu_results())  # what json_out receives: plain types only


def test_record_rate_is_the_record_run_per_gpu() -> None:
    """1770 steps of 8 x 48k tokens in 180.8 s on 8 GPUs (the README's 481k tokens/s per H100)."""
    assert round(bench.RECORD_TOKENS_PER_S_PER_GPU) == 481_189
    assert bench.GPU_BUDGET_S < 8 * 60  # the budget bounds the whole check, whatever each part's own limit


def test_gpu_train_part_times_the_first_step(monkeypatch: pytest.MonkeyPatch) -> None:
    """On the tiny model on CPU: one stamp per step, the first interval is the first step, figures against the
    record and the matmul peak; pretraining.train_micro_batches is itself again afterwards."""
    import pretraining

    monkeypatch.setattr(bench, "train_config", lambda shape, device, compile="auto", overrides=None: tiny_hparams())
    original = pretraining.train_micro_batches
    row = bench.gpu_train_part(torch.device("cpu"), steps=2, warmup=1, matmul_n=128)
    assert pretraining.train_micro_batches is original
    assert len(row["step_intervals_s"]) == 2 and row["first_step_s"] == round(row["step_intervals_s"][0], 1)
    assert row["setup_s"] >= 0 and row["gpu"] == "cpu" and row["fp8_head"] is False
    assert row["vs_record"] == round(row["tokens_per_s"] / bench.RECORD_TOKENS_PER_S_PER_GPU, 3)
    assert row["matmul_bf16_tflops"] >= 0 and row["record_tokens_per_s_per_gpu"] == 481_189
    assert row["mfu"] is None or row["mfu"] > 0  # None: a CPU too slow for a 0.1 TFLOP/s figure
    assert (row["micro_batches"], row["micro_batch_tokens"]) == (2, 256) and row["compile_fallbacks"] == []
    json.dumps(row)


@pytest.mark.slow
def test_limited_process_kills_everything_it_started_at_its_limit() -> None:
    """A command that starts a child and sleeps: both are gone at the limit, and the output so far is kept."""
    code = ("import subprocess, sys, time; c = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']);"
            " print(c.pid, flush=True); time.sleep(60)")
    start = time.monotonic()
    killed = bench.LimitedProcess([sys.executable, "-c", code], limit_s=3).wait()
    assert killed["timed_out"] and killed["returncode"] == -9 and time.monotonic() - start < 30
    child = int(killed["stdout"].split()[0])
    time.sleep(0.5)
    status = Path(f"/proc/{child}/status")
    assert not status.exists() or "State:\tZ" in status.read_text()  # gone, or dead and not yet reaped
    done = bench.LimitedProcess([sys.executable, "-c", "print('hi'); import sys; sys.exit(3)"], limit_s=60).wait()
    assert (done["returncode"], done["timed_out"], done["stdout"]) == (3, False, "hi\n")


@pytest.mark.slow
def test_gpu_check_without_cuda_is_one_line_and_exit_2() -> None:
    result = run_script(["bench.py", "--only", "gpu", "--json-out", "never.json"], env=dict(CUDA_VISIBLE_DEVICES=""))
    assert result.returncode == 2
    assert result.stderr == "bench.py: error: --only gpu needs a CUDA GPU; this machine has none\n"
    assert not (REPO_DIR / "never.json").exists()


@pytest.mark.slow
def test_gpu_check_records_every_part_and_goes_on_after_failures(monkeypatch: pytest.MonkeyPatch,
                                                                tmp_path: Path) -> None:
    """The whole check on a machine whose GPU is hidden: the test parts run (everything skips), the training and
    decode children fail at once, and each failure is one line in the table and the JSON, not the end of the check."""
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # the children see no GPU, even on a machine with one
    monkeypatch.setattr(bench, "gpu_machine", lambda: dict(gpu="none", capability="-", memory_gib=0))
    out = tmp_path / "check" / "gpu.json"
    code = bench.gpu_check(budget_s=300, json_out=out)
    saved = json.loads(out.read_text())
    parts = saved["parts"]
    assert code == 1 and set(parts) == set(bench.GPU_PARTS)
    assert parts["tests"]["status"] == "ok" and parts["tests"]["passed"] == 0 and parts["tests"]["skipped"] >= 8
    assert {s["reason"] for s in parts["tests"]["skips"]} >= {"needs a CUDA GPU"}
    assert parts["scripts"]["status"] == "ok" and parts["scripts"]["skipped"] >= 2  # the slow ones, apart
    assert parts["train_gpt"]["status"] == "ok" and parts["train_gpt"]["skipped"] == 1
    for name in ("train", "decode"):
        assert parts[name]["status"] == "error" and "CUDA is not available" in parts[name]["error"], parts[name]
    assert saved["seconds"] < 300 and all(p["about"] for p in parts.values())


# -----------------------------------------------------------------------------
# peer: ours against GPT2LMHeadModel + AdamW at the same wall clock


def test_seconds_to_reach_a_loss_the_first_validation_already_meets() -> None:
    """A loss above the initial one (the other run diverged) is reached at the first validation, never before it."""
    run = dict(seconds=[0.0, 30.0], val_loss=[10.0, 4.0])
    assert bench.seconds_to_reach(run, 11.0) == 0.0 and bench.seconds_to_reach(run, 7.0) == 15.0


@pytest.mark.parametrize("frac, mult", [(0.0, 0.0), (0.025, 0.5), (0.05, 1.0), (0.525, 0.55), (1.0, 0.1),
                                        (1.5, 0.1), (-1.0, 0.0)])
def test_peer_schedule_warms_up_linearly_then_decays_by_cosine_to_a_tenth(frac: float, mult: float) -> None:
    assert bench.peer_lr_mult(frac) == pytest.approx(mult)


def peer_run(lr: float, seconds: list[float], val_loss: list[float], tokens_per_s: int = 1000) -> dict:
    return dict(lr=lr, seconds=seconds, val_loss=val_loss, final_val_loss=val_loss[-1], train_s=seconds[-1],
                tokens_per_s=tokens_per_s)


def test_peer_comparison_times_each_to_the_others_final_loss() -> None:
    """Ours ends at 4.0 in 100 s; the best AdamW (lr 2e-3, the lowest final loss; a diverged run is never the best)
    ends at 5.0: ours gets there at 50 s, 2x faster, and AdamW never reaches 4.0."""
    ours = peer_run(0, [0.0, 50.0, 100.0], [10.0, 5.0, 4.0], tokens_per_s=500)
    adamw = [peer_run(1e-3, [0.0, 50.0, 99.0], [10.0, 7.0, 5.5]), peer_run(2e-3, [0.0, 50.0, 100.0], [10.0, 6.0, 5.0]),
             peer_run(3e-3, [0.0, 50.0], [10.0, float("nan")])]
    c = bench.peer_comparison(ours, adamw)
    assert c["best_lr"] == 2e-3 and c["val_loss_gap"] == 1.0
    assert c["ours_seconds_to_adamw_loss"] == 50.0 and c["speedup_to_adamw_loss"] == 2.0
    assert c["adamw_seconds_to_ours_loss"] is None and c["speedup_to_ours_loss"] is None
    assert c["tokens_per_s_ratio"] == 0.5


def test_peer_comparison_when_adamw_ends_lower() -> None:
    """The other way round: AdamW passes ours' 4.0 at 75 s (0.75x ours' 100 s); ours never reaches its 3.5."""
    ours = peer_run(0, [0.0, 100.0], [10.0, 4.0])
    c = bench.peer_comparison(ours, [peer_run(1e-3, [0.0, 50.0, 100.0], [10.0, 4.5, 3.5])])
    assert c["adamw_seconds_to_ours_loss"] == 75.0 and c["speedup_to_ours_loss"] == 0.75
    assert c["ours_seconds_to_adamw_loss"] is None and c["speedup_to_adamw_loss"] is None and c["val_loss_gap"] == -0.5


def test_peer_model_maps_our_shape_and_its_loss_is_transformers_own() -> None:
    """GPT2LMHeadModel at our width, depth, heads and padded vocabulary; PeerLoss on (inputs, next tokens) is the
    loss transformers computes from labels (which it shifts itself)."""
    hp = tiny_hparams()
    hf = bench.peer_gpt2(hp).eval()
    config = hf.config
    assert (config.n_embd, config.n_layer, config.n_head) == (hp.model_dim, hp.num_layers, hp.num_heads)
    assert config.vocab_size == 50304 and config.n_positions >= hp.row_len
    tokens = torch.randint(0, hp.vocab_size, (2, hp.row_len), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = bench.PeerLoss(hf)(tokens[:, :-1], tokens[:, 1:])
        theirs = hf(input_ids=tokens, labels=tokens).loss
    assert ours == pytest.approx(float(theirs), rel=1e-5)


def test_peer_step_takes_our_micro_batches_and_rows() -> None:
    """One AdamW step sees the batch as ours does: rank_equivalents micro-batches of train_seq_len tokens, each as
    (train_seq_len / row_len, row_len) rows, in order; the loss is their mean."""
    hp = tiny_hparams(train_seq_len=512, row_len=128, rank_equivalents=2)
    seen = []

    class Recorder(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = torch.nn.Parameter(torch.ones(()))

        def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            seen.append((x.clone(), y.clone()))
            return self.w * (len(seen) + 1.0)

    loss_fn = Recorder()
    inputs = torch.arange(hp.tokens_per_step, dtype=torch.int32)
    loss = bench.peer_step(loss_fn, torch.optim.AdamW(loss_fn.parameters()), (inputs, inputs.long() + 1), hp,
                           M.Runtime(device=torch.device("cpu")))
    assert loss == 2.5 and [x.shape for x, _ in seen] == [(4, 128), (4, 128)]
    assert torch.equal(torch.cat([x.reshape(-1) for x, _ in seen]), inputs)
    assert torch.equal(torch.cat([y.reshape(-1) for _, y in seen]), inputs.long() + 1)


@pytest.mark.slow
def test_peer_quick_compares_both_at_one_budget(capsys: pytest.CaptureFixture) -> None:
    """--only peer --quick end to end: our pretraining.py run, the dtype probe and an AdamW run in their own
    processes; one budget (our training seconds) for both, finite val losses, the same tokens per step and val
    tokens as ours, and the table prints."""
    bench.main(["--only", "peer", "--quick", "--json", "--device", "cpu"])
    peer = json.loads(capsys.readouterr().out)["peer"]
    ours, adamw = peer["ours"], peer["adamw"]
    quick = M.Hyperparameters(**dict(M.PRESETS["shakespeare"], **bench.PEER_QUICK))
    assert peer["quick"] and peer["equal_budget"] and peer["budget_s"] == ours["train_s"] > 0
    assert [r["lr"] for r in adamw] == list(bench.PEER_QUICK_LRS)
    assert all(r["budget_s"] == peer["budget_s"] for r in adamw)
    assert ours["tokens_per_step"] == peer["tokens_per_step"] == quick.tokens_per_step
    assert all(r["tokens_per_step"] == quick.tokens_per_step and r["train_steps"] >= 1 for r in adamw)
    assert peer["val_tokens"] == quick.val_tokens and ours["train_steps"] == quick.num_iterations
    for run in [ours, *adamw]:
        assert all(math.isfinite(v) for v in run["val_loss"]) and run["final_val_loss"] == run["val_loss"][-1]
        assert run["seconds"] == sorted(run["seconds"]) and run["tokens_per_s"] > 0
    assert peer["adamw_dtype"] in ("fp32", "bf16") and set(peer["dtype_probe_step_ms"]) == {"fp32", "bf16"}
    assert set(peer["comparison"]) >= {"best_lr", "ours_val_loss", "adamw_val_loss", "ours_seconds_to_adamw_loss",
                                       "adamw_seconds_to_ours_loss", "speedup_to_adamw_loss",
                                       "speedup_to_ours_loss", "tokens_per_s_ratio"}
    bench.print_peer(peer)
    assert "ours reaches the best AdamW's" in capsys.readouterr().out


def test_provenance_names_the_commit_and_the_cpu() -> None:
    import re

    p = bench.provenance()
    assert set(p) == {"date", "commit", "cpu", "cpu_features", "python"}
    assert p["commit"] is None or re.fullmatch(r"[0-9a-f]{7,40}(\+changes)?", p["commit"])  # None: not a checkout
    assert p["cpu"] and set(p["cpu_features"]) <= set(bench.CPU_FEATURES)
