"""The bad-input contract of every script, in one table.

The policy: every way a user can get input wrong ends in exactly one line on stderr, `<script>: error: ...`, naming
the file, record, line or flag and what to do, with exit code 2, no traceback, and nothing on disk changed. Checked
here as: every file under the case's directory is byte-identical afterwards and no file or directory has appeared
(no partial output, no empty run directory). Odd but valid input to chat.py (empty lines, 50,000 characters,
invalid UTF-8, special-token spellings, emoji) is not an error: exit 0, no traceback, and typed special tokens stay
plain text.

Every row of CASES runs in-process: the script's main(argv) under capsys, with the case's directory as the working
directory (so no .env but the case's own is read) and no NANOGPT_* variable set. An exception other than SystemExit
escaping main() is the traceback a user would see: it is recorded as exit code 1 and fails the case. Rows with a
time limit, and a few representative ones again (test_entry_point, marked slow), run as `python SCRIPT ...`.

Adding a case is one line in CASES:

    pt("num-layers-odd", "{tiny} --num-layers 3", "shards", "--num-layers=3 must be even"),
    pt("orthogonalizer-unknown", "{tiny} --muon-orthogonalizer svd", "shards",
       "--muon-orthogonalizer='svd' must be one of newton_schulz, polar_express"),
    pt("adam-weight-decay-negative", "{tiny} --adam-update record --adam-weight-decay -1", "shards",
       "--adam-weight-decay=-1.0 must be >= 0 and finite"),
    pt("muon-weight-decay-infinite", "{tiny} --muon-weight-decay inf", "shards",
       "--muon-weight-decay=inf must be >= 0 and finite"),
    pt("normuon-beta2-nan", "{tiny} --normuon true --normuon-beta2 nan", "shards",
       "--normuon-beta2=nan must be in [0, 1)"),
    pt("adam-every-needs-record-adam", "{tiny} --adam-every 2", "shards",
       "--adam-every=2 needs --adam-update record"),
    pt("qk-head-groups-not-a-divisor", "{tiny} --muon-qk-head-groups 3", "shards",
       "--muon-qk-head-groups=3 must be 0 or divide --num-heads=2"),

the script (pt, tg, ft, ev, ch, convert, chat_tasks, fineweb), a readable id, the arguments as shell words with
placeholders, the setup builders (names in SETUPS, space-separated) and a fragment of the one stderr line.
Keywords: files= (path under the case's directory -> text or bytes), env= (environment variables), stdin= (bytes),
code=0 (must succeed), replies= (chat.py: replies expected), timeout= (seconds, run as a subprocess), marks=.

Placeholders: {tmp} the case's directory, {in} {logs} {empty} {data} its folders, {ckpt} the tiny base checkpoint
(logs/base/state_step000006.pt, setup "base"), {chat} a fine-tuned one (logs/sft/state_step000004.pt, setup "chat");
{tiny} the tiny model's pretraining flags (tests/conftest.py tiny_args, run id "run"), {ft}, {ev}, {ch}
the base flags of finetune.py, eval.py and chat.py.

    python -m pytest tests/test_bad_input.py -q       # about 75 s on 2 cores, 15 s of it the 100 MB record (slow)
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import importlib
import io
import json
import os
import pickle
import shlex
import shutil
import subprocess
import sys
import traceback
import warnings
import zipfile
from pathlib import Path
from types import ModuleType
from typing import Any, Callable, Iterator

import numpy as np
import pytest
import torch

import inference as I
import model as M
import runs as R
from conftest import REPO_DIR, random_documents, tiny_hparams
from conftest import tiny_args

# -----------------------------------------------------------------------------
# The table's vocabulary: cases, placeholders, inputs


@dataclasses.dataclass(frozen=True)
class Case:
    script: str  # as the user types it: pretraining.py, data/convert.py, ...
    id: str
    argv: str  # shell words; placeholders {tmp} {in} {logs} ... and the macros {tiny} {ft} {ev} {ch}
    setup: str  # names of SETUPS builders, space-separated, applied in order
    fragment: str  # must occur in the one stderr line (placeholders substituted); unused when code is 0
    code: int = 2
    files: dict[str, str | bytes] = dataclasses.field(default_factory=dict)  # path under tmp -> content
    env: dict[str, str] = dataclasses.field(default_factory=dict)
    stdin: bytes = b""
    replies: int | None = None  # chat.py with code 0: how many replies are generated
    timeout: float | None = None  # run as a subprocess within this many seconds
    marks: tuple[Any, ...] = ()


def _case(script: str, id: str, argv: str, setup: str, fragment: str = "", **kw: Any) -> Case:
    return Case(script, id, argv, setup, fragment, **kw)


pt = functools.partial(_case, "pretraining.py")
tg = functools.partial(_case, "train_gpt.py")
ft = functools.partial(_case, "finetune.py")
ev = functools.partial(_case, "eval.py")
ch = functools.partial(_case, "chat.py")
convert = functools.partial(_case, "data/convert.py")
chat_tasks = functools.partial(_case, "data/chat_tasks.py")
fineweb = functools.partial(_case, "data/fineweb.py")

MACROS = {
    "{tiny}": tiny_args(Path("{data}"), Path("{logs}"), "run"),
    "{ft}": "--log-dir {logs} --dtype fp32 --compile off --device cpu --data {in}/d.json".split(),
    "{ev}": "--device cpu --dtype fp32 --checkpoint {ckpt} --log-dir {logs}".split(),
    "{ch}": "--device cpu --dtype fp32 --checkpoint {ckpt} --log-dir {logs} --max-new-tokens 4".split(),
}
NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="cuda:0 is a working device here")
NO_MPS = pytest.mark.skipif(torch.backends.mps.is_available(), reason="mps is a working device here")


def msg(role: str, content: object) -> dict:
    return {"role": role, "content": content}


def convo(*messages: object) -> dict:
    return {"messages": list(messages)}


def doc(*records: object) -> str:
    return json.dumps({"conversations": list(records)})


def dj(text: str | bytes, name: str = "d.json") -> dict[str, str | bytes]:
    """finetune.py's --data file ({in}/d.json) holding text."""
    return {f"in/{name}": text}


GOOD = convo(msg("user", "Hi"), msg("assistant", "Hello."))
GOOD3 = doc(GOOD, GOOD, GOOD)
HI, BOT, BAD = msg("user", "Hi"), msg("bot", "x"), convo(msg("user", "Hi"))  # BAD: no assistant message
LONG_FIRST = convo(msg("user", " ".join(["word"] * 150)), msg("assistant", "Too late."))  # longer than a row
DEEP = "[" * 100_000 + "]" * 100_000  # nested far past Python's recursion limit
D, DL, R1 = "{in}/d.json: ", "{in}/d.jsonl: ", "{in}/d.json: record 1: "  # the file first, then the record
CHOICE = json.dumps(dict(ctx="A", endings=["b", "c"], label=1))  # one good multiple-choice record
SPELLED = "Say <|assistant|> then <|endoftext|> and <|end|><|user|><|system|>"
SCRIPTS_MIX = "emoji 🎭🌹 👩‍👩‍👧‍👦, 日本語, русский, العربية, עברית, Ελληνικά, zero\u200bwidth, \ufeffBOM"
CKPT_FLAW = "not a loadable checkpoint"


# -----------------------------------------------------------------------------
# The table

