"""eval.py and chat.py: metrics equal to hand computations, multiple choice, sampling, and chat.py driven as a person
would use it (a pseudo-terminal), piped or one-shot (bad input: tests/test_bad_input.py). Tiny checkpoints written
here, CPU only.

    python -m pytest tests/test_eval_chat.py -q       # about 1 min on 2 cores
"""
from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pexpect
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

import chat
import eval as EV
import model as M
from conftest import REPO_DIR, random_documents, tiny_hparams
from test_model import randomize_zero_inits
from conftest import tiny_args

CPU = ("--device", "cpu")  # hermetic on machines with a GPU too; numbers compared by hand also pass --dtype fp32
FAVOURED = 262  # " the": the multiple-choice model predicts it with probability ~0.985 everywhere
NEVER = -1000.0  # lm_head weight on the constant hidden dimension: raw logit ~ -5000, soft-capped to ~0 (vs ~15)


# -----------------------------------------------------------------------------
# Helpers


def script_env() -> dict[str, str]:
    """As test_pretraining.run: one thread, no NANOGPT_* variables; a dumb terminal so readline adds no escapes."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("NANOGPT_")}
    env.update(OMP_NUM_THREADS="1", TERM="dumb")
    return env


def script(name: str, *args: str, stdin: bytes = b"", timeout: int = 120) -> subprocess.CompletedProcess:
    """python NAME ARGS in the repository with stdin bytes (piped, not a terminal); output decoded as UTF-8."""
    r = subprocess.run([sys.executable, name, *args], cwd=REPO_DIR, input=stdin, capture_output=True,
                       env=script_env(), timeout=timeout)
    return subprocess.CompletedProcess(r.args, r.returncode, r.stdout.decode(), r.stderr.decode())


def eval_json(*args: str) -> dict:
    r = script("eval.py", *CPU, "--json", *args)
    assert r.returncode == 0, r.stderr
    assert "Traceback" not in r.stderr
    return json.loads(r.stdout)


def replies(stdout: str) -> list[str]:
    """Piped and one-shot chat.py output: every reply followed by a blank line, nothing else."""
    assert stdout.endswith("\n\n"), repr(stdout)
    return stdout[:-2].split("\n\n")


def hand_losses(model: M.GPT, inputs: Tensor, targets: Tensor, row: int, window_blocks: int) -> Tensor:
    """Cross-entropy of every target from model.forward on rows of `row` tokens (each padded to whole blocks,
    after its tokens, so causality leaves them unchanged): the reference for eval.py's numbers."""
    out = []
    with torch.no_grad():
        for start in range(0, inputs.numel(), row):
            x = inputs[start:start + row].long()
            logits = model(F.pad(x, (0, (-x.numel()) % M.BLOCK_SIZE))[None], None, window_blocks)[0, :x.numel()]
            out.append(F.cross_entropy(logits.float(), targets[start:start + row].long(), reduction="none"))
    return torch.cat(out).double()


def hand_bpb(losses: Tensor, targets: Tensor, tok: M.Tokenizer) -> tuple[float, int]:
    """(bits per byte, bytes) over the targets that are not special tokens."""
    special = set(tok.special_ids.values())
    text = torch.tensor([int(t) not in special for t in targets])
    nbytes = sum(len(tok.token_bytes(int(t))) for t in targets if int(t) not in special)
    return float(losses[text].sum() / (math.log(2) * nbytes)), nbytes


def save(log_dir: Path, run_id: str, step: int, model: M.GPT, hp: M.Hyperparameters, kind: str = "base",
         age_s: float = 0.0) -> Path:
    """A checkpoint as pretraining.py (base) or finetune.py (chat) writes it; age_s moves its mtime back."""
    path = M.save_checkpoint(M.checkpoint_path(log_dir, run_id, step), step=step, model=model, optimizers=[], hp=hp,
                             code={}, extra={"kind": "chat"} if kind == "chat" else None)
    if age_s:
        t = time.time() - age_s
        os.utime(path, (t, t))
    return path


