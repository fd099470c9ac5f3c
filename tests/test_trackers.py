"""Experiment trackers (runs.py, Trackers): TensorBoard event files and W&B offline runs hold what metrics.jsonl
holds, also after a kill and --resume; a tracker that cannot start is one line and exit 2 before anything is written;
one that fails mid-run warns once and the run goes on; only rank 0 writes. Everything is read back with the packages'
own readers (tensorboard's event processing, wandb's protobuf schema), never a mock; W&B runs offline.

    python -m pytest -q tests/test_trackers.py
"""
from __future__ import annotations

import json
import re
import signal
import struct
import sys
import zlib
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import model as M
import runs as R
from conftest import REPO_DIR, run, run_script, tiny_args, tiny_hparams

CODE = {"pretraining.py": "print('the code that ran')\n"}
WANDB_BLOCK = 32 * 1024  # the .wandb file is LevelDB's log format: 32 KiB blocks of framed records
WANDB_HEADER = b":W&B" + struct.pack("<HB", 0xBEE1, 0)  # magic, magic number (little-endian), version 0
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4  # the record kinds of a frame


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """W&B records locally, quietly, with its config and cache under tmp_path; the tests are rank 0 of one."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    for var in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(var, str(tmp_path / "wandb_home" / var.lower()))
    monkeypatch.delenv("RANK", raising=False)


@pytest.fixture
def wandb_service() -> Any:
    """The wandb package, its background service shut down after the test. Tests stop it (wandb.teardown()) before
    reading a .wandb file: run.finish() can return before the service has written the file out."""
    import wandb

    yield wandb
    wandb.teardown()


def cpu(**kw) -> M.Runtime:
    return M.Runtime(device=torch.device("cpu"), **kw)


class Recorder(R.Tracker):
    """A tracker that records every call; with fail_at=N its N-th scalars() call raises."""
    name = "flaky"

    def __init__(self, fail_at: int = 0):
        self.calls: list[Any] = []
        self.fail_at = fail_at

    def config(self, hp: M.Hyperparameters, code: dict[str, str]) -> None:
        self.calls.append("config")

    def scalars(self, step: int, values: dict[str, float]) -> None:
        self.calls.append(step)
        if sum(isinstance(c, int) for c in self.calls) == self.fail_at:
            raise OSError("disk on fire")

    def close(self) -> None:
        self.calls.append("close")


# -----------------------------------------------------------------------------
# Readers: metrics.jsonl, TensorBoard event files, W&B's .wandb file


def metrics_scalars(run_dir: Path) -> Counter:
    """metrics.jsonl's numbers as a multiset of (key, step, value), "step" left out, values rounded to float32 as
    TensorBoard stores them."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return Counter((k, r["step"], float(np.float32(v))) for r in rows for k, v in r.items()
                   if k != "step" and isinstance(v, (int, float)))


def tensorboard_view(log_dir: Path) -> tuple[dict[str, Counter], dict[str, dict[str, str]]]:
    """What `tensorboard --logdir log_dir` shows: each run's scalars as a multiset of (tag, step, value), and its
    text summaries by tag."""
    from tensorboard.backend.event_processing import event_accumulator as ea
    from tensorboard.backend.event_processing import event_multiplexer

    mux = event_multiplexer.EventMultiplexer(size_guidance={ea.SCALARS: 0, ea.TENSORS: 0})
    mux.AddRunsFromDirectory(str(log_dir)).Reload()
    scalars, texts = {}, {}
    for name, tags in mux.Runs().items():
        scalars[name] = Counter((tag, e.step, e.value) for tag in tags[ea.SCALARS] for e in mux.Scalars(name, tag))
        texts[name] = {tag.removesuffix("/text_summary"): mux.Tensors(name, tag)[-1].tensor_proto.string_val[0]
                       .decode() for tag in tags[ea.TENSORS]}
    return scalars, texts


