"""The harness (runs.py): flags, the environment and .env into a config (load_config, precedence, unknown flags and
bad values), help text, import direction, run directories, RunLog, Saver, resume, exit policy, signals and script
helpers, in process on CPU.

    python -m pytest -q tests/test_runs.py
"""
from __future__ import annotations

import ast
import dataclasses
import errno
import inspect
import io
import json
import os
import re
import signal
import sys
import textwrap
import time
import tokenize
import traceback
from pathlib import Path

import pytest
import torch

import model as M
import runs as R
from conftest import REPO_DIR, cfg, tiny_hparams

SCRIPTS = ("runs", "inference", "pretraining", "finetune", "eval", "chat", "export", "bench", "gpu_check", "compare",
           "train_gpt")
# The section headings of Hyperparameters (the same in model.py and train_gpt.py); any other comment-only line
# directly below a field must be a hanging-indent continuation of that field's comment.
SECTIONS = ("bookkeeping", "data", "model", "optimisation (record values; provenance in setup_optimizers)",
            "schedule, head and loss (the 2026 record's; issue 26)",
            "architecture (the 2026 record's; issue 27): every switch off = the 2025 record's GPT. docs/architecture.md",
            "loss modifiers: all off by default; validation and eval.py report plain cross-entropy",
            "evaluation, logging and checkpoints", "runtime",
            "experiment trackers: log.txt and metrics.jsonl are always written")


@pytest.fixture(autouse=True)
def _rank_0(monkeypatch: pytest.MonkeyPatch) -> None:
    """exit_with says bad input on rank 0 only (by RANK); the tests run as a single process."""
    monkeypatch.delenv("RANK", raising=False)


def cpu(**kw) -> M.Runtime:
    return M.Runtime(device=torch.device("cpu"), **kw)


def small_hp(tmp_path: Path, **overrides) -> M.Hyperparameters:
    """tiny_hparams with a 256-token vocabulary, so a checkpoint is 0.6 MB instead of 37 MB."""
    return tiny_hparams(vocab_size=256, log_dir=str(tmp_path / "logs"), **overrides)


def small_model(hp: M.Hyperparameters) -> M.GPT:
    torch.manual_seed(0)
    return M.GPT.from_hparams(hp)


def squash(text: str) -> str:
    return " ".join(text.split())


# -----------------------------------------------------------------------------
# Flags: every field's whole comment is its --help text


def documented_fields(source: str) -> tuple[dict[str, str], list[str]]:
    """An independent parse of a Hyperparameters class: (field -> trailing comment plus its hanging-indent
    continuation lines, problems). A problem is a field without a comment, or a comment-only line directly below
    a field that is neither a continuation (`#   more`) nor a section heading followed by a field."""
    source = textwrap.dedent(source)
    lines = source.splitlines()
    cls = ast.parse(source).body[0]
    fields = {n.lineno: n.target.id for n in cls.body if isinstance(n, ast.AnnAssign)}
    comments = {t.start[0]: t.string for t in tokenize.generate_tokens(io.StringIO(source).readline)
                if t.type == tokenize.COMMENT}
    texts, problems = {}, []
    for lineno, name in fields.items():
        if lineno not in comments:
            problems.append(f"{name}: no trailing comment")
            continue
        parts = [comments[lineno].lstrip("#").strip()]
        below = lineno + 1
        while below <= len(lines) and lines[below - 1].strip().startswith("#"):
            line = lines[below - 1].strip()
            if re.match(r"#\s{2,}\S", line):
                parts.append(line[1:].strip())
            elif not (line[1:].strip() in SECTIONS and below + 1 in fields):
                problems.append(f"{name}: comment line {line!r} below it is neither a hanging-indent continuation "
                                f"('#   more') nor a section heading followed by a field")
            below += 1
        texts[name] = " ".join(parts)
    return texts, problems


def test_documented_fields_flags_a_comment_wrapped_without_hanging_indent() -> None:
    """The independent parse itself: a hanging indent joins, a heading passes, a bare wrapped line is a problem."""
    good = ('class H:\n    # data\n    a: int = 1  # first half\n    #   second half\n    # model\n'
            '    b: int = 2  # b\n')
    assert documented_fields(good) == ({"a": "first half second half", "b": "b"}, [])
    bad = 'class H:\n    a: int = 1  # first half\n    # second half\n    b: int = 2  # b\n'
    texts, problems = documented_fields(bad)
    assert texts["a"] == "first half" and len(problems) == 1 and "'# second half'" in problems[0]


@pytest.fixture
def wide_help(monkeypatch: pytest.MonkeyPatch) -> None:
    """argparse wraps help to the terminal width (and may break at hyphens); make it one line per flag."""
    monkeypatch.setenv("COLUMNS", "1000")