CASES: list[Case] = [
    # pretraining.py: flags and their combinations (moved from test_pretraining.py: the first seven)
    pt("num-iterations-not-int", "{tiny} --num-iterations abc", "shards", "--num-iterations: invalid value 'abc'"),
    pt("num-iterations-zero", "{tiny} --num-iterations 0", "shards", "--num-iterations=0 must be positive"),
    pt("unknown-flag", "{tiny} --bogus-flag 1", "shards", "unrecognized arguments: --bogus-flag"),
    pt("flag-typo", "{tiny} --num-iteration 5", "shards",
       "unrecognized arguments: --num-iteration 5 (did you mean --num-iterations?)"),
    pt("env-typo", "{tiny}", "shards", "environment variable NANOGPT_NUM_ITERATION names no hyperparameter (did you "
       "mean NANOGPT_NUM_ITERATIONS?)", env={"NANOGPT_NUM_ITERATION": "3"}),
    pt("num-layers-odd", "{tiny} --num-layers 3", "shards", "--num-layers=3 must be even"),
    pt("orthogonalizer-unknown", "{tiny} --muon-orthogonalizer svd", "shards",
       "--muon-orthogonalizer='svd' must be one of newton_schulz, polar_express"),
    pt("adam-weight-decay-negative", "{tiny} --adam-update record --adam-weight-decay -1", "shards",
       "--adam-weight-decay=-1.0 must be >= 0 and finite"),
    pt("muon-weight-decay-infinite", "{tiny} --muon-weight-decay inf", "shards",
       "--muon-weight-decay=inf must be >= 0 and finite"),
    pt("normuon-beta2-nan", "{tiny} --normuon true --normuon-beta2 nan", "shards",
       "--normuon-beta2=nan must be in [0, 1)"),
    pt("adam-every-needs-record-adam", "{tiny} --adam-every 2", "shards",
       "--adam-every=2 needs --adam-update record"),
    pt("qk-head-groups-not-a-divisor", "{tiny} --muon-qk-head-groups 3", "shards",
       "--muon-qk-head-groups=3 must be 0 or divide --num-heads=2"),
    pt("train-glob-matches-nothing", "{tiny} --train-files /nonexistent/x_*.bin", "shards",
       "no files match '/nonexistent/x_*.bin'"),
    pt("resume-missing-file", "{tiny} --resume /nonexistent/state_step000001.pt", "shards",
       "/nonexistent/state_step000001.pt: checkpoint not found"),
    pt("device-cuda-absent", "{tiny} --device cuda:0", "shards", "--device=cuda:0 but CUDA is not available",
       marks=(NO_CUDA,)),
    pt("device-nonsense", "{tiny} --device nonsense", "shards", "--device='nonsense' is not a torch device"),
    pt("device-mps-absent", "{tiny} --device mps", "shards", "--device=mps but MPS is not available", marks=(NO_MPS,)),
    pt("val-tokens-float", "{tiny} --val-tokens 1.5", "shards", "--val-tokens: invalid value '1.5'"),
    pt("shuffle-rows-not-bool", "{tiny} --shuffle-rows maybe", "shards", "--shuffle-rows: invalid value 'maybe'"),
    pt("flag-without-value", "{tiny} --num-iterations", "shards", "--num-iterations/--num_iterations: expected one"),
    pt("row-len-negative", "{tiny} --row-len -128", "shards", "--row-len=-128 must be >= 0"),
    pt("train-seq-len-zero", "{tiny} --train-seq-len 0", "shards", "--train-seq-len=0 must be positive"),
    pt("cooldown-frac-zero", "{tiny} --cooldown-frac 0", "shards", "--cooldown-frac=0.0 must be in (0, 1]"),
    pt("heads-times-head-dim", "{tiny} --model-dim 96", "shards", "--num-heads * --head-dim = 64 must equal "
       "--model-dim=96"),
    pt("no-attn-layer-too-big", "{tiny} --no-attn-layer 2", "shards", "--no-attn-layer=2 must be -1 or a layer"),
    pt("seq-len-not-multiple-of-row", "{tiny} --train-seq-len 320", "shards",
       "--train-seq-len=320 must be a multiple of --row-len=128"),
    pt("row-len-not-multiple-of-128", "{tiny} --row-len 64", "shards", "row length 64 (--train-seq-len / --row-len) "
       "must be a multiple of 128"),
    pt("shuffle-rows-without-row-len", "{tiny} --row-len 0 --shuffle-rows true", "shards",
       "--shuffle-rows needs --row-len > 0"),
    pt("dtype-fp16", "{tiny} --dtype fp16", "shards", "--dtype='fp16' must be one of auto, bf16, fp32"),
    pt("compile-maybe", "{tiny} --compile maybe", "shards", "--compile='maybe' must be one of auto, on, head, off"),
    pt("preset-unknown", "{tiny} --preset tiny", "shards", "argument --preset: invalid choice: 'tiny'"),
    pt("run-id-with-slash", "{tiny} --run-id a/b", "shards", "--run-id='a/b' may hold only letters"),
    pt("run-id-dotdot", "{tiny} --run-id ..", "shards", "--run-id='..' may hold only letters"),
    pt("run-id-escapes-log-dir", "{tiny} --run-id ../escape", "shards", "--run-id='../escape' may hold only"),
    pt("run-id-absolute", "{tiny} --run-id {tmp}/abs", "shards", "may hold only letters, digits"),
    pt("run-id-exists", "{tiny}", "shards run_exists", "run directory {logs}/run already exists"),
    pt("env-unknown-variable", "{tiny}", "shards", "environment variable NANOGPT_NUM_LAYRES names no hyperparameter",
       env={"NANOGPT_NUM_LAYRES": "4"}),
    pt("env-bad-value", "{tiny}", "shards", "--seed: invalid value 'ten'", env={"NANOGPT_SEED": "ten"}),
    pt("dotenv-unknown-variable", "{tiny}", "shards dotenv_typo", "NANOGPT_NUM_LAYRES names no hyperparameter"),
    pt("resume-latest-nothing", "{tiny} --resume latest", "shards", "under {logs}/"),
    # pretraining.py: data
    pt("empty-shard", "{tiny}", "shards empty_shard", "tiny_train_000000.bin: empty shard (0 tokens)"),
    pt("wrong-magic", "{tiny}", "shards bad_magic", "tiny_train_000000.bin: wrong magic number 12345"),
    pt("wrong-version", "{tiny}", "shards bad_version", "tiny_train_000000.bin: unsupported shard version 2"),
    pt("truncated-shard", "{tiny}", "shards truncated_shard", "tiny_train_000000.bin: truncated shard: header claims"),
    pt("truncated-header", "{tiny}", "shards short_header", "tiny_train_000000.bin: truncated shard header"),
    pt("shard-smaller-than-batch", "{tiny}", "shards short_shard", "tiny_train_000000.bin: 300 tokens; one batch"),
    pt("wrong-magic-second-shard", "{tiny} --num-iterations 1 --save-checkpoint false", "shards bad_magic_second",
       "tiny_train_000001.bin: wrong magic number 12345"),
    pt("train-token-outside-vocab", "{tiny}", "shards oov_train", "tiny_train_000000.bin"),
    pt("val-token-outside-vocab", "{tiny}", "shards oov_val", "tiny_val_000000.bin"),
    pt("val-split-smaller-than-budget", "{tiny} --val-tokens 4096", "shards", "hold fewer than --val-tokens=4096"),
    # pretraining.py: checkpoints given to --resume
    pt("resume-truncated", "--resume {in}/truncated.pt", "shards truncated_ckpt", "{in}/truncated.pt: " + CKPT_FLAW),
    pt("resume-text-file", "--resume {in}/text.pt", "shards text_ckpt", "{in}/text.pt: " + CKPT_FLAW),
    pt("resume-empty-file", "--resume {in}/empty.pt", "shards empty_ckpt", "{in}/empty.pt: " + CKPT_FLAW),
    pt("resume-zip-not-checkpoint", "--resume {in}/zip.pt", "shards zip_ckpt", "{in}/zip.pt: " + CKPT_FLAW),
    pt("resume-list-not-checkpoint", "--resume {in}/list.pt", "shards list_ckpt", "{in}/list.pt: not a checkpoint"),
    pt("resume-code-pickle", "--resume {in}/pickle.pt", "shards pickle_ckpt", "{in}/pickle.pt: " + CKPT_FLAW),
    pt("resume-code-in-zip", "--resume {in}/zip_pickle.pt", "shards zip_pickle_ckpt",
       "{in}/zip_pickle.pt: " + CKPT_FLAW),
    pt("resume-newer-config-field", "--resume {in}/future.pt --device cpu", "shards future_ckpt", "{in}/future.pt"),
    pt("resume-other-architecture", "--resume {logs}/wide/state_step000006.pt --model-dim 64 --num-heads 2 "
       "--head-dim 32 --num-iterations 12 --device cpu", "shards wide",
       "embed.weight has shape (50304, 128) in the checkpoint"),
    pt("resume-fine-tuned", "--resume {chat} --device cpu", "shards chat", "finetune.py --resume"),

    # train_gpt.py (moved from test_train_gpt.py: the first seven)
    tg("num-iterations-not-int", "{tiny} --num-iterations abc", "shards", "--num-iterations: invalid value 'abc'"),
    tg("unknown-flag", "{tiny} --bogus-flag 1", "shards", "unrecognized arguments: --bogus-flag"),
    tg("flag-typo", "{tiny} --num-iteration 5", "shards",
       "unrecognized arguments: --num-iteration 5 (did you mean --num-iterations?)"),
    tg("normuon-not-in-the-record", "{tiny} --normuon true", "shards",
       "--normuon is not in train_gpt.py (the May-2025 record: its plain loss and optimizer, log.txt only)"),
    tg("num-layers-odd", "{tiny} --num-layers 3", "shards", "--num-layers=3 must be even"),
    tg("train-glob-matches-nothing", "{tiny} --train-files /nonexistent/x_*.bin", "shards",
       "no files match '/nonexistent/x_*.bin'"),
    tg("speedrun-without-fineweb", "--log-dir {logs} --preset speedrun --device cpu", "",
       "fineweb_train_*.bin'; create them with `python data/fineweb.py`"),
    tg("resume-refused", "{tiny} --resume latest", "shards", "train_gpt.py always starts fresh; continue its "
       "checkpoints with `python pretraining.py"),
    tg("device-cuda-absent", "{tiny} --device cuda:0", "shards", "--device=cuda:0 but CUDA", marks=(NO_CUDA,)),
    tg("device-nonsense", "{tiny} --device nonsense", "shards", "--device='nonsense' is not a torch device"),
    tg("dtype-fp16", "{tiny} --dtype fp16", "shards", "--dtype='fp16' must be one of auto, bf16, fp32"),
    tg("heads-times-head-dim", "{tiny} --model-dim 96", "shards", "--num-heads * --head-dim = 64 must equal"),
    tg("run-id-escapes-log-dir", "{tiny} --run-id ../escape", "shards", "--run-id='../escape' may hold only"),
    tg("run-id-exists", "{tiny}", "shards run_exists", "{logs}/run.txt already exists; pick another --run-id"),
    tg("env-unknown-variable", "{tiny}", "shards", "environment variable NANOGPT_NUM_LAYRES names no hyperparameter",
       env={"NANOGPT_NUM_LAYRES": "4"}),
    tg("wrong-magic", "{tiny}", "shards bad_magic", "tiny_train_000000.bin: not a version-1 token shard"),
    tg("val-token-outside-vocab", "{tiny}", "shards oov_val", "tiny_val_000000.bin"),
    tg("val-split-smaller-than-budget", "{tiny} --val-tokens 4096", "shards", "hold fewer than --val-tokens=4096"),

    # finetune.py: --data files (moved from test_finetune.py: the first thirty)
    ft("bad-json", "{ft}", "base", D + "not valid JSON (line 2 column 16: ",
       files=dj('{"conversations":\n [{"messages": ]}]}')),
    ft("not-utf8", "{ft}", "base", D + "not UTF-8 text (byte 0)", files=dj(b'\xff\xfe{"conversations": []}')),
    ft("top-level-list", "{ft}", "base", D + "expected an object with a 'conversations' list", files=dj("[]")),
    ft("no-conversations", "{ft}", "base", D + "expected an object with a 'conversations' list",
       files=dj(json.dumps(GOOD))),
    ft("record-not-object", "{ft}", "base", D + "record 2: must be an object with 'messages', not int",
       files=dj(doc(GOOD, 5))),
    ft("messages-missing", "{ft}", "base", D + "record 2: 'messages' must be a non-empty list",
       files=dj(doc(GOOD, {"msgs": []}))),
    ft("messages-empty", "{ft}", "base", R1 + "'messages' must be a non-empty list", files=dj(doc({"messages": []}))),
    ft("messages-not-list", "{ft}", "base", R1 + "'messages' must be a non-empty", files=dj(doc({"messages": "Hi"}))),
    ft("message-not-object", "{ft}", "base", R1 + "message 1 must be an object with 'role'",
       files=dj(doc(convo("Hi")))),
    ft("missing-role", "{ft}", "base", R1 + "message 1: missing 'role'", files=dj(doc(convo({"content": "Hi"})))),
    ft("unknown-role", "{ft}", "base", D + "record 2: message 2: unknown role 'bot'",
       files=dj(doc(GOOD, convo(HI, BOT)))),
    ft("missing-content", "{ft}", "base", R1 + "message 2: missing 'content'",
       files=dj(doc(convo(HI, {"role": "assistant"})))),
    ft("non-string-content", "{ft}", "base", R1 + "message 2: 'content' must be a",
       files=dj(doc(convo(HI, msg("assistant", 5))))),
    ft("empty-content", "{ft}", "base", R1 + "message 2: empty 'content'",
       files=dj(doc(convo(HI, msg("assistant", " \n"))))),
    ft("system-not-first", "{ft}", "base", R1 + "message 2: a system message",
       files=dj(doc(convo(HI, msg("system", "S"), HI)))),
    ft("no-assistant", "{ft}", "base", D + "record 3: no assistant message", files=dj(doc(GOOD, GOOD, BAD))),
    ft("jsonl-bad-line", "{ft} --data {in}/d.jsonl", "base", DL + "not valid JSON (line 2: ",
       files=dj(json.dumps(GOOD) + "\n{oops\n", "d.jsonl")),
    ft("jsonl-bad-record", "{ft} --data {in}/d.jsonl", "base", DL + "line 3: no assistant",
       files=dj(f"{json.dumps(GOOD)}\n\n{json.dumps(BAD)}", "d.jsonl")),
    ft("deep-json", "{ft}", "base", D + "JSON nested too deeply", files=dj(DEEP)),
    ft("deep-jsonl", "{ft} --data {in}/d.jsonl", "base", DL + "JSON nested too deeply",
       files=dj(json.dumps(GOOD) + "\n" + DEEP, "d.jsonl")),
    ft("bad-val-data", "{ft} --val-data {in}/v.json", "base", "{in}/v.json: record 1: no ",
       files={"in/d.json": GOOD3, "in/v.json": doc(BAD)}),
    ft("all-invalid-skipped", "{ft} --skip-invalid", "base", D + "no valid conversations", files=dj(doc(BAD))),
    ft("one-conversation", "{ft}", "base", D + "1 conversation(s) cannot be split for validation",
       files=dj(doc(GOOD))),
    ft("nothing-fits", "{ft}", "base", "no conversation fits the 128-token context",
       files=dj(doc(LONG_FIRST, LONG_FIRST))),
    ft("missing-data-file", "{ft}", "base", D + "cannot read (No such file or directory)"),
    ft("missing-checkpoint", "{ft} --checkpoint {in}/no.pt", "base", "{in}/no.pt: checkpoint not found",
       files=dj(GOOD3)),
    ft("not-a-checkpoint", "{ft} --checkpoint {in}/d.json", "base", D + CKPT_FLAW, files=dj(GOOD3)),
    ft("run-id-exists", "{ft} --run-id base", "base", "run directory {logs}/base already exists", files=dj(GOOD3)),
    ft("val-fraction-too-big", "{ft} --val-fraction 1.5", "base", "--val-fraction=1.5 must be in (0, 1)",
       files=dj(GOOD3)),
    ft("no-parent", "{ft} --log-dir {empty}", "base", "no pretrained checkpoint under {empty}/", files=dj(GOOD3)),
    # finetune.py: more files
    ft("not-utf8-inside", "{ft}", "base", D + "not UTF-8 text (byte 65)",
       files=dj(b'{"conversations": [{"messages": [{"role": "user", "content": "caf\xe9"}]}]}')),
    ft("empty-file", "{ft}", "base", D + "the file is empty (expected conversations as JSON or JSONL)", files=dj("")),
    ft("empty-jsonl", "{ft} --data {in}/d.jsonl", "base", DL + "the file is empty (expected conversations as JSON or "
       "JSONL)", files=dj("\n\n", "d.jsonl")),
    ft("top-level-number", "{ft}", "base", D + "expected an object with a 'conversations' list", files=dj("42")),
    ft("conversations-not-list", "{ft}", "base", D + "expected an object with a 'conversations' list",
       files=dj('{"conversations": {"messages": []}}')),
    ft("jsonl-line-is-number", "{ft} --data {in}/d.jsonl", "base", DL + "line 1: must be an object with 'messages'",
       files=dj("5\n", "d.jsonl")),
    ft("data-is-directory", "{ft} --data {in}", "base", "{in}: cannot read (Is a directory)"),
    ft("record-of-100-MB", "{ft} --val-data {in}/v.json", "base huge_record", "no conversation fits the 128-token "
       "context (train)", timeout=15),
    # finetune.py: flags and checkpoints
    ft("optimizer-unknown", "{ft} --optimizer sgd", "base", "--optimizer='sgd' must be one of muon, adamw",
       files=dj(GOOD3)),
    ft("lr-scale-not-float", "{ft} --lr-scale abc", "base", "argument --lr-scale: invalid float value: 'abc'",
       files=dj(GOOD3)),
    ft("lr-scale-negative", "{ft} --lr-scale -1", "base", "--lr-scale", files=dj(GOOD3)),
    ft("adamw-lr-negative", "{ft} --optimizer adamw --adamw-lr -1", "base", "--adamw-lr=-1.0 must be positive",
       files=dj(GOOD3)),
    ft("num-iterations-zero", "{ft} --num-iterations 0", "base", "--num-iterations=0 must be positive",
       files=dj(GOOD3)),
    ft("run-id-escapes-log-dir", "{ft} --run-id ../escape", "base", "--run-id='../escape' may hold only",
       files=dj(GOOD3)),
    ft("checkpoint-truncated", "{ft} --checkpoint {in}/truncated.pt", "base truncated_ckpt",
       "{in}/truncated.pt: " + CKPT_FLAW, files=dj(GOOD3)),
    ft("checkpoint-code-pickle", "{ft} --checkpoint {in}/pickle.pt", "base pickle_ckpt",
       "{in}/pickle.pt: " + CKPT_FLAW, files=dj(GOOD3)),
    ft("checkpoint-newer-config-field", "{ft} --checkpoint {in}/future.pt", "base future_ckpt", "{in}/future.pt",
       files=dj(GOOD3)),
    ft("resume-base-checkpoint", "{ft} --resume {ckpt}", "base", "{ckpt}: not a fine-tuning checkpoint",
       files=dj(GOOD3)),
    ft("resume-latest-nothing", "{ft} --resume latest", "base", "under {logs}/",
       files=dj(GOOD3)),
    ft("architecture-flags-differ", "{ft} --model-dim 128 --num-heads 4", "base",
       "embed.weight has shape (50304, 64) in the checkpoint", files=dj(GOOD3)),

    # eval.py (moved from the former test_eval_chat.py, now test_eval.py and test_chat.py: the first nine)
    ev("checkpoint-missing", "{ev} --checkpoint {tmp}/gone/state_step000001.pt", "base",
       "{tmp}/gone/state_step000001.pt: checkpoint not found"),
    ev("latest-in-empty-log-dir", "{ev} --checkpoint latest --log-dir {empty}", "base",
       "no checkpoint found under {empty}/"),
    ev("num-samples-negative", "{ev} --num-samples -1", "base", "--num-samples=-1 must be >= 0"),
    ev("max-new-tokens-negative", "{ev} --max-new-tokens -1", "base", "--max-new-tokens=-1 must be >= 0"),
    ev("val-tokens-zero", "{ev} --val-tokens 0", "base", "--val-tokens=0 must be positive"),
    ev("val-tokens-word", "{ev} --val-tokens most", "base", "argument --val-tokens: invalid val_budget value: 'most'"),
    ev("top-p-zero", "{ev} --top-p 0", "base", "--top-p=0.0 must be in (0, 1]"),
    ev("text-latin1", "{ev} --text {in}/latin1.txt", "base", "{in}/latin1.txt: cannot read as UTF-8 text",
       files={"in/latin1.txt": "café, naïve\n".encode("latin-1")}),
    ev("val-tokens-not-multiple", "{ev} --val-tokens 300", "base",
       "--val-tokens=300 must be a multiple of the checkpoint's val_seq_len (256)"),
    ev("hellaswag-no-ctx", "{ev} --hellaswag {in}/h.jsonl", "base", "{in}/h.jsonl:2: needs ctx (string), endings "
       "(list of strings)", files={"in/h.jsonl": CHOICE + "\n" + json.dumps(dict(endings=["b"], label=0)) + "\n"}),
    ev("hellaswag-label-out-of-range", "{ev} --hellaswag {in}/h.jsonl", "base", "{in}/h.jsonl:1: needs ctx (string)",
       files={"in/h.jsonl": json.dumps(dict(ctx="A", endings=["b", "c"], label=2)) + "\n"}),
    ev("hellaswag-not-json", "{ev} --hellaswag {in}/h.jsonl", "base", "{in}/h.jsonl:3: not JSON",
       files={"in/h.jsonl": CHOICE + "\n\n{oops\n"}),
    # eval.py: flags
    ev("unknown-flag", "{ev} --bogus", "base", "unrecognized arguments: --bogus"),
    ev("flag-typo", "{ev} --temprature 1", "base", "unrecognized arguments: --temprature 1 (did you mean "
       "--temperature?)"),
    ev("max-new-tokens-not-int", "{ev} --max-new-tokens abc", "base", "argument --max-new-tokens: invalid int value"),
    ev("limit-negative", "{ev} --limit -1", "base", "--limit=-1 must be >= 0"),
    ev("temperature-negative", "{ev} --temperature -1", "base", "--temperature=-1.0 must be >= 0"),
    ev("top-k-negative", "{ev} --top-k -2", "base", "--top-k=-2 must be >= 0"),
    ev("top-p-too-big", "{ev} --top-p 1.5", "base", "--top-p=1.5 must be in (0, 1]"),
    ev("dtype-fp16", "{ev} --dtype fp16", "base", "argument --dtype: invalid choice: 'fp16'"),
    ev("device-nonsense", "{ev} --device nonsense", "base", "--device='nonsense' is not a torch device"),
    # eval.py: checkpoints
    ev("checkpoint-truncated", "{ev} --checkpoint {in}/truncated.pt", "truncated_ckpt",
       "{in}/truncated.pt: " + CKPT_FLAW),
    ev("checkpoint-text-file", "{ev} --checkpoint {in}/text.pt", "text_ckpt", "{in}/text.pt: " + CKPT_FLAW),
    ev("checkpoint-empty-file", "{ev} --checkpoint {in}/empty.pt", "empty_ckpt", "{in}/empty.pt: " + CKPT_FLAW),
    ev("checkpoint-zip", "{ev} --checkpoint {in}/zip.pt", "zip_ckpt", "{in}/zip.pt: " + CKPT_FLAW),
    ev("checkpoint-list", "{ev} --checkpoint {in}/list.pt", "list_ckpt", "{in}/list.pt: not a checkpoint"),
    ev("checkpoint-code-pickle", "{ev} --checkpoint {in}/pickle.pt", "pickle_ckpt", "{in}/pickle.pt: " + CKPT_FLAW),
    ev("checkpoint-code-in-zip", "{ev} --checkpoint {in}/zip_pickle.pt", "zip_pickle_ckpt",
       "{in}/zip_pickle.pt: " + CKPT_FLAW),
    ev("checkpoint-newer-config-field", "{ev} --checkpoint {in}/future.pt", "future_ckpt", "{in}/future.pt"),
    ev("checkpoint-is-directory", "{ev} --checkpoint {logs}/base", "base", "{logs}/base: checkpoint not found"),
    # eval.py: --text, --hellaswag, --chat-eval and validation files
    ev("text-missing", "{ev} --text {in}/none.txt", "base", "{in}/none.txt: cannot read as UTF-8 text"),
    ev("text-empty", "{ev} --text {in}/empty.txt", "base", "{in}/empty.txt: no text to score",
       files={"in/empty.txt": ""}),
    ev("text-is-directory", "{ev} --text {in}", "base", "{in}: cannot read"),
    ev("hellaswag-missing", "{ev} --hellaswag {in}/none.jsonl", "base", "{in}/none.jsonl: cannot read"),
    ev("hellaswag-empty", "{ev} --hellaswag {in}/h.jsonl", "base", "{in}/h.jsonl: no records",
       files={"in/h.jsonl": "\n"}),
    ev("hellaswag-no-endings", "{ev} --hellaswag {in}/h.jsonl", "base", "{in}/h.jsonl:1: needs ctx",
       files={"in/h.jsonl": json.dumps(dict(ctx="A", endings=[], label=0))}),
    ev("hellaswag-not-utf8", "{ev} --hellaswag {in}/h.jsonl", "base", "{in}/h.jsonl: cannot read",
       files={"in/h.jsonl": b'{"ctx": "caf\xe9", "endings": ["a"], "label": 0}\n'}),
    ev("chat-eval-missing", "{ev} --chat-eval {in}/none.json", "base", "{in}/none.json: cannot read"),
    ev("chat-eval-not-json", "{ev} --chat-eval {in}/c.json", "base", "{in}/c.json: not valid JSON",
       files={"in/c.json": "{oops"}),
    ev("chat-eval-no-assistant", "{ev} --chat-eval {in}/c.json", "base", "{in}/c.json: record 1: no assistant",
       files={"in/c.json": doc(BAD)}),
    ev("chat-eval-reply-to-nothing", "{ev} --chat-eval {in}/c.json", "base", "{in}/c.json: record 1: the last "
       "assistant message must answer a user message", files={"in/c.json": doc(convo(msg("assistant", "x")))}),
    ev("val-glob-matches-nothing", "{ev} --val-files {tmp}/none_*.bin", "base", "no files match"),
    ev("val-wrong-magic", "{ev} --val-files {data}/tiny_train_*.bin", "base shards bad_magic",
       "tiny_train_000000.bin: wrong magic number 12345"),
    ev("val-split-smaller-than-budget", "{ev} --val-files {data}/tiny_val_*.bin --val-tokens 4096", "base shards",
       "hold fewer than --val-tokens=4096"),
    ev("val-token-outside-vocab", "{ev} --val-files {data}/tiny_val_*.bin", "base shards oov_val",
       "tiny_val_000000.bin"),

    # chat.py: bad flags and checkpoints
    ch("checkpoint-missing", "{ch} --checkpoint {in}/none.pt", "base", "{in}/none.pt: checkpoint not found"),
    ch("latest-in-empty-log-dir", "{ch} --checkpoint latest --log-dir {empty}", "", "no checkpoint found under "
       "{empty}/"),
    ch("checkpoint-truncated", "{ch} --checkpoint {in}/truncated.pt", "truncated_ckpt",
       "{in}/truncated.pt: " + CKPT_FLAW),
    ch("checkpoint-text-file", "{ch} --checkpoint {in}/text.pt", "text_ckpt", "{in}/text.pt: " + CKPT_FLAW),
    ch("checkpoint-code-pickle", "{ch} --checkpoint {in}/pickle.pt", "pickle_ckpt", "{in}/pickle.pt: " + CKPT_FLAW),
    ch("checkpoint-code-in-zip", "{ch} --checkpoint {in}/zip_pickle.pt", "zip_pickle_ckpt",
       "{in}/zip_pickle.pt: " + CKPT_FLAW),
    ch("unknown-flag", "{ch} --bogus", "base", "unrecognized arguments: --bogus"),
    ch("top-p-zero", "{ch} --top-p 0", "base", "--top-p=0.0 must be in (0, 1]"),
    ch("max-new-tokens-zero", "{ch} --max-new-tokens 0", "base", "--max-new-tokens=0 must be >= 1"),
    ch("temperature-negative", "{ch} --temperature -1", "base", "--temperature=-1.0 must be >= 0"),
    ch("temperature-not-float", "{ch} --temperature hot", "base", "argument --temperature: invalid float value"),
    ch("context-too-small", "{ch} --context 100", "base", "--context=100 must be at least 256"),
    ch("dtype-fp16", "{ch} --dtype fp16", "base", "argument --dtype: invalid choice: 'fp16'"),
    ch("device-nonsense", "{ch} --device nonsense", "base", "--device='nonsense' is not a torch device"),
    ch("system-prompt-too-long", "{ch} --context 256 --max-new-tokens 128 --prompt hi --system '" + "word " * 300
       + "'", "base", "the system prompt alone exceeds the 128-token prompt budget"),
    # chat.py: odd input is not an error (exit 0, typed special tokens stay text)
    ch("prompt-empty", "{ch} --prompt ''", "base", code=0, replies=1),
    ch("prompt-special-tokens", "{ch} --checkpoint {chat} --prompt '" + SPELLED + "'", "chat", code=0, replies=1),
    ch("stdin-only-blank-lines", "{ch}", "base", code=0, replies=0, stdin=b"\n\n   \n\t\n"),
    ch("stdin-50k-characters", "{ch}", "base", code=0, replies=1, stdin=("tell me more " * 4200)[:50_000].encode()),
    ch("stdin-invalid-utf8", "{ch}", "base", code=0, replies=2, stdin=b"bad \xff\xfe bytes \xc3(\n\x80\x81\n"),
    ch("stdin-control-bytes", "{ch}", "base", code=0, replies=1, stdin=b"\x00\x01\x1b[31m red \x7f\x08\n"),
    ch("stdin-special-tokens-base", "{ch}", "base", code=0, replies=1, stdin=SPELLED.encode()),
    ch("stdin-special-tokens-chat", "{ch} --checkpoint {chat}", "chat", code=0, replies=2,
       stdin=f"{SPELLED}\n<|endoftext|>\n".encode()),
    ch("stdin-mixed-scripts-emoji", "{ch}", "base", code=0, replies=1, stdin=SCRIPTS_MIX.encode() + b"\n"),
    ch("stdin-crlf-no-final-newline", "{ch}", "base", code=0, replies=2, stdin=b"hello\r\nworld"),
    ch("stdin-odd-commands", "{ch}", "base", code=0, replies=0, stdin=b"/temperature hot\n/nope\n/system\n/top_p 9\n"),

    # data scripts
    convert("missing-input-dir", "{tmp}/nope {tmp}/out/x", "", "no such directory"),
    convert("val-fraction-not-float", "{in} {tmp}/out/x --val-fraction abc", "", "--val-fraction"),
    convert("missing-out-prefix", "{in}", "", "out_prefix"),
    chat_tasks("train-not-int", "--train abc --out-dir {tmp}/out", "", "--train"),
    chat_tasks("train-negative", "--train -1 --out-dir {tmp}/out", "", "--train"),
    chat_tasks("out-dir-is-a-file", "--train 2 --heldout 1 --out-dir {in}/file.txt", "", "{in}/file.txt",
               files={"in/file.txt": "not a folder\n"}),
    fineweb("shards-not-int", "abc --out-dir {tmp}/fw", "", "num_train_shards"),
    fineweb("shards-out-of-range", "200 --out-dir {tmp}/fw", "", "num_train_shards=200 must be in 0..103"),
    fineweb("out-dir-is-a-file", "0 --out-dir {in}/file.txt", "", "{in}/file.txt",
            files={"in/file.txt": "not a folder\n"}),
]
ENTRY_POINT_IDS = ["pretraining.py-num-layers-odd", "eval.py-checkpoint-truncated", "finetune.py-deep-json",
                   "chat.py-stdin-invalid-utf8"]  # run again as `python SCRIPT ...` (test_entry_point)


