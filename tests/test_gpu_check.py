"""gpu_check.py's bookkeeping on CPU: its pytest-output parser, a part's status and error line, the summary table,
the training part's figures on a tiny model, its time limits, and its refusal without CUDA. The parts themselves
need a GPU (tests/test_cuda.py).

    python -m pytest -q tests/test_gpu_check.py
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import REPO_DIR, run_script, tiny_hparams

import bench
import gpu_check

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
    found = gpu_check.parse_pytest_output(FINISHED)
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
    found = gpu_check.parse_pytest_output(killed)
    assert found["summary"] is None
    assert (found["passed"], found["failed"], found["skipped"], found["errors"]) == (1, 1, 1, 0)
    assert found["failures"] == [dict(test="tests/test_cuda.py::test_gpu_model_loss_matches_cpu_model",
                                      outcome="failed", message="")]
    assert found["running"] == "tests/test_cuda.py::test_compiled_training_steps_lower_the_loss"
    part = gpu_check.pytest_part(dict(returncode=-9, timed_out=True, stdout=killed, stderr="", seconds=240.0))
    assert part["status"] == "timeout"
    assert part["error"] == "killed at its limit in tests/test_cuda.py::test_compiled_training_steps_lower_the_loss"


@pytest.mark.parametrize("returncode, status", [(0, "ok"), (1, "failed"), (2, "error"), (5, "error")])
def test_pytest_part_is_ok_only_when_pytest_exits_0(returncode: int, status: str) -> None:
    part = gpu_check.pytest_part(dict(returncode=returncode, timed_out=False, stdout=FINISHED, stderr="", seconds=5.0))
    assert part["status"] == status and part["passed"] == 3


def test_error_line_and_last_json_read_a_child_s_output() -> None:
    trace = ("Traceback (most recent call last):\n  File \"bench.py\", line 1\n"
             "torch.OutOfMemoryError: CUDA out of memory\n")
    assert gpu_check.error_line(trace) == "torch.OutOfMemoryError: CUDA out of memory"
    assert gpu_check.error_line("just a line\n\n") == "just a line" and gpu_check.error_line("") == "(no output)"
    assert gpu_check.last_json('log line\n{"a": 1}\n') == {"a": 1}
    assert gpu_check.last_json('noise\n{\n  "rows": [\n    {"b": 2}\n  ]\n}\n') == {"rows": [{"b": 2}]}
    with pytest.raises(ValueError, match="no JSON result"):
        gpu_check.last_json("only log lines\n")
    failed = dict(returncode=1, timed_out=False, stdout="", stderr=trace, seconds=3.0)
    part = gpu_check.script_part(failed, gpu_check.last_json)
    assert part["status"] == "error" and part["error"] == "torch.OutOfMemoryError: CUDA out of memory"
    ok = dict(returncode=0, timed_out=False, stdout='{"bandwidth_gbs": 4000.0, "decode": [{"batch": 1}]}\n',
              stderr="decode ...\n", seconds=30.0)
    assert gpu_check.script_part(ok, gpu_check.decode_figures) == dict(seconds=30.0, returncode=0, status="ok",
                                                               bandwidth_gbs=4000.0, rows=[{"batch": 1}],
                                                               log_tail="decode ...\n")
    unreadable = gpu_check.script_part(dict(ok, stdout="no result\n"), gpu_check.last_json)
    assert unreadable["status"] == "error" and "could not be read (ValueError: no JSON result" in unreadable["error"]


# -----------------------------------------------------------------------------
# the summary table, the record's rate, the training part


def gpu_results() -> dict:
    """What gpu_check records on an H200 where one test failed and decode ran out of time."""
    train = dict(status="ok", seconds=131.0, tokens_per_s=470_000, vs_record=0.977, record_tokens_per_s_per_gpu=481_189,
                 gpu="NVIDIA H200", step_ms=836.6, micro_batches=8, micro_batch_tokens=49_152, fwd_bwd_ms=700.0,
                 newton_schulz_ms=90.0, optimizer_rest_ms=46.6, first_step_s=95.3, compile_s=94.5, mfu=0.402,
                 matmul_bf16_tflops=788.0, peak_memory_mib=61_000, compile_fallbacks=[])
    tests = dict(status="failed", seconds=150.0, **gpu_check.parse_pytest_output(FINISHED))
    return dict(budget_s=450, seconds=400.0, preflight=["dotenv is not installed: ..."],
                machine=dict(gpu="NVIDIA H200", capability="9.0", memory_gib=139.8, torch="2.11.0", cuda="13.0"),
                parts=dict(tests=tests, train=train,
                           decode=dict(status="skipped", seconds=0.0, error="out of time: 12 s of the budget left")))


def test_gpu_summary_gives_each_part_one_line_with_its_figures() -> None:
    lines = gpu_check.gpu_summary(gpu_results(), Path("gpu_check.json")).splitlines()
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
    assert round(gpu_check.RECORD_TOKENS_PER_S_PER_GPU) == 481_189
    # record #89: 1285 steps of 1, 2 and 3 x 8 x 16k tokens (423, 424, 438 steps) in 1.23 min on 8 GPUs
    assert round(gpu_check.RECORD_2026_TOKENS_PER_S_PER_GPU) == 573_884
    assert gpu_check.GPU_BUDGET_S < 8 * 60  # the budget bounds the whole check, whatever each part's own limit


def test_gpu_train_part_times_the_first_step(monkeypatch: pytest.MonkeyPatch) -> None:
    """On the tiny model on CPU: one stamp per step, the first interval is the first step, figures against the
    record and the matmul peak; pretraining.train_micro_batches is itself again afterwards."""
    import pretraining

    monkeypatch.setattr(bench, "train_config", lambda shape, device, compile="auto", overrides=None: tiny_hparams())
    original = pretraining.train_micro_batches
    row = gpu_check.gpu_train_part(torch.device("cpu"), steps=2, warmup=1, matmul_n=128)
    assert pretraining.train_micro_batches is original
    assert len(row["step_intervals_s"]) == 2 and row["first_step_s"] == round(row["step_intervals_s"][0], 1)
    assert row["setup_s"] >= 0 and row["gpu"] == "cpu" and row["fp8_head"] is False
    assert row["vs_record"] == round(row["tokens_per_s"] / gpu_check.RECORD_TOKENS_PER_S_PER_GPU, 3)
    assert row["matmul_bf16_tflops"] >= 0 and row["record_tokens_per_s_per_gpu"] == 481_189
    assert row["mfu"] is None or row["mfu"] > 0  # None: a CPU too slow for a 0.1 TFLOP/s figure
    assert (row["micro_batches"], row["micro_batch_tokens"]) == (2, 256) and row["compile_fallbacks"] == []
    json.dumps(row)


# -----------------------------------------------------------------------------
# time limits and the whole check, on a machine without a GPU


@pytest.mark.slow
def test_limited_process_kills_everything_it_started_at_its_limit() -> None:
    """A command that starts a child and sleeps: both are gone at the limit, and the output so far is kept."""
    code = ("import subprocess, sys, time; c = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']);"
            " print(c.pid, flush=True); time.sleep(60)")
    start = time.monotonic()
    killed = gpu_check.LimitedProcess([sys.executable, "-c", code], limit_s=3).wait()
    assert killed["timed_out"] and killed["returncode"] == -9 and time.monotonic() - start < 30
    child = int(killed["stdout"].split()[0])
    time.sleep(0.5)
    status = Path(f"/proc/{child}/status")
    assert not status.exists() or "State:\tZ" in status.read_text()  # gone, or dead and not yet reaped
    done = gpu_check.LimitedProcess([sys.executable, "-c", "print('hi'); import sys; sys.exit(3)"], limit_s=60).wait()
    assert (done["returncode"], done["timed_out"], done["stdout"]) == (3, False, "hi\n")


@pytest.mark.slow
def test_gpu_check_without_cuda_is_one_line_and_exit_2() -> None:
    result = run_script(["gpu_check.py", "--json-out", "never.json"], env=dict(CUDA_VISIBLE_DEVICES=""))
    assert result.returncode == 2
    assert result.stderr == "gpu_check.py: error: the GPU check needs a CUDA GPU; this machine has none\n"
    assert not (REPO_DIR / "never.json").exists()


@pytest.mark.slow
def test_gpu_check_records_every_part_and_goes_on_after_failures(monkeypatch: pytest.MonkeyPatch,
                                                                tmp_path: Path) -> None:
    """The whole check on a machine whose GPU is hidden: the test parts run (everything skips), the training and
    decode children fail at once, and each failure is one line in the table and the JSON, not the end of the check."""
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # the children see no GPU, even on a machine with one
    monkeypatch.setattr(gpu_check, "gpu_machine", lambda: dict(gpu="none", capability="-", memory_gib=0))
    out = tmp_path / "check" / "gpu.json"
    code = gpu_check.gpu_check(budget_s=300, json_out=out)
    saved = json.loads(out.read_text())
    parts = saved["parts"]
    assert code == 1 and set(parts) == set(gpu_check.GPU_PARTS)
    assert parts["tests"]["status"] == "ok" and parts["tests"]["passed"] == 0 and parts["tests"]["skipped"] >= 8
    assert {s["reason"] for s in parts["tests"]["skips"]} >= {"needs a CUDA GPU"}
    assert parts["scripts"]["status"] == "ok" and parts["scripts"]["skipped"] >= 2  # the slow ones, apart
    assert parts["train_gpt"]["status"] == "ok" and parts["train_gpt"]["skipped"] == 1
    assert "gpu_check.py" in parts["train"]["log_tail"]  # the training part runs this script again (--part train)
    for name in ("train", "decode"):
        assert parts[name]["status"] == "error" and "CUDA is not available" in parts[name]["error"], parts[name]
    assert saved["seconds"] < 300 and all(p["about"] for p in parts.values())


