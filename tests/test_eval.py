"""eval.py: validation metrics equal to hand computations (a fixed budget, every full row of the split, or
metrics alone with --num-samples 0), any text file, multiple choice, and sampling; pretraining.py's own checkpoint
loads in eval.py and chat.py (bad input: tests/test_bad_input.py). Tiny checkpoints written here and in conftest.py,
CPU only.

    python -m pytest tests/test_eval.py -q       # about 1 min on 2 cores
"""
from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

import eval as EV
import inference as I
import model as M
from conftest import CPU, eval_json, random_documents, randomize_zero_inits, script, tiny_args, write_checkpoint

FAVOURED = 262  # " the": the multiple-choice model predicts it with probability ~0.985 everywhere


# -----------------------------------------------------------------------------
# Helpers


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



def in_order_rows(n_tokens: int, row: int) -> int:
    """How many rows of `row` tokens the in-order data generator takes from a shard of n_tokens: a row needs row + 1
    tokens (inputs and shifted targets), and the generator moves to the next shard when pos + row + 1 >= n_tokens."""
    rows, pos = 0, 0
    while pos + row + 1 < n_tokens:
        rows, pos = rows + 1, pos + row
    return rows


# -----------------------------------------------------------------------------
# Fixtures: a random model, a model that always says " the" (the never-stopping one is conftest.py's long_logs)