def event_file_scalars(path: Path) -> Counter:
    """One event file's scalars (any file name, as superseded ones have) through tensorboard's raw loader."""
    from tensorboard.backend.event_processing.event_file_loader import LegacyEventFileLoader

    return Counter((v.tag, event.step, v.simple_value) for event in LegacyEventFileLoader(str(path)).Load()
                   for v in event.summary.value if v.HasField("simple_value"))


def wandb_records(path: Path) -> list[Any]:
    """The records of a .wandb file: frames (crc32 of kind + data, length, kind) reassembled across 32 KiB blocks
    and decoded with wandb's own protobuf schema."""
    from wandb.proto.wandb_internal_pb2 import Record

    data = path.read_bytes()
    assert data[:len(WANDB_HEADER)] == WANDB_HEADER
    records, parts, pos = [], [], len(WANDB_HEADER)  # the file header counts towards the first block
    while pos < len(data):
        room = WANDB_BLOCK - pos % WANDB_BLOCK
        if room < 7:  # too short for a frame header: zero padding up to the next block
            assert data[pos:pos + room] == bytes(room)
            pos += room
            continue
        crc, length, kind = struct.unpack_from("<IHB", data, pos)
        chunk = data[pos + 7:pos + 7 + length]
        assert len(chunk) == length and zlib.crc32(chunk, zlib.crc32(bytes([kind]))) == crc, f"bad frame at {pos}"
        assert (kind in (FULL, FIRST)) == (not parts), f"frame of kind {kind} out of order at {pos}"
        parts.append(chunk)
        pos += 7 + length
        if kind in (FULL, LAST):
            records.append(Record.FromString(b"".join(parts)))
            parts = []
    assert not parts, "the file ends inside a record"
    return records


def wandb_run(root: Path) -> tuple[dict[str, Any], dict[int, dict[str, Any]], list[Any]]:
    """The one offline run under root/wandb: (config, history rows by _step without '_' keys, all records)."""
    (path,) = root.glob("wandb/offline-run-*/run-*.wandb")
    records = wandb_records(path)
    config: dict[str, Any] = {}
    history: dict[int, dict[str, Any]] = {}
    for r in records:
        kind = r.WhichOneof("record_type")
        items = r.run.config.update if kind == "run" else r.config.update if kind == "config" else []
        config.update((i.key or "/".join(i.nested_key), json.loads(i.value_json)) for i in items)
        if kind == "history":
            row = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item}
            history[row["_step"]] = {k: v for k, v in row.items() if not k.startswith("_")}
    config.pop("_wandb", None)
    return config, history, records


# -----------------------------------------------------------------------------
# TensorBoard: the events are metrics.jsonl, also across a kill and --resume


@pytest.mark.slow
def test_tensorboard_events_hold_exactly_metrics_jsonl_and_the_config(shard_dir: Path, tmp_path: Path) -> None:
    """A run with --trackers tensorboard: its events are metrics.jsonl's numbers (same keys, steps, float32
    values, repeats included) and its texts are the config of run.json and the code that ran."""
    logs = tmp_path / "logs"
    r = run_script(["pretraining.py", *tiny_args(shard_dir, logs, "tb", "--trackers", "tensorboard")])
    assert r.returncode == 0, r.stderr
    scalars, texts = tensorboard_view(logs)
    expected = metrics_scalars(logs / "tb")
    assert scalars == {"tb/tensorboard": expected}
    assert Counter((k, s) for k, s, _ in expected)[("train_time_ms", 3)] == 2  # the train and the val record
    assert {s for _, s, _ in expected} == set(range(7)) and {k for k, _, _ in expected} >= {"train_loss", "val_loss"}
    config = json.loads(texts["tb/tensorboard"].pop("config").removeprefix("```\n").removesuffix("\n```"))
    assert config == json.loads((logs / "tb" / R.RUN_INFO).read_text())["hyperparameters"]
    assert texts["tb/tensorboard"] == {f"code/{name}": f"```python\n{(REPO_DIR / name).read_text()}\n```"
                                       for name in ("pretraining.py", "runs.py", "model.py")}