def test_pretraining_help_holds_every_field_comment_whole(wide_help: None) -> None:
    """--help of pretraining.py shows each Hyperparameters field's full comment, wrapped lines included."""
    texts, problems = documented_fields(inspect.getsource(M.Hyperparameters))
    assert problems == []
    assert R.field_comments() == texts
    help_text = squash(R.build_arg_parser("pretraining.py").format_help())
    defaults = {f.name: f.default for f in dataclasses.fields(M.Hyperparameters)}
    for name, text in texts.items():
        if name != "preset":
            assert squash(f"{text} (default {defaults[name]!r})") in help_text, name
    compile_help = re.search(r"--compile STR (.*?) \(default 'auto'\)", help_text).group(1)
    assert "for CPU pretraining, else head" in compile_help


def test_train_gpt_help_holds_every_field_comment_whole(wide_help: None) -> None:
    """train_gpt.py --help shows each of its fields' full comment (--warmup-steps and --compile wrap)."""
    import train_gpt

    texts, problems = documented_fields(inspect.getsource(train_gpt.Hyperparameters))
    assert problems == []
    help_text = squash(train_gpt.build_arg_parser().format_help())
    defaults = {f.name: f.default for f in dataclasses.fields(train_gpt.Hyperparameters)}
    for name, text in texts.items():
        if name != "preset":
            assert squash(f"{text} (default {defaults[name]!r})") in help_text, name
    warmup = re.search(r"--warmup_steps INT (.*?) \(default -1\)", help_text).group(1)
    assert "2 compiled on CPU (no per-window kernels there), else 0" in warmup
    assert "head elsewhere" in re.search(r"--compile STR (.*?) \(default 'auto'\)", help_text).group(1)


def test_every_field_is_documented_in_help(capsys: pytest.CaptureFixture[str]) -> None:
    # the trailing comment of each field is its --help text (house style: one comment per field)
    comments = R.field_comments()
    assert sorted(comments) == sorted(f.name for f in M.dataclasses.fields(M.Hyperparameters))
    with pytest.raises(SystemExit):
        R.build_arg_parser("pretraining.py").parse_args(["--help"])
    assert "tokens per rank-equivalent per step" in " ".join(capsys.readouterr().out.split())


# -----------------------------------------------------------------------------
# load_config: typed flags, unknown flags, bad values


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


def test_cpu_default_is_the_2026_preset(monkeypatch: pytest.MonkeyPatch) -> None:
    # without CUDA the default is the 2026 CPU preset: the 2025 one plus switches, and the same corpus
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert R.default_preset() == R.CPU_DEFAULT_PRESET == "shakespeare2026"
    hp = cfg()
    assert hp.preset == "shakespeare2026"
    old, new = M.PRESETS["shakespeare"], M.PRESETS["shakespeare2026"]
    assert {k: v for k, v in new.items() if k in old} == old  # everything else as the 2025 preset
    switches = {k: v for k, v in new.items() if k not in old}
    assert switches and all(getattr(M.Hyperparameters, k) != v for k, v in switches.items())
    assert M.preset_data(hp) == M.preset_data(cfg("--preset", "shakespeare")) == "shakespeare"
    assert M.preset_data(cfg("--preset", "speedrun")) == "fineweb"
    assert M.preset_data(cfg("--train-files", "mine_*.bin")) is None


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


# -----------------------------------------------------------------------------
# Imports go one way: scripts -> runs.py -> model.py


def imported_modules(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module.split(".")[0])
    return found


def test_model_imports_no_harness_or_script() -> None:
    """model.py is the library: it imports neither runs.py nor any script."""
    assert imported_modules(REPO_DIR / "model.py").isdisjoint(SCRIPTS)


def test_runs_imports_model_but_no_script() -> None:
    """runs.py sits between: it imports model.py and no script."""
    found = imported_modules(REPO_DIR / "runs.py")
    assert "model" in found and found.isdisjoint(set(SCRIPTS) - {"runs"})


def test_inference_imports_model_and_never_the_harness() -> None:
    """inference.py is library: it builds on model.py, and neither the harness nor a script."""
    found = imported_modules(REPO_DIR / "inference.py")
    assert "model" in found and found.isdisjoint(set(SCRIPTS) - {"inference"})


def test_the_training_model_has_no_decode_specialisation() -> None:
    """Decode formats, one-token kernels, caches and the compiled decoding step live in inference.py and reach the
    model through its two seams (a projection's decode format, a cache layer's attend); model.py names none."""
    tree = ast.parse((REPO_DIR / "model.py").read_text())
    names = {node.id for node in ast.walk(tree) if isinstance(node, ast.Name)}
    names |= {node.attr for node in ast.walk(tree) if isinstance(node, ast.Attribute)}
    names |= {node.name for node in ast.walk(tree) if isinstance(node, (ast.FunctionDef, ast.ClassDef))}
    decode = {"PackedWeight", "WeightFormat", "compiled_on_cpu", "one_token_norm", "stored", "streamed_matvec",
              "one_query_attention", "decode_fn", "KVCache", "RingCache", "forward_cached", "set_inference_weights"}
    assert names.isdisjoint(decode), sorted(names & decode)


def test_model_never_exits_or_prints() -> None:
    """The library raises; only the harness and the scripts exit or print a message for the user."""
    calls = []
    for node in ast.walk(ast.parse((REPO_DIR / "model.py").read_text())):
        if isinstance(node, ast.Call):
            name = ast.unparse(node.func)
            if name in ("print", "exit", "quit", "sys.exit", "os._exit") or name.endswith(".exit"):
                calls.append(f"line {node.lineno}: {name}(")
    assert calls == []


