"""The harness: how a script starts, stops, resumes and fails.

model.py is the library (what is trained and how); this module is everything about running a script. Imports go
one way: scripts -> runs.py -> model.py (and scripts -> model.py); model.py never imports this file.

Sections, in order:
    Flags           CLI, environment and .env into Hyperparameters; generated --help
    Run directories RunDir (path, run id, lock), run.json, preflight disk and writability checks
    RunLog          log.txt and metrics.jsonl, written by rank 0, and the trackers it feeds
    Trackers        TensorBoard and Weights & Biases sinks: lazy imports, rank 0, resume without duplicates
    Resume          --resume latest | RUN_DIR | CHECKPOINT into a Resume
    Saver           checkpoints: finite weights only, atomic, pruned, a failed write keeps the previous one
    Stopping        StopSignal, divergence, lost ranks, the exit policy
    Script helpers  import_data_script, warm_up_steps, the compile notice
    Progress        tqdm bars on stderr for long work without step lines, only on a terminal

Exit codes of every script: 0 done (or stopped by SIGTERM/SIGINT after writing a checkpoint); 1 a run that cannot
go on (model.TrainingError, a lost rank, a failed write); 2 bad input (model.USER_ERRORS, argparse); 130 a second
Ctrl-C. Each failure is one line on stderr naming the file, record or flag, and the newest checkpoint where it helps.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import glob
import json
import os
import platform
import re
import shutil
import signal
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, NoReturn

import torch
import torch.distributed as dist
from torch import nn

import model as M
from model import CheckpointError, ConfigError, Hyperparameters, Runtime, TrainingError

# -----------------------------------------------------------------------------
# Flags: CLI, environment and .env into Hyperparameters


def did_you_mean(name: str, choices: list[str], prefix: str = "") -> str:
    """' (did you mean --num-iterations?)' for a close known name, else ''."""
    import difflib

    close = difflib.get_close_matches(name, choices, n=1, cutoff=0.75)
    return f" (did you mean {prefix}{close[0]}?)" if close else ""


class OneLineParser(argparse.ArgumentParser):
    """argparse that reports bad flags as one line (no usage block), with the closest known flag, and exits 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        if message.startswith("unrecognized arguments: "):
            unknown = [w.split("=")[0] for w in message.split(": ", 1)[1].split() if w.startswith("--")]
            message += did_you_mean(unknown[0], list(self._option_string_actions)) if unknown else ""
        self.exit(2, f"{self.prog}: error: {message}\n")


ENV_PREFIX = "NANOGPT_"  # NANOGPT_NUM_ITERATIONS=20 sets num_iterations


def field_comments(cls: type = Hyperparameters) -> dict[str, str]:
    """Each field's comment, the one place a field is documented: the comment after the field, with the lines of a
    comment that wraps (they continue with a hanging indent, `#   more text`)."""
    import inspect

    source = inspect.getsource(cls).replace("\n    #   ", " ")
    return dict(re.findall(r"^    (\w+): \w+ = .*?  # (.*)$", source, flags=re.MULTILINE))


def build_arg_parser(prog: str, description: str = "") -> argparse.ArgumentParser:
    """A CLI generated from Hyperparameters: --num-iterations 20 (or --num_iterations 20)."""
    parser = OneLineParser(prog=prog, description=description, allow_abbrev=False,
                           epilog=f"Every flag is also an environment variable ({ENV_PREFIX}NUM_ITERATIONS=20) "
                                  "or a .env line. Precedence: CLI > environment > .env > preset > default.")
    parser.add_argument("--preset", choices=sorted(M.PRESETS), help="named starting point (default: speedrun with "
                        f"CUDA and FineWeb shards, else {CPU_DEFAULT_PRESET})")
    comments = field_comments()
    for f in dataclasses.fields(Hyperparameters):
        if f.name == "preset":
            continue
        flags = [f"--{M._flag(f.name)}"] + ([f"--{f.name}"] if "_" in f.name else [])
        parser.add_argument(*flags, dest=f.name, default=argparse.SUPPRESS, metavar=str(f.type).upper(),
                            help=f"{comments.get(f.name, '')} (default {f.default!r})")
    return parser


def explicit_overrides(argv: list[str] | None = None, prog: str = "pretraining.py",
                       env: dict[str, str] | None = None, dotenv_path: str | None = ".env",
                       parser: argparse.ArgumentParser | None = None) -> dict[str, Any]:
    """Values the user set (CLI over process environment over .env), typed; 'preset' included when given.

    parser: build_arg_parser(prog) with a script's own flags added (finetune.py); those are left out here."""
    from dotenv import dotenv_values

    known = {f.name for f in dataclasses.fields(Hyperparameters)}
    args = vars((parser or build_arg_parser(prog)).parse_args(argv))
    args = {k: v for k, v in args.items() if k in known}
    merged_env: dict[str, str] = {}
    if dotenv_path and Path(dotenv_path).is_file():
        merged_env.update({k: v for k, v in dotenv_values(dotenv_path).items() if v is not None})
    merged_env.update(os.environ if env is None else env)
    values: dict[str, Any] = {}
    for key, raw in merged_env.items():
        if not key.startswith(ENV_PREFIX) or key == "NANOGPT_RANKS_FILE":
            continue
        name = key[len(ENV_PREFIX):].lower()
        if name not in known:
            hint = did_you_mean(name.upper(), [k.upper() for k in known], ENV_PREFIX)
            raise ConfigError(f"environment variable {key} names no hyperparameter{hint}")
        values[name] = raw
    # argparse turns `--flag=--` into [] (its "--" marker); the user meant the text "--"
    values.update({k: "--" if v == [] else v for k, v in args.items() if v is not None})
    return {k: M._coerce(k, v) for k, v in values.items()}