@pytest.fixture(scope="module")
def base_ckpt(ckpt_hp: M.Hyperparameters, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Random non-zero lm_head and c_proj weights, step 6, alone in its log dir."""
    torch.manual_seed(0)
    model = randomize_zero_inits(M.GPT.from_hparams(ckpt_hp), seed=1)
    return write_checkpoint(tmp_path_factory.mktemp("eval_logs"), "base", 6, model, ckpt_hp)


@pytest.fixture(scope="module")
def choice_ckpt(ckpt_hp: M.Hyperparameters, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Every token embeds to the same vector and the (zero-init) c_proj add nothing, so every position has the
    same final hidden state h; lm_head row FAVOURED = 100 h caps its logit at 30 against 15 for the rest."""
    torch.manual_seed(0)
    model = M.GPT.from_hparams(ckpt_hp)
    with torch.no_grad():
        model.embed.weight.copy_(torch.randn(ckpt_hp.model_dim).expand_as(model.embed.weight))
        x = torch.randint(0, M.EOT_ID, (2, 128), generator=torch.Generator().manual_seed(2))
        h = model.hidden_states(x, *model.attention_masks(x, M.final_window_blocks(ckpt_hp)))  # (B, T, model_dim)
        assert torch.allclose(h, h[0, 0].expand_as(h), atol=1e-5)
        model.lm_head.weight.zero_()
        model.lm_head.weight[FAVOURED] = 100 * h[0, 0]
    return write_checkpoint(tmp_path_factory.mktemp("choice_logs"), "favour", 1, model, ckpt_hp)


# -----------------------------------------------------------------------------
# eval.py


@pytest.mark.slow
def test_val_metrics_equal_hand_computation(base_ckpt: Path, ckpt_hp: M.Hyperparameters, tok: M.Tokenizer) -> None:
    """No task flags: the newest checkpoint's val loss, perplexity and bits per byte over its val shards and
    budget, then seeded samples of the default prompts; the same JSON beside the checkpoint."""
    out = eval_json("--log-dir", str(base_ckpt.parent.parent), "--dtype", "fp32", "--max-new-tokens", "4")
    shard = M._load_data_shard(Path(ckpt_hp.val_files).parent / "tiny_val_000000.bin").long()
    budget = ckpt_hp.val_tokens
    inputs, targets = shard[:budget], shard[1:budget + 1]  # two batches of val_seq_len, as training
    model, _, _ = M.load_model(base_ckpt)
    losses = hand_losses(model.eval(), inputs, targets, ckpt_hp.row_len, M.final_window_blocks(ckpt_hp))
    bpb, nbytes = hand_bpb(losses, targets, tok)
    val = out["val"]
    assert (out["checkpoint"], out["step"], out["kind"]) == (str(base_ckpt), 6, "base")
    assert (val["files"], val["tokens"], val["row_len"]) == (ckpt_hp.val_files, 512, 128)
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
    assert {k: saved[k] for k in out} == out  # the file may hold other runs' sections too (merge_results)
    assert {k: saved["runs"]["val"][k] for k in EV.RUN_SETTINGS} == {k: out[k] for k in EV.RUN_SETTINGS}


@pytest.mark.slow
def test_num_samples_zero_prints_the_metrics_only(base_ckpt: Path) -> None:
    """--num-samples 0: the metrics table and no sample, on the console and in the JSON; the same val results as
    without the flag."""
    ckpt = ("--checkpoint", str(base_ckpt), "--dtype", "fp32")
    r = script("eval.py", *CPU, *ckpt, "--num-samples", "0")
    assert r.returncode == 0, r.stderr
    assert "Traceback" not in r.stderr
    assert re.search(r"^val loss \(nats/token\) +\d+\.\d{4}  512 tokens of ", r.stdout, re.M), r.stdout
    assert "--- prompt" not in r.stdout + r.stderr
    quiet = eval_json(*ckpt, "--num-samples", "0")
    default = eval_json(*ckpt, "--max-new-tokens", "2")
    assert "samples" not in quiet
    assert len(default["samples"]) == 3  # the flag, not the checkpoint, leaves them out
    assert quiet["val"] == default["val"]


@pytest.mark.slow
@pytest.mark.parametrize("shards", [1, 2])
def test_val_tokens_all_scores_every_full_row(base_ckpt: Path, ckpt_hp: M.Hyperparameters, tmp_path: Path,
                                              shards: int) -> None:
    """--val-tokens all: every row of row_len tokens the in-order generator yields until the shards run out (the
    checkpoint's val shard of 3,000 tokens, or two shards of 1,000 and 700 tokens given by --val-files), counted
    and scored here independently of eval.py."""
    row = ckpt_hp.row_len or ckpt_hp.val_seq_len
    if shards == 1:
        files, paths = ckpt_hp.val_files, [Path(ckpt_hp.val_files).parent / "tiny_val_000000.bin"]
    else:
        files, paths = str(tmp_path / "all_val_*.bin"), [tmp_path / f"all_val_{i:06d}.bin" for i in range(2)]
        for path, n, seed in zip(paths, (1000, 700), (4, 5)):
            M.write_data_shard(path, random_documents(n, seed=seed))
    inputs, targets = [], []
    for path in paths:
        tokens = M._load_data_shard(path).long()
        n = in_order_rows(len(tokens), row) * row
        inputs.append(tokens[:n])
        targets.append(tokens[1:n + 1])
    inputs, targets = torch.cat(inputs), torch.cat(targets)
    rows = inputs.numel() // row
    assert rows == {1: 23, 2: 7 + 5}[shards]  # not a whole number of 256-token validation batches
    r = script("eval.py", *CPU, "--json", "--checkpoint", str(base_ckpt), "--dtype", "fp32", "--val-tokens", "all",
               "--num-samples", "0", *(("--val-files", files) if shards == 2 else ()))
    assert r.returncode == 0, r.stderr
    val = json.loads(r.stdout)["val"]
    model, _, _ = M.load_model(base_ckpt)
    window = M.final_window_blocks(ckpt_hp)
    losses = EV.token_losses(model.eval(), inputs, targets, row, window).double()
    assert (val["files"], val["budget"], val["tokens"], val["row_len"]) == (files, "all", rows * row, row)
    assert val["loss"] == pytest.approx(float(losses.mean()), abs=1e-5)
    assert val["loss"] == pytest.approx(float(hand_losses(model, inputs, targets, row, window).mean()), abs=1e-4)
    (line,) = [line for line in r.stderr.splitlines() if line.startswith("val loss (nats/token)")]
    assert f"{rows * row:,} tokens of {files}, rows of {row}" in line
    assert "(every full row of the split)" in line


@pytest.mark.slow
def test_val_tokens_budget_scores_the_first_tokens(base_ckpt: Path, ckpt_hp: M.Hyperparameters) -> None:
    """--val-tokens 768 (a multiple of val_seq_len): the split's first 768 tokens in rows of row_len, as training
    validates; the table names the count, not every row of the split."""
    budget = 3 * ckpt_hp.val_seq_len
    r = script("eval.py", *CPU, "--json", "--checkpoint", str(base_ckpt), "--dtype", "fp32", "--val-tokens",
               str(budget), "--num-samples", "0")
    assert r.returncode == 0, r.stderr
    val = json.loads(r.stdout)["val"]
    shard = M._load_data_shard(Path(ckpt_hp.val_files).parent / "tiny_val_000000.bin").long()
    inputs, targets = shard[:budget], shard[1:budget + 1]
    model, _, _ = M.load_model(base_ckpt)
    window = M.final_window_blocks(ckpt_hp)
    assert (val["budget"], val["tokens"], val["row_len"]) == (768, 768, 128)
    assert val["loss"] == pytest.approx(float(hand_losses(model.eval(), inputs, targets, 128, window).mean()),
                                        abs=1e-4)
    assert val["loss"] == pytest.approx(float(EV.token_losses(model, inputs, targets, 128, window).double().mean()),
                                        abs=1e-5)
    (line,) = [line for line in r.stderr.splitlines() if line.startswith("val loss (nats/token)")]
    assert "768 tokens of " in line and "every full row" not in line


@pytest.mark.slow
def test_text_metrics_equal_hand_computation(base_ckpt: Path, ckpt_hp: M.Hyperparameters, tok: M.Tokenizer,
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
    losses = hand_losses(model.eval(), ids[:-1], ids[1:], ckpt_hp.row_len, M.final_window_blocks(ckpt_hp))
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
    im = I.load_for_inference(str(choice_ckpt), device="cpu", dtype="fp32")
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


def test_merge_results_keeps_the_sections_of_earlier_runs() -> None:
    """A later run replaces only the sections it computed; "runs" says with which settings each was computed."""
    common = dict(checkpoint="c.pt", step=6, kind="base", preset="shakespeare")
    first = dict(common, device="cpu", dtype="torch.float32", weights="fp32", compiled_decoding=False,
                 window_tokens=256, val={"loss": 4.5}, eval_seconds=3.0)
    second = dict(common, device="cpu", dtype="torch.bfloat16", weights="fp32", compiled_decoding=False,
                  window_tokens=256, samples=[{"prompt": "ROMEO."}], sampling={"temperature": 0.8}, eval_seconds=1.0)
    merged = EV.merge_results(EV.merge_results({}, first), second)
    assert merged["val"] == {"loss": 4.5} and merged["samples"] == [{"prompt": "ROMEO."}]
    assert merged["sampling"] == {"temperature": 0.8} and set(merged["runs"]) == {"val", "samples"}
    assert merged["runs"]["val"]["dtype"] == "torch.float32" and merged["runs"]["val"]["eval_seconds"] == 3.0
    assert merged["runs"]["samples"]["dtype"] == "torch.bfloat16" and merged["runs"]["samples"]["eval_seconds"] == 1.0
    third = dict(second, val={"loss": 4.4}, samples=[{"prompt": "KING."}])
    again = EV.merge_results(merged, third)
    assert again["val"] == {"loss": 4.4} and again["samples"] == [{"prompt": "KING."}]
    assert again["runs"]["val"]["dtype"] == "torch.bfloat16"


@pytest.mark.slow
def test_a_prompt_run_keeps_the_val_section_and_says_it_scores_nothing(base_ckpt: Path, tmp_path: Path) -> None:
    """The sequence that lost the val results: a metrics run, then a --prompt run with two samples (samples only,
    said in one line, one header for the prompt), then --val --prompt: the file keeps each section."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    ckpt = run_dir / base_ckpt.name
    ckpt.write_bytes(base_ckpt.read_bytes())
    args = ("--checkpoint", str(ckpt), "--dtype", "fp32")
    metrics = eval_json(*args, "--num-samples", "0")
    r = script("eval.py", *CPU, *args, "--prompt", "ROMEO.", "--num-samples", "2", "--max-new-tokens", "3")
    assert r.returncode == 0, r.stderr
    assert "eval.py: --prompt given: samples only (add --val to score the validation split too)" in r.stdout
    assert r.stdout.count("--- prompt 1/1 (seed 0, 2 samples) ---") == 1 and "val loss" not in r.stdout
    saved = json.loads((run_dir / "eval_6.json").read_text())
    assert saved["val"] == metrics["val"] and len(saved["samples"]) == 1
    assert len(saved["samples"][0]["completions"]) == 2 and set(saved["runs"]) == {"val", "samples"}
    both = eval_json(*args, "--val", "--prompt", "ROMEO.", "--max-new-tokens", "3")
    assert both["val"] == metrics["val"] and both["samples"][0]["prompt"] == "ROMEO."


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