# -----------------------------------------------------------------------------
# Run directories


def test_fresh_run_dir_is_named_by_run_id_and_records_run_json(tmp_path: Path) -> None:
    """A fresh run gets log_dir/run_id and a run.json with the script, the config and the extra info."""
    hp = small_hp(tmp_path, run_id="first")
    run = R.open_run_dir(hp, cpu(), "finetune.py", info=dict(finetune={"parent": "p.pt", "args": {}}))
    try:
        assert run.path == tmp_path / "logs" / "first" and run.run_id == "first"
        info = json.loads((run.path / "run.json").read_text())
        assert info == dict(script="finetune.py", hyperparameters=hp.to_dict(),
                            finetune={"parent": "p.pt", "args": {}})
    finally:
        run.close()


def test_fresh_run_dir_without_run_id_gets_a_generated_one_and_leaves_hp_alone(tmp_path: Path) -> None:
    """An empty run_id becomes timestamp-hex; run.json records it, the caller's Hyperparameters are unchanged."""
    hp = small_hp(tmp_path, run_id="")
    before = hp.to_dict()
    run = R.open_run_dir(hp, cpu(), "pretraining.py")
    try:
        assert re.fullmatch(r"\d{8}-\d{6}-[0-9a-f]{6}", run.run_id)
        assert hp.to_dict() == before
        info = json.loads((run.path / "run.json").read_text())
        assert info == dict(script="pretraining.py", hyperparameters=dict(before, run_id=run.run_id))
    finally:
        run.close()


def test_fresh_run_into_an_existing_directory_is_refused(tmp_path: Path) -> None:
    """Two fresh runs never share a directory: the second one is a ConfigError that says what to do."""
    hp = small_hp(tmp_path, run_id="taken")
    (tmp_path / "logs" / "taken").mkdir(parents=True)
    with pytest.raises(M.ConfigError) as e:
        R.open_run_dir(hp, cpu(), "pretraining.py")
    assert str(e.value) == (f"run directory {tmp_path / 'logs' / 'taken'} already exists; pick another --run-id "
                            f"or --resume")
    assert not (tmp_path / "logs" / "taken" / "run.json").exists()


def test_a_locked_run_dir_cannot_be_opened_until_closed(tmp_path: Path) -> None:
    """While one RunDir holds the lock a second open is refused (naming the holder); after close() it opens."""
    hp = small_hp(tmp_path, run_id="busy")
    first = R.open_run_dir(hp, cpu(), "pretraining.py")
    try:
        with pytest.raises(M.ConfigError) as e:
            R.open_run_dir(hp, cpu(), "pretraining.py", resume_step=0)
        assert "is in use by another process" in str(e.value) and f"(pid {os.getpid()})" in str(e.value)
    finally:
        first.close()
    again = R.open_run_dir(hp, cpu(), "pretraining.py", resume_step=0)
    again.close()


def test_a_refused_start_leaves_no_run_behind(tmp_path: Path) -> None:
    """Not enough disk for the checkpoints: a CheckpointError before training, and no directory is left."""
    hp = small_hp(tmp_path, run_id="huge")
    with pytest.raises(M.CheckpointError, match="not enough disk space"):
        R.open_run_dir(hp, cpu(), "pretraining.py", bytes_per_checkpoint=2**62)
    assert not (tmp_path / "logs" / "huge").exists()


def test_resume_removes_partial_checkpoints_and_trims_metrics(tmp_path: Path) -> None:
    """On resume from step 4: killed writes go, metrics past 4 (and a cut line) go, step 4's train line stays."""
    hp = small_hp(tmp_path, run_id="again")
    run_dir = tmp_path / "logs" / "again"
    run_dir.mkdir(parents=True)
    (run_dir / "run.json").write_text('{"script": "pretraining.py", "original": true}')
    (run_dir / "state_step000004.pt").write_bytes(b"complete")
    (run_dir / ".state_step000006.pt.tmp1234").write_bytes(b"partial")
    (run_dir / ".state_step000004.pt.tmp99").write_bytes(b"partial")
    kept = ['{"step": 3, "train_loss": 5.0}', '{"step": 3, "val_loss": 5.5}', '{"step": 4, "train_loss": 4.9}']
    dropped = ['{"step": 4, "val_loss": 5.4}', '{"step": 5, "train_loss": 4.8}', '{"step": 6, "train_lo']
    (run_dir / "metrics.jsonl").write_text("\n".join(kept + dropped))
    run = R.open_run_dir(hp, cpu(), "pretraining.py", resume_step=4)
    try:
        assert run.path == run_dir
        assert sorted(p.name for p in run_dir.iterdir()) == [".lock", "metrics.jsonl", "run.json",
                                                             "state_step000004.pt"]
        assert (run_dir / "metrics.jsonl").read_text() == "".join(line + "\n" for line in kept)
        assert json.loads((run_dir / "run.json").read_text()) == {"script": "pretraining.py", "original": True}
    finally:
        run.close()