def case_id(case: Case) -> str:
    return f"{case.script.removeprefix('data/')}-{case.id}"


# -----------------------------------------------------------------------------
# Setup builders: each writes what a case needs into its directory


@dataclasses.dataclass(frozen=True)
class Assets:
    """Written once per session: shards and tiny checkpoints (2 layers, 64 wide; about 40 MB each)."""

    shards: Path
    base: Path  # the tiny model, as pretraining.py saves it (its data files are `shards`)
    chat: Path  # the same weights marked as finetune.py marks them
    wide: Path  # model_dim 128: another architecture


class RunsCode:
    """Unpickling this writes a marker file: what an unsafe torch.load of a crafted checkpoint would do."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self) -> tuple[Callable, tuple]:
        return (Path.write_text, (self.marker, "pwned"))


MARKER = "PWNED"  # the file RunsCode writes under the case's directory; the new-files check catches it


def shard_bytes(tokens: np.ndarray, magic: int = M.SHARD_MAGIC, version: int = M.SHARD_VERSION,
                count: int | None = None) -> bytes:
    header = np.zeros(M.HEADER_INTS, dtype=np.int32)
    header[:3] = (magic, version, len(tokens) if count is None else count)
    return header.tobytes() + np.asarray(tokens, dtype=np.uint16).tobytes()


def _link(src: Path, dst: Path) -> None:
    """A hard link (no copy of 40 MB per case): the scripts replace files atomically rather than writing into them,
    and a case that did write into it fails on its changed hash."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)
    except OSError:  # another file system
        shutil.copyfile(src, dst)


