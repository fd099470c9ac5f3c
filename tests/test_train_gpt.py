"""train_gpt.py (the single-file speedrun script) against model.py + pretraining.py: piece by piece in-process,
then whole runs in subprocesses (same losses and final weights, bit for bit; torchrun; checkpoints; log; errors).

    python -m pytest tests/test_train_gpt.py -q
"""
from __future__ import annotations

import ast
import dataclasses
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import model as M
import runs as R
import train_gpt as T
from conftest import REPO_DIR, random_documents, tiny_hparams
from conftest import free_port, read_metrics, run, tiny_args

SOURCE = (REPO_DIR / "train_gpt.py").read_text(encoding="utf-8")


def both_hparams(**overrides) -> tuple[M.Hyperparameters, T.Hyperparameters]:
    hp = tiny_hparams(**overrides)
    return hp, T.Hyperparameters(**hp.to_dict())


def gpt_pair(seed: int = 0, **overrides) -> tuple[M.GPT, T.GPT]:
    """Each file's GPT built from the same seed (so the same init order is checked too)."""
    hp, thp = both_hparams(**overrides)
    torch.manual_seed(seed)
    m = M.GPT.from_hparams(hp)
    torch.manual_seed(seed)
    t = T.GPT(thp.vocab_size, thp.num_layers, thp.num_heads, thp.head_dim, thp.model_dim, thp.max_seq_len,
              thp.no_attn_layer)
    return m, t


# -----------------------------------------------------------------------------
# Self-containment


def test_imports_only_stdlib_torch_numpy() -> None:
    tree = ast.parse(SOURCE)
    roots = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import)
             for alias in node.names}
    roots |= {node.module.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module}
    assert roots - set(sys.stdlib_module_names) - {"__future__"} == {"torch", "numpy"}


