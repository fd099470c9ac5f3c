"""Property-based tests (hypothesis) of what users feed the scripts: config values, shard files, conversation files.

Each property holds for every input hypothesis builds, not only for hand-picked ones: a value either parses to
what it spells or fails with its one-line user error (ConfigError, DataError, argparse's exit 2), never another
exception and never a silently different value. Examples are derandomized, so every run checks the same ones.

    python -m pytest tests/test_properties.py -q      # 11-25 s on 2 cores (shared), 26 tests
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import functools
import io
import json
import math
import re
import tempfile
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import model as M
import runs as R
from conftest import tiny_hparams

# No example database (it would write .hypothesis/ into the repo) and no deadline (CI machines are slow).
settings.register_profile("properties", max_examples=40, deadline=None, derandomize=True, database=None,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def props(max_examples: int) -> settings:
    """The file's profile with its own example count (the counts keep the whole file under 40 s on 2 cores)."""
    return settings(settings.get_profile("properties"), max_examples=max_examples)


@pytest.fixture(scope="module")
def scratch(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Module-scoped: hypothesis runs many examples per test call, so each takes a fresh_dir() below it."""
    return tmp_path_factory.mktemp("properties")


@contextlib.contextmanager
def fresh_dir(parent: Path) -> Iterator[Path]:
    """An empty directory for one example, removed afterwards."""
    with tempfile.TemporaryDirectory(dir=parent) as d:
        yield Path(d)


def one_line(message: str) -> bool:
    return bool(message) and "\n" not in message and "\r" not in message


# -----------------------------------------------------------------------------
# Config

FIELD_TYPES = {f.name: f.type for f in dataclasses.fields(M.Hyperparameters)}  # "int", "float", "bool" or "str"
FIELDS = sorted(set(FIELD_TYPES) - {"preset"})  # preset is a choice, tested on its own
PRESET = "shakespeare"  # passed explicitly, so the result never depends on this machine's CUDA or shards
TRUE_WORDS, FALSE_WORDS = ("1", "true", "yes", "on"), ("0", "false", "no", "off")
NEAR_MISSES = ["", " ", "nan", "-nan", "inf", "-inf", "1e3", "1.5", "2.0", "0x10", "1_000", "_1", "1__0", "\u0663",
               "True", "YES", " off ", "None", "null", "-0", "+7", "1 2", "\x00", "--", "-x", "-5", "=", "5=6"]


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def names_flag(message: str, name: str) -> bool:
    """message mentions --name as a whole flag (--muon-momentum is not found in --muon-momentum-start)."""
    return re.search(rf"{re.escape(flag(name))}(?![\w-])", message) is not None


def same(a: Any, b: Any) -> bool:
    """Equal and of the same type (True is not 1, 1 is not 1.0), NaN equal to NaN."""
    if type(a) is not type(b):
        return False
    if isinstance(a, float) and math.isnan(a):
        return math.isnan(b)
    return a == b


def same_config(a: M.Hyperparameters, b: M.Hyperparameters) -> bool:
    da, db = a.to_dict(), b.to_dict()
    return da.keys() == db.keys() and all(same(da[k], db[k]) for k in da)


def preset_config(**values: Any) -> M.Hyperparameters:
    return M.Hyperparameters(**dict(M.PRESETS[PRESET], preset=PRESET, **values))


@functools.cache
def cli_parser() -> argparse.ArgumentParser:
    """Built once: the build reads model.py's source for the help texts (50 ms), parsing then takes 0.1 ms."""
    return R.build_arg_parser("pretraining.py")


def parse(argv: list[str], env: dict[str, str], dotenv: Path | None = None) -> tuple[str, Any]:
    """load_config's outcome: ("ok", hp), ("config", message) or ("exit", (code, stderr)); anything else raises.

    load_config is config_from_overrides(explicit_overrides(...)) with a fresh parser; this reuses one."""
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            overrides = R.explicit_overrides(argv, env=env, dotenv_path=str(dotenv) if dotenv else None,
                                             parser=cli_parser())
            return "ok", R.config_from_overrides(overrides)
    except M.ConfigError as e:
        return "config", str(e)
    except SystemExit as e:
        return "exit", (e.code, err.getvalue())


def same_outcome(a: tuple[str, Any], b: tuple[str, Any]) -> bool:
    if a[0] != b[0]:
        return False
    return same_config(a[1], b[1]) if a[0] == "ok" else a[1] == b[1]


@pytest.mark.parametrize("argv, env", [([], {}), (["--preset=speedrun", "--seed=3"], {"NANOGPT_SEED": "4"}),
                                       (["--seed", "x"], {}), (["--bogus"], {}), ([], {"NANOGPT_BOGUS": "1"})])
def test_parse_helper_is_load_config(argv: list[str], env: dict[str, str]) -> None:
    """The properties below call parse(); it must agree with load_config itself."""
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            direct: tuple[str, Any] = "ok", R.load_config(argv, env=env, dotenv_path=None)
    except M.ConfigError as e:
        direct = "config", str(e)
    except SystemExit as e:
        direct = "exit", e.code
    got = parse(argv, env)
    assert same_outcome(direct, got) or (direct[0] == got[0] == "exit" and got[1][0] == direct[1] == 2)


RAW_VALUES = st.one_of(st.integers(-10**20, 10**20).map(str), st.floats().map(repr),
                       st.sampled_from(TRUE_WORDS + FALSE_WORDS + tuple(NEAR_MISSES)), st.text(max_size=20))
"""Strings a user might type for any field: well-formed for some type, near misses and arbitrary text."""


@props(300)
@given(name=st.sampled_from(FIELDS), raw=RAW_VALUES)
@example(name="muon_lr", raw="--")
@example(name="run_id", raw="--")
def test_flag_and_env_give_the_coerced_value_or_a_config_error(name: str, raw: str) -> None:
    """Any string, as --flag=VALUE or NANOGPT_NAME=VALUE, sets exactly that field to _coerce(VALUE), or both routes
    raise a one-line ConfigError naming the flag; nothing else changes and no other exception escapes."""
    cli = parse([f"--preset={PRESET}", f"{flag(name)}={raw}"], {})
    env = parse([f"--preset={PRESET}"], {f"{R.ENV_PREFIX}{name.upper()}": raw})
    assert cli[0] == env[0], (cli, env)
    if env[0] == "config":
        assert env[1].startswith(f"{flag(name)}: invalid value {raw!r}") and one_line(env[1])
        assert cli[1].startswith(f"{flag(name)}: ") and one_line(cli[1])
        with pytest.raises(M.ConfigError):
            M._coerce(name, raw)
    else:
        expected = preset_config(**{name: M._coerce(name, raw)})
        assert env[0] == "ok" and same_config(env[1], expected) and same_config(cli[1], expected)
    # "--flag VALUE" agrees too, except that argparse may take a VALUE starting with '-' for a flag: exit 2
    spaced = parse([f"--preset={PRESET}", flag(name), raw], {})
    if spaced[0] == "exit":
        code, stderr = spaced[1]
        assert raw.startswith("-") and code == 2 and one_line(stderr.rstrip("\n")) and "usage:" not in stderr
    else:
        assert same_outcome(spaced, env)


@props(200)
@given(name=st.sampled_from(FIELDS), data=st.data())
def test_well_formed_values_parse_to_themselves(name: str, data: st.DataObject) -> None:
    """A value written the way its type prints (any int, any float repr, a bool word in any case, any text) parses
    back to that value and type, from the CLI and from the environment alike."""
    kind = FIELD_TYPES[name]
    if kind == "int":
        n = data.draw(st.integers(-10**30, 10**30))
        raw, expected = data.draw(st.sampled_from([str(n), f"{n:_}", f" {n}\t"])), n
    elif kind == "float":
        x = data.draw(st.floats())
        raw, expected = data.draw(st.sampled_from([repr(x), f" {x!r} "])), x
    elif kind == "bool":
        word = data.draw(st.sampled_from(TRUE_WORDS + FALSE_WORDS))
        upper = data.draw(st.lists(st.booleans(), min_size=len(word), max_size=len(word)))
        raw = " " + "".join(c.upper() if u else c for c, u in zip(word, upper)) + "\n"
        expected = word in TRUE_WORDS
    else:
        raw = expected = data.draw(st.text())  # strings are kept as typed, whitespace and all
    for outcome in (parse([f"--preset={PRESET}", f"{flag(name)}={raw}"], {}),
                    parse([f"--preset={PRESET}"], {f"{R.ENV_PREFIX}{name.upper()}": raw})):
        assert outcome[0] == "ok" and same(getattr(outcome[1], name), expected), outcome


@props(60)
@given(raw=st.one_of(st.sampled_from(sorted(M.PRESETS)), st.text(min_size=1, max_size=12)))
def test_preset_is_a_known_name_or_an_error(raw: str) -> None:
    """--preset and NANOGPT_PRESET accept exactly the PRESETS names, giving that preset's values unchanged."""
    cli, env = parse([f"--preset={raw}"], {}), parse([], {"NANOGPT_PRESET": raw})
    if raw in M.PRESETS:
        expected = M.Hyperparameters(**dict(M.PRESETS[raw], preset=raw))
        assert same_outcome(cli, ("ok", expected)) and same_outcome(env, ("ok", expected))
    else:
        assert cli[0] == "exit" and cli[1][0] == 2 and "invalid choice" in cli[1][1]
        assert env[0] == "config" and env[1].startswith(f"--preset={raw!r} must be one of") and one_line(env[1])


@props(80)
@given(key=st.one_of(st.from_regex(r"NANOGPT_[A-Za-z0-9_]{1,24}", fullmatch=True),
                     st.sampled_from([f"NANOGPT_{n.upper()}" for n in FIELDS] + ["NANOGPT_RANKS_FILE", "NANOGPT_"]),
                     st.text(max_size=12)))
def test_only_hyperparameters_may_use_the_env_prefix(key: str) -> None:
    """A NANOGPT_* variable that names no field (a typo) is a ConfigError naming it; other variables are ignored."""
    name = key[len(R.ENV_PREFIX):].lower()
    known = key.startswith(R.ENV_PREFIX) and name in FIELD_TYPES
    value = str(getattr(preset_config(), name)) if known else "1"
    outcome = parse([f"--preset={PRESET}"], {key: value})
    if key.startswith(R.ENV_PREFIX) and not known and key != "NANOGPT_RANKS_FILE":
        base = f"environment variable {key} names no hyperparameter"
        assert outcome[0] == "config" and outcome[1].startswith(base) and one_line(outcome[1])
        hint = outcome[1][len(base):]  # nothing, or the closest real variable
        assert hint == "" or (hint.startswith(" (did you mean NANOGPT_") and hint.endswith("?)")
                              and hint[len(" (did you mean NANOGPT_"):-2].lower() in FIELD_TYPES)
    else:
        assert same_outcome(outcome, ("ok", preset_config()))  # the value given is the preset's own, or ignored


@props(60)
@given(name=st.sampled_from([n for n in FIELDS if FIELD_TYPES[n] == "int"]),
       values=st.tuples(*[st.none() | st.integers(0, 10**6)] * 3))
def test_precedence_is_cli_then_env_then_dotenv_then_preset(scratch: Path, name: str,
                                                            values: tuple[int | None, ...]) -> None:
    """Whichever sources set a field, the highest of CLI > environment > .env wins; with none, the preset does."""
    cli, env, dot = values
    key = f"{R.ENV_PREFIX}{name.upper()}"
    with fresh_dir(scratch) as d:
        dotenv = d / ".env"
        dotenv.write_text(f"{key}={dot}\n" if dot is not None else "")
        outcome = parse([f"--preset={PRESET}"] + ([f"{flag(name)}={cli}"] if cli is not None else []),
                        {key: str(env)} if env is not None else {}, dotenv)
    winner = next((v for v in values if v is not None), getattr(preset_config(), name))
    assert outcome[0] == "ok" and getattr(outcome[1], name) == winner


def field_values(kind: str) -> st.SearchStrategy[Any]:
    """Typed values near the validity boundaries: small and huge ints, multiples of the attention block, any
    float (NaN and inf included), bools, the choice words and arbitrary text."""
    return {"int": st.one_of(st.integers(-3, 1100), st.integers(-10**12, 10**12),
                             st.integers(-2, 20).map(lambda k: k * M.BLOCK_SIZE)),
            "float": st.one_of(st.floats(), st.floats(-0.5, 1.5)),
            "bool": st.booleans(),
            "str": st.one_of(st.text(max_size=12), st.sampled_from(["auto", "on", "off", "bf16", "fp32", "fp16",
                                                                    "cpu", "", "latest", "a/b", ".."]))}[kind]


def documented_constraints_hold(hp: M.Hyperparameters, world_size: int) -> bool:
    """What the rest of the code relies on, restated from the field comments (independent of validate's code)."""
    rows = [hp.row_len or hp.train_seq_len, hp.row_len or hp.val_seq_len]
    return (hp.num_heads * hp.head_dim == hp.model_dim and hp.num_layers > 0 and hp.num_layers % 2 == 0
            and -1 <= hp.no_attn_layer < hp.num_layers and all(r > 0 and r % M.BLOCK_SIZE == 0 for r in rows)
            and hp.train_seq_len % rows[0] == 0 and hp.val_seq_len % rows[1] == 0
            and hp.rank_equivalents > 0 and hp.rank_equivalents % world_size == 0
            and hp.val_tokens > 0 and hp.val_tokens % (world_size * hp.val_seq_len) == 0
            and all(getattr(hp, n) > 0 for n in ("muon_lr", "head_lr", "embed_lr", "scalar_lr", "adam_eps"))
            and 0 < hp.cooldown_frac <= 1 and hp.dtype in ("auto", "bf16", "fp32")
            and (not hp.shuffle_rows or hp.row_len > 0))


@props(400)
@given(changes=st.sets(st.sampled_from(FIELDS), min_size=1, max_size=3).flatmap(
    lambda names: st.fixed_dictionaries({n: field_values(FIELD_TYPES[n]) for n in names})),
    world_size=st.sampled_from([1, 2]))
def test_validate_returns_or_names_a_changed_flag(changes: dict[str, Any], world_size: int) -> None:
    """From a valid config, changing 1-3 fields makes validate() either return the config, which then meets the
    documented constraints, or raise a one-line ConfigError that names (as --flag) one of the changed fields."""
    base = tiny_hparams()
    assert base.validate(world_size=world_size) is base
    hp = dataclasses.replace(base, **changes)
    try:
        result = hp.validate(world_size=world_size)
    except M.ConfigError as e:
        assert one_line(str(e)) and any(names_flag(str(e), n) for n in changes), (str(e), changes)
    else:
        assert result is hp and documented_constraints_hold(hp, world_size)


DANGEROUS = ["/", "\\", "..", ".", "\x00", "~", "-", "_", " ", "\n", ":", "a", "Z", "9", "\u00e9", "$HOME", "%2e"]


@props(300)
@given(run_id=st.one_of(st.text(max_size=30),
                        st.lists(st.sampled_from(DANGEROUS), min_size=1, max_size=8).map("".join),
                        st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._-]{0,140}", fullmatch=True)))
@example(run_id="..")
@example(run_id="../up")
@example(run_id="a/../../b")
@example(run_id="/etc")
@example(run_id="a\x00b")
@example(run_id=".")
@example(run_id="-rf")
@example(run_id="ok\n")
@example(run_id="a" * 129)
def test_run_id_never_escapes_the_log_dir(run_id: str) -> None:
    """An accepted run id is one plain path component: the run directory is a direct child of the log directory
    (no '/', '..', absolute path, NUL or option-like name); a refused one is a ConfigError naming --run-id."""
    hp = tiny_hparams(run_id=run_id, log_dir="logs")
    try:
        hp.validate()
    except M.ConfigError as e:
        assert str(e).startswith(f"--run-id={run_id!r} may hold only") and one_line(str(e))
        return
    if run_id == "":
        return  # "" = a generated timestamp id
    log_dir = Path(hp.log_dir).resolve()
    run_dir = (Path(hp.log_dir) / run_id).resolve()
    assert run_dir.parent == log_dir and run_dir.name == run_id
    assert M.checkpoint_path(hp.log_dir, run_id, 7).resolve().parent == run_dir
    assert run_id.isascii() and run_id.isprintable() and len(run_id) <= 128 and run_id[0].isalnum()


def typed_values(kind: str) -> st.SearchStrategy[Any]:
    return {"int": st.integers(), "float": st.floats(), "bool": st.booleans(), "str": st.text()}[kind]


HPARAMS = st.fixed_dictionaries({n: typed_values(k) for n, k in FIELD_TYPES.items()}).map(
    lambda d: M.Hyperparameters(**d))


@props(100)
@given(hp=HPARAMS, via_json=st.booleans())
def test_to_dict_from_dict_round_trip(hp: M.Hyperparameters, via_json: bool) -> None:
    """from_dict(to_dict(hp)) == hp for any typed values, also through JSON (as checkpoints store them)."""
    d = hp.to_dict()
    if via_json:
        d = json.loads(json.dumps(d))
    assert same_config(M.Hyperparameters.from_dict(d), hp)


JSON_SCALARS = st.none() | st.booleans() | st.integers(-10**6, 10**6) | st.floats() | st.text(max_size=8)
JSON_VALUES = st.recursive(JSON_SCALARS, lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=8), c,
                                                                                            max_size=3), max_leaves=10)


