"""The 2026 architecture (issue 27; record #89 at f411b3d3 and its earlier forms): each part against a reference
written here (plain integer arithmetic, explicit loops and formulas on small tensors), the whole model with every
switch on against itself on other paths (KV cache vs the full forward, prefill in chunks), the Adam and Muon groups,
config errors, and the scripts with every switch on (resume bitwise, 2 processes = 1, eval.py, finetune.py,
export.py). With every switch off the model is the 2025 one: tests/test_train_gpt.py holds it bitwise to train_gpt.py.

    python -m pytest tests/test_arch.py -q
"""
from __future__ import annotations

import math
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

import inference as I
import model as M
from conftest import (NEW_TOKENS, PROMPTS, cfg, eval_json, ft_args, greedy, metric_rows, one_and_two_processes,
                      prompt_tokens, random_tokens, reference_choices, run, stopped_and_resumed, tiny_args,
                      tiny_hparams)

# Every switch on, in 4 layers: attention on 0, 1, 3 (layer 2 gets the gated skip from layer 0), long windows on 1
# and 3 (key offset there), paired heads on 0, XSA on 1, layer 3's attention reads layer 1's output (backout).
ALL_ON = dict(num_layers=4, num_heads=2, head_dim=32, model_dim=64, no_attn_layer=2, bigram_rows=97, bigram_dim=48,
              bigram_sign_rows=16, smear=True, value_embed_layers="1,3", value_embed_gates=True,
              residual_lambdas=True, skip_topology="gated", gated_skip_from=0, backout_layer=1,
              long_window_layers="1,3", key_offset=True, xsa_layers="1", attn_gate=True, paired_head_layers="0")
ALL_ON_FLAGS = [f"--{M._flag(k)}={v}" for k, v in ALL_ON.items()]
RECORD_ROWS = 50304 * 15 // 2  # record #89's bigram_vocab_size


def wrap32(v: int) -> int:
    """v as an int32 holds it: two's complement wrap."""
    return (v + 2**31) % 2**32 - 2**31


def reference_hash(tokens: list[int], rows: int) -> list[int]:
    """The record's get_bigram_hash written out: out[0] = mod, then out[t] = (36313 * x[t] ^ 27191 * out'[t-1]) % mod
    where out' is x with position 0 already overwritten by mod; int32 products; Python's % (the divisor's sign)."""
    mod = rows - 1
    prev = [mod] + tokens[1:-1]  # what the record reads as position t's previous token, t = 1 ..
    out = [mod]
    for t in range(1, len(tokens)):
        out.append((wrap32(36313 * tokens[t]) ^ wrap32(27191 * prev[t - 1])) % mod)
    return out