@pytest.mark.slow
def test_tensorboard_after_kill_and_resume_holds_each_metric_once(shard_dir: Path, tmp_path: Path) -> None:
    """kill -9 two steps past the step-3 checkpoint, then --resume latest: the active events hold exactly the final
    metrics.jsonl (steps 4 and 5 once, not twice), and superseded/ keeps the killed run's events, out of
    `tensorboard --logdir`'s sight."""
    logs = tmp_path / "logs"
    args = tiny_args(shard_dir, logs, "run", "--trackers", "tensorboard")
    r = run([sys.executable, "tests/faults.py", "kill@step=5", "pretraining.py", *args])
    assert r.returncode == -signal.SIGKILL, r.stderr
    killed = metrics_scalars(logs / "run")
    assert {("train_loss", 4), ("train_loss", 5)} <= {(k, s) for k, s, _ in killed}  # logged past the checkpoint
    assert tensorboard_view(logs)[0] == {"run/tensorboard": killed}  # flushed per record: kill -9 lost none
    r = run_script(["pretraining.py", "--resume", "latest", "--log-dir", str(logs)])
    assert r.returncode == 0, r.stderr
    final = metrics_scalars(logs / "run")
    assert tensorboard_view(logs)[0] == {"run/tensorboard": final}
    assert Counter((k, s) for k, s, _ in final)[("train_loss", 4)] == 1
    (aside,) = (logs / "run" / "superseded").iterdir()
    assert aside.name.startswith("events.out.superseded.") and event_file_scalars(aside) == killed


def test_tracker_dir_holds_each_runs_files_under_its_run_id(tmp_path: Path) -> None:
    """--tracker-dir DIR: the events go to DIR/<run_id>/tensorboard, none into the run directory."""
    run_dir = tmp_path / "logs" / "r7"
    run_dir.mkdir(parents=True)
    hp = tiny_hparams(trackers="tensorboard", tracker_dir=str(tmp_path / "tb"))
    log = R.RunLog(cpu(), run_dir, R.open_trackers(hp, cpu(), run_dir, resumed=False))
    log.metrics(step=1, train_loss=4.5)
    log.close()
    assert tensorboard_view(tmp_path / "tb")[0] == {"r7/tensorboard": Counter({("train_loss", 1, 4.5): 1})}
    assert sorted(p.name for p in run_dir.iterdir()) == ["metrics.jsonl"]


# -----------------------------------------------------------------------------
# Weights & Biases, offline: the config, the history, one run id across --resume


