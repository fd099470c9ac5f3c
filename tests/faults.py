"""Run a script with faults injected at chosen points, for tests/test_faults.py.

    python tests/faults.py SPEC[,SPEC...] pretraining.py ARGS...

A SPEC is ACTION@POINT=N, optionally followed by @rank=R (only that torchrun rank acts):
    POINT  step=N   inside optimizer step N (after backward, before the update; steps count from 0)
           eval=N   at the start of the N-th validation (1-based)
           save=N   halfway through writing the checkpoint of step N
    ACTION kill     SIGKILL this process (kill -9)
           stop     SIGSTOP this process (a hung rank: alive, holding its sockets, never answering)
           term     send this process SIGTERM (what a preemptible cluster sends)
           int      send this process SIGINT (Ctrl-C)
           int2     SIGINT, then a second SIGINT 1.2 s later (quit at once)
           nan      fill one weight with NaN (at step=N: the update of step N spreads it)
           enospc   (save=N only) the write fails with 'No space left on device' after half the bytes

The hooks wrap model.py functions the scripts call through the module (M.apply_schedules, M.evaluate, torch.save),
so the script under test runs unmodified; then the script runs as __main__.
"""
from __future__ import annotations

import errno
import io
import os
import runpy
import signal
import sys
import time
from pathlib import Path
from typing import Any

REPO_DIR = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_DIR))

import torch  # noqa: E402

import model as M  # noqa: E402


def parse(specs: str) -> list[tuple[str, str, int]]:
    """'kill@step=3@rank=1,term@eval=2' -> [(action, point, n)] for this process's rank."""
    rank = int(os.environ.get("RANK", 0))
    faults = []
    for spec in specs.split(","):
        action, *parts = spec.split("@")
        where = dict(part.split("=") for part in parts)
        if int(where.pop("rank", rank)) != rank:
            continue
        (point, n), = where.items()
        faults.append((action, point, int(n)))
    return faults


def act(action: str, weights: list[torch.Tensor] | None = None) -> None:
    me = os.getpid()
    if action == "kill":
        os.kill(me, signal.SIGKILL)
    elif action == "stop":
        os.kill(me, signal.SIGSTOP)
    elif action == "term":
        os.kill(me, signal.SIGTERM)
    elif action in ("int", "int2"):
        os.kill(me, signal.SIGINT)
        if action == "int2":
            time.sleep(1.2)
            os.kill(me, signal.SIGINT)
    elif action == "nan":
        with torch.no_grad():
            weights[0].fill_(float("nan"))
    else:
        raise SystemExit(f"faults.py: unknown action {action!r}")


def install(faults: list[tuple[str, str, int]]) -> None:
    at = {(point, n): action for action, point, n in faults}
    evals = [0]
    apply_schedules, evaluate, save = M.apply_schedules, M.evaluate, torch.save

    def apply_schedules_hook(optimizers: list, step: int, hp: Any) -> None:
        action = at.get(("step", step))
        if action:
            act(action, [p for opt in optimizers for g in opt.param_groups for p in g["params"] if p.ndim >= 2])
        apply_schedules(optimizers, step, hp)

    def evaluate_hook(*args: Any, **kwargs: Any) -> float:
        evals[0] += 1
        action = at.get(("eval", evals[0]))
        if action:
            act(action)
        return evaluate(*args, **kwargs)

    def save_hook(obj: Any, f: Any, *args: Any, **kwargs: Any) -> None:
        action = at.get(("save", obj.get("step", -1))) if isinstance(obj, dict) and "optimizers" in obj else None
        if action not in ("kill", "enospc"):
            return save(obj, f, *args, **kwargs)
        buffer = io.BytesIO()
        save(obj, buffer, *args, **kwargs)
        f.write(buffer.getvalue()[:buffer.tell() // 2])
        f.flush()
        os.fsync(f.fileno())
        if action == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), getattr(f, "name", None))

    M.apply_schedules, M.evaluate, torch.save = apply_schedules_hook, evaluate_hook, save_hook


def main() -> None:
    specs, script, *argv = sys.argv[1:]
    install(parse(specs))
    sys.argv = [script, *argv]
    runpy.run_path(str(REPO_DIR / script), run_name="__main__")


if __name__ == "__main__":
    main()