# -----------------------------------------------------------------------------
# RunLog


def test_runlog_prints_and_appends_to_log_txt(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """Rank 0: a line goes to stdout and to log.txt; console=False writes log.txt only."""
    log = R.RunLog(cpu(), tmp_path)
    log.print("step:1/6 train_loss:4.0000")
    log.print("quiet", console=False)
    log.close()
    assert capsys.readouterr().out == "step:1/6 train_loss:4.0000\n"
    assert (tmp_path / "log.txt").read_text() == "step:1/6 train_loss:4.0000\nquiet\n"


def test_runlog_metrics_are_one_json_line_per_call_on_disk_at_once(tmp_path: Path) -> None:
    """Each metrics() call is one JSON line, readable before close() (a kill -9 loses no logged step)."""
    log = R.RunLog(cpu(), tmp_path)
    try:
        log.metrics(step=1, train_loss=4.5)
        assert (tmp_path / "metrics.jsonl").read_text() == '{"step": 1, "train_loss": 4.5}\n'
        log.metrics(step=3, val_loss=4.25, train_time_ms=12.0)
        rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
        assert rows == [dict(step=1, train_loss=4.5), dict(step=3, val_loss=4.25, train_time_ms=12.0)]
    finally:
        log.close()


def test_runlog_of_rank_1_writes_nothing(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """Only rank 0 writes: rank 1 prints nothing and creates no file, with no process group."""
    log = R.RunLog(cpu(rank=1, world_size=2), tmp_path)
    log.print("hello")
    log.metrics(step=1, train_loss=4.0)
    log.header(tiny_hparams(), {"pretraining.py": "print('x')"})
    log.close()
    assert capsys.readouterr() == ("", "")
    assert list(tmp_path.iterdir()) == []


def test_runlog_header_writes_code_versions_and_config_to_log_only(tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture) -> None:
    """header(): the code that ran, the Python and PyTorch versions and `config: {json}`, in log.txt only."""
    hp = tiny_hparams(run_id="hdr")
    log = R.RunLog(cpu(), tmp_path)
    log.header(hp, {"pretraining.py": "SOURCE OF PRETRAINING", "model.py": "SOURCE OF MODEL"})
    log.close()
    assert capsys.readouterr().out == ""
    text = (tmp_path / "log.txt").read_text()
    assert text.startswith("==> pretraining.py <==\nSOURCE OF PRETRAINING\n==> model.py <==\nSOURCE OF MODEL\n")
    assert f"Running Python {sys.version.split()[0]} on " in text
    assert f"Running PyTorch {torch.__version__} compiled for CUDA {torch.version.cuda}" in text
    config_line = next(line for line in text.splitlines() if line.startswith("config: "))
    assert json.loads(config_line[len("config: "):]) == hp.to_dict()


# -----------------------------------------------------------------------------
# Saver


def make_saver(tmp_path: Path, rt: M.Runtime | None = None, **kw) -> tuple[R.Saver, M.GPT]:
    """A Saver on logs/saved (Hyperparameters fields in kw go to the config, the rest to Saver) and a model."""
    overrides = {k: kw.pop(k) for k in list(kw) if k in {f.name for f in dataclasses.fields(M.Hyperparameters)}}
    hp = small_hp(tmp_path, run_id="saved", **overrides)
    run_dir = tmp_path / "logs" / "saved"
    run_dir.mkdir(parents=True, exist_ok=True)
    return R.Saver(rt or cpu(), R.RunDir(run_dir), hp, {"pretraining.py": "code"}, **kw), small_model(hp)


def test_saver_writes_checkpoint_with_extras_in_order(tmp_path: Path) -> None:
    """save(): state_stepNNNNNN.pt with the config, Saver's extra, then val_step, then the call's extra."""
    saver, model = make_saver(tmp_path, extra=dict(kind="chat", lineage="parent.pt"))
    path = saver.save(5, model, [], {"shard": 0}, 4.5, 3, train_time_ms=12.5, note="x")
    assert path == tmp_path / "logs" / "saved" / "state_step000005.pt"
    state = torch.load(path, weights_only=True)
    assert list(state)[-5:] == ["kind", "lineage", "val_step", "train_time_ms", "note"]
    assert (state["step"], state["val_step"], state["val_loss"], state["train_time_ms"]) == (5, 3, 4.5, 12.5)
    assert state["hyperparameters"] == saver.hp.to_dict() and state["code"] == {"pretraining.py": "code"}
    assert state["data_position"] == {"shard": 0} and state["kind"] == "chat"


def test_saver_keeps_only_the_newest_checkpoints(tmp_path: Path) -> None:
    """After each save only hp.keep_checkpoints newest checkpoints remain."""
    saver, model = make_saver(tmp_path, keep_checkpoints=2)
    for step in (2, 4, 6):
        saver.save(step, model, [], None, None, None)
    assert [p.name for p in M.run_checkpoints(saver.run.path)] == ["state_step000004.pt", "state_step000006.pt"]


@pytest.mark.parametrize("case", ["rank1", "save_checkpoint_false"])
def test_saver_writes_nothing_off_rank_0_or_when_disabled(tmp_path: Path, case: str) -> None:
    """Rank 1, or --save-checkpoint false: save() returns None and the run directory stays empty."""
    if case == "rank1":
        saver, model = make_saver(tmp_path, rt=cpu(rank=1, world_size=2))
    else:
        saver, model = make_saver(tmp_path, save_checkpoint=False)
    assert saver.save(3, model, [], None, None, None) is None
    assert list(saver.run.path.iterdir()) == []


def test_saver_refuses_non_finite_weights(tmp_path: Path) -> None:
    """NaN weights: a TrainingError naming the parameter and the good checkpoint, ending with the hint; no write."""
    saver, model = make_saver(tmp_path, hint="Lower --lr-scale, then start again")
    good = saver.save(2, model, [], None, None, None)
    name, param = list(model.named_parameters())[3]
    with torch.no_grad():
        param.view(-1)[0] = float("nan")
    with pytest.raises(M.TrainingError) as e:
        saver.save(4, model, [], None, None, None)
    assert str(e.value) == (f"step 4: 1 parameter tensor(s) hold NaN or inf (first: {name}); stopped without "
                            f"writing a checkpoint (the newest good checkpoint is {good}). "
                            f"Lower --lr-scale, then start again")
    assert sorted(p.name for p in saver.run.path.iterdir()) == ["state_step000002.pt"]


@pytest.mark.parametrize("where", ["torch.save", "atomic_write"])
def test_saver_failed_write_keeps_the_previous_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                         where: str) -> None:
    """A full disk: one TrainingError naming the previous checkpoint, which is byte-identical; no partial file."""
    saver, model = make_saver(tmp_path)
    previous = saver.save(2, model, [], None, None, None)
    before = previous.read_bytes()

    def fail(*args, **kwargs):
        if where == "torch.save":
            args[1].write(b"PK partial")  # some bytes reached the temporary file first
        raise OSError(errno.ENOSPC, "No space left on device")

    if where == "torch.save":
        monkeypatch.setattr(torch, "save", fail)
    else:
        monkeypatch.setattr(M, "atomic_write", fail)
    with pytest.raises(M.TrainingError) as e:
        saver.save(4, model, [], None, None, None)
    target = saver.run.path / "state_step000004.pt"
    assert str(e.value) == (f"{target}: checkpoint not written (No space left on device); the previous checkpoint "
                            f"{previous} is intact. Free space or fix the directory, then continue with "
                            f"--resume latest")
    assert previous.read_bytes() == before
    assert sorted(p.name for p in saver.run.path.iterdir()) == ["state_step000002.pt"]


def test_saver_real_failed_write_keeps_the_previous_checkpoint(tmp_path: Path) -> None:
    """A write the kernel refuses part way (RLIMIT_FSIZE, like a full disk), through the real torch.save: one
    TrainingError naming the previous checkpoint, which stays byte-identical, and no file left behind."""
    resource = pytest.importorskip("resource")
    saver, model = make_saver(tmp_path)
    previous = saver.save(2, model, [], None, None, None)
    before = previous.read_bytes()
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    for limit in (len(before) // 8, len(before) // 4, len(before) // 2):  # the write fails at different points
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))  # Python ignores SIGXFSZ: the write fails EFBIG
        try:
            with pytest.raises(M.TrainingError) as e:
                saver.save(4, model, [], None, None, None)
        finally:
            resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        assert str(e.value).startswith(f"{saver.run.path / 'state_step000004.pt'}: checkpoint not written")
        assert f"the previous checkpoint {previous} is intact" in str(e.value)
        assert previous.read_bytes() == before
        assert sorted(p.name for p in saver.run.path.iterdir()) == ["state_step000002.pt"]