def test_wandb_offline_run_holds_the_config_code_and_every_step(tmp_path: Path, wandb_service: Any) -> None:
    """A W&B offline run holds the config as Hyperparameters, the code files, and each metrics record at its step,
    under the id run.json records (300 steps: the file spans several 32 KiB blocks)."""
    hp = tiny_hparams(trackers="wandb", run_id="w", log_dir=str(tmp_path / "logs"))
    rundir = R.open_run_dir(hp, cpu(), "pretraining.py")
    log = R.RunLog(cpu(), rundir.path, R.open_trackers(hp, cpu(), rundir.path, resumed=False))
    log.header(hp, CODE)
    logged = {step: dict(train_loss=10 - step / 100, lr_mult=0.5) for step in range(1, 301)}
    for step, values in logged.items():
        log.metrics(step=step, **values)
    log.close()
    rundir.close()
    wandb_service.teardown()
    config, history, records = wandb_run(rundir.path)
    assert config == hp.to_dict()
    assert history == logged
    (wb_run,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    assert wb_run.run_id == R.read_run_info(rundir.path)["wandb_id"] and wb_run.project == hp.wandb_project
    (code,) = rundir.path.glob("wandb/offline-run-*/files/code/pretraining.py")
    assert code.read_text() == CODE["pretraining.py"]
    assert next(rundir.path.glob("wandb/offline-run-*/run-*.wandb")).stat().st_size > 2 * WANDB_BLOCK


def test_wandb_resume_continues_the_same_run_id(tmp_path: Path, wandb_service: Any) -> None:
    """The W&B id is written once into run.json (the rest of it kept) and a resumed run records under it again."""
    hp = tiny_hparams(trackers="wandb", run_id="w", log_dir=str(tmp_path / "logs"))
    rundir = R.open_run_dir(hp, cpu(), "pretraining.py")
    before = R.read_run_info(rundir.path)
    assert "wandb_id" not in before
    for resumed in (False, True):
        for tracker in R.open_trackers(hp, cpu(), rundir.path, resumed=resumed):
            tracker.scalars(1, {"train_loss": 4.5})
            tracker.close()
    rundir.close()
    wandb_service.teardown()
    info = R.read_run_info(rundir.path)
    assert info == dict(before, wandb_id=info["wandb_id"]) and len(info["wandb_id"]) == 12
    runs = sorted(rundir.path.glob("wandb/offline-run-*"))  # wandb adds "-1" to a name taken in the same second
    assert len(runs) == 2 and all(re.fullmatch(rf"offline-run-\d{{8}}_\d{{6}}-{info['wandb_id']}(-\d+)?", d.name)
                                  for d in runs), runs
    for d in runs:
        records = wandb_records(d / f"run-{info['wandb_id']}.wandb")
        assert [r.run.run_id for r in records if r.WhichOneof("record_type") == "run"] == [info["wandb_id"]]


# -----------------------------------------------------------------------------
# A tracker that cannot start: one line, exit 2, nothing written


@pytest.mark.parametrize("name, modules", [("tensorboard", ("torch.utils.tensorboard", "tensorboard")),
                                           ("wandb", ("wandb",))])
def test_missing_tracker_package_names_the_pip_command(name: str, modules: tuple[str, ...],
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """A tracker whose package does not import is a ConfigError with the pinned pip command."""
    for module in modules:
        monkeypatch.setitem(sys.modules, module, None)
    with pytest.raises(M.ConfigError) as e:
        R.check_trackers(tiny_hparams(trackers="tensorboard,wandb"))
    version = {"tensorboard": "2.21.0", "wandb": "0.31.0"}[name]
    assert str(e.value) == (f"--trackers={name} needs the {name} package, which is not installed: "
                            f"pip install {name}=={version}")


def test_unwritable_tracker_dir_is_a_config_error(tmp_path: Path) -> None:
    """--tracker-dir that cannot be created (its parent is a file: root-proof) is a ConfigError naming the flag;
    without --trackers the flag is unused and not checked."""
    (tmp_path / "a_file").write_text("")
    bad = tmp_path / "a_file" / "tb"
    with pytest.raises(M.ConfigError) as e:
        R.check_trackers(tiny_hparams(trackers="tensorboard", tracker_dir=str(bad)))
    assert str(e.value) == f"--tracker-dir={bad}: cannot write there (Not a directory)"
    R.check_trackers(tiny_hparams(tracker_dir=str(bad)))


def test_unknown_tracker_name_is_a_config_error() -> None:
    """--trackers accepts only tensorboard and wandb (spaces around commas allowed); anything else is named."""
    R.check_tracker_names(tiny_hparams(trackers=" tensorboard , wandb "))
    assert R.tracker_names(tiny_hparams(trackers=" tensorboard , wandb ")) == ["tensorboard", "wandb"]
    with pytest.raises(M.ConfigError) as e:
        R.check_extensions(tiny_hparams(trackers="tensorboard,mlflow"))
    assert str(e.value) == "--trackers='tensorboard,mlflow': unknown tracker 'mlflow' (choose from tensorboard, wandb)"


@pytest.mark.slow
@pytest.mark.parametrize("case", ["missing-package", "unwritable-dir"])
def test_script_refuses_a_tracker_that_cannot_start_before_writing(case: str, shard_dir: Path,
                                                                   tmp_path: Path) -> None:
    """pretraining.py with a tracker that cannot start: exit 2, one stderr line, no run directory."""
    logs, env = tmp_path / "logs", {}
    if case == "missing-package":  # a wandb that fails to import shadows the installed one
        (tmp_path / "shadow" / "wandb").mkdir(parents=True)
        (tmp_path / "shadow" / "wandb" / "__init__.py").write_text("raise ImportError('no wandb here')\n")
        flags, env = ["--trackers", "wandb"], {"PYTHONPATH": str(tmp_path / "shadow")}
        line = "--trackers=wandb needs the wandb package, which is not installed: pip install wandb==0.31.0"
    else:
        (tmp_path / "a_file").write_text("")
        flags = ["--trackers", "tensorboard", "--tracker-dir", str(tmp_path / "a_file" / "tb")]
        line = f"--tracker-dir={tmp_path / 'a_file' / 'tb'}: cannot write there (Not a directory)"
    r = run_script(["pretraining.py", *tiny_args(shard_dir, logs, "refused", *flags)], env=env)
    assert (r.returncode, r.stderr) == (2, f"pretraining.py: error: {line}\n")
    assert not logs.exists()


@pytest.mark.parametrize("resumed", [False, True])
def test_tracker_failing_to_start_removes_only_a_fresh_run_dir(resumed: bool, tmp_path: Path) -> None:
    """open_trackers raises a ConfigError naming the tracker; a fresh run directory is removed, a resumed one kept."""
    run_dir = tmp_path / "r"
    run_dir.mkdir()
    (run_dir / "tensorboard").write_text("a file where the events folder goes")
    with pytest.raises(M.ConfigError, match=r"^--trackers=tensorboard: the tracker could not start \(FileExistsError"):
        R.open_trackers(tiny_hparams(trackers="tensorboard"), cpu(), run_dir, resumed=resumed)
    assert run_dir.exists() == resumed


# -----------------------------------------------------------------------------
# RunLog: a failing tracker is dropped with one warning; only rank 0 writes


def test_tracker_failing_mid_run_warns_once_and_the_others_go_on(tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture) -> None:
    """A tracker raising at step 2 is dropped with one stderr line and closed once; TensorBoard (after it in the
    list) and metrics.jsonl still get every record."""
    flaky = Recorder(fail_at=2)
    (tensorboard,) = R.open_trackers(tiny_hparams(trackers="tensorboard"), cpu(), tmp_path, resumed=False)
    log = R.RunLog(cpu(), tmp_path, [flaky, tensorboard])
    log.header(tiny_hparams(), CODE)
    for step in range(1, 5):
        log.metrics(step=step, train_loss=5.0 - step, train_time_ms=10.0 * step)
    log.close()
    assert capsys.readouterr().err == ("warning: the flaky tracker failed to log step 2 (OSError: disk on fire); "
                                       "continuing without it (metrics.jsonl has every step)\n")
    assert flaky.calls == ["config", 1, 2, "close"]
    assert len(metrics_scalars(tmp_path)) == 8
    assert tensorboard_view(tmp_path)[0] == {"tensorboard": metrics_scalars(tmp_path)}


def test_trackers_are_written_by_rank_0_only(tmp_path: Path) -> None:
    """Rank 1 starts no tracker (and writes no W&B id) and its RunLog calls none it is given: the folder stays
    empty."""
    rank_1 = cpu(rank=1, world_size=2)
    assert R.open_trackers(tiny_hparams(trackers="tensorboard,wandb"), rank_1, tmp_path, resumed=False) == []
    recorder = Recorder()
    log = R.RunLog(rank_1, tmp_path, [recorder])
    log.header(tiny_hparams(), CODE)
    log.metrics(step=1, train_loss=4.0)
    log.close()
    assert recorder.calls == [] and list(tmp_path.iterdir()) == []