def _shard(name: str, data: bytes) -> Callable[[Path, Assets], None]:
    return lambda tmp, a: (tmp / "data" / name).write_bytes(data)


def _in(name: str, make: Callable[[Path, Assets], bytes]) -> Callable[[Path, Assets], None]:
    return lambda tmp, a: (tmp / "in" / name).write_bytes(make(tmp, a))


def _torch_bytes(obj: Any) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _zip_bytes() -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("notes/readme.txt", "a zip archive, but not one torch.save wrote\n")
    return buf.getvalue()


def _future_ckpt(tmp: Path, a: Assets) -> bytes:
    """The base checkpoint with a hyperparameter this version does not know (written by a newer version)."""
    ckpt = torch.load(a.base, weights_only=True)
    ckpt["hyperparameters"]["new_field"] = 1
    return _torch_bytes(ckpt)


def _huge_record(tmp: Path, a: Assets) -> None:
    """A 100 MB user message (one JSON string of 'a'), written in well under a second; good held-out data."""
    with open(tmp / "in" / "d.json", "wb") as f:
        f.write(b'{"conversations": [{"messages": [{"role": "user", "content": "')
        for _ in range(100):
            f.write(b"a" * 1_000_000)
        f.write(b'"}, {"role": "assistant", "content": "ok"}]}]}')
    (tmp / "in" / "v.json").write_text(GOOD3)