def test_saver_diverged_names_newest_checkpoint_and_hint(tmp_path: Path) -> None:
    """Saver.diverged(problem): the TrainingError a script raises on a non-finite loss, with Saver's hint."""
    saver, model = make_saver(tmp_path, hint="HINT.")
    first = saver.diverged("step 3: the training loss is nan")
    assert isinstance(first, M.TrainingError)
    assert str(first) == ("step 3: the training loss is nan; stopped without writing a checkpoint (no checkpoint "
                          "was written yet). HINT.")
    path = saver.save(2, model, [], None, None, None)
    assert str(saver.diverged("x")) == f"x; stopped without writing a checkpoint (the newest good checkpoint is " \
                                       f"{path}). HINT."
    assert R.Saver(cpu(), saver.run, saver.hp, {}).hint == R.DIVERGENCE_HINT


# -----------------------------------------------------------------------------
# resolve_resume


@pytest.fixture
def log_dir(tmp_path: Path) -> Path:
    return tmp_path / "logs"


def started_run(log_dir: Path, run_id: str, script: str = "pretraining.py", **info) -> tuple[Path, M.Hyperparameters]:
    """A run as open_run_dir leaves it before its first checkpoint: run.json only."""
    hp = tiny_hparams(vocab_size=256, log_dir=str(log_dir), run_id=run_id, num_iterations=9)
    R.open_run_dir(hp, cpu(), script, info=info).close()
    return log_dir / run_id, hp


