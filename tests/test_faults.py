"""Faults injected into real runs (tests/faults.py): kill -9, SIGTERM, Ctrl-C, NaN, a full disk, a dead or hung
torchrun rank, two runs racing for one directory. Each run either stops with one clear line and keeps its good
checkpoints, or resumes with `--resume latest` to exactly the state of a run that was never interrupted.

    python -m pytest tests/test_faults.py -q --durations=10       # about 2.5 min on 2 cores
"""
from __future__ import annotations

import collections
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import model as M
import runs as R
import pretraining
from conftest import REPO_DIR
from conftest import free_port

pytestmark = pytest.mark.slow

FAULTS = "tests/faults.py"
STEPS = 8  # --num-iterations of the tiny runs: validations at 0, 4, 8; checkpoints at 2, 4, 6, 8
VOCAB = 500  # token ids of the random shards; no <|endoftext|>, so a 512-row vocab holds them
RUN_ID = "run"
TORCHRUN = ("-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1")
DiskUsage = collections.namedtuple("DiskUsage", "total used free")


# -----------------------------------------------------------------------------
# Helpers


def clean_env(**extra: str) -> dict[str, str]:
    """The environment of a script under test: no NANOGPT_* settings of the caller, one thread per process."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("NANOGPT_")}
    env.update(extra, OMP_NUM_THREADS="1")
    return env


def run(args: list[str], timeout: float = 120, **env: str) -> subprocess.CompletedProcess:
    """python ARGS in the repository, output captured."""
    return subprocess.run([sys.executable, *args], cwd=REPO_DIR, capture_output=True, text=True, timeout=timeout,
                          env=clean_env(**env))


def start(args: list[str], **env: str) -> subprocess.Popen:
    """python ARGS in the repository, in the background; stdout and stderr are pipes of text lines."""
    return subprocess.Popen([sys.executable, *args], cwd=REPO_DIR, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, bufsize=1, env=clean_env(**env))


def tiny_args(data: Path, log_dir: Path, *extra: str) -> list[str]:
    """pretraining.py's flags for the 2-layer, 64-wide model on the random shards: fp32 and uncompiled on CPU, so
    runs are bitwise reproducible; flags in `extra` come last and win."""
    return ["--preset", "shakespeare", "--train-files", str(data / "tiny_train_*.bin"),
            "--val-files", str(data / "tiny_val_*.bin"), "--vocab-size", "512", "--num-layers", "2",
            "--num-heads", "2", "--head-dim", "32", "--model-dim", "64", "--train-seq-len", "256", "--row-len", "128",
            "--val-seq-len", "256", "--val-tokens", "512", "--rank-equivalents", "2", "--window-max", "256",
            "--num-iterations", str(STEPS), "--val-loss-every", "4", "--save-every", "2",
            "--muon-momentum-warmup", "3", "--dtype", "fp32", "--compile", "off", "--device", "cpu",
            "--log-dir", str(log_dir), *extra]


def faulty(spec: str, script_args: list[str]) -> list[str]:
    """tests/faults.py SPEC SCRIPT ARGS...: the script, unmodified, with the fault injected."""
    return [FAULTS, spec, *script_args]


def ckpt_path(run_dir: Path, step: int) -> Path:
    return run_dir / f"state_step{step:06d}.pt"


def checkpoint_steps(run_dir: Path) -> list[int]:
    return [M.load_checkpoint(p)["step"] for p in M.run_checkpoints(run_dir)]


def partial_writes(run_dir: Path) -> list[str]:
    """Hidden temporary files of checkpoint writes that never finished."""
    return sorted(p.name for p in run_dir.glob(".*.tmp*"))


def metric_rows(run_dir: Path) -> list[tuple[int, float | None, float | None]]:
    """(step, train_loss, val_loss) of every metrics.jsonl line, in order (timings left out)."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r.get("train_loss"), r.get("val_loss")) for r in rows]


