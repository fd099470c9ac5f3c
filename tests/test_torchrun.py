"""The torchrun contract of pretraining.py and finetune.py: the same global batch on one process and on
`torch.distributed.run --nproc_per_node=2` (gloo, CPU) gives the same losses (1e-5 relative) and weights (fp32),
because gradient accumulation, not the process count, sets the batch. In subprocesses, on conftest.py's tiny model.

    python -m pytest tests/test_torchrun.py -q      # about 1.5 min on 2 cores
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Callable, NamedTuple

import pytest

from conftest import assert_same_run, free_port, ft_args, metric_rows, run, tiny_args

pytestmark = pytest.mark.slow

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1"]


class Runs(NamedTuple):
    one: Path  # the run directory of the one-process run
    two: Path  # the run directory of the two-process run
    log: str  # the two-process run's console output
    steps: int  # optimizer steps of both runs (the step of their last checkpoint)


def pretraining_runs(request: pytest.FixtureRequest, tmp_path: Path) -> Runs:
    """6 steps of the tiny model on random shards, as one process and as two."""
    shard_dir = request.getfixturevalue("shard_dir")
    one = run([sys.executable, "pretraining.py", *tiny_args(shard_dir, tmp_path, "one")])
    assert one.returncode == 0, one.stderr
    two = run([*TORCHRUN, f"--master_port={free_port()}", "pretraining.py", *tiny_args(shard_dir, tmp_path, "two")])
    assert two.returncode == 0, two.stderr
    return Runs(tmp_path / "one", tmp_path / "two", two.stdout, 6)


def finetune_runs(request: pytest.FixtureRequest, tmp_path: Path) -> Runs:
    """4 Muon steps on the synthetic chat task from the tiny parent: conftest.py's `straight` run, and two processes."""
    straight, parent, (train, heldout) = (request.getfixturevalue(n) for n in ("straight", "parent", "task_files"))
    args = ft_args(tmp_path, "two", "--checkpoint", str(parent), "--data", str(train), "--val-data", str(heldout))
    two = run([*TORCHRUN, f"--master_port={free_port()}", *args])
    assert two.returncode == 0, two.stderr
    return Runs(straight, tmp_path / "two", two.stdout, 4)


RUNS: dict[str, Callable[[pytest.FixtureRequest, Path], Runs]] = {
    "pretraining.py": pretraining_runs, "finetune.py": finetune_runs}


@pytest.mark.parametrize("script", list(RUNS))
def test_torchrun_two_processes_match_one(script: str, request: pytest.FixtureRequest, tmp_path: Path) -> None:
    """Same global batch on 1 and 2 gloo processes: same losses (1e-5 rel) and weights (fp32); fine-tuning also
    trains the same number of assistant tokens at every step."""
    one, two, log, steps = RUNS[script](request, tmp_path)
    assert "world_size:2" in log
    if script == "pretraining.py":
        assert "accumulation:1" in log  # 2 rank-equivalents on 2 processes: one micro-batch each
    if script == "finetune.py":
        train1, train2 = metric_rows(one)[0], metric_rows(two)[0]
        assert [t["trained_tokens"] for t in train1] == [t["trained_tokens"] for t in train2]
    assert_same_run(one, two, steps)
