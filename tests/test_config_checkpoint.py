"""Config (CLI, environment, .env, presets, validate, JSON) and checkpoints (round trip, discovery, safe loading).

    pytest tests/test_config_checkpoint.py
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import shlex
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import model as M
import runs as R
from conftest import tiny_hparams

# -----------------------------------------------------------------------------
# CLI


def cfg(*argv: str, env: dict[str, str] | None = None, dotenv: Path | None = None) -> M.Hyperparameters:
    """load_config isolated from the process environment and from any .env in the working directory."""
    return R.load_config(list(argv), env=env or {}, dotenv_path=str(dotenv) if dotenv else None)


@pytest.mark.parametrize("flag", ["--num-iterations", "--num_iterations"])
def test_cli_sets_typed_value(flag: str) -> None:
    hp = cfg(flag, "20")
    assert hp.num_iterations == 20 and isinstance(hp.num_iterations, int)


def test_cli_parses_bools_and_floats() -> None:
    hp = cfg("--save-checkpoint", "false", "--cooldown-frac", "0.25", "--val-tokens", "1_048_576")
    assert hp.save_checkpoint is False and hp.cooldown_frac == 0.25 and hp.val_tokens == 1_048_576


def test_unknown_flag_exits_2_with_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        cfg("--num-iterations", "20", "--bogus-flag", "1")
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "usage:" not in err  # one line, no usage block
    assert "unrecognized arguments: --bogus-flag 1" in err


@pytest.mark.parametrize("argv, flag", [(["--num-iterations", "abc"], "--num-iterations"),
                                        (["--cooldown-frac", "x"], "--cooldown-frac"),
                                        (["--save-checkpoint", "maybe"], "--save-checkpoint"),
                                        (["--val-tokens", "1.5"], "--val-tokens")])
def test_bad_cli_value_names_the_flag(argv: list[str], flag: str) -> None:
    with pytest.raises(M.ConfigError, match=rf"^{flag}: invalid value '{re.escape(argv[1])}'"):
        cfg(*argv)


# -----------------------------------------------------------------------------
# Precedence: CLI > process environment > .env file > preset > dataclass default


@pytest.fixture
def dotenv(tmp_path: Path) -> Path:
    path = tmp_path / ".env"
    path.write_text("NANOGPT_NUM_ITERATIONS=7\nNANOGPT_VAL_LOSS_EVERY=3\n")
    return path


def test_precedence_cli_env_dotenv(dotenv: Path) -> None:
    env = {"NANOGPT_NUM_ITERATIONS": "9"}
    assert cfg("--preset", "shakespeare", "--num-iterations", "11", env=env, dotenv=dotenv).num_iterations == 11
    assert cfg("--preset", "shakespeare", env=env, dotenv=dotenv).num_iterations == 9  # env beats .env
    hp = cfg("--preset", "shakespeare", dotenv=dotenv)
    assert (hp.num_iterations, hp.val_loss_every) == (7, 3)  # .env beats the preset (400, 100)
    # a .env key the process environment does not set still applies next to one it does
    assert cfg("--preset", "shakespeare", env=env, dotenv=dotenv).val_loss_every == 3


def test_precedence_preset_over_default_under_env() -> None:
    default = M.Hyperparameters.val_loss_every
    preset = M.PRESETS["shakespeare"]["val_loss_every"]
    assert preset != default  # otherwise the test proves nothing
    assert cfg("--preset", "shakespeare").val_loss_every == preset
    assert cfg("--preset", "shakespeare", env={"NANOGPT_VAL_LOSS_EVERY": "5"}).val_loss_every == 5
    # a field the preset leaves alone keeps the dataclass default
    assert cfg("--preset", "shakespeare").muon_lr == M.Hyperparameters.muon_lr


def test_preset_from_environment() -> None:
    assert cfg(env={"NANOGPT_PRESET": "speedrun"}).preset == "speedrun"
    assert cfg("--preset", "shakespeare", env={"NANOGPT_PRESET": "speedrun"}).preset == "shakespeare"


@pytest.mark.parametrize("where", ["env", "dotenv"])
def test_unknown_env_var_is_an_error(tmp_path: Path, where: str) -> None:
    # a typo such as NANOGPT_NUM_ITERATION must not be ignored silently
    dotenv = tmp_path / ".env"
    dotenv.write_text("NANOGPT_FOO=1\n" if where == "dotenv" else "")
    env = {"NANOGPT_FOO": "1"} if where == "env" else {}
    with pytest.raises(M.ConfigError, match="environment variable NANOGPT_FOO names no hyperparameter"):
        cfg(env=env, dotenv=dotenv)


def test_bad_env_value_names_the_flag() -> None:
    with pytest.raises(M.ConfigError, match=r"^--num-iterations: invalid value 'many'"):
        cfg(env={"NANOGPT_NUM_ITERATIONS": "many"})


def test_speedrun_preset_is_the_record() -> None:
    hp = cfg("--preset", "speedrun")
    record = dict(num_layers=12, num_heads=6, head_dim=128, model_dim=768, train_seq_len=49152,
                  val_seq_len=262144, val_tokens=10485760, num_iterations=1770, cooldown_frac=0.4,
                  val_loss_every=125, rank_equivalents=8, vocab_size=50257, no_attn_layer=7, row_len=0)
    assert {k: getattr(hp, k) for k in record} == record
    assert hp.preset == "speedrun"


# -----------------------------------------------------------------------------
# validate()

POSITIVE = ["val_tokens", "train_seq_len", "val_seq_len", "rank_equivalents", "vocab_size", "num_layers",
            "num_heads", "head_dim", "model_dim", "window_max", "num_iterations", "muon_momentum_warmup",
            "muon_lr", "head_lr", "embed_lr", "scalar_lr", "adam_eps"]
INVALID = [  # (overrides, world_size, message)
    *[({name: 0}, 1, rf"--{name.replace('_', '-')}=0 must be positive") for name in POSITIVE],
    *[({name: -1}, 1, rf"--{name.replace('_', '-')}=-1 must be >= 0") for name in ["row_len", "val_loss_every",
                                                                                 "save_every"]],
    ({"cooldown_frac": 0.0}, 1, r"--cooldown-frac=0.0 must be in \(0, 1\]"),
    ({"cooldown_frac": 1.5}, 1, r"--cooldown-frac=1.5 must be in \(0, 1\]"),
    ({"adam_beta1": 1.0}, 1, r"--adam-beta1=1.0 must be in \[0, 1\)"),
    ({"muon_momentum_start": -0.1}, 1, r"--muon-momentum-start=-0.1 must be in \[0, 1\)"),
    ({"num_layers": 3}, 1, r"--num-layers=3 must be even"),
    ({"warmup_steps": -2}, 1, r"--warmup-steps=-2 must be -1 \(auto\) or >= 0"),
    ({"shuffle_rows": True, "row_len": 0}, 1, r"--shuffle-rows needs --row-len > 0"),
    ({"model_dim": 96}, 1, r"--num-heads \* --head-dim = 64 must equal --model-dim=96"),
    ({"no_attn_layer": 2}, 1, r"--no-attn-layer=2 must be -1 or a layer index below --num-layers=2"),
    ({"no_attn_layer": -2}, 1, r"--no-attn-layer=-2 must be -1"),
    ({"row_len": 96}, 1, r"--train-seq-len=256 must be a multiple of --row-len=96"),
    ({"row_len": 256, "train_seq_len": 384}, 1, r"--train-seq-len=384 must be a multiple of --row-len=256"),
    ({"row_len": 64}, 1, r"row length 64 \(--train-seq-len / --row-len\) must be a multiple of 128"),
    ({"row_len": 0, "train_seq_len": 192}, 1, r"row length 192 \(--train-seq-len / --row-len\) must be a multiple"),
    ({}, 3, r"--rank-equivalents=2 must be divisible by the world size 3"),
    ({"val_tokens": 384}, 1, r"--val-tokens=384 must be a multiple of world_size \* --val-seq-len = 256"),
    ({"val_tokens": 256}, 2, r"--val-tokens=256 must be a multiple of world_size \* --val-seq-len = 512"),
    ({"dtype": "fp16"}, 1, r"--dtype='fp16' must be one of auto, bf16, fp32"),
    ({"compile": "yes"}, 1, r"--compile='yes' must be one of auto, on, head, off"),
    ({"fp8_head": "maybe"}, 1, r"--fp8-head='maybe' must be one of auto, on, off"),
    ({"run_id": "a/b"}, 1, r"--run-id='a/b' may hold only"),
    ({"run_id": ".."}, 1, r"--run-id='\.\.' may hold only"),
    ({"run_id": "../up"}, 1, r"--run-id='\.\./up' may hold only"),
]


@pytest.mark.parametrize("overrides, world_size, message", INVALID,
                         ids=[f"{'-'.join(o) or 'world'}{w}" for o, w, _ in INVALID])
def test_validate_names_the_flag(overrides: dict[str, Any], world_size: int, message: str) -> None:
    assert tiny_hparams().validate(world_size=1)  # the base is valid, so the override is what fails
    with pytest.raises(M.ConfigError, match=f"^{message}"):
        tiny_hparams(**overrides).validate(world_size=world_size)


@pytest.mark.parametrize("preset", sorted(M.PRESETS))
@pytest.mark.parametrize("world_size", [1, 2, 4, 8])
def test_presets_validate(preset: str, world_size: int) -> None:
    hp = M.Hyperparameters(**M.PRESETS[preset], preset=preset)
    if hp.rank_equivalents % world_size == 0:  # speedrun: 8 rank-equivalents; shakespeare: 2 (1 or 2 processes)
        assert hp.validate(world_size=world_size) is hp
    else:
        with pytest.raises(M.ConfigError, match=f"--rank-equivalents={hp.rank_equivalents} must be divisible"):
            hp.validate(world_size=world_size)
    assert preset != "speedrun" or hp.rank_equivalents % world_size == 0  # the record runs on 1, 2, 4, 8 GPUs


def test_valid_run_id() -> None:
    assert tiny_hparams(run_id="run-1.b_2").validate().run_id == "run-1.b_2"


# -----------------------------------------------------------------------------
# JSON round trip


@pytest.mark.parametrize("preset", sorted(M.PRESETS))
def test_json_round_trip(preset: str) -> None:
    hp = M.Hyperparameters(**M.PRESETS[preset], preset=preset, run_id="r1", save_checkpoint=False)
    again = M.Hyperparameters.from_dict(json.loads(json.dumps(hp.to_dict())))
    assert again == hp
    assert {f.name: type(getattr(again, f.name)) for f in dataclasses.fields(hp)} == \
        {f.name: type(getattr(hp, f.name)) for f in dataclasses.fields(hp)}


def test_from_dict_refuses_unknown_and_mistyped_keys() -> None:
    d = tiny_hparams().to_dict()
    with pytest.raises(M.ConfigError, match=r"unknown hyperparameter\(s\): bogus, zzz"):
        M.Hyperparameters.from_dict(dict(d, zzz=1, bogus=2))
    with pytest.raises(M.ConfigError, match=r"^--num-iterations: invalid value 2.5"):
        M.Hyperparameters.from_dict(dict(d, num_iterations=2.5))  # no silent truncation to 2


# -----------------------------------------------------------------------------
# Checkpoints

VOCAB = 256  # a 256-token vocabulary keeps the checkpoint about a megabyte


def train_steps(model: M.GPT, optimizers: list[torch.optim.Optimizer], steps: int, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randint(0, VOCAB, (2, 128), generator=g)
        y = torch.randint(0, VOCAB, (2, 128), generator=g)
        model(x, y, 2).backward()
        for opt in optimizers:
            opt.step()
        model.zero_grad(set_to_none=True)


def make_trained() -> tuple[M.GPT, list[torch.optim.Optimizer], M.Hyperparameters]:
    """Tiny model and optimizers after two steps (deterministic: the same tensors on every call)."""
    torch.manual_seed(0)
    hp = tiny_hparams(vocab_size=VOCAB, run_id="run")
    model = M.GPT.from_hparams(hp)
    optimizers = M.setup_optimizers(model, hp)
    train_steps(model, optimizers, 2)  # lm_head starts at zero: the hidden matrices get gradients from step 2
    return model, optimizers, hp


@pytest.fixture(scope="module")
def trained() -> tuple[M.GPT, list[torch.optim.Optimizer], M.Hyperparameters]:
    """Shared by the module's tests, which must not change it."""
    model, optimizers, hp = make_trained()
    muon = optimizers[1].state_dict()["state"]
    assert any(s["momentum_buffer"].abs().sum() > 0 for s in muon.values())  # real Muon state to compare
    assert all(s["step"] == 2 for s in optimizers[0].state_dict()["state"].values())  # and Adam state
    return model, optimizers, hp


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory, trained) -> Path:
    model, optimizers, hp = trained
    path = M.checkpoint_path(tmp_path_factory.mktemp("ckpt") / "logs", hp.run_id, 2)
    M.save_checkpoint(path, step=2, model=model, optimizers=optimizers, hp=hp, code={"model.py": "# code"},
                      data_position=dict(shard=1, pos=512, epoch=3), val_loss=4.25)
    return path


