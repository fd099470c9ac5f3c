"""Several nodes: two torchrun launchers on localhost, each one "node" (`--nnodes=2`, one process each, c10d
rendezvous on a free loopback port), as docs/multinode.md starts them. Both launchers exit 0 and the run
equals one process on the same config (losses 1e-5 relative, weights in fp32), as tests/test_torchrun.py asks of
one launcher; a world size that does not divide --rank-equivalents stops both with one line. In subprocesses, on
conftest.py's tiny model.

    python -m pytest tests/test_multinode.py -q      # about 1.5-2 min on 2 cores
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import NamedTuple

import pytest

from conftest import REPO_DIR, assert_same_run, free_port, ft_args, metric_rows, run, tiny_args

pytestmark = pytest.mark.slow

NODES = 2


class Launchers(NamedTuple):
    codes: list[int]  # each launcher's exit status, node 0 first
    stdout: str  # every launcher's stdout (its ranks' output), node 0 first
    stderr: str


def two_nodes(argv: list[str], tmp_path: Path, timeout: float = 150) -> Launchers:
    """`torchrun --nnodes=2 --nproc-per-node=1 --rdzv-backend=c10d ... argv` started twice, as on two machines.

    Bounded: the rendezvous gives up after 60 s (a launcher that never comes), the ranks after --collective-timeout;
    past `timeout` both launchers get SIGTERM (which they pass on to their ranks, SIGKILLing them 5 s later) and,
    if still there, SIGKILL. Output goes to files: two launchers writing to pipes read one after the other could
    block each other."""
    port = free_port()
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nnodes={NODES}", "--nproc-per-node=1",
           "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}", f"--rdzv-id=test-{port}",
           "--rdzv-conf=join_timeout=60", "--local-addr=127.0.0.1", "--shutdown-timeout=5", *argv]
    env = {k: v for k, v in os.environ.items() if not k.startswith("NANOGPT_")}
    env["OMP_NUM_THREADS"] = "1"
    procs, files = [], []
    try:
        for node in range(NODES):
            out, err = (open(tmp_path / f"node{node}.{name}", "w+") for name in ("out", "err"))
            files += [out, err]
            procs.append(subprocess.Popen(cmd, cwd=REPO_DIR, env=env, stdout=out, stderr=err,
                                          start_new_session=True))
        deadline, hung = time.monotonic() + timeout, False
        for p in procs:
            try:
                p.wait(timeout=max(deadline - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                hung = True
                break
    finally:
        for sig, grace in ((signal.SIGTERM, 20), (signal.SIGKILL, 10)):
            for p in procs:
                if p.poll() is None:
                    os.killpg(p.pid, sig)
            for p in procs:
                try:
                    p.wait(timeout=grace)
                except subprocess.TimeoutExpired:
                    pass
    texts = []
    for f in files:
        f.seek(0)
        texts.append(f.read())
        f.close()
    codes = [p.returncode for p in procs]
    assert not hung, f"the launchers did not finish within {timeout} s (exit status {codes}):\n{''.join(texts)}"
    return Launchers(codes, "".join(texts[0::2]), "".join(texts[1::2]))


def test_two_nodes_pretraining_match_one_process(shard_dir: Path, tmp_path: Path) -> None:
    """6 steps on 2 nodes x 1 process: both launchers exit 0; same losses and weights as one process."""
    one = run([sys.executable, "pretraining.py", *tiny_args(shard_dir, tmp_path, "one")])
    assert one.returncode == 0, one.stderr
    two = two_nodes(["pretraining.py", *tiny_args(shard_dir, tmp_path, "two", "--collective-timeout", "60")],
                    tmp_path)
    assert two.codes == [0, 0], two.stderr
    assert "world_size:2" in two.stdout and "accumulation:1" in two.stdout
    assert "Traceback" not in two.stderr and "RendezvousConnectionError" not in two.stderr, two.stderr
    assert_same_run(tmp_path / "one", tmp_path / "two", steps=6)


def test_two_nodes_finetune_match_one_process(straight: Path, parent: Path, task_files: tuple[Path, Path],
                                              tmp_path: Path) -> None:
    """4 fine-tuning steps on 2 nodes x 1 process equal conftest.py's one-process `straight` run."""
    train, heldout = task_files
    args = ft_args(tmp_path, "two", "--checkpoint", str(parent), "--data", str(train), "--val-data", str(heldout),
                   "--collective-timeout", "60")
    two = two_nodes(args, tmp_path)
    assert two.codes == [0, 0], two.stderr
    assert "world_size:2" in two.stdout
    assert "Traceback" not in two.stderr and "RendezvousConnectionError" not in two.stderr, two.stderr
    train1, _ = metric_rows(straight)
    train2, _ = metric_rows(tmp_path / "two")
    assert [t["trained_tokens"] for t in train1] == [t["trained_tokens"] for t in train2]
    assert_same_run(straight, tmp_path / "two", steps=4)


def test_world_size_not_dividing_rank_equivalents(shard_dir: Path, tmp_path: Path) -> None:
    """--rank-equivalents=3 on 2 nodes x 1 process: every rank exits 2 with the same ConfigError, which rank 0 alone
    prints, once, with no traceback of ours; torchrun reports a failed worker as its own exit 1 (with its own
    ChildFailedError report, or, on the node whose store went away first, its RendezvousConnectionError)."""
    two = two_nodes(["pretraining.py", *tiny_args(shard_dir, tmp_path, "bad", "--rank-equivalents", "3",
                                                  "--collective-timeout", "60")], tmp_path)
    assert two.codes == [1, 1], two.stderr
    ours = [line for line in two.stderr.splitlines() if line.startswith("pretraining.py: error:")]
    assert ours == ["pretraining.py: error: --rank-equivalents=3 must be divisible by the world size 2 (each "
                    "process accumulates rank_equivalents / world_size micro-batches)"], two.stderr
    for name in ("pretraining.py", "model.py", "runs.py"):
        assert f'{REPO_DIR / name}", line' not in two.stderr, two.stderr  # no frame of ours in any traceback
    assert "exitcode  : 2" in two.stderr  # torchrun's report names the worker's exit status