def checkpoint(run_dir: Path, hp: M.Hyperparameters, step: int, **extra) -> Path:
    return M.save_checkpoint(run_dir / f"state_step{step:06d}.pt", step=step, model=small_model(hp), optimizers=[],
                             hp=hp, code={}, extra=extra)


@pytest.mark.parametrize("spec", ["latest", "run_dir", "checkpoint"])
def test_resolve_resume_finds_the_newest_checkpoint(log_dir: Path, spec: str) -> None:
    """latest, a run directory and a checkpoint path all give a Resume of that run and checkpoint."""
    run_dir, hp = started_run(log_dir, "base")
    checkpoint(run_dir, hp, 3)
    newest = checkpoint(run_dir, hp, 6, val_step=6)
    arg = {"latest": "latest", "run_dir": str(run_dir), "checkpoint": str(newest)}[spec]
    resume = R.resolve_resume(arg, log_dir, "pretraining.py")
    assert isinstance(resume, R.Resume) and dataclasses.is_dataclass(resume) and not isinstance(resume, tuple)
    assert (resume.run_dir, resume.checkpoint, resume.target) == (run_dir, newest, str(newest))
    assert resume.state["step"] == 6 and resume.record is resume.state
    assert resume.config == hp


def test_resolve_resume_of_a_run_killed_before_its_first_checkpoint(log_dir: Path) -> None:
    """run.json only: no checkpoint, no state, run.json's config, and the run directory as target."""
    run_dir, hp = started_run(log_dir, "early")
    resume = R.resolve_resume("latest", log_dir, "pretraining.py")
    assert (resume.run_dir, resume.checkpoint, resume.state, resume.target) == (run_dir, None, None, str(run_dir))
    assert resume.config == hp and resume.record["script"] == "pretraining.py"


def test_pretraining_refuses_a_fine_tuned_checkpoint(log_dir: Path) -> None:
    """A chat checkpoint is continued by finetune.py, not pretraining.py."""
    run_dir, hp = started_run(log_dir, "chat", "finetune.py", finetune={"parent": "p", "args": {}})
    path = checkpoint(run_dir, hp, 2, kind="chat", finetune={"parent": "p", "args": {}})
    with pytest.raises(M.CheckpointError) as e:
        R.resolve_resume(str(path), log_dir, "pretraining.py")
    assert str(e.value) == f"{path}: a fine-tuned checkpoint; continue it with finetune.py --resume"


def test_pretraining_refuses_a_record_checkpoint(log_dir: Path) -> None:
    """A record checkpoint (weights, no config) cannot be resumed."""
    path = log_dir / "record" / "state_step001770.pt"
    path.parent.mkdir(parents=True)
    torch.save({"model": small_model(tiny_hparams(vocab_size=256)).state_dict(), "step": 1770}, path)
    with pytest.raises(M.CheckpointError) as e:
        R.resolve_resume(str(path), log_dir, "pretraining.py")
    assert str(e.value) == f"{path}: has no hyperparameters (a record checkpoint cannot be resumed)"


def test_finetune_refuses_a_base_checkpoint(log_dir: Path) -> None:
    """finetune.py --resume on a pretraining checkpoint says to use pretraining.py."""
    run_dir, hp = started_run(log_dir, "base")
    path = checkpoint(run_dir, hp, 2)
    with pytest.raises(M.CheckpointError) as e:
        R.resolve_resume(str(path), log_dir, "finetune.py")
    assert str(e.value) == f"{path}: not a fine-tuning checkpoint (resume pretraining with pretraining.py)"


def test_finetune_refuses_a_run_json_without_lineage(log_dir: Path) -> None:
    """A finetune.py run.json without its "finetune" lineage is not a fine-tuning run."""
    run_dir, _ = started_run(log_dir, "nolineage", "finetune.py")
    with pytest.raises(M.CheckpointError) as e:
        R.resolve_resume(str(run_dir), log_dir, "finetune.py")
    assert str(e.value) == f"{run_dir / 'run.json'}: not a fine-tuning run"


def test_finetune_resumes_its_own_run_killed_before_a_checkpoint(log_dir: Path) -> None:
    """latest for finetune.py skips pretraining runs and returns the lineage from run.json."""
    started_run(log_dir, "base")
    run_dir, hp = started_run(log_dir, "ft", "finetune.py", finetune={"parent": "p.pt", "args": {"lr_scale": 1}})
    resume = R.resolve_resume("latest", log_dir, "finetune.py")
    assert (resume.run_dir, resume.checkpoint, resume.config) == (run_dir, None, hp)
    assert resume.record["finetune"] == {"parent": "p.pt", "args": {"lr_scale": 1}}


def resumed_from_an_earlier_checkpoint(log_dir: Path, keep: int) -> tuple[R.RunDir, R.Saver, M.GPT]:
    """A run with checkpoints 3 and 6, continued with --resume .../state_step000003.pt (README: `--resume
    CHECKPOINT` continues exactly), as pretraining.py opens it: its run directory at resume_step=3."""
    run_dir, hp = started_run(log_dir, "branch")
    hp = dataclasses.replace(hp, keep_checkpoints=keep)
    for step in (3, 6):
        checkpoint(run_dir, hp, step)
    resume = R.resolve_resume(str(run_dir / "state_step000003.pt"), log_dir, "pretraining.py")
    run = R.open_run_dir(hp, cpu(), "pretraining.py", resume_step=resume.state["step"])
    return run, R.Saver(cpu(), run, hp, {}), small_model(hp)