def assert_equal_values(a: Any, b: Any, where: str) -> None:
    """Tensors bit for bit, containers item by item, anything else with ==."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), where
        for key in a:
            assert_equal_values(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_equal_values(x, y, f"{where}[{i}]")
    else:
        assert a == b, (where, a, b)


def assert_same_final_state(run_dir: Path, reference: Path, step: int = STEPS) -> None:
    """The final checkpoints hold the same weights, optimizer state (every tensor), data position and val loss."""
    a = M.load_checkpoint(ckpt_path(reference, step))
    b = M.load_checkpoint(ckpt_path(run_dir, step))
    assert_equal_values(a["model"], b["model"], "model")
    assert_equal_values([o["state"] for o in a["optimizers"]], [o["state"] for o in b["optimizers"]], "optimizers")
    assert a["data_position"] == b["data_position"]
    assert a["val_loss"] == b["val_loss"]


def assert_close_final_state(run_dir: Path, reference: Path) -> None:
    """Equal up to the order in which 2 processes sum gradients (fp32): weights and final val loss."""
    a = M.load_checkpoint(ckpt_path(reference, STEPS))
    b = M.load_checkpoint(ckpt_path(run_dir, STEPS))
    assert a["model"].keys() == b["model"].keys()
    for k in a["model"]:
        torch.testing.assert_close(b["model"][k], a["model"][k], rtol=1e-4, atol=1e-5, msg=k)
    assert b["val_loss"] == pytest.approx(a["val_loss"], rel=1e-4, abs=1e-5)


def resume_latest(log_dir: Path, script: str = "pretraining.py", from_step: int | None = None) -> str:
    """`SCRIPT --resume latest --log-dir L` must exit 0; returns its stdout. from_step: where it must continue."""
    r = run([script, "--resume", "latest", "--log-dir", str(log_dir)])
    assert r.returncode == 0, r.stdout + r.stderr
    if from_step is not None and script == "pretraining.py":
        assert f"resumed_from:{log_dir / RUN_ID}" in r.stdout and f" step:{from_step}\n" in r.stdout, r.stdout
    return r.stdout


def assert_resumes_exactly(log_dir: Path, reference: Path, from_step: int | None) -> None:
    """--resume latest finishes the run in log_dir bit for bit as the reference run, metrics included."""
    resume_latest(log_dir, from_step=from_step)
    assert_same_final_state(log_dir / RUN_ID, reference)
    assert metric_rows(log_dir / RUN_ID) == metric_rows(reference)


def error_lines(stderr: str, prog: str = "pretraining.py") -> list[str]:
    """The `PROG: error: ...` lines of a script's stderr (torchrun interleaves its own and every rank's)."""
    return [line for line in stderr.splitlines() if line.startswith(f"{prog}: error: ")]


# -----------------------------------------------------------------------------
# Fixtures: the random shards and the uninterrupted run every resumed one is compared with


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """2 train shards of 6,000 random tokens and a val shard of 3,000, ids in [0, 500)."""
    d = tmp_path_factory.mktemp("fault_data")
    rng = np.random.default_rng(0)
    for name, n in [("tiny_train_000000.bin", 6000), ("tiny_train_000001.bin", 6000), ("tiny_val_000000.bin", 3000)]:
        M.write_data_shard(d / name, rng.integers(0, VOCAB, size=n).astype(np.uint16))
    return d


@pytest.fixture(scope="module")
def reference(data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The run directory of the uninterrupted 8-step run."""
    logs = tmp_path_factory.mktemp("reference")
    r = run(["pretraining.py", *tiny_args(data, logs, "--run-id", RUN_ID)])
    assert r.returncode == 0, r.stderr
    assert checkpoint_steps(logs / RUN_ID) == [6, 8]
    return logs / RUN_ID


# -----------------------------------------------------------------------------
# kill -9: resume latest continues from the newest complete checkpoint, bit for bit