@props(200)
@given(d=st.dictionaries(st.sampled_from(sorted(FIELD_TYPES)) | st.text(max_size=6), JSON_VALUES, max_size=4))
@example(d={"muon_lr": None})
@example(d={"\r": None})
def test_from_dict_of_any_json_is_a_config_or_a_config_error(d: dict[str, Any]) -> None:
    """Whatever JSON a checkpoint's 'hyperparameters' hold, from_dict returns fields of the annotated types or
    raises a one-line ConfigError (unknown key, or the flag of the bad value); never TypeError or another error."""
    try:
        hp = M.Hyperparameters.from_dict(d)
    except M.ConfigError as e:
        message = str(e)
        assert one_line(message)
        assert message.startswith("unknown hyperparameter(s): ") or any(
            message.startswith(f"{flag(k)}: invalid value ") for k in d), message
        return
    assert all(type(getattr(hp, k)).__name__ == FIELD_TYPES[k] for k in d)


# -----------------------------------------------------------------------------
# Shards

HEADER_BYTES = M.HEADER_INTS * 4


def load_or_error(path: Path) -> np.ndarray | str:
    """The tokens _load_data_shard returns, or its DataError message; any other exception propagates."""
    try:
        tokens = M._load_data_shard(path)
    except M.DataError as e:
        return str(e)
    assert tokens.dtype == torch.uint16
    assert M.read_shard_header(path) == len(tokens)
    return tokens.numpy().copy()