def test_resume_latest_after_resuming_an_earlier_checkpoint_continues_the_new_branch(log_dir: Path) -> None:
    """Stopped at step 4 after resuming from step 3: --resume latest continues from the step-4 checkpoint."""
    run, saver, model = resumed_from_an_earlier_checkpoint(log_dir, keep=2)
    try:
        written = saver.save(4, model, [], None, None, None)
    finally:
        run.close()
    assert R.resolve_resume("latest", log_dir, "pretraining.py").checkpoint == written


def test_saver_never_prunes_the_checkpoint_it_just_wrote(log_dir: Path) -> None:
    """save() returns a checkpoint that exists, also in a run resumed from an earlier checkpoint."""
    run, saver, model = resumed_from_an_earlier_checkpoint(log_dir, keep=1)
    try:
        written = saver.save(4, model, [], None, None, None)
    finally:
        run.close()
    assert written.is_file()


def test_resume_latest_without_runs(log_dir: Path) -> None:
    """latest with no run of the script says how to start one."""
    started_run(log_dir, "ft", "finetune.py", finetune={"parent": "p", "args": {}})
    with pytest.raises(M.CheckpointError) as e:
        R.resolve_resume("latest", log_dir, "pretraining.py")
    assert str(e.value) == f"no pretraining.py run under {log_dir}/ to resume (start one with python pretraining.py)"


# -----------------------------------------------------------------------------
# Exit policy


def locked_run(tmp_path: Path, prog: str = "x.py") -> R.ScriptRun:
    path = tmp_path / "run"
    path.mkdir(exist_ok=True)
    return R.ScriptRun(prog, run_dir=R.RunDir(path, R.lock_run_dir(path)))


def assert_unlocked(run: R.ScriptRun) -> None:
    assert run.run_dir.lock is None
    R.lock_run_dir(run.run_dir.path).close()  # would raise ConfigError if still held


def exit_of(run: R.ScriptRun, error: BaseException) -> int:
    with pytest.raises(SystemExit) as e:
        with R.exit_policy(run):
            raise error
    return e.value.code


def test_bad_input_exits_2_with_one_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """A ConfigError: exit 2, exactly one stderr line `prog: error: message`, the lock released."""
    run = locked_run(tmp_path)
    assert exit_of(run, M.ConfigError("--num-iterations=0 must be positive")) == 2
    assert capsys.readouterr() == ("", "x.py: error: --num-iterations=0 must be positive\n")
    assert_unlocked(run)