def _shards(tmp: Path, a: Assets) -> None:
    for src in sorted(a.shards.glob("*.bin")):
        shutil.copyfile(src, tmp / "data" / src.name)


def _run_exists(tmp: Path, a: Assets) -> None:
    (tmp / "logs" / "run").mkdir()
    (tmp / "logs" / "run" / "log.txt").write_text("an earlier run\n")
    (tmp / "logs" / "run.txt").write_text("an earlier record\n")  # train_gpt.py's log of run "run"


TOKENS = random_documents(6000, seed=1)
OOV = TOKENS.copy()
OOV[100::500] = 60_000  # fits uint16, but is no row of the 50304-row embedding
SETUPS: dict[str, Callable[[Path, Assets], None]] = {
    "shards": _shards,  # data/tiny_train_00000{0,1}.bin (6,000 tokens each), data/tiny_val_000000.bin (3,000)
    "base": lambda tmp, a: _link(a.base, tmp / "logs" / "base" / "state_step000006.pt"),
    "chat": lambda tmp, a: _link(a.chat, tmp / "logs" / "sft" / "state_step000004.pt"),
    "wide": lambda tmp, a: _link(a.wide, tmp / "logs" / "wide" / "state_step000006.pt"),
    "run_exists": _run_exists,
    "dotenv_typo": lambda tmp, a: (tmp / ".env").write_text("NANOGPT_NUM_LAYRES=4\n"),
    "huge_record": _huge_record,
    # broken shards, replacing those of "shards"
    "empty_shard": _shard("tiny_train_000000.bin", shard_bytes(TOKENS[:0])),
    "bad_magic": _shard("tiny_train_000000.bin", shard_bytes(TOKENS, magic=12345)),
    "bad_magic_second": _shard("tiny_train_000001.bin", shard_bytes(TOKENS, magic=12345)),
    "bad_version": _shard("tiny_train_000000.bin", shard_bytes(TOKENS, version=2)),
    "truncated_shard": _shard("tiny_train_000000.bin", shard_bytes(TOKENS)[:-10]),
    "short_header": _shard("tiny_train_000000.bin", shard_bytes(TOKENS)[:100]),
    "short_shard": _shard("tiny_train_000000.bin", shard_bytes(TOKENS[:300])),
    "oov_train": _shard("tiny_train_000000.bin", shard_bytes(OOV)),
    "oov_val": _shard("tiny_val_000000.bin", shard_bytes(OOV[:3000])),
    # files that are not checkpoints, under in/
    "truncated_ckpt": _in("truncated.pt", lambda tmp, a: a.base.read_bytes()[:a.base.stat().st_size // 2]),
    "text_ckpt": _in("text.pt", lambda tmp, a: b"this is a text file, not a checkpoint\n"),
    "empty_ckpt": _in("empty.pt", lambda tmp, a: b""),
    "zip_ckpt": _in("zip.pt", lambda tmp, a: _zip_bytes()),
    "list_ckpt": _in("list.pt", lambda tmp, a: _torch_bytes([1, 2, 3])),
    "pickle_ckpt": _in("pickle.pt", lambda tmp, a: pickle.dumps({"model": RunsCode(tmp / MARKER)}, protocol=2)),
    "zip_pickle_ckpt": _in("zip_pickle.pt", lambda tmp, a: _torch_bytes({"model": RunsCode(tmp / MARKER)})),
    "future_ckpt": _in("future.pt", _future_ckpt),
}


@pytest.fixture(scope="session")
def assets(tmp_path_factory: pytest.TempPathFactory, shakespeare_data: Path) -> Assets:
    """Shards and checkpoints shared by every case (copied into a case's directory by its setup)."""
    root = tmp_path_factory.mktemp("bad_input_assets")
    shards = root / "shards"
    shards.mkdir()
    M.write_data_shard(shards / "tiny_train_000000.bin", random_documents(6000, seed=1))
    M.write_data_shard(shards / "tiny_train_000001.bin", random_documents(6000, seed=2))
    M.write_data_shard(shards / "tiny_val_000000.bin", random_documents(3000, seed=3))
    files = dict(train_files=str(shards / "tiny_train_*.bin"), val_files=str(shards / "tiny_val_*.bin"))
    paths = {}
    for name, step, hp, extra in [
        ("base", 6, tiny_hparams(**files), None),
        ("chat", 4, tiny_hparams(**files), dict(kind="chat", chat_template=M.CHAT_TEMPLATE_VERSION,
                                                finetune=dict(parent="logs/base/state_step000006.pt", args={}))),
        ("wide", 6, tiny_hparams(**files, model_dim=128, num_heads=4), None),
    ]:
        torch.manual_seed(0)
        paths[name] = M.save_checkpoint(root / name / f"state_step{step:06d}.pt", step=step, hp=hp, code={},
                                        model=M.GPT.from_hparams(hp), optimizers=[], extra=extra)
    return Assets(shards=shards, **paths)


def prepare(case: Case, tmp: Path, assets: Assets) -> None:
    for folder in ("in", "logs", "empty", "data"):
        (tmp / folder).mkdir()
    for name in case.setup.split():
        SETUPS[name](tmp, assets)
    for rel, content in case.files.items():
        path = tmp / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content if isinstance(content, bytes) else content.encode())


def places(tmp: Path) -> dict[str, str]:
    return {"{tmp}": str(tmp), "{in}": str(tmp / "in"), "{logs}": str(tmp / "logs"), "{empty}": str(tmp / "empty"),
            "{data}": str(tmp / "data"), "{ckpt}": str(tmp / "logs" / "base" / "state_step000006.pt"),
            "{chat}": str(tmp / "logs" / "sft" / "state_step000004.pt")}


def fill(text: str, tmp: Path) -> str:
    for key, value in places(tmp).items():
        text = text.replace(key, value)
    return text


def expand(argv: str, tmp: Path) -> list[str]:
    words: list[str] = []
    for word in shlex.split(argv):
        words += [fill(w, tmp) for w in MACROS.get(word, [word])]
    return words


# -----------------------------------------------------------------------------
# Running a case, in-process or as a subprocess


@dataclasses.dataclass
class Outcome:
    code: int | None  # None: killed at the time limit
    stdout: str
    stderr: str
    prompts: list[list[int]] | None = None  # chat.py in-process: every prompt sent to generate()


@functools.cache
def script_module(script: str) -> ModuleType:
    if script.startswith("data/"):
        return R.import_data_script(Path(script).stem)
    return importlib.import_module(Path(script).stem)


HIDDEN_WARNINGS = (DeprecationWarning, PendingDeprecationWarning, ImportWarning, ResourceWarning)  # python's default


def run_in_process(case: Case, argv: list[str], monkeypatch: pytest.MonkeyPatch,
                   capsys: pytest.CaptureFixture[str]) -> Outcome:
    """main(argv) as the command line runs it: stdin a pipe, warnings printed, an escaping exception a traceback."""
    module = script_module(case.script)
    prompts: list[list[int]] = []
    generate = I.generate

    def spy(model: Any, prompt: list[int], **kw: Any) -> Any:
        prompts.append(list(prompt))
        return generate(model, prompt, **kw)

    monkeypatch.setattr(I, "generate", spy)
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(case.stdin), encoding="utf-8", newline="\n"))
    monkeypatch.setattr(sys, "argv", [case.script, *argv])
    code, trace = 0, ""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            module.main(argv)
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 0 if e.code is None else 1
        except Exception:  # noqa: BLE001 - what a user would see as a traceback: the case records it and fails
            code, trace = 1, traceback.format_exc()
    out, err = capsys.readouterr()
    shown = [w for w in caught if not issubclass(w.category, HIDDEN_WARNINGS)]
    err += "".join(f"{w.filename}:{w.lineno}: {w.category.__name__}: {w.message}\n" for w in shown) + trace
    return Outcome(code, out, err, prompts)


