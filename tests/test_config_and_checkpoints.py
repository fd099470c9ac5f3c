"""model.py's config and checkpoint sections: Hyperparameters (presets, validate(), JSON round trip) and checkpoints
(round trip, resume, discovery, safe loading, pruning). How flags, the environment and .env become a config is the
harness's (tests/test_runs.py); the on-disk format is tests/test_checkpoint_format.py's.

    python -m pytest tests/test_config_and_checkpoints.py -q
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
from torch import Tensor, nn

import model as M
from conftest import PADDED_VOCAB, cfg, random_tokens, randomize_zero_inits, tiny_hparams


# -----------------------------------------------------------------------------
# Presets and validate()


def test_speedrun_preset_is_the_record() -> None:
    hp = cfg("--preset", "speedrun")
    record = dict(num_layers=12, num_heads=6, head_dim=128, model_dim=768, train_seq_len=49152,
                  val_seq_len=262144, val_tokens=10485760, num_iterations=1770, cooldown_frac=0.4,
                  val_loss_every=125, rank_equivalents=8, vocab_size=50257, no_attn_layer=7, row_len=0)
    assert {k: getattr(hp, k) for k in record} == record
    assert hp.preset == "speedrun"


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
    # loadable without our helper, in the safe mode (torch.load(weights_only=True), which runs no pickled code)
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


def test_the_newest_checkpoint_of_a_run_is_its_highest_step(tmp_path: Path) -> None:
    """A copy that does not keep timestamps (here `touch`) can leave step 50 of a 75-step run newer than step 75:
    the run still counts as written when its newest file was, and its highest step is the one used."""
    logs = tmp_path / "logs"
    final = touch(logs / "run" / "state_step000075.pt", 1_000)
    touch(logs / "run" / "state_step000050.pt", 2_000)
    assert M.find_latest_checkpoint(logs) == final == M.resolve_checkpoint("latest", logs)
    other = touch(logs / "other" / "state_step000100.pt", 1_500)  # older than the run's step 50
    assert M.find_latest_checkpoint(logs) == final
    os.utime(other, (3_000, 3_000))
    assert M.find_latest_checkpoint(logs) == other


def test_find_latest_checkpoint_by_kind(tmp_path: Path) -> None:
    # chat.py looks for the newest fine-tuned checkpoint, eval.py for the newest of any kind; a newer base
    # checkpoint must not hide an older chat one, and unreadable files are never candidates of a kind.
    logs, hp, tiny = tmp_path / "logs", tiny_hparams(), nn.Linear(4, 4)
    chat = M.save_checkpoint(M.checkpoint_path(logs, "sft", 5), step=5, model=tiny, optimizers=[], hp=hp, code={},
                             extra={"kind": "chat"})
    base = M.save_checkpoint(M.checkpoint_path(logs, "pre", 10), step=10, model=tiny, optimizers=[], hp=hp, code={})
    os.utime(chat, (1_000, 1_000))
    os.utime(base, (2_000, 2_000))
    assert (M.checkpoint_kind(chat), M.checkpoint_kind(base)) == ("chat", "base")
    assert M.find_latest_checkpoint(logs) == base
    assert M.find_latest_checkpoint(logs, kind="base") == base
    assert M.find_latest_checkpoint(logs, kind="chat") == chat
    assert M.find_latest_checkpoint(logs, run_id="pre", kind="chat") is None
    garbage = logs / "junk" / "state_step000001.pt"
    garbage.parent.mkdir()
    garbage.write_bytes(b"not a checkpoint")
    os.utime(garbage, (3_000, 3_000))  # the newest file of all
    assert M.checkpoint_kind(garbage) == "none"
    assert M.find_latest_checkpoint(logs, kind="base") == base
    assert M.find_latest_checkpoint(logs, kind="chat") == chat
    os.utime(chat, (4_000, 4_000))
    assert M.find_latest_checkpoint(logs, kind="chat") == chat and M.find_latest_checkpoint(logs, kind="base") == base


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


# -----------------------------------------------------------------------------
# Checkpoints from the record script


def record_style_state_dict(model: M.GPT) -> dict[str, Tensor]:
    """The record's layout: `_orig_mod.` keys (compiled model) and bf16 embeddings with 50257 rows."""
    out = {}
    for key, value in model.state_dict().items():
        if key == "embed.weight" or key.startswith("value_embeds."):
            value = value[:50257].bfloat16()
        out["_orig_mod." + key] = value.clone()
    return out