def test_bad_input_is_said_by_rank_0_only(capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    """Bad input is the same on every torchrun rank: rank 1 exits 2 silently, a training failure it still says."""
    monkeypatch.setenv("RANK", "1")
    assert exit_of(R.ScriptRun("x.py"), M.DataError("bad shard")) == 2
    assert capsys.readouterr().err == ""
    assert exit_of(R.ScriptRun("x.py"), M.TrainingError("lost")) == 1
    assert capsys.readouterr().err == "x.py: error: lost\n"


def test_training_error_exits_1(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """A TrainingError (a run that cannot go on): exit 1, its message as the one line."""
    run = locked_run(tmp_path)
    assert exit_of(run, M.TrainingError("step 3: the training loss is nan")) == 1
    assert capsys.readouterr().err == "x.py: error: step 3: the training loss is nan\n"
    assert_unlocked(run)


def test_second_ctrl_c_exits_130_naming_the_newest_checkpoint(tmp_path: Path,
                                                              capsys: pytest.CaptureFixture) -> None:
    """KeyboardInterrupt: exit 130, "interrupted (second Ctrl-C)" and the run's newest checkpoint."""
    run = locked_run(tmp_path)
    for step in (2, 4):
        (run.run_dir.path / f"state_step{step:06d}.pt").write_bytes(b"x")
    assert exit_of(run, KeyboardInterrupt()) == 130
    newest = run.run_dir.path / "state_step000004.pt"
    assert capsys.readouterr().err == (f"x.py: error: interrupted (second Ctrl-C): the current step was not saved; "
                                       f"the newest checkpoint is {newest} (continue with --resume latest)\n")
    assert_unlocked(run)


def test_second_ctrl_c_before_any_checkpoint(capsys: pytest.CaptureFixture) -> None:
    """KeyboardInterrupt with no run directory yet: exit 130, saying no checkpoint was written."""
    assert exit_of(R.ScriptRun("x.py"), KeyboardInterrupt()) == 130
    assert capsys.readouterr().err == ("x.py: error: interrupted (second Ctrl-C): the current step was not saved; "
                                       "no checkpoint of this run was written\n")


def test_os_error_exits_1_naming_the_file(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """A failed write: exit 1, one line with the file and the reason, the lock released."""
    run = locked_run(tmp_path)
    error = OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "run" / "log.txt"))
    assert exit_of(run, error) == 1
    assert capsys.readouterr().err == (f"x.py: error: {tmp_path / 'run' / 'log.txt'}: No space left on device; "
                                       f"no checkpoint of this run was written\n")
    assert_unlocked(run)


def test_a_bug_keeps_its_traceback(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """Any other exception propagates unchanged (a bug to report), and the lock is still released."""
    run = locked_run(tmp_path)
    with pytest.raises(ZeroDivisionError) as e:
        with R.exit_policy(run):
            1 / 0
    assert "1 / 0" in "".join(traceback.format_exception(e.value))
    assert capsys.readouterr().err == ""
    assert_unlocked(run)


def test_clean_exit_releases_the_lock(tmp_path: Path) -> None:
    """A run that finishes leaves its directory unlocked too."""
    run = locked_run(tmp_path)
    with R.exit_policy(run) as inside:
        assert inside is run
    assert_unlocked(run)


# -----------------------------------------------------------------------------
# StopSignal


@pytest.fixture
def stop() -> R.StopSignal:
    """A StopSignal installed for the test, always restored (a stray SIGTERM would end pytest)."""
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    s = R.StopSignal(rank=0).install()
    yield s
    s.restore()
    for sig, handler in handlers.items():
        signal.signal(sig, handler)


def test_sigterm_requests_a_stop(stop: R.StopSignal, capfd: pytest.CaptureFixture) -> None:
    """SIGTERM sets the flag the loop reads; report() says where the checkpoint is and how to continue."""
    assert stop.name is None and not stop.requested(cpu())
    os.kill(os.getpid(), signal.SIGTERM)
    assert stop.name == "SIGTERM" and stop.requested(cpu())
    assert capfd.readouterr().err == ("SIGTERM received: writing a checkpoint after the current step (Ctrl-C again "
                                      "to quit without one)\n")
    assert stop.report(4, Path("P"), "pretraining.py") == ("stopped by SIGTERM at step 4: checkpoint P; continue "
                                                           "with python pretraining.py --resume latest")
    assert stop.report(4, None, "pretraining.py") == "stopped by SIGTERM at step 4: no new step to save"


def test_second_ctrl_c_raises_only_after_a_second(stop: R.StopSignal, capfd: pytest.CaptureFixture) -> None:
    """A repeated SIGINT within a second (torchrun forwarding) is ignored; a later one raises KeyboardInterrupt."""
    try:
        os.kill(os.getpid(), signal.SIGINT)
        os.kill(os.getpid(), signal.SIGINT)
    except KeyboardInterrupt:
        pytest.fail("a SIGINT within a second of the first raised KeyboardInterrupt")
    assert stop.name == "SIGINT"
    stop._at = time.monotonic() - 2.0  # the first Ctrl-C was two seconds ago
    with pytest.raises(KeyboardInterrupt):
        os.kill(os.getpid(), signal.SIGINT)
    capfd.readouterr()


def test_restore_puts_back_the_previous_handlers() -> None:
    """restore() reinstates whatever handlers were there before install()."""
    def mine(signum, frame):
        pass

    originals = {sig: signal.signal(sig, mine) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        s = R.StopSignal().install()
        assert signal.getsignal(signal.SIGTERM) == s._handle and signal.getsignal(signal.SIGINT) == s._handle
        s.restore()
        assert signal.getsignal(signal.SIGTERM) is mine and signal.getsignal(signal.SIGINT) is mine
    finally:
        for sig, handler in originals.items():
            signal.signal(sig, handler)


# -----------------------------------------------------------------------------
# Script helpers


def data_files() -> list[str]:
    """What data/ holds (shards, corpora), bytecode caches aside."""
    return sorted(str(p.relative_to(REPO_DIR)) for p in (REPO_DIR / "data").rglob("*") if "__pycache__" not in p.parts)


@pytest.mark.parametrize("warmup, compiled, device, expected", [
    (-1, False, "cpu", 0), (-1, True, "cpu", 2), (-1, True, "cuda", 10), (-1, False, "cuda", 0),
    (5, False, "cpu", 5), (0, True, "cuda", 0), (3, True, "cpu", 3),
])
def test_warm_up_steps(warmup: int, compiled: bool, device: str, expected: int) -> None:
    """-1 = auto: none uncompiled, 2 compiled on CPU, 10 compiled on CUDA; an explicit value wins."""
    rt = M.Runtime(device=torch.device(device), compile=compiled)
    assert R.warm_up_steps(tiny_hparams(warmup_steps=warmup), rt) == expected


def test_import_data_script_runs_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                         shakespeare_data: Path) -> None:
    """import_data_script("convert") gives the module; importing it writes no file anywhere we look (the corpus
    is fetched first, so that no other test worker writes data/ meanwhile)."""
    monkeypatch.chdir(tmp_path)
    before = data_files()
    module = R.import_data_script("convert")
    assert callable(module.main) and module.__name__ == "data_convert"
    assert data_files() == before
    assert list(tmp_path.iterdir()) == []