def test_import_does_no_work(tmp_path: Path) -> None:
    """Importing writes nothing, loads no repository module and starts no process group."""
    code = ("import sys; sys.path.insert(0, sys.argv[1]); import train_gpt, torch.distributed as d; "
            "print(sorted(m for m in ('model', 'tiktoken', 'dotenv', 'transformers') if m in sys.modules), "
            "d.is_initialized())")
    result = subprocess.run([sys.executable, "-c", code, str(REPO_DIR)], cwd=tmp_path, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[] False"
    assert not any(tmp_path.iterdir())


def test_sections_follow_model_py_order() -> None:
    """The banners of train_gpt.py name model.py's sections, in model.py's order (files and the tokenizer excepted:
    the record's training reads its shards by glob, writes with torch.save and needs no tokenizer; loss modifiers
    too: it trains the record's plain loss and refuses their flags), then training."""
    banner = re.compile(r"^# -{77}\n# (\w[\w ]*?)(?::.*)?$", re.MULTILINE)
    ours = banner.findall(SOURCE)
    skipped = ("Files", "Loss modifiers", "Tokenizer and chat format")
    lib = [s for s in banner.findall((REPO_DIR / "model.py").read_text()) if s not in skipped]
    assert ours == lib + ["Training"], ours


# -----------------------------------------------------------------------------
# Config: same fields, presets, flags and messages


def test_hyperparameters_fields_and_presets_equal() -> None:
    def fields(cls: type) -> list[tuple[str, str, object]]:
        return [(f.name, str(f.type), f.default) for f in dataclasses.fields(cls)]

    assert fields(T.Hyperparameters) == fields(M.Hyperparameters)
    # the record's presets only: the 2026 presets compose switches train_gpt.py refuses
    assert T.PRESETS == {k: v for k, v in M.PRESETS.items() if k not in ("shakespeare2026", "speedrun2026")}
    assert T.BLOCK_SIZE == M.BLOCK_SIZE and T.EOT_ID == M.EOT_ID and T.SHARD_MAGIC == M.SHARD_MAGIC
    assert T.CHECKPOINT_FORMAT == M.CHECKPOINT_FORMAT


@pytest.mark.parametrize("argv, env", [
    ([], {}),
    (["--preset", "speedrun"], {}),
    (["--preset", "shakespeare", "--num-iterations", "20", "--model_dim", "128", "--shuffle-rows", "false"], {}),
    (["--preset", "speedrun", "--cooldown-frac", "0.5"], {"NANOGPT_NUM_ITERATIONS": "9", "NANOGPT_SEED": "3"}),
    (["--seed", "4"], {"NANOGPT_SEED": "3", "NANOGPT_VAL_TOKENS": "65_536"}),
])
def test_same_flags_give_same_config(argv: list[str], env: dict[str, str]) -> None:
    ours = T.load_config(argv, env=env)
    if "--preset" not in argv and ours.preset == "shakespeare":  # without CUDA: train_gpt.py's default is the
        argv = ["--preset", "shakespeare", *argv]  # 2025 CPU preset, pretraining.py's the 2026 one
        assert R.default_preset() == "shakespeare2026"
    lib = R.load_config(argv, env=env, dotenv_path=None)
    assert dataclasses.asdict(ours) == lib.to_dict()


@pytest.mark.parametrize("argv, env", [
    (["--num-iterations", "abc"], {}),
    (["--shuffle-rows", "maybe"], {}),
    (["--cooldown-frac", "x"], {}),
    ([], {"NANOGPT_NUM_LAYRES": "4"}),
])
def test_bad_values_give_same_message(argv: list[str], env: dict[str, str]) -> None:
    with pytest.raises(M.ConfigError) as lib:
        R.load_config(argv, env=env, dotenv_path=None)
    with pytest.raises(T.ConfigError) as ours:
        T.load_config(argv, env=env)
    assert str(ours.value) == str(lib.value)


@pytest.mark.parametrize("overrides, world_size", [
    (dict(num_iterations=0), 1), (dict(warmup_steps=-2), 1), (dict(row_len=-1), 1), (dict(muon_lr=0.0), 1),
    (dict(cooldown_frac=0.0), 1), (dict(adam_beta2=1.0), 1), (dict(model_dim=96), 1), (dict(num_layers=3), 1),
    (dict(no_attn_layer=2), 1), (dict(train_seq_len=200), 1), (dict(row_len=100, train_seq_len=200), 1),
    (dict(shuffle_rows=True, row_len=0), 1), (dict(rank_equivalents=3), 2), (dict(val_tokens=256), 2),
    (dict(dtype="fp16"), 1), (dict(run_id="../escape"), 1),
])
def test_validation_messages_equal(overrides: dict, world_size: int) -> None:
    hp, thp = both_hparams(**overrides)
    with pytest.raises(M.ConfigError) as lib:
        hp.validate(world_size)
    with pytest.raises(T.ConfigError) as ours:
        thp.validate(world_size)
    assert str(ours.value) == str(lib.value)


def test_help_lists_every_field_with_its_comment() -> None:
    text = T.build_arg_parser().format_help()
    for name, comment in R.field_comments().items():
        if name != "preset":
            assert f"--{name.replace('_', '-')}" in text, name
    assert "optimizer steps" in text


# -----------------------------------------------------------------------------
# The pieces, bit for bit


@pytest.mark.parametrize("shape", [(64, 64), (96, 32), (32, 96), (3, 48, 16)])
def test_newtonschulz_equal(shape: tuple[int, ...]) -> None:
    G = torch.randn(shape, generator=torch.Generator().manual_seed(len(shape)))
    assert torch.equal(T.zeropower_via_newtonschulz5(G), M.zeropower_via_newtonschulz5(G))


@pytest.mark.parametrize("preset", ["speedrun", "shakespeare"])
def test_schedules_equal_at_every_step(preset: str) -> None:
    hp, thp = M.Hyperparameters(**M.PRESETS[preset]), T.Hyperparameters(**T.PRESETS[preset])
    for step in range(hp.num_iterations + 2):
        assert T.get_lr(step, thp) == M.get_lr(step, hp)
        assert T.get_muon_momentum(step, thp) == M.get_muon_momentum(step, hp)
        assert T.get_window_size_blocks(step, thp) == M.get_window_size_blocks(step, hp)


@pytest.mark.parametrize("num_layers, no_attn", [(2, -1), (4, 1), (8, 5)])
def test_gpt_init_and_forward_equal(num_layers: int, no_attn: int) -> None:
    """Same seed gives the same weights (names, shapes, values); the same weights give the same logits and loss."""
    m, t = gpt_pair(num_layers=num_layers, no_attn_layer=no_attn, row_len=256)
    sd_m, sd_t = m.state_dict(), t.state_dict()
    assert list(sd_t) == list(sd_m)
    assert all(torch.equal(sd_t[k], sd_m[k]) for k in sd_m)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():  # the zero-initialised projections would hide attention and MLPs
        for p in list(m.parameters()):
            p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    t.load_state_dict(m.state_dict())
    x = torch.randint(0, M.EOT_ID, (2, 256), generator=gen)
    x[0, [0, 70, 200]] = M.EOT_ID
    y = torch.randint(0, M.EOT_ID, (2, 256), generator=gen)
    for window in (1, 2, torch.tensor(3, dtype=torch.int32)):
        assert torch.equal(t(x, None, window), m(x, None, window))
        assert torch.equal(t(x, y, window), m(x, y, window))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert torch.equal(t(x, y, window), m(x, y, window))


@pytest.mark.parametrize("window", [1, 2, 3, 1 << 20])
def test_attention_masks_equal(window: int) -> None:
    tokens = torch.from_numpy(random_documents(2 * 512, seed=window % 7, mean_doc_len=150).astype("int64"))
    docs = (tokens.view(2, 512) == M.EOT_ID).cumsum(dim=1)
    assert torch.equal(T.dense_attention_mask(docs, window), M.dense_attention_mask(docs, window))
    ours, lib = T.flex_block_mask(docs, window), M.flex_block_mask(docs, window)
    for name in ("kv_num_blocks", "kv_indices", "full_kv_num_blocks", "full_kv_indices"):
        assert torch.equal(getattr(ours, name), getattr(lib, name)), name


# the speedrun preset's optimizer settings (the dataclass defaults) and layout (an attention-free layer) at tiny size
SPEEDRUN_TINY = dict(num_layers=4, no_attn_layer=1, head_lr=0.22, embed_lr=0.6, scalar_lr=0.04, muon_momentum_warmup=300)


@pytest.mark.parametrize("shape", [{}, SPEEDRUN_TINY], ids=["shakespeare-tiny", "speedrun-tiny"])
def test_optimizer_steps_equal(shape: dict) -> None:
    """Adam + Muon with schedules, every 2026 switch off: three steps on the same gradients leave the same weights
    and state as the May-2025 record's own optimizer code."""
    m, t = gpt_pair(seed=2, **shape)
    hp, thp = both_hparams(**shape)
    opts_m, opts_t = M.setup_optimizers(m, hp), T.setup_optimizers(t, thp)
    assert [[len(g["params"]) for g in o.param_groups] for o in opts_t] == \
        [[len(g["params"]) for g in o.param_groups] for o in opts_m]
    gen = torch.Generator().manual_seed(3)
    for step in range(3):
        for pm, pt in zip(m.parameters(), t.parameters()):
            pm.grad = torch.randn(pm.shape, generator=gen)
            pt.grad = pm.grad.clone()
        M.apply_schedules(opts_m, step, hp)
        T.apply_schedules(opts_t, step, thp)
        for om, ot in zip(opts_m, opts_t):
            om.step()
            ot.step()
    assert all(torch.equal(a, b) for a, b in zip(m.parameters(), t.parameters()))
    for om, ot in zip(opts_m, opts_t):
        sm, st = om.state_dict(), ot.state_dict()
        assert st["param_groups"] == sm["param_groups"] and st["state"].keys() == sm["state"].keys()
        for idx, state in sm["state"].items():
            assert all(torch.equal(v, st["state"][idx][k]) for k, v in state.items()), idx


@pytest.mark.parametrize("world_size, shuffle", [(1, False), (2, False), (1, True), (2, True)])
def test_data_generators_equal(shard_dir: Path, world_size: int, shuffle: bool) -> None:
    pattern = str(shard_dir / "tiny_train_*.bin")
    for rank in range(world_size):
        kwargs = dict(row_len=128, shuffle_seed=5 if shuffle else None)
        ours = T.distributed_data_generator(pattern, 1024, rank, world_size, **kwargs)
        lib = M.distributed_data_generator(pattern, 1024, rank, world_size, **kwargs)
        for _ in range(15):  # past both shards: epochs and reshuffles included
            a, b = next(ours), next(lib)
            assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) and a[2] == b[2]