def assert_same(a: Any, b: Any, where: str = "") -> None:
    """Deep equality of state_dict-like values; tensors compared exactly (dtype and shape included)."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), where
        for k in a:
            assert_same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def test_checkpoint_round_trip(saved: Path, trained) -> None:
    model, optimizers, hp = trained
    # loadable without our helper, in the safe mode (rule 12)
    raw = torch.load(saved, map_location="cpu", weights_only=True)
    ckpt = M.load_checkpoint(saved)
    assert_same(ckpt, raw)
    assert_same(ckpt["model"], model.state_dict(), "model")
    for i, opt in enumerate(optimizers):
        assert_same(ckpt["optimizers"][i], opt.state_dict(), f"optimizers[{i}]")
    assert M.Hyperparameters.from_dict(ckpt["hyperparameters"]) == hp
    assert ckpt["data_position"] == dict(shard=1, pos=512, epoch=3)
    assert (ckpt["step"], ckpt["val_loss"], ckpt["format"]) == (2, 4.25, M.CHECKPOINT_FORMAT)
    assert ckpt["code"] == {"model.py": "# code"}
    assert [p.name for p in saved.parent.iterdir()] == ["state_step000002.pt"]  # no temporary file left


def test_resumed_run_continues_identically(saved: Path, trained) -> None:
    # restoring model + optimizers from the checkpoint and training on is the same as never stopping
    model, optimizers, hp = make_trained()  # the run that never stopped (a twin of `trained`, which stays intact)
    assert_same(model.state_dict(), trained[0].state_dict())
    restored, hp2, ckpt = M.load_model(saved)
    assert hp2 == hp
    opts2 = M.setup_optimizers(restored, hp2)
    for opt, state in zip(opts2, ckpt["optimizers"]):
        opt.load_state_dict(state)
    train_steps(model, optimizers, 1, seed=1)
    train_steps(restored, opts2, 1, seed=1)
    assert not torch.equal(model.lm_head.weight, trained[0].lm_head.weight)  # the step changed something
    assert_same(restored.state_dict(), model.state_dict(), "model after one more step")


def test_checkpoint_strips_wrapper_prefixes(tmp_path: Path, trained) -> None:
    # a DDP-style `module.` wrapper must not leak into the saved keys (loads into a bare GPT, strict)
    model, optimizers, hp = trained
    wrapper = nn.Module()
    wrapper.module = model
    path = M.save_checkpoint(tmp_path / "w" / "state_step000002.pt", step=2, model=wrapper, optimizers=[],
                             hp=hp, code={})
    assert all(not k.startswith("module.") for k in M.load_checkpoint(path)["model"])
    assert_same(M.load_model(path)[0].state_dict(), model.state_dict())


def touch(path: Path, mtime: float) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"")
    os.utime(path, (mtime, mtime))
    return path


def test_find_latest_checkpoint(tmp_path: Path) -> None:
    logs = tmp_path / "logs"
    old = touch(logs / "a" / "state_step000005.pt", 1_000)
    new = touch(logs / "b" / "state_step000010.pt", 2_000)
    # partial writes, newer than anything complete, are never picked
    touch(logs / "b" / ".state_step000010.pt.tmp123", 3_000)
    touch(logs / "b" / "state_step000010.pt.tmp", 3_000)
    touch(logs / "b" / ".state_step000020.pt.tmp99", 3_000)
    touch(logs / "b" / "notes_step000030.pt", 3_000)
    assert M.find_latest_checkpoint(logs) == new
    assert M.find_latest_checkpoint(logs, run_id="a") == old
    assert M.resolve_checkpoint("latest", logs) == new
    assert M.resolve_checkpoint(str(old), logs) == old
    # same modification time: the higher step wins
    same = touch(logs / "b" / "state_step000011.pt", 2_000)
    assert M.find_latest_checkpoint(logs) == same


def test_resolve_checkpoint_errors(tmp_path: Path) -> None:
    (tmp_path / "logs" / "run").mkdir(parents=True)
    touch(tmp_path / "logs" / "run" / ".state_step000001.pt.tmp5", 1_000)  # only a partial file
    with pytest.raises(M.CheckpointError, match="no checkpoint found under .*logs/ \\(run pretraining.py first\\)"):
        M.resolve_checkpoint("latest", tmp_path / "logs")
    missing = tmp_path / "nope.pt"
    with pytest.raises(M.CheckpointError, match=rf"^{re.escape(str(missing))}: checkpoint not found"):
        M.resolve_checkpoint(str(missing), tmp_path)


class _RunsShell:
    """Pickles to os.system(cmd): what a malicious checkpoint would execute on an unsafe torch.load."""

    def __init__(self, cmd: str):
        self.cmd = cmd

    def __reduce__(self):
        return (os.system, (self.cmd,))


def test_malicious_checkpoint_is_refused(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"model": {"w": torch.zeros(2)}, "payload": _RunsShell(f"touch {shlex.quote(str(marker))}")}, path)
    with pytest.raises(M.CheckpointError, match=rf"^{re.escape(str(path))}: not a loadable checkpoint\b.*refused"):
        M.load_checkpoint(path)
    assert not marker.exists()  # the payload never ran


def bad_checkpoint(tmp_path: Path, saved: Path, case: str) -> Path:
    path = tmp_path / f"{case}.pt"
    if case == "truncated":
        data = saved.read_bytes()
        path.write_bytes(data[:len(data) // 2])  # a copy interrupted halfway
    elif case == "text":
        path.write_text("hello, this is not a checkpoint\n")
    elif case == "no_model":
        torch.save({"weights": torch.zeros(3)}, path)
    return path


@pytest.mark.parametrize("case, message", [
    ("missing", "checkpoint not found"),
    ("truncated", r"not a loadable checkpoint\b"),
    ("text", r"not a loadable checkpoint\b"),
    ("no_model", r"not a checkpoint \(no 'model' entry\)"),
])
def test_unloadable_checkpoint_is_one_clear_error(tmp_path: Path, saved: Path, case: str, message: str) -> None:
    path = bad_checkpoint(tmp_path, saved, case)
    with pytest.raises(M.CheckpointError, match=rf"^{re.escape(str(path))}: {message}") as exc:
        M.load_checkpoint(path)
    msg = str(exc.value)
    assert "\n" not in msg and "refused" not in msg  # one line; not mistaken for a malicious file
    # the reason after the colon must be words a user can act on, not a bare exception payload such as "101"
    reason = msg.split(": ", 2)[-1]
    assert re.search(r"[A-Za-z]{3}", reason), msg


def test_load_model_reports_shape_mismatch(tmp_path: Path, saved: Path) -> None:
    ckpt = torch.load(saved, weights_only=True)
    ckpt["hyperparameters"]["model_dim"] = 128  # config says 128 wide, tensors are 64 wide
    path = tmp_path / "other_arch.pt"
    torch.save(ckpt, path)
    with pytest.raises(M.CheckpointError, match=rf"^{re.escape(str(path))}: embed\.weight has shape \(256, 64\) "
                                                r"in the checkpoint but \(256, 128\) in the model config"):
        M.load_model(path)


def test_prune_keeps_the_newest_steps_and_ignores_partials(tmp_path: Path) -> None:
    for step in (5, 10, 100, 20):
        (tmp_path / f"state_step{step:06d}.pt").write_bytes(b"x")
    partial = tmp_path / ".state_step000200.pt.tmp1"  # an interrupted write is not a checkpoint to count
    partial.write_bytes(b"x")
    deleted = M.prune_checkpoints(tmp_path, keep=2)
    assert sorted(p.name for p in deleted) == ["state_step000005.pt", "state_step000010.pt"]
    assert sorted(p.name for p in tmp_path.glob("state_step*.pt")) == ["state_step000020.pt", "state_step000100.pt"]
    assert partial.exists()
    assert M.prune_checkpoints(tmp_path, keep=0) == []  # 0 keeps everything


def test_every_field_is_documented_in_help(capsys: pytest.CaptureFixture[str]) -> None:
    # the trailing comment of each field is its --help text (house style: one comment per field)
    comments = R.field_comments()
    assert sorted(comments) == sorted(f.name for f in M.dataclasses.fields(M.Hyperparameters))
    with pytest.raises(SystemExit):
        R.build_arg_parser("pretraining.py").parse_args(["--help"])
    assert "tokens per rank-equivalent per step" in " ".join(capsys.readouterr().out.split())