def test_infer_hparams_record_layout() -> None:
    # The real 12-layer record layout, built on the meta device: shapes only, no memory.
    with torch.device("meta"):
        record = M.GPT(50257, 12, 6, 128, 768, 1024, no_attn_layer=7)
    sd = record_style_state_dict(record)
    assert "_orig_mod.blocks.7.attn.qkv_w" not in sd and "_orig_mod.value_embeds.2.weight" in sd
    hp = M.infer_hparams(sd)
    assert (hp.num_layers, hp.model_dim, hp.num_heads, hp.head_dim, hp.no_attn_layer, hp.vocab_size) == \
        (12, 768, 6, 128, 7, 50257)
    with torch.device("meta"):
        target = M.GPT.from_hparams(hp)
    M.load_state_into(target, sd, "record")  # keys and (padded) shapes fit


def small_record_model() -> M.GPT:
    """4 layers, layer 1 without attention, one 128-wide head (infer_hparams assumes head_dim 128; value embeddings
    need model_dim = num_heads * head_dim)."""
    model = randomize_zero_inits(M.GPT(50257, 4, 1, 128, 128, 256, no_attn_layer=1), head_std=0.5)
    with torch.no_grad():  # as in a record checkpoint: bf16 embeddings, nothing in the padding rows
        for emb in [model.embed, *model.value_embeds]:
            emb.weight.copy_(emb.weight.bfloat16().float())
            emb.weight[50257:] = 0
    return model.eval()


def test_record_checkpoint_loads(tmp_path: Path) -> None:
    source = small_record_model()
    sd = record_style_state_dict(source)
    tokens = random_tokens(1, 129, seed=4, eot_positions={0: [0, 90]})
    with torch.no_grad():
        want = source(tokens[:, :-1], tokens[:, 1:])

    target = M.GPT(50257, 4, 1, 128, 128, 256, no_attn_layer=1).eval()
    M.load_state_into(target, sd, "record")
    path = tmp_path / "state_step001770.pt"
    torch.save({"step": 1770, "code": "# train_gpt.py source", "model": sd, "optimizers": []}, path)
    loaded, hp, ckpt = M.load_model(path)
    assert ckpt["step"] == 1770
    assert (hp.num_layers, hp.model_dim, hp.num_heads, hp.head_dim, hp.no_attn_layer) == (4, 128, 1, 128, 1)
    assert loaded.blocks[1].attn is None and loaded.embed.weight.shape == (PADDED_VOCAB, 128)
    with torch.no_grad():
        for model in (target, loaded.eval()):
            torch.testing.assert_close(model(tokens[:, :-1], tokens[:, 1:]), want, atol=1e-6, rtol=0)


def test_load_state_into_names_mismatching_tensor(tiny_hp: M.Hyperparameters) -> None:
    model = M.GPT.from_hparams(tiny_hp)
    sd = model.state_dict()
    sd["blocks.0.mlp.c_fc.weight"] = torch.zeros(128, 64)
    expected = ("ckpt.pt: blocks.0.mlp.c_fc.weight has shape (128, 64) in the checkpoint but (256, 64) in the "
                "model config")
    with pytest.raises(M.CheckpointError, match=f"^{re.escape(expected)}$"):
        M.load_state_into(model, sd, "ckpt.pt")