def test_bad_shard_is_a_data_error(tmp_path: Path) -> None:
    bad = tmp_path / "bad_000000.bin"
    bad.write_bytes(b"\0" * 2048)
    with pytest.raises(T.DataError, match="bad_000000.bin: not a version-1 token shard"):
        next(T.distributed_data_generator(str(tmp_path / "bad_*.bin"), 256, 0, 1))
    M.write_data_shard(bad, list(range(1000)))
    bad.write_bytes(bad.read_bytes()[:-10])
    with pytest.raises(T.DataError, match="truncated or empty shard: header claims 1000 tokens"):
        next(T.distributed_data_generator(str(tmp_path / "bad_*.bin"), 256, 0, 1))


# -----------------------------------------------------------------------------
# Whole runs (subprocesses)

PARITY_STEPS = 20


def shakespeare_args(log_dir: Path, run_id: str) -> list[str]:
    """A 2-layer model on the real corpus with the CPU defaults (dtype auto, whole-model compile): 20 steps."""
    return ["--preset", "shakespeare", "--log-dir", str(log_dir), "--run-id", run_id, "--num-layers", "2",
            "--num-heads", "2", "--head-dim", "32", "--model-dim", "64", "--train-seq-len", "512", "--row-len", "256",
            "--val-seq-len", "512", "--val-tokens", "2048", "--num-iterations", str(PARITY_STEPS),
            "--val-loss-every", "10", "--muon-momentum-warmup", "10", "--device", "cpu"]


