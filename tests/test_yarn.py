"""--window-block (the window unit) and --yarn (record #31's YaRN on the stage schedule's window growth, record #89's
final validation window): the formulas written out here, the masks against a brute-force rule, attention against SDPA
with an explicit mask, KV-cache generation against the full forward, bad values, and a resume across a window change.

    python -m pytest -n 0 tests/test_yarn.py -q
"""
from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import inference as I
import model as M
import train_gpt
from conftest import cfg, doc_ids, randomize_zero_inits, random_tokens, run, stopped_and_resumed, tiny_hparams


def yarn_hp(**overrides) -> M.Hyperparameters:
    """100 steps: stages [0, 33), [33, 66), [66, 99), extension [99, 100); long windows 3, 7, 11, 13 blocks of 32."""
    values = dict(stage_schedule="2026", yarn=True, window_block=32, num_iterations=100)
    values.update(overrides)
    return tiny_hparams(**values).validate()


def base_freqs(head_dim: int) -> torch.Tensor:
    quarter = head_dim // 4
    return torch.cat([(1 / 1024) ** torch.linspace(0, 1, steps=quarter), torch.zeros(quarter)])


def yarn_by_hand(freqs: torch.Tensor, old: int, new: int) -> tuple[torch.Tensor, float]:
    """The record's Yarn.apply, frequency by frequency: alpha 1, beta 32, scale factor 0.2 ln(new/old) + 1."""
    out = freqs.clone()
    for i, f in enumerate(freqs.tolist()):
        turns = old * f / (2 * math.pi)
        ramp = min(max((turns - 1) / 31, 0.0), 1.0)
        out[i] = f * (old / new + ramp * (1 - old / new))
    return out, 0.2 * math.log(new / old) + 1


# -----------------------------------------------------------------------------
# The rotary tables and the attention scale


def test_window_history_and_final_window() -> None:
    hp = yarn_hp()
    assert M.yarn_state_at(0, hp)[0] == (96,) and M.yarn_state_at(32, hp)[0] == (96,)
    assert M.yarn_state_at(33, hp)[0] == (96, 224)
    assert M.yarn_state_at(99, hp)[0] == M.yarn_state_at(10**6, hp)[0] == (96, 224, 352, 416)
    assert [M.get_window_size_blocks(s, hp) for s in (0, 33, 66, 99)] == [3, 7, 11, 13]
    assert M.get_window_size_blocks(100, hp) == M.final_window_blocks(hp) == 20  # record #89's final validation
    assert M.final_window_blocks(yarn_hp(yarn=False)) == 13
    model = M.GPT.from_hparams(hp)  # a loaded model is in the state training ends in
    assert model.yarn_windows == (96, 224, 352, 416) and model.short_window_max == 6