KILLS = [  # (fault, step of the newest complete checkpoint the run resumes from, hidden partial write left)
    pytest.param("kill@step=1", 0, None, id="before-first-checkpoint"),
    pytest.param("kill@step=5", 4, None, id="mid-stride"),
    pytest.param("kill@eval=2", 4, None, id="during-validation"),
    pytest.param("kill@save=6", 4, ".state_step000006.pt.tmp", id="mid-checkpoint-write"),
    pytest.param("kill@eval=3", 8, None, id="during-final-validation"),
]


@pytest.mark.parametrize("spec, from_step, partial", KILLS)
def test_kill_then_resume_is_bitwise_exact(spec: str, from_step: int, partial: str | None, data: Path,
                                           reference: Path, tmp_path: Path) -> None:
    """A run killed anywhere leaves only complete checkpoints (a half-written one is a hidden .tmp file) and
    `--resume latest` ends with the uninterrupted run's weights, optimizer state, data position and metrics; a run
    killed before its first checkpoint starts again from step 0 with the config in its run.json."""
    r = run(faulty(spec, ["pretraining.py", *tiny_args(data, tmp_path, "--run-id", RUN_ID)]))
    assert r.returncode == -signal.SIGKILL, r.stderr
    run_dir = tmp_path / RUN_ID
    newest = M.newest_checkpoint(run_dir)
    if from_step == 0:
        assert newest is None and (run_dir / R.RUN_INFO).is_file()
    else:
        assert newest == ckpt_path(run_dir, from_step) and M.load_checkpoint(newest)["step"] == from_step
    left = partial_writes(run_dir)
    if partial is None:
        assert left == []
    else:
        assert len(left) == 1 and left[0].startswith(partial), left
    assert_resumes_exactly(tmp_path, reference, from_step)
    assert partial_writes(run_dir) == []  # the resumed run removed the partial write