def run_subprocess(case: Case, argv: list[str], tmp: Path, timeout: float) -> Outcome:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("NANOGPT_") and k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(case.env, OMP_NUM_THREADS="1")
    try:
        r = subprocess.run([sys.executable, str(REPO_DIR / case.script), *argv], cwd=tmp, input=case.stdin,
                           capture_output=True, env=env, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        return Outcome(None, (e.stdout or b"").decode(errors="replace"), (e.stderr or b"").decode(errors="replace"))
    return Outcome(r.returncode, r.stdout.decode(errors="replace"), r.stderr.decode(errors="replace"))


# -----------------------------------------------------------------------------
# Checks


def snapshot(root: Path) -> dict[str, str]:
    """Every file (sha256) and directory under root."""
    out = {}
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root).as_posix()
        if p.is_dir() and not p.is_symlink():
            out[rel + "/"] = "dir"
        else:
            digest = hashlib.sha256()
            with open(p, "rb") as f:
                while chunk := f.read(1 << 20):
                    digest.update(chunk)
            out[rel] = digest.hexdigest()
    return out


def plain_text_problems(prompts: list[list[int]]) -> list[str]:
    """Typed text is plain text: a prompt's special tokens are only the template's (<|endoftext|> first, and for
    a chat model <|user|> ... <|end|> <|assistant|> ... <|end|> per turn, ending with <|assistant|>)."""
    S = M.CHAT_SPECIAL_TOKENS
    usr, end, ast = S["<|user|>"], S["<|end|>"], S["<|assistant|>"]
    problems = []
    for i, ids in enumerate(prompts):
        special = [t for t in ids if t >= M.EOT_ID]
        turns = max(special.count(usr), 1)
        chat = [M.EOT_ID] + [usr, end, ast, end] * (turns - 1) + [usr, end, ast]
        if special not in ([M.EOT_ID], chat) or ids[0] != M.EOT_ID:
            problems.append(f"prompt {i + 1}: special tokens {special} are not only the template's")
    return problems