# -----------------------------------------------------------------------------
# Fixtures: shards, a random model, a model that never stops, a model that always says " the"


@pytest.fixture(scope="module")
def tok(shakespeare_data: Path) -> M.Tokenizer:
    return M.get_tokenizer()


@pytest.fixture(scope="module")
def hp(tmp_path_factory: pytest.TempPathFactory, shakespeare_data: Path) -> M.Hyperparameters:
    """The tiny model's config, with train and val shards of random documents of its own (and, through
    shakespeare_data, the data/gpt2.tiktoken that every checkpoint fixture's scripts need)."""
    d = tmp_path_factory.mktemp("shards")
    M.write_data_shard(d / "tiny_train_000000.bin", random_documents(3000, seed=1))
    M.write_data_shard(d / "tiny_val_000000.bin", random_documents(3000, seed=3))
    return tiny_hparams(train_files=str(d / "tiny_train_*.bin"), val_files=str(d / "tiny_val_*.bin"))


@pytest.fixture(scope="module")
def base_ckpt(hp: M.Hyperparameters, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Random non-zero lm_head and c_proj weights, step 6, alone in its log dir."""
    torch.manual_seed(0)
    model = randomize_zero_inits(M.GPT.from_hparams(hp), seed=1)
    return save(tmp_path_factory.mktemp("eval_logs"), "base", 6, model, hp)


def never_stopping_model(hp: M.Hyperparameters, tok: M.Tokenizer) -> M.GPT:
    """Random weights, but <|endoftext|>, the chat tokens and every token holding a newline are practically
    impossible: a large constant embedding dimension keeps hidden dimension 0 positive at every position, and
    their lm_head rows weigh it by NEVER (raw logit ~ -5000, capped logit ~0 against ~15 for the others)."""
    torch.manual_seed(0)
    model = randomize_zero_inits(M.GPT.from_hparams(hp), seed=1)
    banned = [i for i in range(M.EOT_ID) if b"\n" in tok.token_bytes(i) or b"\r" in tok.token_bytes(i)]
    banned += range(M.EOT_ID, model.lm_head.weight.size(0))
    with torch.no_grad():
        model.embed.weight[:, 0] = 50.0
        model.lm_head.weight[banned] = 0.0
        model.lm_head.weight[banned, 0] = NEVER
        x = torch.randint(0, M.EOT_ID, (4, 128), generator=torch.Generator().manual_seed(2))
        logits = model(x, None, M.final_window_blocks(hp))  # (B, T, V)
    assert float(logits[..., banned].max()) < 1 < 10 < float(logits.topk(50, dim=-1).values[..., -1].min())
    return model


@pytest.fixture(scope="module")
def long_logs(hp: M.Hyperparameters, tok: M.Tokenizer, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One log dir with a never-stopping base checkpoint (step 10, newest) and the same weights fine-tuned
    ('chat', step 5, a minute older)."""
    model, logs = never_stopping_model(hp, tok), tmp_path_factory.mktemp("chat_logs")
    return dict(logs=logs, chat=save(logs, "sft", 5, model, hp, kind="chat", age_s=60),
                base=save(logs, "pre", 10, model, hp))


@pytest.fixture(scope="module")
def choice_ckpt(hp: M.Hyperparameters, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Every token embeds to the same vector and the (zero-init) c_proj add nothing, so every position has the
    same final hidden state h; lm_head row FAVOURED = 100 h caps its logit at 30 against 15 for the rest."""
    torch.manual_seed(0)
    model = M.GPT.from_hparams(hp)
    with torch.no_grad():
        model.embed.weight.copy_(torch.randn(hp.model_dim).expand_as(model.embed.weight))
        x = torch.randint(0, M.EOT_ID, (2, 128), generator=torch.Generator().manual_seed(2))
        h = model.hidden_states(x, *model.attention_masks(x, M.final_window_blocks(hp)))  # (B, T, model_dim)
        assert torch.allclose(h, h[0, 0].expand_as(h), atol=1e-5)
        model.lm_head.weight.zero_()
        model.lm_head.weight[FAVOURED] = 100 * h[0, 0]
    return save(tmp_path_factory.mktemp("choice_logs"), "favour", 1, model, hp)


@pytest.fixture(scope="module")
def inference(long_logs: dict[str, Path]) -> dict[str, M.InferenceModel]:
    return {kind: M.load_for_inference(str(long_logs[kind]), device="cpu", dtype="fp32") for kind in ("base", "chat")}


# -----------------------------------------------------------------------------
# eval.py


@pytest.mark.slow
def test_val_metrics_equal_hand_computation(base_ckpt: Path, hp: M.Hyperparameters, tok: M.Tokenizer) -> None:
    """No task flags: the newest checkpoint's val loss, perplexity and bits per byte over its val shards and
    budget, then seeded samples of the default prompts; the same JSON beside the checkpoint."""
    out = eval_json("--log-dir", str(base_ckpt.parent.parent), "--dtype", "fp32", "--max-new-tokens", "4")
    shard = M._load_data_shard(Path(hp.val_files).parent / "tiny_val_000000.bin").long()
    inputs, targets = shard[:hp.val_tokens], shard[1:hp.val_tokens + 1]  # two batches of val_seq_len, as training
    model, _, _ = M.load_model(base_ckpt)
    losses = hand_losses(model.eval(), inputs, targets, hp.row_len, M.final_window_blocks(hp))
    bpb, nbytes = hand_bpb(losses, targets, tok)
    val = out["val"]
    assert (out["checkpoint"], out["step"], out["kind"]) == (str(base_ckpt), 6, "base")
    assert (val["files"], val["tokens"], val["row_len"]) == (hp.val_files, 512, 128)
    assert val["loss"] == pytest.approx(float(losses.mean()), abs=1e-4)
    assert val["perplexity"] == pytest.approx(math.exp(val["loss"]), rel=1e-9)
    assert val["bpb"] == pytest.approx(bpb, abs=1e-4)
    assert val["bytes"] == nbytes
    assert val["special_targets_excluded_from_bpb"] == int((targets == M.EOT_ID).sum()) > 0
    assert [s["prompt"] for s in out["samples"]] == EV.PROMPTS["web"]  # train files are not Shakespeare's
    assert [s["seed"] for s in out["samples"]] == [0, 1, 2]
    assert all(len(s["completions"]) == 1 and s["new_tokens"] <= 4 for s in out["samples"])
    assert out["sampling"] == dict(max_new_tokens=4, temperature=0.8, top_k=50, top_p=1.0, kv_cache=True)
    saved = json.loads((base_ckpt.parent / "eval_6.json").read_text())
    assert saved == out


@pytest.mark.slow
def test_text_metrics_equal_hand_computation(base_ckpt: Path, hp: M.Hyperparameters, tok: M.Tokenizer,
                                             tmp_path: Path) -> None:
    """--text: every UTF-8 byte of the file counts (the first target is the first text token after
    <|endoftext|>); more than one row of 128 tokens, the last one short."""
    text = ("Ünïcödé façade — naïve café; 日本語のテキスト; emoji 🎭🌹, Ελληνικά.\n"
            "ROMEO. Wherefore art thou?\n") * 3
    path = tmp_path / "notes.txt"
    path.write_text(text, encoding="utf-8")
    out = eval_json("--checkpoint", str(base_ckpt), "--dtype", "fp32", "--text", str(path))
    ids = torch.tensor(tok.encode_document(text))
    assert 128 < ids.numel() - 1 < 256
    model, _, _ = M.load_model(base_ckpt)
    losses = hand_losses(model.eval(), ids[:-1], ids[1:], hp.row_len, M.final_window_blocks(hp))
    bpb, nbytes = hand_bpb(losses, ids[1:], tok)
    r = out["text"]
    assert "val" not in out and "samples" not in out
    assert (r["file"], r["tokens"], r["row_len"]) == (str(path), ids.numel() - 1, 128)
    assert nbytes == r["bytes"] == len(text.encode("utf-8")) and r["special_targets_excluded_from_bpb"] == 0
    assert r["loss"] == pytest.approx(float(losses.mean()), abs=1e-4)
    assert r["perplexity"] == pytest.approx(math.exp(r["loss"]), rel=1e-9)
    assert r["bpb"] == pytest.approx(bpb, abs=1e-4)


CHOICES = [  # (ctx, endings, index of " the the the the", which the favoured-token model makes certain)
    ("The cat sat on", ["the the the the", "a warm mat today", "its own tail"], 0),
    ("ROMEO. Wherefore art", ["thou Romeo", "the the the the", "you so sad", "he gone now"], 1),
    ("Once upon a time,", ["a king ruled", "birds sang loudly", "the the the the"], 2),
]


def write_choices(path: Path, right: bool) -> Path:
    rows = [dict(ctx=c, endings=e, label=i if right else (i + 1) % len(e)) for c, e, i in CHOICES]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.slow
def test_multiple_choice_picks_the_certain_ending(choice_ckpt: Path, tok: M.Tokenizer, tmp_path: Path) -> None:
    assert tok.encode(" the the the the") == [FAVOURED] * 4
    wrong_endings = [e for _, endings, i in CHOICES for j, e in enumerate(endings) if j != i]
    assert all(FAVOURED not in tok.encode(" " + e) for e in wrong_endings)
    right = write_choices(tmp_path / "right.jsonl", right=True)
    out = eval_json("--checkpoint", str(choice_ckpt), "--hellaswag", str(right))
    assert out["choices"] == dict(file=str(right), examples=3, acc=1.0, acc_norm=1.0)
    out = eval_json("--checkpoint", str(choice_ckpt), "--hellaswag", str(right), "--limit", "2")
    assert out["choices"]["examples"] == 2
    im = M.load_for_inference(str(choice_ckpt), device="cpu", dtype="fp32")
    wrong = write_choices(tmp_path / "wrong.jsonl", right=False)
    assert EV.eval_choices(im, str(wrong), 0) == dict(file=str(wrong), examples=3, acc=0.0, acc_norm=0.0)


@pytest.mark.slow
def test_multiple_choice_context_longer_than_the_rotary_table(choice_ckpt: Path, tok: M.Tokenizer,
                                                              tmp_path: Path) -> None:
    """A record longer than the checkpoint's training rows is scored (the rotary table grows), not a crash."""
    ctx = "And so the tale goes on, " * 30
    assert len(tok.encode_document(ctx)) > 128  # the tiny checkpoint's row_len, so its max_seq_len
    path = tmp_path / "long.jsonl"
    path.write_text(json.dumps(dict(ctx=ctx, endings=["a king ruled", "the the the the"], label=1)) + "\n")
    r = script("eval.py", *CPU, "--checkpoint", str(choice_ckpt), "--json", "--hellaswag", str(path))
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["choices"]["acc"] == 1.0


@pytest.mark.slow
def test_prompts_samples_seed_and_kv_cache(long_logs: dict[str, Path], tok: M.Tokenizer) -> None:
    """Two prompts x two samples, reproducible by seed; greedy decoding equal with and without the KV cache,
    past the first 128-token block (the never-stopping model always writes max_new_tokens)."""
    ckpt = str(long_logs["base"])
    args = ["--checkpoint", ckpt, "--prompt", "ROMEO.\n", "--prompt", "To be, or not to be", "--num-samples", "2",
            "--seed", "3", "--temperature", "1", "--max-new-tokens", "8"]
    first, again = eval_json(*args), eval_json(*args)
    assert [(s["prompt"], s["seed"], len(s["completions"]), s["new_tokens"]) for s in first["samples"]] == \
        [("ROMEO.\n", 3, 2, 16), ("To be, or not to be", 4, 2, 16)]
    assert [s["completions"] for s in first["samples"]] == [s["completions"] for s in again["samples"]]
    assert all(a != b for a, b in (s["completions"] for s in first["samples"]))
    prompt = "KING HENRY.\nNow, my lords, " + "what say you to this? " * 16
    assert 100 < len(tok.encode_document(prompt)) < 128
    greedy = ["--checkpoint", ckpt, "--prompt", prompt, "--temperature", "0", "--max-new-tokens", "60"]
    cached, reference = eval_json(*greedy), eval_json(*greedy, "--no-kv-cache")
    assert (cached["sampling"]["kv_cache"], reference["sampling"]["kv_cache"]) == (True, False)
    assert cached["samples"][0]["new_tokens"] == 60
    assert cached["samples"][0]["completions"] == reference["samples"][0]["completions"]


# -----------------------------------------------------------------------------
# chat.py


def spawn_chat(*args: str) -> pexpect.spawn:
    return pexpect.spawn(sys.executable, ["chat.py", *CPU, *args], cwd=str(REPO_DIR), env=script_env(),
                         encoding="utf-8", codec_errors="replace", timeout=60, dimensions=(40, 200))


@pytest.mark.slow
def test_chat_in_a_terminal(long_logs: dict[str, Path]) -> None:
    """Typed as a person would: a reply, commands, Ctrl-C during a reply and at the prompt, quit."""
    child = spawn_chat("--checkpoint", str(long_logs["base"]), "--log-dir", str(long_logs["logs"]),
                       "--max-new-tokens", "5", "--temperature", "1")
    try:
        child.expect_exact(f"chat.py: {long_logs['base']} (step 10, preset test, cpu)")
        child.expect_exact("base model (not fine-tuned)")
        child.expect_exact("you> ")
        child.sendline("Good morrow")
        child.expect_exact("bot> ")
        child.expect_exact("you> ")
        assert child.before.strip() and "\n" not in child.before.strip()  # the reply: 5 tokens, no newline
        for line, answer in [("/temperature 0", "[temperature = 0.0]"), ("new", "[new conversation]"),
                             ("clear", "[conversation and system prompt cleared]"),
                             ("/max_new_tokens 3000", "[max_new_tokens = 3000]"),
                             ("/temperature 1", "[temperature = 1.0]"),
                             ("/top_p 2", "[/top_p needs a valid float, got '2']")]:
            child.sendline(line)
            child.expect_exact(answer)
            child.expect_exact("you> ")
        child.sendline("help")
        for line in chat.HELP.splitlines():
            child.expect_exact(line.rstrip())
        child.expect_exact("you> ")
        child.sendline("Tell me a long tale")  # up to ~1000 tokens (the context), seconds: stopped early
        child.expect_exact("bot> ")
        child.expect(r"\S")
        child.sendintr()
        child.expect_exact(" [interrupted]")
        child.expect_exact("you> ")
        assert child.isalive()
        child.sendintr()
        child.expect_exact("[Ctrl-D or quit to leave]")
        child.expect_exact("you> ")
        child.sendline("quit")
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 0, child.before


@pytest.mark.slow
def test_chat_ctrl_d_leaves(long_logs: dict[str, Path]) -> None:
    child = spawn_chat("--log-dir", str(long_logs["logs"]))
    try:
        child.expect_exact("chat model (fine-tuned")
        child.expect_exact("you> ")
        child.sendeof()
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 0, child.before


@pytest.mark.slow
def test_chat_one_shot_and_piped(long_logs: dict[str, Path]) -> None:
    """--prompt: one reply and a blank line. Piped: a reply per user line, commands silent, banner on stderr."""
    ckpt = ["--checkpoint", str(long_logs["base"]), "--log-dir", str(long_logs["logs"]), "--max-new-tokens", "6"]
    r = script("chat.py", *CPU, *ckpt, "--prompt", "Good morrow")
    assert r.returncode == 0, r.stderr
    (reply,) = replies(r.stdout)
    assert reply and "\n" not in reply
    r = script("chat.py", *CPU, *ckpt, stdin=b"Good morrow\n/temperature 0\nWho art thou?\n")
    assert r.returncode == 0, r.stderr
    got = replies(r.stdout)
    assert len(got) == 2 and all(g and "\n" not in g for g in got), r.stdout
    assert r.stderr.startswith(f"chat.py: {long_logs['base']} (step 10, preset test, cpu)\nbase model"), r.stderr
    assert "[temperature" not in r.stdout + r.stderr  # commands answer only in a terminal


def banner(*args: str) -> list[str]:
    """chat.py's banner (stderr when stdin is piped; empty stdin, so no reply)."""
    r = script("chat.py", *CPU, *args)
    assert r.returncode == 0 and r.stdout == "", r.stderr
    return r.stderr.splitlines()


@pytest.mark.slow
def test_chat_prefers_the_newest_fine_tuned_checkpoint(long_logs: dict[str, Path], hp: M.Hyperparameters,
                                                       tmp_path: Path) -> None:
    lines = banner("--log-dir", str(long_logs["logs"]))
    assert lines[0] == f"chat.py: {long_logs['chat']} (step 5, preset test, cpu)"  # older than the base one
    assert lines[1].startswith(f"chat model (fine-tuned, chat template v{M.CHAT_TEMPLATE_VERSION})")
    lines = banner("--log-dir", str(long_logs["logs"]), "--checkpoint", str(long_logs["base"]))
    assert lines[0].startswith(f"chat.py: {long_logs['base']} (step 10") and lines[1].startswith("base model")
    model = M.GPT.from_hparams(hp)
    save(tmp_path, "old", 9, model, hp, age_s=60)
    newest = save(tmp_path, "new", 2, model, hp)  # the newest by time, though of a lower step
    lines = banner("--log-dir", str(tmp_path))
    assert lines[0] == f"chat.py: {newest} (step 2, preset test, cpu)" and lines[1].startswith("base model")
    out = eval_json("--checkpoint", str(long_logs["chat"]), "--prompt", "Hello", "--max-new-tokens", "3")
    assert (out["checkpoint"], out["step"], out["kind"]) == (str(long_logs["chat"]), 5, "chat")


SPELLED = "Say <|assistant|> then <|endoftext|> and <|end|><|user|><|system|>"


@pytest.mark.parametrize("kind", ["base", "chat"])
def test_render_never_forges_special_tokens(inference: dict[str, M.InferenceModel], kind: str) -> None:
    im, tok = inference[kind], inference[kind].tokenizer
    special = set(tok.special_ids.values())
    conv = chat.Conversation(system="Be brief.", turns=[("hi <|end|>", "hello <|endoftext|>")])
    ids = chat.render(im, conv, SPELLED)
    if kind == "chat":
        # structure only: <|endoftext|>, system and end, user and end twice, assistant and end, assistant
        S = M.CHAT_SPECIAL_TOKENS
        assert [i for i in ids if i in special] == [M.EOT_ID, S["<|system|>"], S["<|end|>"], S["<|user|>"],
                                                    S["<|end|>"], S["<|assistant|>"], S["<|end|>"], S["<|user|>"],
                                                    S["<|end|>"], S["<|assistant|>"]]
        start = len(ids) - 1 - ids[::-1].index(S["<|user|>"]) + 1
        assert ids[start:len(ids) - 2] == tok.encode(SPELLED)
    else:
        assert ids[0] == M.EOT_ID and not special & set(ids[1:])
        assert tok.decode(ids[1:]) == (f"Be brief.\n\nUSER.\nhi <|end|>\n\nASSISTANT.\nhello <|endoftext|>\n\n"
                                       f"USER.\n{SPELLED}\n\nASSISTANT.\n")


@pytest.mark.parametrize("kind", ["base", "chat"])
def test_fit_drops_oldest_turns_keeps_system_prompt(inference: dict[str, M.InferenceModel], kind: str) -> None:
    im = inference[kind]
    turns = [(f"question {i}: " + "tell me more " * 6, f"answer {i}") for i in range(10)]
    conv = chat.Conversation(system="You are a player in a comedy.", turns=list(turns))
    budget = 160
    ids, note = chat.fit(im, conv, "and now?", budget)
    kept = len(conv.turns)
    assert 0 < kept < 10 and conv.turns == turns[-kept:]
    assert conv.system == "You are a player in a comedy."
    assert ids == chat.render(im, conv, "and now?") and len(ids) <= budget
    longer = chat.Conversation(system=conv.system, turns=turns[-kept - 1:])
    assert len(chat.render(im, longer, "and now?")) > budget  # dropped no more than needed
    assert note == f"[dropped the {10 - kept} oldest turn(s) to fit the {budget}-token prompt budget]"
    full = chat.Conversation(system=conv.system, turns=list(turns))
    assert chat.fit(im, full, "and now?", 10_000) == (chat.render(im, full, "and now?"), "") and full.turns == turns


def test_fit_cuts_a_long_message_but_keeps_the_prompt_start(inference: dict[str, M.InferenceModel]) -> None:
    """A message cut to fit keeps the prompt's start (<|endoftext|>, system prompt, speaker) intact."""
    im = inference["base"]
    ids, note = chat.fit(im, chat.Conversation(system="Be brief."), "\n\n" + "word " * 300, 100)
    assert note.startswith("[your message was cut to its last ") and len(ids) <= 100
    assert ids[0] == M.EOT_ID and im.tokenizer.decode(ids[1:]).startswith("Be brief.\n\nUSER.\n")


@pytest.mark.slow
def test_chat_piped_odd_input(long_logs: dict[str, Path]) -> None:
    """Empty and blank lines are skipped; a 20,000-character line, invalid UTF-8, emoji and mixed scripts each
    get one reply."""
    lines = [b"", b"Good morrow", b"   ", ("tell me more " * 1700)[:20_000].encode(), b"bad \xff\xfe bytes \xc3(",
             "emoji 🎭🌹, 日本語, русский, العربية, עברית".encode(), b""]
    r = script("chat.py", *CPU, "--checkpoint", str(long_logs["base"]), "--log-dir", str(long_logs["logs"]),
               "--max-new-tokens", "4", stdin=b"\n".join(lines) + b"\n")
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    got = replies(r.stdout)
    assert len(got) == 4 and all(g and "\n" not in g for g in got), r.stdout


@pytest.mark.slow
def test_pretraining_checkpoint_loads_in_both(shard_dir: Path, tmp_path: Path, shakespeare_data: Path) -> None:
    """pretraining.py's own checkpoint, found with no flag but --log-dir: eval.py's val loss equals the one
    stored at the last step, and chat.py answers."""
    logs = tmp_path / "logs"
    r = script("pretraining.py", *tiny_args(shard_dir, logs, "tiny"), timeout=300)
    assert r.returncode == 0, r.stderr
    final = logs / "tiny" / "state_step000006.pt"
    stored = torch.load(final, weights_only=True)["val_loss"]
    r = script("eval.py", "--log-dir", str(logs), "--max-new-tokens", "5")
    assert r.returncode == 0, r.stderr
    assert f"checkpoint: {final} (step 6, base model, preset shakespeare)" in r.stdout
    out = json.loads((final.parent / "eval_6.json").read_text())
    assert out["checkpoint"] == str(final) and out["val"]["tokens"] == 512
    assert out["val"]["loss"] == pytest.approx(stored, abs=1e-4)
    assert [s["prompt"] for s in out["samples"]] == EV.PROMPTS["web"]
    r = script("chat.py", "--log-dir", str(logs), "--prompt", "hi", "--max-new-tokens", "5")
    assert r.returncode == 0, r.stderr
    assert re.fullmatch(r"[^\n]*(\n[^\n]+)*\n\n", r.stdout), repr(r.stdout)  # one reply (no blank line inside)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["base", "chat"])
def test_chat_reference_path_gives_the_same_reply(long_logs: dict[str, Path], kind: str) -> None:
    """chat.py --no-kv-cache (full recompute every token) writes the same greedy reply as the cached path."""
    args = ("--checkpoint", str(long_logs[kind]), *CPU, "--prompt", "Good morrow", "--temperature", "0",
            "--max-new-tokens", "40")
    cached, reference = script("chat.py", *args), script("chat.py", *args, "--no-kv-cache")
    assert cached.returncode == reference.returncode == 0, cached.stderr + reference.stderr
    assert cached.stdout.strip() and cached.stdout == reference.stdout