def randomize_everything(model: M.GPT, seed: int = 1) -> M.GPT:
    """Every parameter random (the zero-initialised gates, lambdas, bigram table and projections would hide parts)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim >= 2:
                p.copy_(torch.randn(p.shape, generator=gen) * p.size(-1) ** -0.5)
            else:
                p.copy_(0.5 + 0.5 * torch.rand(p.shape, generator=gen))
        model.lm_head.weight.mul_(8)
    return model


def arch_model(seed: int = 1, **overrides) -> M.GPT:
    torch.manual_seed(0)
    hp = tiny_hparams(**dict(ALL_ON, row_len=256, **overrides))
    return randomize_everything(M.GPT.from_hparams(hp.validate()), seed).eval()


# -----------------------------------------------------------------------------
# The parts against references


def test_bigram_hash_is_the_records_int32_arithmetic() -> None:
    gen = torch.Generator().manual_seed(0)
    for rows in (RECORD_ROWS, 97, 2):
        tokens = torch.randint(0, 50257, (3, 40), generator=gen)
        tokens[0, :4] = torch.tensor([50256, 50256, 0, 50256])  # the largest ids and 0 at the quirky positions
        got = M.bigram_hash(tokens, rows)
        for row in range(3):
            assert got[row].tolist() == reference_hash(tokens[row].tolist(), rows)
        assert (got[:, 0] == rows - 1).all() and got.min() >= 0 and got.max() <= rows - 1
        # position 1's previous token is the reserved value, and 27191 * (rows - 1) wraps for the record's rows
        if rows == RECORD_ROWS:
            assert 27191 * (rows - 1) > 2**31 - 1
        # a continuation (the KV cache) from position k with the token before it equals the whole row's columns
        for k in (1, 2, 7):
            part = M.bigram_hash(tokens[:, k:], rows, start=k, before_B=tokens[:, k - 1])
            assert torch.equal(part, got[:, k:])


def test_bigram_embedding_with_the_sign_trick() -> None:
    torch.manual_seed(0)
    emb = M.BigramEmbedding(rows=31, dim=8, sign_rows=5)
    torch.nn.init.normal_(emb.embed.weight)
    assert set(emb.signs.unique().tolist()) <= {-1.0, 1.0}
    tokens = torch.randint(0, 50257, (2, 12))
    got = emb(tokens)
    rows = M.bigram_hash(tokens, 31)
    for b in range(2):
        for t in range(12):
            sign_row = 0 if t == 0 else (int(tokens[b, t - 1]) ^ int(tokens[b, t])) % 5
            want = emb.embed.weight[rows[b, t]] * emb.signs[sign_row]
            torch.testing.assert_close(got[b, t], want, rtol=0, atol=0)
    torch.testing.assert_close(emb(tokens[:, 5:], start=5, before_B=tokens[:, 4]), got[:, 5:], rtol=0, atol=0)
    assert not M.BigramEmbedding(31, 8, 0)(tokens).any()  # zero at init: the switch starts as a no-op


def test_smear_is_the_identity_at_init_and_the_formula_after() -> None:
    torch.manual_seed(0)
    smear = M.SmearGate()
    x = torch.randn(2, 9, 16)
    assert torch.equal(smear(x), x)  # scale 0 at init
    with torch.no_grad():
        smear.scale.fill_(0.7)
        smear.gate.weight.normal_()
    got = smear(x)
    for t in range(9):
        gate = 0.7 * torch.sigmoid(x[:, t, :12] @ smear.gate.weight[0])  # (B,)
        want = x[:, t] if t == 0 else x[:, t] + gate[:, None] * x[:, t - 1]
        torch.testing.assert_close(got[:, t], want, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(smear(x[:, 4:], before_BD=x[:, 3]), got[:, 4:], rtol=0, atol=0)


def test_xsa_removes_exactly_the_value_component() -> None:
    gen = torch.Generator().manual_seed(0)
    y, v = torch.randn(2, 5, 3, 8, generator=gen, dtype=torch.float64), torch.randn(2, 5, 3, 8, generator=gen,
                                                                                    dtype=torch.float64)
    alpha = torch.tensor([0.0, 0.4, 50.0], dtype=torch.float64)  # off, part, tanh ~ 1: all of it
    out = M.xsa(y, v, alpha)
    assert torch.equal(out[:, :, 0], y[:, :, 0])
    along = (out * v).sum(-1) / v.norm(dim=-1)
    torch.testing.assert_close(along[:, :, 2], torch.zeros(2, 5, dtype=torch.float64), atol=1e-12, rtol=0)
    for b, t in ((0, 0), (1, 4)):
        comp = (y[b, t, 1] @ v[b, t, 1]) / (v[b, t, 1] @ v[b, t, 1]) * v[b, t, 1]
        torch.testing.assert_close(out[b, t, 1], y[b, t, 1] - math.tanh(0.4) * comp)
        # what is left off v is untouched: out - y is along v
        diff = out[b, t, 1] - y[b, t, 1]
        torch.testing.assert_close(diff - (diff @ v[b, t, 1]) / (v[b, t, 1] @ v[b, t, 1]) * v[b, t, 1],
                                   torch.zeros(8, dtype=torch.float64), atol=1e-12, rtol=0)


def test_key_offset_against_hand_shifted_keys() -> None:
    rotary = M.Rotary(16, 64)
    still = rotary.still_dims()
    # half-truncated RoPE: pairs (i, i + 8) for i in 4..7 have frequency 0; those 8 channels are the still ones
    assert still.tolist() == [False] * 4 + [True] * 4 + [False] * 4 + [True] * 4
    k = torch.randn(2, 6, 3, 16)
    got = M.shift_still_keys(k, still)
    want = k.clone()
    for t in range(1, 6):
        for d in range(16):
            if still[d]:
                want[:, t, :, d] = k[:, t - 1, :, d]
    assert torch.equal(got, want)
    assert torch.equal(M.shift_still_keys(k[:, 3:], still, k[:, 2:3]), got[:, 3:])  # a continuation
    # the still channels are exactly those the rotation leaves unchanged at any position
    x = torch.randn(1, 40, 1, 16)
    rotated = rotary(x)
    assert torch.equal(rotated[..., still], x[..., still]) and not torch.equal(rotated[..., ~still], x[..., ~still])


def reference_paired_attention(attn: M.CausalSelfAttention, x: Tensor, docs: Tensor) -> Tensor:
    """Paired-head attention written out: per head h, q/k/v of token t at interleaved slot 2t + (h >= H/2), rotated
    for position 2t + h % 2 (the record's quirk); group g = h mod H/2 attends causally over the slots of its own
    document; heads back in place; the output gate; c_proj. No window (the test's window covers the row)."""
    B, T, _ = x.shape
    H, D = attn.num_heads, attn.head_dim
    qkv = x @ attn.qkv_w.flatten(end_dim=1).T
    q, k, v = qkv.view(B, T, 3, H, D).unbind(2)
    q, k = F.rms_norm(q, (D,)), F.rms_norm(k, (D,))
    freqs = M.rotary_freqs(D)

    def rot(vec: Tensor, pos: int) -> Tensor:
        a, b = vec[:D // 2], vec[D // 2:]
        c, s = torch.cos(pos * freqs), torch.sin(pos * freqs)
        return torch.cat([a * c + b * s, b * c - a * s])

    v = attn.lambdas[0] * v  # the record's v scale (value_embed_gates on); this layer reads no value embedding
    out = torch.zeros(B, T, H, D)
    for b in range(B):
        for g in range(H // 2):
            heads = (g, g + H // 2)
            slots = [(t, j) for t in range(T) for j in (0, 1)]  # slot 2t + j holds head heads[j] of token t
            qs = torch.stack([rot(q[b, t, heads[j]], 2 * t + heads[j] % 2) for t, j in slots])
            ks = torch.stack([rot(k[b, t, heads[j]], 2 * t + heads[j] % 2) for t, j in slots])
            vs = torch.stack([v[b, t, heads[j]] for t, j in slots])
            scores = qs @ ks.T * attn.attn_scale
            for i, (ti, _) in enumerate(slots):
                for n, (tn, _) in enumerate(slots):
                    if n > i or docs[b, tn] != docs[b, ti]:
                        scores[i, n] = -math.inf
            ys = scores.softmax(-1) @ vs
            for i, (t, j) in enumerate(slots):
                out[b, t, heads[j]] = ys[i]
    out = out * torch.sigmoid(x[..., :12] @ attn.gate.T)[..., None]
    return attn.c_proj(attn.lambdas[1] * out.reshape(B, T, H * D))


def test_paired_head_attention_equals_the_explicit_interleaved_sequence() -> None:
    model = arch_model(num_heads=4, head_dim=16)
    attn = model.blocks[0].attn
    assert attn.arch.paired and attn.arch.gate and not attn.arch.xsa
    x = F.rms_norm(torch.randn(2, 128, 64), (64,))
    tokens = random_tokens(2, 128, seed=3, eot_positions={0: [0, 50], 1: [0, 127]})
    docs = (tokens == M.EOT_ID).cumsum(1)
    mask = M.dense_attention_mask(M.paired_docs(docs), 1 << 20)
    with torch.no_grad():
        got = attn(x, None, mask)
        want = reference_paired_attention(attn, x, docs)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    # the pairing is the record's reshape: head g with head g + H/2, not adjacent heads
    heads = torch.arange(4).view(1, 1, 4, 1).expand(1, 3, 4, 1).float()
    assert M.pair_heads(heads)[0, :, :, 0].tolist() == [[0, 1], [2, 3]] * 3


# -----------------------------------------------------------------------------
# The whole model on its other paths


@pytest.fixture(scope="module")
def model() -> M.GPT:
    return arch_model()


@pytest.mark.parametrize("name", ["127", "129", "300-past-window", "700-past-window"])
def test_kv_cache_greedy_equals_reference_with_every_switch(model: M.GPT, name: str) -> None:
    """Prompts whose documents start mid-block and that outrun the window (and the rotary table): the cache carries
    the token and key before each step and paired layers' two keys a token."""
    assert not I.ring_decodes(model)
    n, eots = PROMPTS[name]
    prompt = prompt_tokens(n, eots, seed=n)
    cached = greedy(model, prompt, NEW_TOKENS, use_cache=True, window_blocks=2)
    assert cached == reference_choices(model, prompt, cached, window_blocks=2)
    assert len(set(cached)) > 1  # the random model does not just repeat one token


@pytest.mark.parametrize("window_blocks", [1, 2, 1 << 20])
def test_prefill_in_chunks_equals_the_forward(model: M.GPT, window_blocks: int) -> None:
    tokens = random_tokens(2, 512, seed=11, eot_positions={0: [0, 100, 300], 1: [0]})
    model.ensure_positions(512)
    with torch.no_grad():
        full = model(tokens, None, window_blocks)
        cache = I.KVCache(model, 2, 512)
        parts = [I.prefill(model, tokens[:, a:b], cache, window_blocks) for a, b in ((0, 1), (1, 130), (130, 512))]
    torch.testing.assert_close(torch.cat(parts, dim=1), full, atol=1e-5, rtol=0)


def test_several_samples_from_one_cache_equal_the_reference(model: M.GPT) -> None:
    """Three sampled continuations from one prefilled prompt (the cache expanded, the previous keys with it) are
    the reference path's samples for the same seed."""
    prompt = prompt_tokens(140, [0, 70], seed=2)
    runs = [list(I.generate(model, prompt, window_blocks=2, max_new_tokens=8, temperature=1.0, num_samples=3,
                            stop_ids=(), seed=4, use_cache=use_cache)) for use_cache in (True, False)]
    assert runs[0] == runs[1]
    assert len(set(zip(*runs[0]))) > 1  # the samples differ


def test_parts_are_where_the_config_says() -> None:
    model = arch_model()
    attn = [b.attn for b in model.blocks]
    assert attn[2] is None and model.skip is not None and not hasattr(model, "skip_weights")
    assert [a.arch.paired for a in attn if a] == [True, False, False]
    assert [a.arch.key_offset for a in attn if a] == [False, True, True]
    assert [a.arch.xsa for a in attn if a] == [False, True, False]
    assert [a.arch.ve_gate for a in attn if a] == [False, True, True]
    assert model.bigram.embed.weight.shape == (97, 48) and model.bigram.signs.shape == (16, 48)
    assert [hasattr(b, "bigram_lambda") for b in model.blocks] == [True, True, False, True]
    # zero-initialised parts leave the 2025 model's function at init where the record's do: smear, bigram
    fresh = M.GPT.from_hparams(tiny_hparams(**ALL_ON))
    assert not fresh.smear.scale.any() and not fresh.bigram.embed.weight.any()
    assert torch.equal(fresh.skip.scale, torch.tensor([M.SKIP_LAMBDA_INIT]))
    assert abs(float(fresh.value_embeds[0].weight.detach().std()) - M.VE_INIT_STD) < 1e-3


def test_optimizer_groups_of_the_2026_parts() -> None:
    hp = tiny_hparams(**ALL_ON)
    model = M.GPT.from_hparams(hp)
    muon = {id(p) for p in M.muon_params(model)}
    names = {id(p): n for n, p in model.named_parameters()}
    assert not any("gate" in names[i] for i in muon)  # gates are Adam's (record #56)
    for table in ("2025", "2026"):
        groups = M.adam_groups(model, tiny_hparams(**ALL_ON, adam_table=table))
        adam = [id(p) for g in groups for p in g["params"]]
        assert len(adam) == len(set(adam)) and set(adam) | muon == set(names)  # every parameter exactly once
    rows = {n: M.adam_row_2026(n) for n in names.values()}
    assert rows["smear.gate.weight"] == "smear_gate" and rows["skip.gate.weight"] == "skip_gate"
    assert rows["blocks.0.attn.gate"] == "gates" and rows["blocks.1.attn.ve_gate"] == "gates"
    assert rows["blocks.1.attn.xsa_alpha"] == "lambdas" and rows["blocks.1.x0_lambda"] == "lambdas"
    assert rows["blocks.1.resid_lambdas"] == "resid_lambdas" and rows["backout_lambda"] == "scalars"
    lrs = {round(g["lr"], 9) for g in M.adam_groups(model, tiny_hparams(**ALL_ON, adam_table="2026"))}
    assert round(hp.embed_lr * 0.008 * 75 / 0.6, 9) in lrs  # the bigram table's record LR: 0.008 * 75


@pytest.mark.parametrize("flags, message", [
    (["--bigram-rows", "1"], "--bigram-rows=1 leaves no row besides the reserved one (the first position's); use 0 "
                             "(off) or at least 2"),
    (["--bigram-sign-rows", "8"], "--bigram-sign-rows needs --bigram-rows > 0 (the bigram hash embedding)"),
    (["--xsa-layers", "1,x"], "--xsa-layers='1,x': 'x' is not a layer number"),
    (["--paired-head-layers", "9"], "--paired-head-layers='9': layer 9 is out of range (0..5) or repeated"),
    (["--xsa-layers", "1", "--paired-head-layers", "1"],
     "--xsa-layers and --paired-head-layers share layer 1: XSA on paired heads is not defined (the record skips "
     "it: a paired head's output mixes two heads' values)"),
    (["--skip-topology", "gated"], "--skip-topology gated adds layer --gated-skip-from=3's output where "
                                   "--no-attn-layer=-1 has no attention: it needs 0 <= --gated-skip-from < "
                                   "--no-attn-layer"),
    (["--bigram-update", "sparse"], "--bigram-update='sparse' must be one of dense, rows"),
])
def test_bad_architecture_values_are_one_clear_line(flags: list[str], message: str) -> None:
    with pytest.raises(M.ConfigError) as e:
        cfg("--preset", "shakespeare", *flags).validate()
    assert str(e.value) == message


# -----------------------------------------------------------------------------
# The scripts with every switch on


@pytest.mark.slow
@pytest.mark.parametrize("update", ["dense", "rows"])
def test_resume_is_bitwise_with_every_switch(shard_dir, tmp_path, update: str) -> None:
    extra = (*ALL_ON_FLAGS, "--bigram-update", update)
    full, half, _, resumed = stopped_and_resumed(shard_dir, tmp_path, extra, stop=3, end=6)
    for name, tensor in full["model"].items():
        assert torch.equal(tensor, half["model"][name]), name
    assert "bigram.signs" in full["model"]


@pytest.mark.slow
def test_two_processes_follow_one_with_every_switch(shard_dir, tmp_path) -> None:
    one_and_two_processes(shard_dir, tmp_path, ALL_ON_FLAGS + ["--adam-table", "2026"])


@pytest.mark.slow
def test_eval_and_finetune_of_a_checkpoint_with_every_switch(shard_dir, tmp_path, task_files) -> None:
    """eval.py scores the validation split as training did and samples through the cache as without it;
    finetune.py trains on from the checkpoint (the export: tests/test_export.py)."""
    result = run([sys.executable, "pretraining.py", *tiny_args(shard_dir, tmp_path, "arch", *ALL_ON_FLAGS)])
    assert result.returncode == 0, result.stderr
    ckpt = tmp_path / "arch" / "state_step000006.pt"
    loaded, hp, _ = M.load_model(ckpt)
    assert M.Architecture.from_hparams(hp) == loaded.arch and loaded.bigram is not None
    trained_val = [r["val_loss"] for r in metric_rows(tmp_path / "arch")[1] if r.get("step") == 6][0]
    common = ("--checkpoint", str(ckpt), "--dtype", "fp32", "--prompt", "To be", "--max-new-tokens", "6",
              "--temperature", "0")
    cached, uncached = eval_json(*common, "--val"), eval_json(*common, "--no-kv-cache")
    assert abs(cached["val"]["loss"] - trained_val) < 1e-4
    assert [s["completions"] for s in cached["samples"]] == [s["completions"] for s in uncached["samples"]]
    ft = run([sys.executable, *ft_args(tmp_path, "ft", "--checkpoint", str(ckpt), "--data", str(task_files[0]),
                                       "--val-data", str(task_files[1]), "--num-iterations", "2")])
    assert ft.returncode == 0, ft.stderr
    tuned, _, _ = M.load_model(tmp_path / "ft" / "state_step000002.pt")
    assert tuned.arch == loaded.arch


def test_row_adam_is_lazy_adam_on_the_touched_rows() -> None:
    """--bigram-update rows against lazy Adam written per row: touched rows step with the record's arithmetic and
    LR-squared decay, the others keep weights and moments."""
    gen = torch.Generator().manual_seed(0)
    table = torch.nn.Parameter(torch.randn(10, 4, generator=gen, dtype=torch.float64))
    opt = M.RowAdam([dict(params=[table], lr=0.1, weight_decay=0.5)], (0.8, 0.95), 1e-10)
    ref, m, v = table.detach().clone(), torch.zeros(10, 4, dtype=torch.float64), torch.zeros(10, 4, dtype=torch.float64)
    for t, touched in enumerate(([1, 3], [3, 7], [7]), start=1):
        grad = torch.zeros(10, 4, dtype=torch.float64)
        grad[touched] = torch.randn(len(touched), 4, generator=gen, dtype=torch.float64)
        table.grad = grad
        opt.step()
        for r in touched:
            m[r] = 0.8 * m[r] + 0.2 * grad[r]
            v[r] = 0.95 * v[r] + 0.05 * grad[r] ** 2
            step = 0.1 * math.sqrt(1 - 0.95**t) / (1 - 0.8**t)
            ref[r] = ref[r] - step * m[r] / (v[r].sqrt() + 1e-10) - 0.1 * 0.1 * 0.5 * ref[r]
        torch.testing.assert_close(table.detach(), ref, rtol=1e-12, atol=1e-12)
    assert torch.equal(opt.state[table]["exp_avg"][[0, 2, 4]], torch.zeros(3, 4, dtype=torch.float64))


def test_bigram_rows_gets_its_own_optimizer() -> None:
    hp = tiny_hparams(**ALL_ON, bigram_update="rows")
    model = M.GPT.from_hparams(hp)
    opts = M.setup_optimizers(model, hp)
    assert isinstance(opts[1], M.RowAdam) and opts[1].param_groups[0]["params"] == [model.bigram.embed.weight]
    assert not any(p is model.bigram.embed.weight for g in opts[0].param_groups for p in g["params"])
    dense = M.setup_optimizers(model, tiny_hparams(**ALL_ON))
    assert len(dense) == 2


def test_speedrun2026_preset_has_record_89s_shape_and_schedule() -> None:
    """The preset's model, built on the meta device, has record #89's parts at its sizes; its schedule the record's
    1270 + 15 steps, stages and split step; it validates on 1, 2, 4 and 8 processes."""
    hp = M.Hyperparameters(**M.PRESETS["speedrun2026"], preset="speedrun2026")
    for world_size in (1, 2, 4, 8):
        hp.validate(world_size)
    with torch.device("meta"):
        model = M.GPT.from_hparams(hp)
    assert len(model.blocks) == 11 and model.blocks[6].attn is None
    assert model.bigram.embed.weight.shape == (377_280, 768) and model.bigram.signs.shape == (8192, 768)
    assert len(model.value_embeds) == 5 and model.arch.value_embeds(11) == [None, 0, 1] + [None] * 5 + [2, 3, 4]
    assert [i for i, b in enumerate(model.blocks) if b.attn is not None and b.attn.arch.paired] == [0, 2, 5, 9]
    assert [i for i, b in enumerate(model.blocks) if b.attn is not None and b.attn.arch.key_offset] == [3, 10]
    assert model.arch.gated_skip == (3, 6) and model.arch.backout_layer == 7
    assert M.schedule_lengths(hp) == (1270, 15) and M.split_step(hp) == 847
    assert hp.tokens_per_step == 8 * 16 * 1024  # stage 1's 8 x 2048 x 8; the stages add micro-batches