CPU_DEFAULT_PRESET = "shakespeare2026"  # the default without CUDA or FineWeb (docs/optimizer.md, "Ablation")


def default_preset() -> str:
    """speedrun when CUDA and FineWeb shards are both present, else CPU_DEFAULT_PRESET."""
    has_fineweb = bool(glob.glob(str(M.resolve_path(M.PRESETS["speedrun"].get(
        "train_files", Hyperparameters.train_files)))))
    return "speedrun" if torch.cuda.is_available() and has_fineweb else CPU_DEFAULT_PRESET


def config_from_overrides(values: dict[str, Any]) -> Hyperparameters:
    """Explicit values (from explicit_overrides) on top of their preset, or the default preset."""
    values = dict(values)
    preset = values.pop("preset", None) or default_preset()
    if preset not in M.PRESETS:
        raise ConfigError(f"--preset={preset!r} must be one of {', '.join(sorted(M.PRESETS))}")
    return Hyperparameters(**dict(M.PRESETS[preset], preset=preset, **values))


def load_config(argv: list[str] | None = None, prog: str = "pretraining.py", env: dict[str, str] | None = None,
                dotenv_path: str | None = ".env") -> Hyperparameters:
    """Precedence: CLI > process environment > .env file > preset > dataclass default.

    Raises ConfigError for bad values; argparse itself exits 2 on unknown flags.
    """
    return config_from_overrides(explicit_overrides(argv, prog, env, dotenv_path))


def import_plugins(hp: Hyperparameters) -> None:
    """--plugins a.b,c: import each module (from the working directory too) so it can register components, such as
    custom loss modifiers with model.register_loss_modifier."""
    import importlib

    for name in (part.strip() for part in hp.plugins.split(",")):
        if not name:
            continue
        added = os.getcwd() not in sys.path
        if added:
            sys.path.append(os.getcwd())
        try:
            importlib.import_module(name)
        except Exception as e:  # noqa: BLE001 - any error in the user's module is theirs to see, on one line
            raise ConfigError(f"--plugins: cannot import {name!r} ({type(e).__name__}: {M.first_line(e)})") from None
        finally:
            if added:
                sys.path.remove(os.getcwd())


def check_extensions(hp: Hyperparameters) -> None:
    """Before anything is written: plugins import, every loss modifier is known, every tracker can start."""
    check_tracker_names(hp)
    import_plugins(hp)
    M.loss_modifiers(hp)
    check_trackers(hp)


def loss_parts_text(parts: dict[str, float]) -> str:
    """ ' (ce:4.1234 z_loss:0.0012 ...)' for a step line; '' when nothing modifies the loss."""
    return f" ({' '.join(f'{k}:{v:.4f}' for k, v in parts.items())})" if parts else ""


# -----------------------------------------------------------------------------
# Run directories: RunDir, run.json, the lock, preflight checks

RUN_INFO = "run.json"  # what started a run: its script and config, so a run killed before any checkpoint resumes


@dataclass
class RunDir:
    """logs/<run_id>/ of the running script; rank 0 holds its lock until close() (or until the process dies)."""
    path: Path
    lock: Any = None  # open file holding the flock on path/.lock; None on other ranks

    @property
    def run_id(self) -> str:
        return self.path.name

    def close(self) -> None:
        if self.lock is not None:
            self.lock.close()
            self.lock = None


def new_run_dir(log_dir: str | Path, run_id: str) -> Path:
    """A fresh run directory; two runs started at once never share one (mkdir fails if it exists)."""
    run_dir = Path(log_dir) / (run_id or time.strftime("%Y%m%d-%H%M%S") + "-" + uuid.uuid4().hex[:6])
    try:
        run_dir.mkdir(parents=True, exist_ok=False)
    except FileExistsError:
        raise ConfigError(f"run directory {run_dir} already exists; pick another --run-id or --resume") from None
    except OSError as e:
        raise ConfigError(f"cannot create run directory {run_dir}: {e.strerror}") from None
    return run_dir