def correct_reading(raw: bytes) -> np.ndarray | None:
    """The tokens a correct reader finds in these bytes, or None where it must refuse the file."""
    if len(raw) < HEADER_BYTES:
        return None
    magic, version, count = (int(v) for v in np.frombuffer(raw[:12], dtype=np.int32))
    if magic != M.SHARD_MAGIC or version != M.SHARD_VERSION or count <= 0 or len(raw) != HEADER_BYTES + 2 * count:
        return None
    return np.frombuffer(raw[HEADER_BYTES:], dtype=np.uint16)


def header_bytes(magic: int, version: int, count: int) -> bytes:
    header = np.zeros(M.HEADER_INTS, dtype=np.int32)
    header[:3] = (magic, version, count)
    return header.tobytes()


@st.composite
def shard_like(draw: st.DrawFn) -> bytes:
    """Bytes that look more or less like a shard: random, or a header (right or wrong fields) and a body whose
    length may or may not match the count."""
    if draw(st.integers(0, 3)) == 0:
        return draw(st.binary(max_size=2 * HEADER_BYTES))
    int32 = st.integers(-2**31, 2**31 - 1)
    body = draw(st.binary(max_size=600))
    magic = draw(st.sampled_from([M.SHARD_MAGIC]) | int32)
    version = draw(st.sampled_from([M.SHARD_VERSION, 0, 2]) | int32)
    count = draw(st.sampled_from([len(body) // 2, len(body) // 2 + 1, len(body) // 2 - 1, 0, -1]) | int32)
    return header_bytes(magic, version, count) + body + draw(st.binary(max_size=3))


uint16_tokens = st.one_of(hnp.arrays(np.uint16, st.integers(1, 3000)),
                          st.lists(st.integers(0, 2**16 - 1), min_size=1, max_size=300),
                          hnp.arrays(np.int64, st.integers(1, 300), elements=st.integers(0, 2**16 - 1)))


@props(60)
@given(tokens=uint16_tokens)
def test_written_shard_reads_back_exactly(scratch: Path, tokens: np.ndarray | list[int]) -> None:
    """Any 1..n uint16 tokens (array or list) written as a shard read back identical, at the llm.c size."""
    with fresh_dir(scratch) as d:
        path = d / "x_000000.bin"
        M.write_data_shard(path, tokens)
        loaded = load_or_error(path)
        assert isinstance(loaded, np.ndarray)
        np.testing.assert_array_equal(loaded, np.asarray(tokens, dtype=np.int64))
        assert path.stat().st_size == HEADER_BYTES + 2 * len(tokens)
        assert [p.name for p in d.iterdir()] == [path.name]  # no temporary file left beside it


@props(60)
@given(tokens=st.lists(st.integers(-2**40, 2**40) | st.integers(0, 2**16 - 1), max_size=20))
def test_write_refuses_what_uint16_cannot_hold_and_keeps_the_old_shard(scratch: Path, tokens: list[int]) -> None:
    """Writing tokens outside 0..65535 (or none) is a DataError naming the file; the shard already there survives."""
    with fresh_dir(scratch) as d:
        path = d / "x.bin"
        M.write_data_shard(path, [1, 2, 3])
        if tokens and all(0 <= t < 2**16 for t in tokens):
            M.write_data_shard(path, tokens)
            np.testing.assert_array_equal(load_or_error(path), tokens)
        else:
            with pytest.raises(M.DataError) as exc:
                M.write_data_shard(path, np.array(tokens, dtype=np.int64))
            assert str(exc.value).startswith(f"{path}: ") and one_line(str(exc.value))
            np.testing.assert_array_equal(load_or_error(path), [1, 2, 3])
        assert [p.name for p in d.iterdir()] == ["x.bin"]


@props(400)
@given(raw=shard_like())
def test_any_bytes_load_correctly_or_raise_a_data_error(scratch: Path, raw: bytes) -> None:
    """Any file content loads to exactly the tokens it holds, or is a one-line DataError naming the file; never
    numpy's or torch's exception, never a token count other than the file's."""
    with fresh_dir(scratch) as d:
        path = d / "s_000000.bin"
        path.write_bytes(raw)
        got, want = load_or_error(path), correct_reading(raw)
    if want is None:
        assert isinstance(got, str) and got.startswith(f"{path}: ") and one_line(got), got
    else:
        assert isinstance(got, np.ndarray), got
        np.testing.assert_array_equal(got, want)


@props(300)
@given(tokens=hnp.arrays(np.uint16, st.integers(1, 400)), data=st.data())
def test_damaged_shard_is_refused_or_reads_the_damage_exactly(scratch: Path, tokens: np.ndarray,
                                                               data: st.DataObject) -> None:
    """A valid shard truncated or extended is refused; a flipped byte in magic, version or count is refused, in the
    unused header it changes nothing, and in the body it changes exactly the one token that holds it."""
    with fresh_dir(scratch) as d:
        path = d / "s_000000.bin"
        M.write_data_shard(path, tokens)
        raw = path.read_bytes()
        kind = data.draw(st.sampled_from(["flip", "truncate", "extend"]))
        if kind == "flip":
            i = data.draw(st.integers(0, len(raw) - 1))
            damaged = raw[:i] + bytes([raw[i] ^ data.draw(st.integers(1, 255))]) + raw[i + 1:]
        elif kind == "truncate":
            damaged = raw[:data.draw(st.integers(0, len(raw) - 1))]
        else:
            damaged = raw + data.draw(st.binary(min_size=1, max_size=8))
        path.write_bytes(damaged)
        got = load_or_error(path)
    if kind != "flip" or i < 12:
        assert isinstance(got, str) and got.startswith(f"{path}: ") and one_line(got), got
    elif i < HEADER_BYTES:
        np.testing.assert_array_equal(got, tokens)
    else:
        assert isinstance(got, np.ndarray) and len(got) == len(tokens)
        assert np.flatnonzero(got != tokens).tolist() == [(i - HEADER_BYTES) // 2]


@st.composite
def shard_sets(draw: st.DrawFn) -> dict[str, Any]:
    """1-3 small shards and a generator setting: world size 1 or 2, a batch, sequential or shuffled rows."""
    world_size = draw(st.sampled_from([1, 2]))
    shuffle = draw(st.booleans())
    row_len = draw(st.sampled_from([2, 4, 8])) if shuffle else 0
    batch = world_size * (row_len * draw(st.integers(1, 3)) if shuffle else draw(st.integers(1, 12)))
    lens = draw(st.lists(st.integers(batch + 2, 4 * batch + 10), min_size=1, max_size=3))
    seed = draw(st.integers(0, 1000)) if shuffle else None
    return dict(world_size=world_size, batch=batch, row_len=row_len, lens=lens, seed=seed)


SHARD_STRIDE = 1000  # shard j holds the counting tokens j*1000 + (0, 1, ...), so a token names its shard and offset


def write_counting_shards(d: Path, lens: list[int]) -> str:
    for j, n in enumerate(lens):
        M.write_data_shard(d / f"c_{j:06d}.bin", np.arange(j * SHARD_STRIDE, j * SHARD_STRIDE + n))
    return str(d / "c_*.bin")


def batches(pattern: str, s: dict[str, Any], rank: int, world_size: int, n: int | None,
            start: dict[str, int] | None = None) -> list[tuple[torch.Tensor, torch.Tensor, dict[str, int]]]:
    """n batches (None: one epoch, cycle=False) of the generator for this setting."""
    gen = M.distributed_data_generator(pattern, s["batch"], rank, world_size, row_len=s["row_len"],
                                       shuffle_seed=s["seed"], start=start, cycle=n is not None)
    return list(gen) if n is None else [next(gen) for _ in range(n)]


@props(100)
@given(s=shard_sets(), k=st.integers(0, 30))
def test_ranks_together_are_the_single_process_batch(scratch: Path, s: dict[str, Any], k: int) -> None:
    """On any shards, over several epochs, the ranks' slices concatenated are the one-process batch, every rank
    reports the same position, and restarting from any position reproduces the continuation."""
    with fresh_dir(scratch) as d:
        pattern = write_counting_shards(d, s["lens"])
        n = 2 * sum(s["lens"]) // s["batch"] + 3  # past at least one epoch boundary
        whole = batches(pattern, s, 0, 1, n)
        ranks = [batches(pattern, s, r, s["world_size"], n) for r in range(s["world_size"])]
        k = k % (n - 2)
        resumed = batches(pattern, s, 0, 1, 2, start=dict(whole[k][2]))
    local = s["batch"] // s["world_size"]
    for i, (x, y, position) in enumerate(whole):
        assert x.dtype == torch.int32 and y.dtype == torch.int64 and x.shape == y.shape == (s["batch"],)
        assert all(len(ranks[r][i][0]) == local for r in range(s["world_size"]))
        assert torch.equal(torch.cat([ranks[r][i][0] for r in range(s["world_size"])]), x)
        assert torch.equal(torch.cat([ranks[r][i][1] for r in range(s["world_size"])]), y)
        assert all(ranks[r][i][2] == position for r in range(s["world_size"]))
        assert torch.equal(y.view(-1, s["row_len"] or s["batch"]), x.long().view(-1, s["row_len"] or s["batch"]) + 1)
    assert whole[-1][2]["epoch"] >= 1
    for (x, y, p), (xf, yf, pf) in zip(resumed, whole[k + 1:k + 3]):
        assert torch.equal(x, xf) and torch.equal(y, yf) and p == pf


@props(100)
@given(s=shard_sets())
def test_one_epoch_visits_what_the_rule_says(scratch: Path, s: dict[str, Any]) -> None:
    """One epoch (cycle=False): sequential batches start at 0, B, 2B, ... while pos + B + 1 < len in every shard;
    shuffled batches take whole rows on the row grid, each row of a shard at most once, as many as fill batches."""
    with fresh_dir(scratch) as d:
        epoch = batches(write_counting_shards(d, s["lens"]), s, 0, 1, None)
    B, row = s["batch"], s["row_len"]
    if s["seed"] is None:
        want = [j * SHARD_STRIDE + p for j, n in enumerate(s["lens"]) for p in range(0, n - B - 1, B)]
        assert [int(x[0]) for x, _, _ in epoch] == want
        assert all(torch.equal(x.long(), torch.arange(int(x[0]), int(x[0]) + B)) for x, _, _ in epoch)
        return
    starts = [int(r[0]) for x, _, _ in epoch for r in x.long().view(-1, row)]
    assert len(starts) == len(set(starts))
    for j, n in enumerate(s["lens"]):
        mine = [t - j * SHARD_STRIDE for t in starts if j * SHARD_STRIDE <= t < (j + 1) * SHARD_STRIDE]
        assert all(t % row == 0 and t + row + 1 <= n for t in mine)
        assert len(mine) == ((n - 1) // row * row) // B * (B // row)


# -----------------------------------------------------------------------------
# Conversations and the chat template

SPECIAL_STRINGS = ["<|endoftext|>", *M.CHAT_SPECIAL_TOKENS]
ROLE_IDS = {role: M.CHAT_SPECIAL_TOKENS[f"<|{role}|>"] for role in M.CHAT_ROLES}
END_ID = M.CHAT_SPECIAL_TOKENS["<|end|>"]
FRAGMENTS = [*SPECIAL_STRINGS, "<|", "|>", "<|end", "endoftext|>", "<|im_start|>", "\n", " ", "\u2028"]


def texts(min_size: int = 0) -> st.SearchStrategy[str]:
    """Arbitrary text with special-token spellings (whole, split, nested) spliced in anywhere."""
    return st.lists(st.text(max_size=10) | st.sampled_from(FRAGMENTS), min_size=min_size, max_size=6).map("".join)


def message_text() -> st.SearchStrategy[str]:
    return texts(1).map(lambda s: s if s.strip() else s + "x")  # valid content is not blank


@st.composite
def conversations(draw: st.DrawFn) -> dict[str, Any]:
    """Valid records: an optional system message, then user/assistant turns with at least one assistant."""
    roles = (["system"] if draw(st.booleans()) else []) + draw(st.lists(st.sampled_from(["user", "assistant"]),
                                                                        min_size=1, max_size=4))
    if "assistant" not in roles:
        roles.append("assistant")
    return {"messages": [{"role": r, "content": draw(message_text())} for r in roles]}


@st.composite
def message_like(draw: st.DrawFn) -> Any:
    """Mostly message-shaped: each key missing, mistyped or misspelled now and then."""
    if draw(st.integers(0, 9)) == 0:
        return draw(JSON_VALUES)
    m: dict[str, Any] = {}
    if draw(st.integers(0, 9)):
        m["role"] = draw(st.sampled_from(M.CHAT_ROLES) if draw(st.integers(0, 4)) else
                         st.sampled_from(["", "System", "bot", " user"]) | JSON_VALUES)
    if draw(st.integers(0, 9)):
        m["content"] = draw(st.text(max_size=8) if draw(st.integers(0, 4)) else
                            st.sampled_from(["", " ", "\n\t", "\u3000"]) | JSON_VALUES)
    m.update(draw(st.dictionaries(st.text(max_size=5), JSON_SCALARS, max_size=1)))
    return m


BROKEN_RULES = ["system_later", "blank", "role", "no_role", "no_content", "content_type", "no_assistant", "empty",
                "not_a_list"]


@st.composite
def broken_conversation(draw: st.DrawFn) -> dict[str, Any]:
    """A valid record with one rule of the format broken (so each rule is checked on otherwise valid records)."""
    record = draw(conversations())
    messages = record["messages"]
    j, rule = draw(st.integers(0, len(messages) - 1)), draw(st.sampled_from(BROKEN_RULES))
    if rule == "system_later":
        messages.insert(draw(st.integers(1, len(messages))), {"role": "system", "content": "Be brief."})
    elif rule == "blank":
        messages[j]["content"] = draw(st.sampled_from(["", " ", "\n\t\u3000"]))
    elif rule == "role":
        messages[j]["role"] = draw(st.sampled_from(["System", "bot", " user", ""]) | JSON_SCALARS)
    elif rule in ("no_role", "no_content"):
        del messages[j][rule[3:]]
    elif rule == "content_type":
        messages[j]["content"] = draw(JSON_VALUES.filter(lambda v: not isinstance(v, str)))
    elif rule == "no_assistant":
        record["messages"] = [m for m in messages if m["role"] != "assistant"]
    else:
        record["messages"] = [] if rule == "empty" else draw(JSON_SCALARS)
    return record


@st.composite
def conversation_like(draw: st.DrawFn) -> Any:
    """Anything from arbitrary JSON values to nearly valid records."""
    kind = draw(st.integers(0, 9))
    if kind == 0:
        return draw(JSON_VALUES)
    if kind == 1:
        return draw(conversations())
    if kind < 5:
        return draw(broken_conversation())
    record = {"messages": draw(st.lists(message_like(), max_size=4) if kind > 2 else JSON_VALUES)}
    record.update(draw(st.dictionaries(st.text(max_size=8), JSON_SCALARS, max_size=1)))
    return record


def is_valid_conversation(record: Any) -> bool:
    """The record format of README / finetune.py, restated: a non-empty 'messages' list of {role, content} with
    roles system (first only), user or assistant, non-blank string content, and at least one assistant turn."""
    if not isinstance(record, dict) or not isinstance(record.get("messages"), list) or not record["messages"]:
        return False
    for j, m in enumerate(record["messages"]):
        if not isinstance(m, dict) or m.get("role") not in M.CHAT_ROLES or (m["role"] == "system" and j > 0):
            return False
        if not isinstance(m.get("content"), str) or not m["content"].strip():
            return False
    return any(m["role"] == "assistant" for m in record["messages"])


@props(500)
@given(record=conversation_like())
def test_conversation_error_is_none_exactly_for_valid_records(record: Any) -> None:
    """conversation_error never raises, leaves the record alone, and returns None exactly for valid records, else
    one line saying why."""
    before = copy.deepcopy(record)
    problem = M.conversation_error(record)
    assert (problem is None) == is_valid_conversation(record), (problem, record)
    assert problem is None or (isinstance(problem, str) and one_line(problem))
    assert json.dumps(record, sort_keys=True) == json.dumps(before, sort_keys=True)


def same_json(a: Any, b: Any) -> bool:
    return json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)  # NaN-safe, type-exact for JSON


def file_bytes(records: list[Any], suffix: str, ensure_ascii: bool) -> bytes:
    if suffix == ".jsonl":
        text = "".join(json.dumps(r, ensure_ascii=ensure_ascii) + "\n" for r in records)
    else:
        text = json.dumps({"conversations": records}, ensure_ascii=ensure_ascii, indent=1)
    return text.encode("utf-8")


def load(scratch: Path, content: bytes, suffix: str, skip_invalid: bool = False) -> tuple[Path, Any]:
    """load_conversations' result or its DataError message (str), and the path it was given."""
    with fresh_dir(scratch) as d:
        path = d / f"chat{suffix}"
        path.write_bytes(content)
        try:
            return path, M.load_conversations(path, skip_invalid=skip_invalid)
        except M.DataError as e:
            return path, str(e)


@st.composite
def conversation_files(draw: st.DrawFn) -> bytes:
    """Random bytes, or JSON / JSONL of arbitrary and nearly valid records, perhaps cut short or with a BOM."""
    kind = draw(st.integers(0, 3))
    if kind == 0:
        return draw(st.binary(max_size=200))
    records = draw(st.lists(conversation_like(), max_size=4))
    content = file_bytes(records, ".jsonl" if kind == 1 else ".json", draw(st.booleans()))
    if kind == 3:
        content = content[:draw(st.integers(0, len(content)))]
    return (b"\xef\xbb\xbf" if draw(st.booleans()) else b"") + content


@props(250)
@given(content=conversation_files(), suffix=st.sampled_from([".json", ".jsonl"]), skip_invalid=st.booleans())
@example(content=b'{"conversations": [' + b"1" * 5000 + b"]}", suffix=".json", skip_invalid=False)
@example(content=b"[" * 100_000, suffix=".json", skip_invalid=False)
def test_any_file_loads_or_is_a_data_error_naming_it(scratch: Path, content: bytes, suffix: str,
                                                    skip_invalid: bool) -> None:
    """Whatever the bytes, load_conversations returns valid records (and one-line reasons for skipped ones) or
    raises a one-line DataError naming the file; never json's, Python's or another exception."""
    path, got = load(scratch, content, suffix, skip_invalid)
    if isinstance(got, str):
        assert got.startswith(f"{path}: ") and one_line(got), got
        return
    valid, skipped = got
    assert valid and all(is_valid_conversation(r) for r in valid)
    assert all(one_line(s) for s in skipped) and (skip_invalid or not skipped)


@props(100)
@given(records=st.lists(conversations(), min_size=1, max_size=3), suffix=st.sampled_from([".json", ".jsonl"]),
       ensure_ascii=st.booleans(), bom=st.booleans())
@example(records=[{"messages": [{"role": "assistant", "content": "a\u2028b"}]}], suffix=".jsonl", ensure_ascii=False,
         bom=False)
def test_valid_records_load_back_unchanged(scratch: Path, records: list[dict[str, Any]], suffix: str,
                                           ensure_ascii: bool, bom: bool) -> None:
    """Valid conversations written by json.dumps (ASCII-escaped or not, with or without a BOM) load back equal."""
    content = (b"\xef\xbb\xbf" if bom else b"") + file_bytes(records, suffix, ensure_ascii)
    _, got = load(scratch, content, suffix)
    assert not isinstance(got, str), got
    assert same_json(got[0], records) and got[1] == []


@props(150)
@given(records=st.lists(conversation_like(), min_size=1, max_size=5), blanks=st.lists(st.booleans(), min_size=5,
                                                                                      max_size=5),
       skip_invalid=st.booleans())
def test_jsonl_keeps_valid_records_and_names_the_line_of_bad_ones(scratch: Path, records: list[Any],
                                                                  blanks: list[bool], skip_invalid: bool) -> None:
    """JSONL with blank lines between records: skip_invalid keeps exactly the valid records in order and gives one
    reason per other record with its line number; without it, the first bad record's line is named."""
    lines, numbered = [], []
    for record, blank in zip(records, blanks):
        if blank:
            lines.append("  ")
        lines.append(json.dumps(record))
        numbered.append((len(lines), record))
    path, got = load(scratch, ("\n".join(lines) + "\n").encode(), ".jsonl", skip_invalid)
    valid = [r for _, r in numbered if is_valid_conversation(r)]
    bad = [n for n, r in numbered if not is_valid_conversation(r)]
    if not skip_invalid and bad:
        assert isinstance(got, str) and got.startswith(f"{path}: line {bad[0]}: ") and "--skip-invalid" in got
    elif not valid:
        assert got == f"{path}: no valid conversations"
    else:
        assert not isinstance(got, str) and same_json(got[0], valid)
        assert [s.split(":")[0] for s in got[1]] == [f"line {n}" for n in bad]


@props(300)
@given(text=st.one_of(texts(), st.text(), st.binary(max_size=40).map(lambda b: b.decode("utf-8", "surrogateescape"))))
@example(text="<|endoftext|>")
@example(text="".join(SPECIAL_STRINGS))
def test_encode_never_yields_a_special_id(tok: M.Tokenizer, text: str) -> None:
    """Tokenizer.encode treats every string as text: no id is <|endoftext|> (50256) or above, whatever the text
    spells, and it decodes back to the text (lone surrogates aside, which UTF-8 cannot hold)."""
    ids = tok.encode(text)
    assert all(0 <= i < M.EOT_ID for i in ids)
    if not any("\ud800" <= c <= "\udfff" for c in text):
        assert tok.decode(ids) == text


def strip_specials(text: str) -> str:
    for s in SPECIAL_STRINGS:
        text = text.replace(s, "")
    return text


def special_count(ids: list[int], tok: M.Tokenizer) -> int:
    specials = set(tok.special_ids.values())
    return sum(i in specials for i in ids)


@props(300)
@given(record=conversations(), add_generation_prompt=st.booleans())
def test_render_trains_only_assistant_text_and_forges_no_special_id(tok: M.Tokenizer, record: dict[str, Any],
                                                                    add_generation_prompt: bool) -> None:
    """For any valid conversation, special spellings in the text included: ids and mask have one length; the only
    special ids are the template's (<|endoftext|>, then <|role|> ... <|end|> per message, <|assistant|> to prompt),
    as many as with the spellings removed; each content span decodes to its message; the mask is 1 exactly on
    assistant content and its <|end|>; every id is below CHAT_VOCAB_LIMIT."""
    assert M.conversation_error(record) is None
    messages = record["messages"]
    ids, mask = M.render_conversation(tok, messages, add_generation_prompt=add_generation_prompt)
    assert len(ids) == len(mask) and set(mask) <= {0, 1} and max(ids) < M.CHAT_VOCAB_LIMIT
    specials = set(tok.special_ids.values())
    assert ids[0] == M.EOT_ID and mask[0] == 0
    pos = 1
    for m in messages:
        assert ids[pos] == ROLE_IDS[m["role"]] and mask[pos] == 0
        end = ids.index(END_ID, pos + 1)  # content holds no special id, so the first <|end|> closes the message
        span = ids[pos + 1:end]
        assert not set(span) & specials and tok.decode(span) == m["content"]
        assert mask[pos + 1:end + 1] == [int(m["role"] == "assistant")] * (len(span) + 1)
        pos = end + 1
    assert ids[pos:] == ([ROLE_IDS["assistant"]] if add_generation_prompt else []) and not any(mask[pos:])
    expected = 1 + 2 * len(messages) + add_generation_prompt
    stripped = [dict(m, content=strip_specials(m["content"])) for m in messages]
    plain_ids, _ = M.render_conversation(tok, stripped, add_generation_prompt=add_generation_prompt)
    assert special_count(ids, tok) == special_count(plain_ids, tok) == expected