def problems_of(case: Case, r: Outcome, tmp: Path, before: dict[str, str]) -> list[str]:
    """Everything that breaks the policy, as lines for the failure message (empty: the case passes)."""
    found = []
    lines = r.stderr.strip().splitlines()
    if r.code is None:
        found.append(f"still running after {case.timeout} s (killed)")
    elif "Traceback (most recent call last)" in r.stderr:
        found.append(f"traceback: {lines[-1] if lines else ''}")
    if r.code is not None and r.code != case.code:
        found.append(f"exit code {r.code}, expected {case.code}")
    if case.code == 2 and r.code is not None:
        name = Path(case.script).name
        if len(lines) != 1:
            found.append(f"{len(lines)} stderr lines, expected 1")
        if not lines or not lines[0].startswith((f"{case.script}: error: ", f"{name}: error: ")):
            found.append(f"stderr does not start with '{case.script}: error: '")
        if fill(case.fragment, tmp) not in r.stderr:
            found.append(f"stderr lacks {fill(case.fragment, tmp)!r}")
    if case.replies is not None and r.prompts is not None and len(r.prompts) != case.replies:
        found.append(f"{len(r.prompts)} replies generated, expected {case.replies}")
    if case.code == 0 and r.prompts:
        found += plain_text_problems(r.prompts)
    after = snapshot(tmp)
    changed = sorted(p for p in before if after.get(p) != before[p])
    new = sorted(set(after) - set(before))
    if changed:
        found.append(f"changed or removed: {', '.join(changed)}")
    if new:
        found.append(f"left behind: {', '.join(new[:8])}{' ...' if len(new) > 8 else ''}")
    if found:
        found += ["--- stderr ---", *lines[-15:]]
    return found