def test_kill_from_outside_then_resume_is_bitwise_exact(data: Path, reference: Path, tmp_path: Path) -> None:
    """kill -9 sent by another process at an arbitrary moment (after step 3's log line): same guarantee."""
    proc = start(["pretraining.py", *tiny_args(data, tmp_path, "--run-id", RUN_ID)])
    try:
        for line in proc.stdout:
            if line.startswith(f"step:3/{STEPS}"):
                break
        else:
            pytest.fail(f"the run ended before step 3: {proc.stderr.read()}")
        proc.kill()
    finally:
        proc.kill()
        proc.communicate(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    assert_resumes_exactly(tmp_path, reference, from_step=None)


# -----------------------------------------------------------------------------
# SIGTERM / Ctrl-C: a checkpoint after the current step, exit 0; a second Ctrl-C quits without one


SIGNALS = [  # (fault, signal name, step of the checkpoint written on the way out)
    pytest.param("term@step=5", "SIGTERM", 6, id="SIGTERM"),
    pytest.param("int@step=5", "SIGINT", 6, id="SIGINT"),
]


@pytest.mark.parametrize("spec, name, stopped_at", SIGNALS)
def test_signal_saves_then_resume_is_bitwise_exact(spec: str, name: str, stopped_at: int, data: Path,
                                                   reference: Path, tmp_path: Path) -> None:
    """A signal during a step finishes that step, writes its checkpoint, says how to continue and exits 0;
    --resume latest then ends bit for bit as the uninterrupted run."""
    r = run(faulty(spec, ["pretraining.py", *tiny_args(data, tmp_path, "--run-id", RUN_ID)]))
    assert r.returncode == 0, r.stderr
    saved = ckpt_path(tmp_path / RUN_ID, stopped_at)
    assert r.stdout.splitlines()[-1] == (f"stopped by {name} at step {stopped_at}: checkpoint {saved}; "
                                         f"continue with python pretraining.py --resume latest")
    assert r.stderr.splitlines() == [f"{name} received: writing a checkpoint after the current step "
                                     f"(Ctrl-C again to quit without one)"]
    assert M.load_checkpoint(saved)["step"] == stopped_at
    assert_resumes_exactly(tmp_path, reference, from_step=stopped_at)


@pytest.mark.parametrize("script", ["pretraining.py", "finetune.py"])
def test_signal_in_the_last_step_finishes_the_run(script: str, data: Path, reference: Path,
                                                  ft_inputs: dict[str, Path], ft_reference: Path,
                                                  tmp_path: Path) -> None:
    """SIGTERM during the last step: only the final validation is left, so the run finishes it (a checkpoint
    without the final val loss would look finished and is not) and ends exactly as the uninterrupted run."""
    if script == "pretraining.py":
        args, ref, steps = ["pretraining.py", *tiny_args(data, tmp_path, "--run-id", RUN_ID)], reference, STEPS
    else:
        args, ref, steps = ft_args(ft_inputs, tmp_path), ft_reference, FT_STEPS
    r = run(faulty(f"term@step={steps - 1}", args))
    assert r.returncode == 0, r.stderr
    assert r.stderr.splitlines() == ["SIGTERM received: writing a checkpoint after the current step "
                                     "(Ctrl-C again to quit without one)"]
    assert "stopped by" not in r.stdout and f"state_step{steps:06d}.pt" in r.stdout.splitlines()[-1]
    assert_same_final_state(tmp_path / RUN_ID, ref, steps)


def test_second_ctrl_c_quits_without_a_checkpoint(data: Path, tmp_path: Path) -> None:
    """Ctrl-C twice, 1.2 s apart: exit 130 at once, naming the newest checkpoint (step 4), which still loads; the
    interrupted step is not saved."""
    r = run(faulty("int2@step=5", ["pretraining.py", *tiny_args(data, tmp_path, "--run-id", RUN_ID)]))
    assert r.returncode == 130, r.stderr
    run_dir = tmp_path / RUN_ID
    last = r.stderr.splitlines()[-1]
    assert last.startswith("pretraining.py: error: interrupted (second Ctrl-C)"), r.stderr
    assert str(ckpt_path(run_dir, 4)) in last
    assert not ckpt_path(run_dir, 6).exists()
    assert checkpoint_steps(run_dir) == [2, 4] and partial_writes(run_dir) == []


# -----------------------------------------------------------------------------
# NaN: stop with one line, no checkpoint of non-finite weights


NANS = [  # (fault, how the one error line begins)
    pytest.param("nan@step=4", "step 6: the training loss is nan; ", id="loss"),
    pytest.param("nan@step=5", "step 6: 1 parameter tensor(s) hold NaN or inf (first: ", id="weights"),
]


@pytest.mark.parametrize("spec, head", NANS)
def test_nan_stops_without_a_checkpoint(spec: str, head: str, data: Path, tmp_path: Path) -> None:
    """A NaN weight stops the run with exit 1 at the first non-finite loss or checkpoint, naming the newest good
    checkpoint (step 4, all finite), and writes nothing after it."""
    r = run(faulty(spec, ["pretraining.py", *tiny_args(data, tmp_path, "--run-id", RUN_ID)]))
    assert r.returncode == 1, r.stderr
    run_dir = tmp_path / RUN_ID
    newest = ckpt_path(run_dir, 4)
    (line,) = r.stderr.splitlines()
    assert line.startswith(f"pretraining.py: error: {head}"), line
    assert f"stopped without writing a checkpoint (the newest good checkpoint is {newest})" in line
    assert M.newest_checkpoint(run_dir) == newest and checkpoint_steps(run_dir) == [2, 4]
    assert partial_writes(run_dir) == []
    for k, v in M.load_checkpoint(newest)["model"].items():
        assert torch.isfinite(v).all(), k


# -----------------------------------------------------------------------------
# A full disk mid-write


def test_full_disk_keeps_previous_checkpoint_then_resume(data: Path, reference: Path, tmp_path: Path) -> None:
    """ENOSPC halfway through the step-6 checkpoint: exit 1 with one line naming the file and the intact step-4
    checkpoint, no partial file left; --resume latest (disk freed) ends bit for bit as the uninterrupted run."""
    r = run(faulty("enospc@save=6", ["pretraining.py", *tiny_args(data, tmp_path, "--run-id", RUN_ID)]))
    assert r.returncode == 1, r.stderr
    run_dir = tmp_path / RUN_ID
    (line,) = r.stderr.splitlines()
    assert line.startswith(f"pretraining.py: error: {ckpt_path(run_dir, 6)}: "), line
    assert "No space left on device" in line
    assert f"the previous checkpoint {ckpt_path(run_dir, 4)} is intact" in line
    assert partial_writes(run_dir) == [] and checkpoint_steps(run_dir) == [2, 4]
    assert_resumes_exactly(tmp_path, reference, from_step=4)


# -----------------------------------------------------------------------------
# Pre-flight checks (in-process): refused before any training step, nothing left behind


def main_exit(argv: list[str], capsys: pytest.CaptureFixture) -> tuple[int, list[str]]:
    """pretraining.main(argv) in this process; (exit code, stderr lines)."""
    with pytest.raises(SystemExit) as exit_info:
        pretraining.main(argv)
    return exit_info.value.code, capsys.readouterr().err.splitlines()


@pytest.fixture
def in_process(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No NANOGPT_* variables and no .env for an in-process main()."""
    for key in [k for k in os.environ if k.startswith("NANOGPT_")]:
        monkeypatch.delenv(key)
    monkeypatch.chdir(tmp_path)


def test_not_enough_disk_space_is_refused_before_training(data: Path, tmp_path: Path, in_process: None,
                                                          monkeypatch: pytest.MonkeyPatch,
                                                          capsys: pytest.CaptureFixture) -> None:
    """1 MB free: exit 2 with one line, and the refused run leaves no run directory."""
    monkeypatch.setattr(R.shutil, "disk_usage", lambda path: DiskUsage(10**9, 10**9 - 10**6, 10**6))  # runs.py checks
    logs = tmp_path / "logs"
    code, err = main_exit(tiny_args(data, logs), capsys)
    assert code == 2 and len(err) == 1 and "not enough disk space" in err[0], err
    assert err[0].startswith("pretraining.py: error: ")
    assert list(logs.iterdir()) == []


def test_unwritable_run_directory_is_refused() -> None:
    """check_writable probes with a real write (so it holds for root too, who ignores permission bits)."""
    with pytest.raises(M.CheckpointError, match="cannot write to the run directory"):
        R.check_writable(Path("/proc"))


def test_log_dir_below_a_file_is_refused(data: Path, tmp_path: Path, in_process: None,
                                         capsys: pytest.CaptureFixture) -> None:
    """--log-dir under a regular file: exit 2, one line."""
    (tmp_path / "file").write_text("not a directory")
    code, err = main_exit(tiny_args(data, tmp_path / "file" / "logs"), capsys)
    assert code == 2 and len(err) == 1, err
    assert err[0].startswith("pretraining.py: error: cannot create run directory "), err


# -----------------------------------------------------------------------------
# One run per directory


def test_run_dir_lock_is_exclusive(tmp_path: Path) -> None:
    """A second lock on a locked run directory fails naming the holder's pid; once released it can be taken."""
    first = R.lock_run_dir(tmp_path)
    try:
        with pytest.raises(M.ConfigError, match=rf"is in use by another process \(pid {os.getpid()}\)"):
            R.lock_run_dir(tmp_path)
    finally:
        first.close()
    R.lock_run_dir(tmp_path).close()


def test_two_runs_with_one_run_id_do_not_share_it(data: Path, tmp_path: Path) -> None:
    """Two runs started at once with the same --run-id: one trains, the other exits 2 with one line."""
    args = ["pretraining.py", *tiny_args(data, tmp_path, "--run-id", "same", "--num-iterations", "2")]
    procs = [start(args), start(args)]
    errs = [p.communicate(timeout=120)[1] for p in procs]
    results = [(p.returncode, err) for p, err in zip(procs, errs)]
    assert sorted(code for code, _ in results) == [0, 2], results
    err = next(err for code, err in results if code == 2)
    assert err.splitlines() == [f"pretraining.py: error: run directory {tmp_path / 'same'} already exists; "
                                f"pick another --run-id or --resume"]


# -----------------------------------------------------------------------------
# torchrun: a dead or hung rank stops the others with one line; resuming works on any world size


def test_dead_rank_stops_the_run_and_resumes_on_any_world_size(data: Path, reference: Path, tmp_path: Path) -> None:
    """Rank 1 killed during step 5: rank 0 stops within seconds naming the step-4 checkpoint; the run then
    resumes with 1 process, or again with 2, to the uninterrupted run's weights and val loss (fp32, summation
    order aside)."""
    logs = tmp_path / "two"
    args = ["pretraining.py", *tiny_args(data, logs, "--run-id", RUN_ID, "--collective-timeout", "10")]
    t0 = time.monotonic()
    r = run([*TORCHRUN, f"--master_port={free_port()}", *faulty("kill@step=5@rank=1", args)], timeout=90)
    assert r.returncode != 0 and time.monotonic() - t0 < 60, r.stderr
    lost = [line for line in error_lines(r.stderr) if "rank 0 lost contact with the other ranks" in line]
    assert len(lost) == 1 and str(ckpt_path(logs / RUN_ID, 4)) in lost[0], r.stderr
    one = tmp_path / "one"
    shutil.copytree(logs, one)
    resume_latest(one, from_step=4)
    assert_close_final_state(one / RUN_ID, reference)
    again = run([*TORCHRUN, f"--master_port={free_port()}", "pretraining.py", "--resume", "latest",
                 "--log-dir", str(logs)])
    assert again.returncode == 0, again.stderr
    assert "world_size:2" in again.stdout and f"resumed_from:{logs / RUN_ID}" in again.stdout
    assert_close_final_state(logs / RUN_ID, reference)


def test_hung_rank_times_out(data: Path, tmp_path: Path) -> None:
    """Rank 1 stopped (alive, never answering): rank 0 gives up after --collective-timeout with one line."""
    args = faulty("stop@step=5@rank=1", ["pretraining.py", *tiny_args(data, tmp_path, "--run-id", RUN_ID,
                                                                       "--collective-timeout", "5")])
    dist_env = dict(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), WORLD_SIZE="2")
    ranks = [start(args, RANK=str(r), LOCAL_RANK=str(r), **dist_env) for r in (0, 1)]
    try:
        _, err = ranks[0].communicate(timeout=40)
        assert ranks[0].returncode == 1, err
        (line,) = err.splitlines()
        assert line.startswith("pretraining.py: error: rank 0 lost contact with the other ranks"), line
        # gloo words an expired timeout "Timed out ..." or, when the waiting side's pair closes first under load,
        # "Application timeout caused pair closure"
        assert re.search(r"timed out|timeout", line, re.I) and str(ckpt_path(tmp_path / RUN_ID, 4)) in line, line
    finally:
        for proc in ranks:
            proc.kill()  # SIGKILL ends a stopped process too
            proc.communicate(timeout=30)


# -----------------------------------------------------------------------------
# finetune.py: the same guarantees


FT_STEPS = 6


@pytest.fixture(scope="module")
def ft_inputs(data: Path, tmp_path_factory: pytest.TempPathFactory, shakespeare_data: Path) -> dict[str, Path]:
    """A tiny GPT-2-vocab parent (2 pretraining steps on the random shards) and the synthetic chat task: 40
    training conversations (JSONL) and 8 held-out ones (JSON). shakespeare_data provides the tokenizer ranks."""
    logs = tmp_path_factory.mktemp("ft_parent")
    r = run(["pretraining.py", *tiny_args(data, logs, "--run-id", "parent", "--vocab-size", "50257",
                                          "--num-iterations", "2", "--val-loss-every", "2")])
    assert r.returncode == 0, r.stderr
    train, heldout = R.import_data_script("chat_tasks").build(40, 8, seed=0)
    d = tmp_path_factory.mktemp("ft_tasks")
    (d / "train.jsonl").write_text("".join(json.dumps(c) + "\n" for c in train))
    (d / "heldout.json").write_text(json.dumps({"conversations": heldout}))
    return dict(parent=ckpt_path(logs / "parent", 2), train=d / "train.jsonl", heldout=d / "heldout.json")


def ft_args(inputs: dict[str, Path], log_dir: Path) -> list[str]:
    """finetune.py for 6 steps, validations at 0, 3, 6, checkpoints every 2 steps; fp32, uncompiled."""
    return ["finetune.py", "--checkpoint", str(inputs["parent"]), "--data", str(inputs["train"]),
            "--val-data", str(inputs["heldout"]), "--log-dir", str(log_dir), "--run-id", RUN_ID,
            "--num-iterations", str(FT_STEPS), "--val-loss-every", "3", "--save-every", "2",
            "--dtype", "fp32", "--compile", "off", "--device", "cpu"]


@pytest.fixture(scope="module")
def ft_reference(ft_inputs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The run directory of the uninterrupted fine-tuning run."""
    logs = tmp_path_factory.mktemp("ft_reference")
    r = run(ft_args(ft_inputs, logs))
    assert r.returncode == 0, r.stderr
    return logs / RUN_ID


FT_SIGNALS = [  # (fault, step of the checkpoint written on the way out)
    pytest.param("term@step=3", 4, id="mid-run"),
]


@pytest.mark.parametrize("spec, stopped_at", FT_SIGNALS)
def test_finetune_sigterm_saves_then_resume_is_bitwise_exact(spec: str, stopped_at: int, ft_inputs: dict[str, Path],
                                                             ft_reference: Path, tmp_path: Path) -> None:
    """SIGTERM during a step: a chat checkpoint after it, exit 0; --resume latest ends bit for bit as the
    uninterrupted fine-tuning run."""
    r = run(faulty(spec, ft_args(ft_inputs, tmp_path)))
    assert r.returncode == 0, r.stderr
    saved = ckpt_path(tmp_path / RUN_ID, stopped_at)
    assert r.stdout.splitlines()[-1] == (f"stopped by SIGTERM at step {stopped_at}: checkpoint {saved}; "
                                         f"continue with python finetune.py --resume latest")
    assert M.checkpoint_kind(saved) == "chat"
    resume_latest(tmp_path, "finetune.py")
    assert_same_final_state(tmp_path / RUN_ID, ft_reference, FT_STEPS)


def test_finetune_kill_before_first_checkpoint_restarts(ft_inputs: dict[str, Path], ft_reference: Path,
                                                        tmp_path: Path) -> None:
    """kill -9 before the first checkpoint: --resume latest starts again from run.json and ends bit for bit as
    the uninterrupted fine-tuning run."""
    r = run(faulty("kill@step=1", ft_args(ft_inputs, tmp_path)))
    assert r.returncode == -signal.SIGKILL, r.stderr
    assert M.newest_checkpoint(tmp_path / RUN_ID) is None
    out = resume_latest(tmp_path, "finetune.py")
    assert f"-> {tmp_path / RUN_ID} (resumed at step 0)" in out
    assert_same_final_state(tmp_path / RUN_ID, ft_reference, FT_STEPS)