@pytest.fixture(scope="module")
def parity_runs(tmp_path_factory: pytest.TempPathFactory, shakespeare_data: Path) -> Path:
    """The same 20-step run through train_gpt.py (run 'single') and pretraining.py (run 'library')."""
    logs = tmp_path_factory.mktemp("parity")
    for script, run_id in (("train_gpt.py", "single"), ("pretraining.py", "library")):
        result = run([sys.executable, script, *shakespeare_args(logs, run_id)], timeout=600)
        assert result.returncode == 0, result.stderr
    return logs


def checkpoint(run_dir: Path, step: int) -> dict:
    return torch.load(run_dir / f"state_step{step:06d}.pt", weights_only=True)


@pytest.mark.slow
def test_train_gpt_equals_pretraining_bitwise(parity_runs: Path) -> None:
    """Every train and val loss, the final weights and the optimizer state are bitwise equal."""
    strip = [{k: v for k, v in row.items() if k != "train_time_ms"}
             for run_id in ("single", "library")
             for row in map(json.loads, (parity_runs / run_id / "metrics.jsonl").read_text().splitlines())]
    single, library = strip[:len(strip) // 2], strip[len(strip) // 2:]
    assert single == library and len(single) == PARITY_STEPS + 3  # 20 train rows, val at 0, 10, 20
    train, val = read_metrics(parity_runs / "single")
    assert val[-1] < val[0] - 3 and train[-1] < train[0] - 3  # it learned: parity of a run that moved
    a, b = checkpoint(parity_runs / "single", PARITY_STEPS), checkpoint(parity_runs / "library", PARITY_STEPS)
    assert set(a) == set(b) and list(a["model"]) == list(b["model"])
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    for opt_a, opt_b in zip(a["optimizers"], b["optimizers"]):
        for idx, state in opt_a["state"].items():
            assert all(torch.equal(v, opt_b["state"][idx][k]) for k, v in state.items())
    assert a["data_position"] == b["data_position"] and a["val_loss"] == b["val_loss"] == val[-1]
    assert {k: v for k, v in a["hyperparameters"].items() if k != "run_id"} == \
        {k: v for k, v in b["hyperparameters"].items() if k != "run_id"}


@pytest.mark.slow
def test_log_begins_with_source_then_versions_then_step_lines(parity_runs: Path) -> None:
    log = (parity_runs / "single.txt").read_text()
    assert log.startswith(SOURCE)
    header = log[len(SOURCE):]
    assert "Running Python" in header and re.search(r"Running PyTorch \S+ compiled for CUDA", header)
    config = json.loads(next(line for line in header.splitlines() if line.startswith("config: "))[8:])
    assert config["num_iterations"] == PARITY_STEPS and config["run_id"] == "single"
    steps = [line for line in header.splitlines() if line.startswith("step:")]
    assert len(steps) == PARITY_STEPS + 3
    assert all(re.fullmatch(r"step:\d+/20 (train_loss|val_loss):\d+\.\d{4} train_time:\d+ms step_avg:\d+\.\d\dms"
                            r"( tok/s:\d+)?", line) for line in steps), steps
    assert checkpoint(parity_runs / "single", PARITY_STEPS)["code"] == {"train_gpt.py": SOURCE}


@pytest.mark.slow
def test_checkpoint_loads_in_library_and_resumes_in_pretraining(parity_runs: Path, tmp_path: Path) -> None:
    """model.load_model reads train_gpt.py's checkpoint; pretraining.py --resume from its step 10 ends on
    exactly train_gpt.py's step-20 weights."""
    model, hp, _ = M.load_model(parity_runs / "single" / f"state_step{PARITY_STEPS:06d}.pt")
    assert hp.num_layers == 2 and hp.run_id == "single"
    final = checkpoint(parity_runs / "single", PARITY_STEPS)["model"]
    assert all(torch.equal(v, final[k]) for k, v in model.state_dict().items())
    resumed_dir = tmp_path / "single"
    resumed_dir.mkdir()
    shutil.copy(parity_runs / "single" / "state_step000010.pt", resumed_dir)
    result = run([sys.executable, "pretraining.py", "--resume", str(resumed_dir / "state_step000010.pt")], timeout=600)
    assert result.returncode == 0, result.stderr
    ours = checkpoint(resumed_dir, PARITY_STEPS)["model"]
    assert all(torch.equal(ours[k], final[k]) for k in final)


@pytest.mark.slow
def test_checkpoint_loads_in_eval_and_chat(parity_runs: Path, tmp_path: Path) -> None:
    """eval.py and chat.py find train_gpt.py's checkpoint in a log dir by themselves; eval's val loss on the same
    budget equals the one train_gpt.py logged."""
    (tmp_path / "single").symlink_to(parity_runs / "single", target_is_directory=True)
    result = run([sys.executable, "eval.py", "--log-dir", str(tmp_path), "--max-new-tokens", "5", "--json"])
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["checkpoint"].endswith(f"single/state_step{PARITY_STEPS:06d}.pt") and report["step"] == PARITY_STEPS
    assert report["val"]["tokens"] == 2048
    assert report["val"]["loss"] == pytest.approx(read_metrics(parity_runs / "single")[1][-1], abs=1e-3)
    assert len(report["samples"]) == 3 and all(s["completions"][0] for s in report["samples"])
    chat = run([sys.executable, "chat.py", "--log-dir", str(tmp_path), "--prompt", "Good morrow",
                "--max-new-tokens", "8"])
    assert chat.returncode == 0 and chat.stdout.strip(), chat.stderr
    assert f"single/state_step{PARITY_STEPS:06d}.pt" in chat.stderr and "base model" in chat.stderr


@pytest.mark.slow
def test_torchrun_two_processes_match_one(shard_dir: Path, tmp_path: Path) -> None:
    """train_gpt.py on 2 gloo processes follows its 1-process trajectory (fp32; 1e-5 relative)."""
    one = run([sys.executable, "train_gpt.py", *tiny_args(shard_dir, tmp_path, "one")])
    assert one.returncode == 0, one.stderr
    two = run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
               f"--master_port={free_port()}", "train_gpt.py", *tiny_args(shard_dir, tmp_path, "two")])
    assert two.returncode == 0, two.stderr
    assert "world_size:2 accumulation:1" in two.stdout
    train1, val1 = read_metrics(tmp_path / "one")
    train2, val2 = read_metrics(tmp_path / "two")
    assert len(train1) == len(train2) == 6 and len(val1) == len(val2) == 3
    for a, b in zip(train1 + val1, train2 + val2):
        assert abs(a - b) <= 1e-5 * abs(a), (train1, train2, val1, val2)
    w1, w2 = checkpoint(tmp_path / "one", 6)["model"], checkpoint(tmp_path / "two", 6)["model"]
    for k in w1:
        torch.testing.assert_close(w1[k], w2[k], rtol=1e-4, atol=1e-5, msg=k)