# -----------------------------------------------------------------------------
# Tests


@pytest.fixture
def case_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """The case's working directory: no .env but its own, no NANOGPT_* or torchrun variables. Files over 1 MB
    (checkpoints, the 100 MB record) are deleted afterwards: pytest keeps the directories of three sessions."""
    for key in [k for k in os.environ if k.startswith("NANOGPT_") or k in ("RANK", "WORLD_SIZE", "LOCAL_RANK")]:
        monkeypatch.delenv(key)
    monkeypatch.chdir(tmp_path)
    yield tmp_path
    for p in tmp_path.rglob("*"):
        if p.is_file() and p.stat().st_size > 1 << 20:
            p.unlink()


def params(cases: list[Case]) -> list[Any]:
    return [pytest.param(c, id=case_id(c), marks=c.marks + ((pytest.mark.slow,) if c.timeout else ()))
            for c in cases]


def test_ids_are_unique_and_setups_exist() -> None:
    ids = [case_id(c) for c in CASES]
    assert len(ids) == len(set(ids)), sorted(i for i in ids if ids.count(i) > 1)
    assert {n for c in CASES for n in c.setup.split()} <= set(SETUPS)
    assert set(ENTRY_POINT_IDS) <= set(ids)


@pytest.mark.parametrize("case", params(CASES))
def test_bad_input(case: Case, case_dir: Path, assets: Assets, monkeypatch: pytest.MonkeyPatch,
                   capsys: pytest.CaptureFixture[str]) -> None:
    prepare(case, case_dir, assets)
    for key, value in case.env.items():
        monkeypatch.setenv(key, value)
    before = snapshot(case_dir)
    argv = expand(case.argv, case_dir)
    if case.timeout:
        outcome = run_subprocess(case, argv, case_dir, case.timeout)
    else:
        outcome = run_in_process(case, argv, monkeypatch, capsys)
    problems = problems_of(case, outcome, case_dir, before)
    assert not problems, "\n".join(problems)
    assert not (case_dir / MARKER).exists()  # a crafted pickle never ran


@pytest.mark.slow
@pytest.mark.parametrize("case", params([c for c in CASES if case_id(c) in ENTRY_POINT_IDS]))
def test_entry_point(case: Case, case_dir: Path, assets: Assets) -> None:
    """The same rows through the real command line (`python SCRIPT ...`): no traceback, one line, exit code."""
    prepare(case, case_dir, assets)
    before = snapshot(case_dir)
    outcome = run_subprocess(case, expand(case.argv, case_dir), case_dir, timeout=120)
    problems = problems_of(case, outcome, case_dir, before)
    assert not problems, "\n".join(problems)


def test_plain_text_check_catches_a_forged_token() -> None:
    """The check the chat rows rely on: a typed <|user|> that became the special token is caught."""
    S = M.CHAT_SPECIAL_TOKENS
    usr, end, ast = S["<|user|>"], S["<|end|>"], S["<|assistant|>"]
    assert plain_text_problems([[M.EOT_ID, 10, 11], [M.EOT_ID, usr, 10, end, ast, 12, end, usr, 13, end, ast]]) == []
    assert plain_text_problems([[M.EOT_ID, 10, M.EOT_ID], [M.EOT_ID, usr, usr, 10, end, ast]]) == [
        f"prompt 1: special tokens {[M.EOT_ID, M.EOT_ID]} are not only the template's",
        f"prompt 2: special tokens {[M.EOT_ID, usr, usr, end, ast]} are not only the template's"]


def test_rank_equivalents_not_divisible_by_world_size() -> None:
    """Only torchrun reaches this through a script (two processes); the check itself is validate(world_size)."""
    with pytest.raises(M.ConfigError, match=r"^--rank-equivalents=3 must be divisible by the world size 2 "):
        tiny_hparams(rank_equivalents=3, val_tokens=1024).validate(world_size=2)