def test_rotary_tables_after_window_changes_follow_the_formula() -> None:
    hp = yarn_hp()
    model = M.GPT.from_hparams(hp)
    rotary = model.blocks[0].attn.rotary
    freqs, scale = base_freqs(hp.head_dim), 0.12
    for step, (old, new) in [(33, (96, 224)), (66, (224, 352)), (99, (352, 416))]:
        model.set_yarn(*M.yarn_state_at(step, hp))
        freqs, factor = yarn_by_hand(freqs, old, new)
        scale *= factor
        theta = torch.arange(rotary.cos.size(0), dtype=torch.float32)[:, None] * freqs[None]
        torch.testing.assert_close(rotary.cos, theta.cos(), rtol=0, atol=2e-6)
        torch.testing.assert_close(rotary.sin, theta.sin(), rtol=0, atol=2e-6)
        assert all(b.attn.attn_scale == pytest.approx(scale, rel=1e-12) for b in model.blocks if b.attn)
        assert all(b.attn.rotary is rotary for b in model.blocks if b.attn)  # one table for every layer
    model.set_yarn(*M.yarn_state_at(0, hp))  # back to the start: the base table, bitwise
    assert torch.equal(rotary.cos, M.Rotary(hp.head_dim, hp.max_seq_len).cos)
    assert model.blocks[0].attn.attn_scale == 0.12
    # the lowest frequency is interpolated fully (96 / 416), the highest less; the unrotated half stays unrotated
    ratio = freqs / base_freqs(hp.head_dim)
    assert ratio[hp.head_dim // 4 - 1] == pytest.approx(96 / 416) and ratio[0] > 0.5
    assert not freqs[hp.head_dim // 4:].any()


def explicit_window_mask(T: int, window_blocks: int, block: int) -> torch.Tensor:
    """One document: a query sees keys of its own block up to itself and of the window_blocks - 1 blocks before."""
    q, k = torch.arange(T)[:, None], torch.arange(T)[None, :]
    return (k <= q) & (q // block - k // block < window_blocks)


def test_attention_over_the_new_window_equals_sdpa_with_the_explicit_mask() -> None:
    hp = yarn_hp()
    model = randomize_zero_inits(M.GPT.from_hparams(hp))
    model.set_yarn(*M.yarn_state_at(33, hp))  # the window has grown from 3 to 7 blocks of 32
    attn, T = model.blocks[0].attn, 256
    x = torch.randn(1, T, hp.model_dim)
    tokens = torch.randint(0, M.EOT_ID, (1, T))  # one document
    long_mask, _ = model.attention_masks(tokens, 7)
    got = attn(x, None, long_mask)

    freqs, factor = yarn_by_hand(base_freqs(hp.head_dim), 96, 224)
    theta = torch.arange(T, dtype=torch.float32)[:, None] * freqs[None]  # (T, D/2)
    cos, sin = theta.cos()[None, :, None], theta.sin()[None, :, None]
    q, k, v = (x @ attn.qkv_w.flatten(end_dim=1).T).view(1, T, 3 * hp.num_heads, hp.head_dim).chunk(3, dim=-2)
    q, k = F.rms_norm(q, (hp.head_dim,)), F.rms_norm(k, (hp.head_dim,))
    rot = [torch.cat([a * cos + b * sin, b * cos - a * sin], -1) for a, b in (t.chunk(2, -1) for t in (q, k))]
    v = attn.lambdas[0] * v
    mask = explicit_window_mask(T, 7, 32)
    y = F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (*rot, v)), attn_mask=mask,
                                       scale=0.12 * factor)
    want = y.transpose(1, 2).reshape(1, T, -1) @ attn.c_proj.weight.T
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_generation_with_the_cache_equals_the_full_forward() -> None:
    # the final state of a --yarn model: YaRN's table and scale, a 20-block long window, short windows of 6 blocks
    hp = yarn_hp()
    model = randomize_zero_inits(M.GPT.from_hparams(hp), head_std=0.2).eval()
    prompt = random_tokens(1, 300, seed=4, eot_positions={0: [0, 130]})[0].tolist()
    window = M.final_window_blocks(hp)

    def greedy(use_cache: bool) -> list[int]:
        return [s[0] for s in I.generate(model, prompt, window_blocks=window, max_new_tokens=40, stop_ids=(),
                                         use_cache=use_cache)]

    assert greedy(True) == greedy(False)


# -----------------------------------------------------------------------------
# Masks: the window unit


def brute_force_mask(docs: list[int], window_blocks: int, block: int) -> torch.Tensor:
    """The record's block rule, block by block: a query block keeps its window_blocks - 1 most recent full key blocks
    (before it, every token of both in one document) and its max(window_blocks - full, 1) most recent partial ones
    (sharing a document otherwise); inside them, causal and same-document tokens."""
    T, NB = len(docs), len(docs) // block
    span = [(docs[b * block], docs[b * block + block - 1]) for b in range(NB)]
    keep = torch.zeros(T, T, dtype=torch.bool)
    for qb in range(NB):
        full = [kb for kb in range(qb) if span[kb][0] == span[kb][1] == span[qb][0] == span[qb][1]]
        partial = [kb for kb in range(qb + 1) if kb not in full and span[kb][0] <= span[qb][1]
                   and span[kb][1] >= span[qb][0]]
        kept = full[::-1][:window_blocks - 1] + partial[::-1][:max(window_blocks - len(full), 1)]
        for kb in kept:
            for q in range(qb * block, qb * block + block):
                for k in range(kb * block, min(kb * block + block, q + 1)):
                    keep[q, k] = docs[q] == docs[k]
    return keep


@pytest.mark.parametrize("window_blocks", [1, 2, 3, 5, 20])
def test_small_blocks_give_the_brute_force_mask(window_blocks: int) -> None:
    tokens = random_tokens(2, 256, seed=1, eot_positions={0: [0, 40, 150], 1: [0, 64, 65, 200]})
    docs = doc_ids(tokens)
    got = M.dense_attention_mask(docs, window_blocks, 32)[:, 0]
    for b in range(2):
        assert torch.equal(got[b], brute_force_mask(docs[b].tolist(), window_blocks, 32))
    model = M.GPT.from_hparams(tiny_hparams(window_block=32, row_len=256).validate())
    long_mask, short_mask = model.attention_masks(tokens, window_blocks)
    assert torch.equal(long_mask, got[:, None])
    assert torch.equal(short_mask[:, 0, :, :], M.dense_attention_mask(docs, window_blocks // 2, 32)[:, 0])


def test_default_block_is_the_record_bitwise() -> None:
    tokens = random_tokens(2, 512, seed=2, eot_positions={0: [0, 100, 300], 1: [0, 256]})
    docs = doc_ids(tokens)
    for window in (1, 2, 3, 4):
        assert torch.equal(M.dense_attention_mask(docs, window), train_gpt.dense_attention_mask(docs, window))
        assert torch.equal(M.dense_attention_mask(docs, window, 128), M.dense_attention_mask(docs, window))
    hp = tiny_hparams()
    ours, record = M.Rotary(hp.head_dim, 512), train_gpt.Rotary(hp.head_dim, 512)
    assert torch.equal(ours.cos, record.cos) and torch.equal(ours.sin, record.sin)
    model = M.GPT.from_hparams(hp)
    assert model.window_block == 128 and model.short_window_max is None and model.yarn_windows == ()
    assert all(b.attn.attn_scale == 0.12 for b in model.blocks if b.attn)
    # with the stage schedule but no --yarn: no final window, no rescaling
    staged = tiny_hparams(stage_schedule="2026", num_iterations=100).validate()
    assert M.final_window_blocks(staged) == 13 and M.GPT.from_hparams(staged).yarn_windows == ()


# -----------------------------------------------------------------------------
# Bad values: one line, exit 2


@pytest.mark.parametrize("argv,message", [
    (["--window-block", "0"], "--window-block=0 must be a positive divisor of 128, so that it divides the row "
                              "length 256 (--train-seq-len / --row-len) and every padded sequence"),
    (["--window-block", "96"], "--window-block=96 must be a positive divisor of 128, so that it divides the row "
                               "length 256 (--train-seq-len / --row-len) and every padded sequence"),
    (["--yarn", "true"], "--yarn needs --stage-schedule (it rescales the rotary when the stages' window grows)"),
])
def test_bad_values(argv: list[str], message: str) -> None:
    with pytest.raises(M.ConfigError) as e:
        cfg("--preset", "shakespeare", *argv).validate()
    assert str(e.value) == message


@pytest.mark.slow
@pytest.mark.parametrize("script,argv,start", [
    ("pretraining.py", ["--window-block", "100"], "error: --window-block=100 must be a positive divisor of 128"),
    ("train_gpt.py", ["--yarn", "true", "--stage-schedule", "2026"], "error: --stage-schedule is not in train_gpt.py"),
    ("train_gpt.py", ["--window-block", "64"], "error: --window-block is not in train_gpt.py"),
])
def test_bad_values_are_one_line_and_exit_2(script: str, argv: list[str], start: str) -> None:
    result = run([sys.executable, script, "--preset", "shakespeare", *argv], timeout=120)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"{script}: {start}"), result.stderr


# -----------------------------------------------------------------------------
# Resume: 8 steps are stages [0, 3), [3, 5), [5, 8); the window grows 3 -> 7 -> 11 blocks of 32 tokens


@pytest.mark.slow
def test_resume_across_a_window_change_is_exact(shard_dir: Path, tmp_path: Path) -> None:
    staged = ("--stage-schedule", "2026", "--yarn", "true", "--window-block", "32", "--num-iterations", "8",
              "--val-loss-every", "4")
    a, b, full, again = stopped_and_resumed(shard_dir, tmp_path, staged, stop=4, end=8)
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert a["val_loss"] == b["val_loss"] and a["data_position"] == b["data_position"]
    assert "window:11" in full.stdout and "window:11" in again.stdout