@pytest.mark.slow
def test_existing_run_id_is_refused_and_kept(shard_dir: Path, tmp_path: Path) -> None:
    (tmp_path / "taken.txt").write_text("an earlier record\n")
    result = run([sys.executable, "train_gpt.py", *tiny_args(shard_dir, tmp_path, "taken")])
    assert result.returncode == 2 and "taken.txt already exists; pick another --run-id" in result.stderr
    assert (tmp_path / "taken.txt").read_text() == "an earlier record\n"


@pytest.mark.slow
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_runs_agree(shard_dir: Path, tmp_path: Path) -> None:
    """On a GPU (FlexAttention, bf16 embeddings, whole-model compile with warm-up) the scripts agree to within
    bf16 and atomic-add noise; on CPU they are bitwise equal (above)."""
    gpu = ["--device", "cuda", "--dtype", "bf16", "--compile", "on", "--warmup-steps", "2"]
    for script, run_id in (("train_gpt.py", "single"), ("pretraining.py", "library")):
        result = run([sys.executable, script, *tiny_args(shard_dir, tmp_path, run_id), *gpu], timeout=600)
        assert result.returncode == 0, result.stderr
        assert "warm-up: 2 steps run and undone" in result.stdout
    (train1, val1), (train2, val2) = read_metrics(tmp_path / "single"), read_metrics(tmp_path / "library")
    for a, b in zip(train1 + val1, train2 + val2):
        assert abs(a - b) <= 1e-2 * abs(a), (train1, train2, val1, val2)


@pytest.mark.parametrize("name", T.LIBRARY_ONLY)
def test_library_only_fields_are_refused(name: str) -> None:
    """Each field of the shared config that the record does not have (loss modifiers, trackers, the 2026 record's
    optimizer switches) is refused by name when it differs from its default."""
    field = {f.name: f for f in dataclasses.fields(T.Hyperparameters)}[name]
    value = {"bool": True, "int": 2, "float": 0.5}.get(str(field.type), "other")
    T.refuse_library_only(T.Hyperparameters())  # the defaults pass
    with pytest.raises(T.ConfigError, match=rf"^--{name.replace('_', '-')} is not in train_gpt.py \(the May-2025 "
                                            r"record: its plain loss and optimizer, log.txt only\); `python "
                                            r"pretraining.py` takes the same flags and has it$"):
        T.refuse_library_only(T.Hyperparameters(**{name: value}))