def lock_run_dir(run_dir: Path) -> Any:
    """An exclusive lock on run_dir/.lock for the life of the process (the kernel drops it when the process dies,
    even by kill -9), so two processes never train into one run, e.g. two `--resume latest` at once."""
    import fcntl  # POSIX only; imported here so the module still imports on Windows

    handle = open(run_dir / ".lock", "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        owner = handle.read().strip() or "?"
        handle.close()
        raise ConfigError(f"run directory {run_dir} is in use by another process (pid {owner}); wait for it to "
                          f"finish or pick another run") from None
    handle.truncate(0)
    handle.write(str(os.getpid()))
    handle.flush()
    return handle


def check_writable(run_dir: Path) -> None:
    """Fail before training, not at the first checkpoint, when the run directory cannot be written."""
    probe = run_dir / f".write_test{os.getpid()}"
    try:
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as e:
        raise CheckpointError(f"{run_dir}: cannot write to the run directory ({e.strerror}); "
                              f"pick another --log-dir") from None


def checkpoint_bytes(model: nn.Module, optimizers: list[torch.optim.Optimizer]) -> int:
    """Size of a checkpoint before the first step has created optimizer state: the weights and what the
    optimizers' state will hold after step 1 (model.optimizer_state_bytes)."""
    return sum(p.numel() * p.element_size() for p in model.parameters()) + M.optimizer_state_bytes(optimizers)


def check_disk_space(run_dir: Path, hp: Hyperparameters, bytes_per_checkpoint: int) -> None:
    """Before training: room for the checkpoints the run keeps at once (plus the one being written)."""
    if not hp.save_checkpoint:
        return
    saves = hp.num_iterations // hp.val_loss_every + 1 if hp.val_loss_every else 1
    if hp.save_every:
        saves += hp.num_iterations // hp.save_every
    at_once = min(saves, hp.keep_checkpoints + 1) if hp.keep_checkpoints else saves
    present = sum(p.stat().st_size for p in M.run_checkpoints(run_dir))  # replaced as the run goes on
    need = at_once * bytes_per_checkpoint - present
    free = shutil.disk_usage(run_dir).free
    if need > free:
        raise CheckpointError(f"{run_dir}: not enough disk space: the run keeps up to {at_once} checkpoint(s) of "
                              f"about {bytes_per_checkpoint / 2**20:,.0f} MiB but only {free / 2**20:,.0f} MiB are "
                              f"free; free some, pick another --log-dir, lower --keep-checkpoints or pass "
                              f"--save-checkpoint false")


def trim_metrics(path: Path, step: int) -> None:
    """On resume from `step`, drop metrics a killed run logged after it (they are logged again) and any line a
    kill cut short; the train line of `step` itself came before the checkpoint and stays."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            record = json.loads(line)
            keep = record["step"] < step or (record["step"] == step and "train_loss" in record)
        except (ValueError, KeyError, TypeError):
            keep = False
        if keep:
            kept.append(line + "\n")
    with M.atomic_write(path, "w") as f:
        f.writelines(kept)


def set_aside_later_checkpoints(run_dir: Path, step: int) -> list[Path]:
    """A run resumed from an earlier checkpoint than its newest starts a new branch: its checkpoints past `step`
    move to run_dir/superseded/ (kept, never deleted), so `--resume latest` and pruning see only the new branch, as
    metrics.jsonl does after trim_metrics."""
    later = [p for p in M.run_checkpoints(run_dir) if int(M.CHECKPOINT_RE.fullmatch(p.name).group(1)) > step]
    if not later:
        return []
    aside = run_dir / "superseded"
    aside.mkdir(exist_ok=True)
    moved = []
    for p in later:
        target = aside / p.name
        if target.exists():  # set aside twice at the same step: keep both
            target = aside / f"{p.stem}.{time.strftime('%Y%m%d-%H%M%S')}{p.suffix}"
        p.rename(target)
        moved.append(target)
    print(f"{run_dir}: resuming at step {step}: {len(moved)} later checkpoint(s) moved to {aside}/", flush=True)
    return moved


def _prepare_run_dir(hp: Hyperparameters, script: str, resume_step: int | None, bytes_per_checkpoint: int,
                     info: dict[str, Any]) -> RunDir:
    """Rank 0's part of open_run_dir: create or reuse, lock, check, and record the run."""
    if resume_step is None:
        path = new_run_dir(hp.log_dir, hp.run_id)
    else:
        path = Path(hp.log_dir) / hp.run_id
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ConfigError(f"cannot create run directory {path}: {e.strerror}") from None
    run = RunDir(path, lock_run_dir(path))
    try:
        check_writable(path)
        check_disk_space(path, hp, bytes_per_checkpoint)
    except CheckpointError:
        run.close()
        if resume_step is None:  # a refused start leaves no run behind
            shutil.rmtree(path, ignore_errors=True)
        raise
    if resume_step is not None:
        for partial in path.glob(".state_step*.pt.tmp*"):  # left by a write that was killed
            partial.unlink(missing_ok=True)
        trim_metrics(path / "metrics.jsonl", resume_step)
        set_aside_later_checkpoints(path, resume_step)
    if resume_step is None or not (path / RUN_INFO).exists():
        config = dict(hp.to_dict(), run_id=run.run_id)
        with M.atomic_write(path / RUN_INFO, "w") as f:
            json.dump(dict(script=script, hyperparameters=config, **info), f, indent=1)
    return run


def open_run_dir(hp: Hyperparameters, rt: Runtime, script: str, resume_step: int | None = None,
                 bytes_per_checkpoint: int = 0, info: dict[str, Any] | None = None) -> RunDir:
    """The run directory, prepared by rank 0 and broadcast: a new one (named hp.run_id, or a timestamp when that is
    empty), or on resume (resume_step = the step the run continues from) the run's own, with partial writes removed
    and metrics past that step dropped. run.json records the script, the config and `info`. Every rank raises rank
    0's error, so a refused start leaves none waiting."""
    run, error = None, None
    if rt.master:
        try:
            run = _prepare_run_dir(hp, script, resume_step, bytes_per_checkpoint, info or {})
        except (ConfigError, CheckpointError) as e:
            error = e
    if rt.distributed:
        shared = [None if run is None else str(run.path), None if error is None else str(error)]
        dist.broadcast_object_list(shared, src=0)
        if shared[1] is not None and error is None:
            error = CheckpointError(shared[1])
        if run is None and error is None:
            run = RunDir(Path(shared[0]))
    if error is not None:
        raise error
    return run


def read_run_info(run_dir: Path) -> dict[str, Any] | None:
    try:
        info = json.loads((run_dir / RUN_INFO).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return info if isinstance(info, dict) else None


# -----------------------------------------------------------------------------
# RunLog: log.txt and metrics.jsonl, written by rank 0


class RunLog:
    """A run's log.txt (the code, the config, then every line the script prints) and metrics.jsonl (one JSON object
    per call, flushed at once, so a kill -9 loses no logged step), plus the trackers asked for, which get the same
    config, code and scalars. Only rank 0 prints or writes. A tracker that fails warns once and is dropped: the run
    and the other sinks go on, and metrics.jsonl stays the source of truth."""

    def __init__(self, rt: Runtime, run_dir: Path, trackers: list["Tracker"] | None = None):
        self.master = rt.master
        self.logfile = run_dir / "log.txt"
        self._metrics = open(run_dir / "metrics.jsonl", "a") if self.master else None
        self.trackers = list(trackers or []) if self.master else []

    def print(self, msg: str, console: bool = True) -> None:
        if not self.master:
            return
        if console:
            print(msg, flush=True)
        with open(self.logfile, "a", encoding="utf-8") as f:
            f.write(msg + "\n")

    def header(self, hp: Hyperparameters, code: dict[str, str]) -> None:
        """The code that ran, the versions and the config first, as the record's logs begin."""
        for name, src in code.items():
            self.print(f"==> {name} <==\n{src}", console=False)
        self.print("=" * 100, console=False)
        self.print(f"Running Python {sys.version.split()[0]} on {platform.platform()}", console=False)
        self.print(f"Running PyTorch {torch.__version__} compiled for CUDA {torch.version.cuda}", console=False)
        self.print("config: " + json.dumps(hp.to_dict()), console=False)
        self.print("=" * 100, console=False)
        self._each("record the config", lambda t: t.config(hp, code))

    def metrics(self, **record: Any) -> None:
        if self._metrics is None:
            return
        self._metrics.write(json.dumps(record) + "\n")
        self._metrics.flush()
        scalars = tracker_scalars(record)
        self._each(f"log step {record.get('step')}", lambda t: t.scalars(record["step"], scalars))

    def _each(self, what: str, call: Any) -> None:
        for tracker in list(self.trackers):
            try:
                call(tracker)
            except Exception as e:  # noqa: BLE001 - a tracker must never stop training
                self.trackers.remove(tracker)
                print(f"warning: the {tracker.name} tracker failed to {what} ({type(e).__name__}: "
                      f"{M.first_line(e)}); continuing without it (metrics.jsonl has every step)",
                      file=sys.stderr, flush=True)
                with contextlib.suppress(Exception):
                    tracker.close()

    def close(self) -> None:
        if self._metrics is not None:
            self._metrics.close()
            self._metrics = None
        self._each("close", lambda t: t.close())
        self.trackers = []


# -----------------------------------------------------------------------------
# Trackers: TensorBoard and Weights & Biases, imported only when asked for, written by rank 0

TRACKERS = ("tensorboard", "wandb")  # what --trackers accepts
TRACKER_PACKAGES = {"tensorboard": "tensorboard==2.21.0", "wandb": "wandb==0.31.0"}  # as pinned in requirements-test.txt
TRACKER_MODULES = {"tensorboard": "torch.utils.tensorboard", "wandb": "wandb"}


def tracker_names(hp: Hyperparameters) -> list[str]:
    """--trackers as a list: 'tensorboard, wandb' -> ['tensorboard', 'wandb']."""
    return [name.strip() for name in hp.trackers.split(",") if name.strip()]


def check_tracker_names(hp: Hyperparameters) -> None:
    """Every name in --trackers is one this harness writes."""
    if bad := sorted(set(tracker_names(hp)) - set(TRACKERS)):
        raise ConfigError(f"--trackers={hp.trackers!r}: unknown tracker {bad[0]!r} (choose from "
                          f"{', '.join(TRACKERS)})")


def tracker_scalars(record: dict[str, Any]) -> dict[str, float]:
    """The numbers of a metrics record that trackers get (live and when TensorBoard replays metrics.jsonl): every
    numeric value but the step."""
    return {k: v for k, v in record.items() if k != "step" and isinstance(v, (int, float))}


class Tracker:
    """A sink of RunLog: the config and code once, then every metrics record's numbers at its step."""
    name = ""

    def config(self, hp: Hyperparameters, code: dict[str, str]) -> None:
        raise NotImplementedError

    def scalars(self, step: int, values: dict[str, float]) -> None:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError


def tracker_root(hp: Hyperparameters, run_dir: Path) -> Path:
    """The run directory, or --tracker-dir/<run_id> (one folder per run, so `tensorboard --logdir` sees them all)."""
    return Path(hp.tracker_dir) / run_dir.name if hp.tracker_dir else run_dir


def check_trackers(hp: Hyperparameters) -> None:
    """Before anything is written: every tracker asked for is known and imports, and --tracker-dir can be written."""
    import importlib

    check_tracker_names(hp)
    for name in tracker_names(hp):
        try:
            importlib.import_module(TRACKER_MODULES[name])
        except ImportError:
            raise ConfigError(f"--trackers={name} needs the {name} package, which is not installed: "
                              f"pip install {TRACKER_PACKAGES[name]}") from None
    if tracker_names(hp) and hp.tracker_dir:
        root = Path(hp.tracker_dir)
        try:
            root.mkdir(parents=True, exist_ok=True)
            check_writable(root)
        except (OSError, CheckpointError) as e:
            reason = e.strerror if isinstance(e, OSError) else "not writable"
            raise ConfigError(f"--tracker-dir={hp.tracker_dir}: cannot write there ({reason})") from None


class TensorBoardTracker(Tracker):
    """Event files in <tracker root>/tensorboard, one scalar per metrics key (tag = the key, step = the step).

    On resume the folder is rebuilt from metrics.jsonl (already trimmed to the resume step): earlier event files
    move to superseded/ and the kept records are written again, so the events hold exactly metrics.jsonl's
    scalars, with no step twice, whatever a killed run had written."""
    name = "tensorboard"

    def __init__(self, directory: Path, metrics_file: Path, resumed: bool):
        from torch.utils.tensorboard import SummaryWriter

        if resumed:  # renamed so that `tensorboard --logdir` no longer reads them
            aside = directory.parent / "superseded"
            for old in sorted(directory.glob("events.out.tfevents.*")):
                aside.mkdir(exist_ok=True)
                old.rename(aside / old.name.replace("tfevents", "superseded"))
        directory.mkdir(parents=True, exist_ok=True)
        check_writable(directory)
        self.writer = SummaryWriter(str(directory), max_queue=1000, flush_secs=3600)
        if resumed and metrics_file.exists():
            for line in metrics_file.read_text(encoding="utf-8").splitlines():
                record = json.loads(line)
                self._add(record["step"], tracker_scalars(record))
            self.writer.flush()

    def config(self, hp: Hyperparameters, code: dict[str, str]) -> None:
        self.writer.add_text("config", "```\n" + json.dumps(hp.to_dict(), indent=1) + "\n```")
        for name, src in code.items():
            self.writer.add_text(f"code/{name}", "```python\n" + src + "\n```")
        self.writer.flush()

    def _add(self, step: int, values: dict[str, float]) -> None:
        for key, value in values.items():
            self.writer.add_scalar(key, value, step)

    def scalars(self, step: int, values: dict[str, float]) -> None:
        self._add(step, values)
        self.writer.flush()  # as metrics.jsonl is: a kill loses no logged step

    def close(self) -> None:
        self.writer.close()


class WandbTracker(Tracker):
    """A Weights & Biases run with the id kept in run.json, so --resume continues the same run. WANDB_MODE=offline
    records under <tracker root>/wandb with no network (`wandb sync` uploads it later). W&B keeps one value per key
    and step: where two records of one step share a key (train_time_ms at a validation step), the later one."""
    name = "wandb"

    def __init__(self, directory: Path, hp: Hyperparameters, wandb_id: str):
        import wandb

        directory.mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(project=hp.wandb_project, id=wandb_id, name=hp.run_id, resume="allow",
                              dir=str(directory), config=hp.to_dict(),
                              settings=wandb.Settings(console="off", quiet=True))

    def config(self, hp: Hyperparameters, code: dict[str, str]) -> None:
        self.run.config.update(hp.to_dict(), allow_val_change=True)
        code_dir = Path(self.run.dir) / "code"  # the run's files: `wandb sync` uploads them with it
        code_dir.mkdir(parents=True, exist_ok=True)
        for name, src in code.items():
            (code_dir / name).write_text(src, encoding="utf-8")

    def scalars(self, step: int, values: dict[str, float]) -> None:
        self.run.log(values, step=step)

    def close(self) -> None:
        self.run.finish()


def wandb_run_id(run_dir: Path) -> str:
    """The W&B id recorded in run.json; a run that has none yet (started without W&B) gets one now."""
    info = read_run_info(run_dir) or {}
    if not info.get("wandb_id"):
        info["wandb_id"] = uuid.uuid4().hex[:12]
        with M.atomic_write(run_dir / RUN_INFO, "w") as f:
            json.dump(info, f, indent=1)
    return info["wandb_id"]


def open_trackers(hp: Hyperparameters, rt: Runtime, run_dir: Path, resumed: bool) -> list[Tracker]:
    """The trackers of --trackers, started on rank 0 before training; one that cannot start is a ConfigError."""
    if not rt.master:
        return []
    root, trackers = tracker_root(hp, run_dir), []
    for name in tracker_names(hp):
        try:
            if name == "tensorboard":
                trackers.append(TensorBoardTracker(root / "tensorboard", run_dir / "metrics.jsonl", resumed))
            else:
                trackers.append(WandbTracker(root, hp, wandb_run_id(run_dir)))
        except Exception as e:  # noqa: BLE001 - whatever a tracker's package raises
            for started in trackers:
                with contextlib.suppress(Exception):
                    started.close()
            if not resumed:  # a refused start leaves no run behind
                shutil.rmtree(run_dir, ignore_errors=True)
                shutil.rmtree(root, ignore_errors=True)
            hint = "; WANDB_MODE=offline records locally, with no account" if name == "wandb" else ""
            raise ConfigError(f"--trackers={name}: the tracker could not start ({type(e).__name__}: "
                              f"{M.first_line(e)}){hint}") from None
    return trackers


# -----------------------------------------------------------------------------
# Resume: --resume latest | RUN_DIR | CHECKPOINT


def _run_script(run_dir: Path) -> str | None:
    """Which script a run belongs to: run.json says; runs without one (train_gpt.py's, older ones) by their
    newest checkpoint's kind."""
    info = read_run_info(run_dir)
    if info is not None:
        return info.get("script")
    newest = M.newest_checkpoint(run_dir)
    if newest is None:
        return None
    return "finetune.py" if M.checkpoint_kind(newest) == "chat" else "pretraining.py"


def latest_run(log_dir: str | Path, script: str) -> Path | None:
    """The run of `script` under log_dir that was active last (newest file in it), checkpointed or not."""
    runs = [d for d in Path(log_dir).glob("*") if d.is_dir() and _run_script(d) == script]
    if not runs:
        return None
    return max(runs, key=lambda d: max((f.stat().st_mtime for f in d.iterdir()), default=d.stat().st_mtime))


def resume_target(spec: str, log_dir: str | Path, script: str) -> tuple[Path, Path | None]:
    """(run directory, newest checkpoint or None) for --resume latest | RUN_DIR | CHECKPOINT (model.resolve_path)."""
    path = M.resolve_path(spec)
    if spec == "latest":
        run_dir = latest_run(log_dir, script)
        if run_dir is None:
            raise CheckpointError(f"no {script} run under {log_dir}/ to resume (start one with python {script})")
    elif path.is_dir():
        run_dir = path
        if _run_script(run_dir) != script:
            raise CheckpointError(f"{path}: not a {script} run directory (no {RUN_INFO} or checkpoints of it)")
    elif path.is_file():
        return path.parent, path
    else:
        raise CheckpointError(f"{path}: checkpoint not found")
    return run_dir, M.newest_checkpoint(run_dir)


@dataclass
class Resume:
    """What --resume found: the run, its newest checkpoint and the config the run was started with."""
    run_dir: Path
    checkpoint: Path | None  # None: the run was killed before its first checkpoint and starts again from step 0
    state: dict | None  # the loaded checkpoint
    config: Hyperparameters  # the run's own config (its checkpoint's, else run.json's)
    record: dict  # the checkpoint, else run.json: where a fine-tuning run keeps its lineage

    @property
    def target(self) -> str:
        """What hp.resume records: the checkpoint, or the run directory when there is none."""
        return str(self.checkpoint or self.run_dir)


def resolve_resume(spec: str, log_dir: str | Path, script: str) -> Resume:
    """The run to continue for pretraining.py or finetune.py, refusing the other script's runs and checkpoints."""
    chat = script == "finetune.py"
    run_dir, path = resume_target(spec, log_dir, script)
    if path is None:
        info = read_run_info(run_dir)
        config = M.saved_config(info, run_dir / RUN_INFO)
        if chat and "finetune" not in info:
            raise CheckpointError(f"{run_dir / RUN_INFO}: not a fine-tuning run")
        return Resume(run_dir, None, None, config, info)
    state = M.load_checkpoint(path)
    if chat and (state.get("kind") != "chat" or "finetune" not in state):
        raise CheckpointError(f"{path}: not a fine-tuning checkpoint (resume pretraining with pretraining.py)")
    if not chat and "hyperparameters" not in state:
        raise CheckpointError(f"{path}: has no hyperparameters (a record checkpoint cannot be resumed)")
    if not chat and state.get("kind") == "chat":
        raise CheckpointError(f"{path}: a fine-tuned checkpoint; continue it with finetune.py --resume")
    return Resume(run_dir, path, state, M.saved_config(state, path), state)


# -----------------------------------------------------------------------------
# Saver: checkpoints of a running script

DIVERGENCE_HINT = ("Lower the learning rates (--muon-lr, --embed-lr, --head-lr, --scalar-lr) or use --dtype fp32, "
                   "then start again or --resume")


def diverged(problem: str, previous: Path | None, hint: str = DIVERGENCE_HINT) -> TrainingError:
    """The one-line error of a run that went non-finite: what, the checkpoint that is still good, what to change."""
    kept = f"the newest good checkpoint is {previous}" if previous else "no checkpoint was written yet"
    return TrainingError(f"{problem}; stopped without writing a checkpoint ({kept}). {hint}")


def write_failure(error: BaseException) -> OSError | None:
    """The OSError behind a failed write. torch.save's zip writer reports a write the kernel refused part way (full
    disk, file-size limit) as a RuntimeError ("unexpected pos ..."), with the OSError as its context."""
    while error is not None and not isinstance(error, OSError):
        error = error.__cause__ or error.__context__
    return error


class Saver:
    """Rank 0 writes the run's checkpoints. Non-finite weights are refused (a NaN checkpoint would become `latest`
    and replace a good one), older checkpoints are pruned only after the new one is in place, and a failed write is
    one TrainingError that names the previous checkpoint, which stays intact. `extra` goes into every checkpoint;
    `hint` is what the divergence error tells the user to change (the script's own flags)."""

    def __init__(self, rt: Runtime, run: RunDir, hp: Hyperparameters, code: dict[str, str],
                 extra: dict[str, Any] | None = None, hint: str = DIVERGENCE_HINT):
        self.rt, self.run, self.hp, self.code = rt, run, hp, code
        self.extra, self.hint = extra or {}, hint

    def newest(self) -> Path | None:
        return M.newest_checkpoint(self.run.path)

    def diverged(self, problem: str) -> TrainingError:
        return diverged(problem, self.newest(), self.hint)

    def save(self, step: int, model: nn.Module, optimizers: list[torch.optim.Optimizer],
             data_position: dict[str, int] | None, val_loss: float | None, val_step: int | None,
             **extra: Any) -> Path | None:
        """Checkpoint `step` with the last validation (loss, step): a run stopped before its final validation is
        then not mistaken for a finished one. Other ranks, and runs with --save-checkpoint false, write nothing."""
        if not (self.rt.master and self.hp.save_checkpoint):
            return None
        path = M.checkpoint_path(self.run.path.parent, self.run.run_id, step)
        previous = self.newest()
        bad = [name for name, p in model.named_parameters() if not bool(torch.isfinite(p).all())]
        if bad:
            raise diverged(f"step {step}: {len(bad)} parameter tensor(s) hold NaN or inf (first: {bad[0]})",
                           previous, self.hint)
        try:
            M.save_checkpoint(path, step=step, model=model, optimizers=optimizers, hp=self.hp, code=self.code,
                              data_position=data_position, val_loss=val_loss,
                              extra={**self.extra, "val_step": val_step, **extra})
        except (OSError, RuntimeError) as e:
            cause = write_failure(e)
            if cause is None:
                raise
            kept = f"the previous checkpoint {previous} is intact" if previous else "no earlier checkpoint exists"
            raise TrainingError(f"{path}: checkpoint not written ({cause.strerror or cause}); {kept}. Free space or "
                                f"fix the directory, then continue with --resume latest") from None
        M.prune_checkpoints(self.run.path, self.hp.keep_checkpoints)  # only after the new one is safely in place
        return path


# -----------------------------------------------------------------------------
# Stopping: signals, lost ranks, the exit policy


class StopSignal:
    """SIGTERM or SIGINT asks the training loop to write a checkpoint after the current step and exit 0.

    Preemptible clusters send SIGTERM and allow a grace period before SIGKILL; Ctrl-C sends SIGINT. The handler only
    sets a flag, which the loop reads between steps (ranks agree on it through one scalar all_reduce, so all stop at
    the same step). A second Ctrl-C raises KeyboardInterrupt at once, unless it comes within a second of the first:
    torchrun forwards the terminal's SIGINT to workers that already received it from the terminal.
    """

    def __init__(self, rank: int = 0):
        self.rank = rank
        self.name: str | None = None
        self._at = 0.0
        self._previous: dict[int, Any] = {}

    def install(self) -> "StopSignal":
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame: Any) -> None:
        if self.name is None:
            self.name, self._at = signal.Signals(signum).name, time.monotonic()
            if self.rank == 0:  # os.write: print() is not safe to re-enter from a signal handler
                os.write(2, f"{self.name} received: writing a checkpoint after the current step "
                            f"(Ctrl-C again to quit without one)\n".encode())
        elif signum == signal.SIGINT and time.monotonic() - self._at > 1.0:
            raise KeyboardInterrupt

    def report(self, step: int, path: Path | None, script: str) -> str:
        """The line a stopped run ends with: where its checkpoint is and how to continue."""
        saved = f"checkpoint {path}; continue with python {script} --resume latest" if path else "no new step to save"
        return f"stopped by {self.name} at step {step}: {saved}"

    def requested(self, rt: Runtime) -> bool:
        """Whether any rank was signalled (a collective under torchrun: call it on every rank at the same point)."""
        if not rt.distributed:
            return self.name is not None
        flag = torch.tensor(float(self.name is not None), device=rt.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())


def lost_rank(error: BaseException, rt: Runtime | None) -> bool:
    """A collective failed because another rank died (connection reset) or hung (timeout)."""
    if rt is None or not rt.distributed:
        return False
    # gloo and NCCL raise plain RuntimeErrors; these are the phrases of a dead peer or an expired collective timeout
    return isinstance(error, dist.DistError) or (isinstance(error, RuntimeError) and re.search(
        r"gloo|nccl|timed out|timeout|connection (reset|closed)|pair closure|by peer", str(error), re.I) is not None)


def exit_with(code: int, prog: str, message: str) -> NoReturn:
    """One line on stderr and the exit code. Bad input (2) is the same on every torchrun rank: rank 0 says it."""
    if code != 2 or int(os.environ.get("RANK", "0")) == 0:
        print(f"{prog}: error: {message}", file=sys.stderr)
    sys.exit(code)


@dataclass
class ScriptRun:
    """What a training script's exit policy needs, filled in as its main() gets there."""
    prog: str
    hp: Hyperparameters | None = None
    rt: Runtime | None = None
    run_dir: RunDir | None = None

    def newest_checkpoint_note(self) -> str:
        """Where a stopped run can be continued from, for the one-line error."""
        if self.run_dir is not None:
            path = self.run_dir.path
        else:
            path = Path(self.hp.log_dir) / self.hp.run_id if self.hp is not None and self.hp.run_id else None
        newest = M.newest_checkpoint(path) if path is not None and path.is_dir() else None
        return f"the newest checkpoint is {newest} (continue with --resume latest)" if newest else \
            "no checkpoint of this run was written"


def exit_on_run_failure(error: BaseException, run: ScriptRun) -> None:
    """A collective that failed because another rank died or hung, or a failed write (full disk): one line, exit 1.
    Anything else returns, and the caller re-raises it with its traceback (that is a bug to report)."""
    if lost_rank(error, run.rt):
        exit_with(1, run.prog, f"rank {run.rt.rank} lost contact with the other ranks (one died or hung; its own "
                               f"output says why): {M.first_line(error)}; {run.newest_checkpoint_note()}; resuming "
                               f"works on any world size")
    if isinstance(error, OSError):
        exit_with(1, run.prog, f"{error.filename or 'write failed'}: {error.strerror or M.first_line(error)}; "
                               f"{run.newest_checkpoint_note()}")


@contextlib.contextmanager
def exit_policy(run: ScriptRun) -> Iterator[ScriptRun]:
    """pretraining.py's and finetune.py's ending: bad input 2, a run that cannot go on 1, a second Ctrl-C 130, each
    one line naming the newest checkpoint where it helps; a lost rank or failed write 1; then the run directory's
    lock is released and the process group shut down, after a barrier when the run finished. Anything else keeps
    its traceback."""
    finished = False
    try:
        yield run
        finished = True
    except M.USER_ERRORS as e:
        exit_with(2, run.prog, str(e))
    except TrainingError as e:
        exit_with(1, run.prog, str(e))
    except KeyboardInterrupt:
        exit_with(130, run.prog, "interrupted (second Ctrl-C): the current step was not saved; "
                  + run.newest_checkpoint_note())
    except Exception as e:  # noqa: BLE001 - only a failed collective or write is turned into one line
        exit_on_run_failure(e, run)
        raise
    finally:
        if run.run_dir is not None:
            run.run_dir.close()
        if run.rt is not None:
            try:
                M.shutdown_runtime(run.rt, barrier=finished)
            except Exception as e:  # noqa: BLE001 - the final barrier: another rank died after this one finished
                exit_on_run_failure(e, run)
                raise


# -----------------------------------------------------------------------------
# Script helpers


def import_data_script(name: str) -> Any:
    """data/<name>.py as a module (data/ holds scripts, not a package); importing one runs nothing."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"data_{name}", M.REPO_DIR / "data" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def warm_up_steps(hp: Hyperparameters, rt: Runtime) -> int:
    """Steps to run (and undo) before the clock starts. A compiled CUDA run needs the record's 10: FlexAttention
    compiles per window size. CPU attention takes the window as a tensor, so after 2 steps (the first compiles,
    the second meets the optimizer state) a step is as fast as it will get (docs/measurements.md, warm-up)."""
    if hp.warmup_steps >= 0:
        return hp.warmup_steps
    if not rt.compile:
        return 0
    return 10 if rt.device.type == "cuda" else 2


def compile_notice(name: str) -> str:
    """What the first compiled steps do and roughly how long they take: rounded ranges of the whole-model compile
    measured on CPUs and GPUs (docs/measurements.md, "Warm-up")."""
    return (f"compiling {name} with torch.compile (first steps and first validation only; about 1-3 min on a CPU, "
            f"1-2 min on a GPU, less once inductor's cache holds it) ...")


def announce_compile(rt: Runtime) -> None:
    """Say, before the first compiled step, what the silence that follows is (rank 0, stderr, so stdout and log.txt
    stay as they were)."""
    if rt.compile and rt.master:
        print(compile_notice("the model"), file=sys.stderr, flush=True)


# -----------------------------------------------------------------------------
# Progress: tqdm bars for long work that prints no step lines (data preparation, eval.py's scoring)

PROGRESS_OFF_ENV = "TQDM_DISABLE"  # tqdm's own switch; not NANOGPT_*, a prefix that only hyperparameters may use


def progress_enabled(stream: Any = None) -> bool:
    """Whether progress bars are drawn on stream (default sys.stderr): only on a terminal, so logs, pipes and --json
    output stay byte for byte what they were; TQDM_DISABLE=1 turns them off on a terminal too."""
    stream = sys.stderr if stream is None else stream
    if os.environ.get(PROGRESS_OFF_ENV, "").strip().lower() in ("1", "true", "yes", "on"):
        return False
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty())


def progress(iterable: Any = None, *, desc: str, total: float | None = None, unit: str = "it",
             unit_scale: bool = False, leave: bool = False, enabled: bool | None = None, file: Any = None) -> Any:
    """A tqdm bar on stderr (or file) counting iterable's items, or what .update(n) adds: `desc: 3/8 [00:04<00:06]`.

    enabled: None follows progress_enabled(file); True or False forces it (tests). leave=False clears the bar when it
    closes, so the lines printed after it (a summary, eval.py's table) read as they do without one. Redrawn at most
    twice a second: a bar costs nothing next to the work it counts. Use it as a context manager, or iterate it."""
    from tqdm import tqdm  # installed with transformers and huggingface_hub

    stream = sys.stderr if file is None else file
    on = progress_enabled(stream) if enabled is None else enabled
    return tqdm(iterable, desc=desc, total=total, unit=unit, unit_scale=unit_scale, leave=leave, file=stream,
                disable=not on, mininterval=0.5, dynamic_ncols=True)

