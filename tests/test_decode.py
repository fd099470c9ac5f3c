"""inference.py's fast decoding: the ring KV cache, weights in bf16 / int8 (set_inference_weights) and the compiled
decoding step (compile_decoding), each against the full-forward reference. Speed is bench.py's (--only decode).

    python -m pytest tests/test_decode.py -q      # CPU, about a minute on 2 cores (two compiles)
"""
from __future__ import annotations

import copy

import pytest
import torch
from torch import Tensor

import inference as I
import model as M
from conftest import (NEW_TOKENS, PROMPTS, WINDOW, build_model, greedy, prompt_tokens, random_tokens,
                      randomize_zero_inits, reference_choices, tiny_hparams)

S = M.BLOCK_SIZE


def teacher_forced_logits(model: M.GPT, tokens_BT: Tensor, prefill: int, window_blocks: int) -> Tensor:
    """Logits (B, T - prefill, V) of decoding tokens_BT one step at a time after a prefill of `prefill` tokens:
    rows prefill-1 .. T-2 predict tokens prefill .. T-1, as the full forward's rows do."""
    B, T = tokens_BT.shape
    model.ensure_positions(T)
    with torch.no_grad():
        cache = I.KVCache(model, B, prefill)
        first = I.prefill(model, tokens_BT[:, :prefill], cache, window_blocks)[:, -1]
        ring = I.RingCache(cache, window_blocks)
        rest = [I.decode_step(model, tokens_BT[:, t], ring) for t in range(prefill, T - 1)]
    return torch.stack([first, *rest], dim=1)


def full_logits(model: M.GPT, tokens_BT: Tensor, window_blocks: int) -> Tensor:
    T = tokens_BT.size(1)
    pad = (-T) % S  # padding after the last token leaves every earlier row unchanged (causal)
    model.ensure_positions(T + pad)
    with torch.no_grad():
        return model(torch.cat([tokens_BT, tokens_BT.new_zeros(tokens_BT.size(0), pad)], dim=1), None,
                     window_blocks)[:, :T]


@pytest.fixture(scope="module")
def model() -> M.GPT:
    return build_model()


# -----------------------------------------------------------------------------
# The ring cache: exact against the full forward


@pytest.mark.parametrize("window_blocks, prefill", [(1, 1), (2, 5), (2, 200), (3, 130), (4, 128)])
def test_ring_decoding_equals_full_forward_across_documents_and_wraps(model: M.GPT, window_blocks: int,
                                                                      prefill: int) -> None:
    # two rows with different documents: starts mid-block, on a block edge, several in one block, one spanning
    # more than the window; 900 tokens wrap every ring here ((window_blocks + 1) * 128 <= 640 slots)
    eots = {0: [0, 60, 128, 129, 400, 401, 402, 700], 1: [0, 255, 256, 500, 890]}
    tokens = random_tokens(2, 900, seed=window_blocks, eot_positions=eots)
    got = teacher_forced_logits(model, tokens, prefill, window_blocks)
    want = full_logits(model, tokens, window_blocks)[:, prefill - 1:-1]
    torch.testing.assert_close(got, want, atol=2e-5, rtol=0)


def test_whole_block_steps_read_zeros_where_the_ring_holds_no_key_yet(model: M.GPT) -> None:
    # a compiled step attends over whole blocks, past the newest key, under the mask; the ring's memory there is
    # uninitialised (could hold NaN, and a masked 0 x NaN is still NaN) until the block begins (_start_block)
    T, prefill = 300, 100  # blocks begin at 128 and 256; the ring of WINDOW + 1 blocks does not wrap
    tokens = random_tokens(1, T, seed=3, eot_positions={0: [0, 140]})
    model.ensure_positions(T)
    with torch.no_grad():
        cache = I.KVCache(model, 1, prefill)
        I.prefill(model, tokens[:, :prefill], cache, WINDOW)
        ring = I.RingCache(cache, WINDOW)
        for t in ring.k + ring.v:
            if t is not None:
                t[:, :, prefill:] = float("nan")
        rows = []
        for t in range(prefill, T - 1):
            long_mask, short_mask = ring.advance(tokens[:, t], whole_blocks=True)
            rows.append(I.step_logits(model, tokens[:, t], long_mask, short_mask, ring))
            ring.pos += 1
    want = full_logits(model, tokens, WINDOW)[:, prefill:-1]
    torch.testing.assert_close(torch.stack(rows, 1), want, atol=2e-5, rtol=0)


def test_ring_holds_the_window_and_a_block() -> None:
    m = build_model()
    cache = I.KVCache(m, 1, 10)
    with torch.no_grad():
        I.prefill(m, random_tokens(1, 10, seed=0), cache, 3)
    ring = I.RingCache(cache, 3)
    assert ring.size == 4 * S
    assert all(k is None or k.shape[2] == 4 * S for k in ring.k)
    assert ring.slot_pos[:10].tolist() == list(range(10)) and bool((ring.slot_pos[10:] == -1).all())


def test_ring_equals_the_kv_cache_for_several_samples(model: M.GPT) -> None:
    # num_samples > 1 expands the prefilled cache before the ring takes it over; rows then diverge when sampled
    prompt = prompt_tokens(300, [0, 170, 260], seed=2)
    kw = dict(window_blocks=WINDOW, max_new_tokens=20, stop_ids=(), temperature=1.0, seed=7)
    three = [list(s) for s in zip(*I.generate(model, prompt, num_samples=3, **kw))]
    reference = [list(s) for s in zip(*I.generate(model, prompt, num_samples=3, use_cache=False, **kw))]
    assert three == reference and len({tuple(s) for s in three}) > 1


# -----------------------------------------------------------------------------
# Weights in a decode format


def test_packed_int8_rows_are_symmetric_absmax_and_the_matmul_matches_the_dequantized_matrix() -> None:
    w = torch.randn(300, 64, generator=torch.Generator().manual_seed(0))
    w[7] = 0  # a zero row (zero-initialised projections) must not divide by zero
    packed = I.PackedWeight(w, "int8")
    assert packed.q.dtype == torch.int8 and packed.scale.dtype == torch.bfloat16
    assert int(packed.q.abs().amax()) <= 127 and bool((packed.q[7] == 0).all())
    deq = packed.dequantized()
    assert float((deq - w).abs().amax(dim=1).div(w.abs().amax(dim=1).clamp_min(1e-9)).amax()) < 1 / 127 + 0.01
    x = torch.randn(3, 64)
    ref = x.bfloat16().float() @ deq.T  # the kernel takes bf16 activations and gives bf16 out
    torch.testing.assert_close(packed.few_rows(x), ref, atol=0.02 * float(ref.abs().amax()), rtol=0.02)
    assert torch.equal(packed(x, w), packed.few_rows(x))  # a decode batch of 3 rows takes the packed kernel


def test_many_rows_use_the_plain_product_with_the_rounded_matrix() -> None:
    linear = M.CastedLinear(64, 32)
    linear.decode = I.PackedWeight(linear.weight, "int8")
    with torch.no_grad():
        linear.weight.copy_(linear.decode.dequantized())
    x = torch.randn(I.PACKED_ROWS + 1, 64)
    assert torch.equal(linear(x), torch.nn.functional.linear(x, linear.weight))  # scoring: exact fp32 product


def test_set_inference_weights_rounds_every_matrix_and_keeps_the_embeddings() -> None:
    m = build_model()
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    I.set_inference_weights(m, "bf16")
    for name, p in m.named_parameters():
        if "embed" in name or p.ndim < 2:
            assert torch.equal(p, before[name]), name  # tables (one row per token) and scalars stay fp32
        else:
            assert torch.equal(p, before[name].bfloat16().float()), name
    assert all(b.attn.qkv_decode is not None for b in m.blocks if b.attn is not None)
    assert all(p.fmt == "bf16" for p in I.weight_formats(m)) and m.lm_head.decode is not None
    assert I.set_inference_weights(build_model(), "fp32").lm_head.decode is None
    with pytest.raises(M.ConfigError, match=r"^--weights=fp16: expected one of fp32, bf16, int8$"):
        I.set_inference_weights(m, "fp16")


INT8_LOGIT_TOLERANCE = 0.05  # max |logit difference| of the tiny model's soft-capped logits (range 0..30)


@pytest.mark.parametrize("fmt, tolerance", [("bf16", 0.05), ("int8", INT8_LOGIT_TOLERANCE)])
def test_quantised_logits_stay_close_to_fp32(fmt: str, tolerance: float) -> None:
    # on a tiny model with lm_head std 0.02 (logits of a trained model's scale, not the random-test 1.0)
    reference = randomize_zero_inits(M.GPT.from_hparams(tiny_hparams(row_len=256, num_layers=4)), head_std=0.02)
    quantised = I.set_inference_weights(copy.deepcopy(reference), fmt)
    tokens = random_tokens(2, 300, seed=1, eot_positions={0: [0, 150], 1: [0]})
    want = full_logits(reference, tokens, WINDOW)[:, 99:-1]
    decoded = teacher_forced_logits(quantised, tokens, 100, WINDOW)  # the packed kernels, one row at a time
    assert float((decoded - want).abs().amax()) < tolerance
    scored = full_logits(quantised, tokens, WINDOW)[:, 99:-1]  # scoring: the rounded matrices in fp32
    assert float((scored - want).abs().amax()) < tolerance


# -----------------------------------------------------------------------------
# The compiled decoding step


@pytest.fixture(scope="module")
def compiled_model() -> M.GPT:
    return I.compile_decoding(build_model())


@pytest.mark.parametrize("name", ["129", "300-past-window", "700-past-window"])
def test_compiled_decoding_greedy_equals_reference(compiled_model: M.GPT, name: str) -> None:
    n, eots = PROMPTS[name]
    prompt = prompt_tokens(n, eots, seed=n)
    got = greedy(compiled_model, prompt, NEW_TOKENS, use_cache=True)
    assert got == reference_choices(compiled_model, prompt, got)


def test_compiled_decoding_logits_equal_eager(compiled_model: M.GPT) -> None:
    tokens = random_tokens(1, 500, seed=4, eot_positions={0: [0, 200, 333]})
    compiled = teacher_forced_logits(compiled_model, tokens, 50, WINDOW)
    eager = teacher_forced_logits(I.compile_decoding(build_model(), on=False), tokens, 50, WINDOW)
    torch.testing.assert_close(compiled, eager, atol=1e-4, rtol=0)


@pytest.mark.parametrize("fmt, length, seed, eot", [("int8", 400, 5, 150), ("bf16", 300, 6, 100)])
def test_compiled_rounded_decoding_matches_eager(fmt: str, length: int, seed: int, eot: int) -> None:
    m = I.set_inference_weights(build_model(), fmt)
    tokens = random_tokens(1, length, seed=seed, eot_positions={0: [0, eot]})
    eager = teacher_forced_logits(m, tokens, 20, WINDOW)
    compiled = teacher_forced_logits(I.compile_decoding(m), tokens, 20, WINDOW)
    torch.testing.assert_close(compiled, eager, atol=0.05, rtol=0)


# The forms a compiled step takes on a CPU, run eagerly here against what they replace


@pytest.mark.parametrize("fmt", ["int8", "bf16"])
@pytest.mark.parametrize("rows", [64, 300])  # whole tiles of I.TILE_ROWS, and a size streamed by rows
def test_streamed_product_equals_the_packed_product(fmt: str, rows: int) -> None:
    w = torch.randn(rows, 48, generator=torch.Generator().manual_seed(rows))
    packed = I.PackedWeight(w, fmt)
    assert packed.tiled is None  # until compiled steps need it (compile_decoding)
    packed.tile()
    assert (packed.tiled is None) == (rows % I.TILE_ROWS != 0)
    x = torch.randn(1, 1, 48, generator=torch.Generator().manual_seed(1))
    ref = x.bfloat16().float() @ packed.dequantized().T  # bf16 activations, the rounded matrix, fp32 sums
    got = packed.streamed(x)
    assert got.shape == (1, 1, rows) and got.dtype == torch.float32
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-5)


def test_compile_decoding_makes_and_drops_the_tiled_copies() -> None:
    m = I.set_inference_weights(build_model(), "int8")
    packed = [m.lm_head.decode] + [b.attn.qkv_decode for b in m.blocks if b.attn is not None]
    assert all(p.tiled is None for p in packed)
    I.compile_decoding(m)
    assert all(p.tiled is not None for p in packed)  # the tiny model's rows are whole tiles
    I.compile_decoding(m, on=False)
    assert all(p.tiled is None for p in packed) and m.decode_fn is None
    fp32 = build_model()
    I.compile_decoding(fp32)  # fp32 layers get the streaming format while compiled steps are on, and lose it after
    assert [type(f) for f in I.weight_formats(fp32)] == [I.WeightFormat] * len(list(I.projections(fp32)))
    I.compile_decoding(fp32, on=False)
    assert I.weight_formats(fp32) == [] and fp32.decode_fn is None


def test_streamed_matvec_and_stored_compute_what_they_replace() -> None:
    x, w = torch.randn(1, 1, 40), torch.randn(24, 40)
    torch.testing.assert_close(I.streamed_matvec(x, w), x @ w.T, atol=1e-5, rtol=1e-5)
    scale = torch.rand(24)
    torch.testing.assert_close(I.streamed_matvec(x, w, scale), (x @ w.T) * scale, atol=1e-5, rtol=1e-5)
    assert torch.equal(I.stored(x), x)


def test_a_compiled_one_row_projection_of_a_normed_row_equals_rms_norm_and_the_product() -> None:
    # compiled, the fp32 format streams the weight by rows from the normed row as inductor fuses it (the model's
    # norm has no decoding form of its own): the numbers are those of rms_norm and the plain product, and eps keeps
    # a zero row finite
    w = torch.randn(32, 64, generator=torch.Generator().manual_seed(0))
    fmt = I.WeightFormat()
    step = torch.compile(lambda x: fmt(torch.nn.functional.rms_norm(x, (64,)), w))
    x = torch.randn(1, 1, 64, generator=torch.Generator().manual_seed(1)) * 5
    want = torch.nn.functional.linear(torch.nn.functional.rms_norm(x, (64,)), w)
    torch.testing.assert_close(step(x), want, atol=1e-5, rtol=1e-5)
    assert step(torch.zeros(1, 1, 64)).eq(0).all()


def test_one_query_attention_equals_sdpa_with_the_mask() -> None:
    g = torch.Generator().manual_seed(0)
    q, k, v = torch.randn(2, 3, 1, 16, generator=g), torch.randn(2, 3, 40, 16, generator=g), torch.randn(2, 3, 40, 16)
    mask = torch.rand(2, 1, 1, 40, generator=g) < 0.5
    mask[..., 7] = True  # the query's own slot is always visible
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=0.12)
    torch.testing.assert_close(I.one_query_attention(q, k, v, mask, 0.12), ref, atol=1e-5, rtol=1e-5)


# -----------------------------------------------------------------------------
# bench.py's quality check of the formats (its figures: docs/measurements.md, "Fast decoding")


def test_greedy_agreement_by_hand() -> None:
    import bench

    reference = [[1, 2, 3, 4], [5, 6, 7, 8]]
    got = bench.greedy_agreement([[1, 2, 3, 4], [5, 9, 7, 8]], reference)
    assert got == dict(identical=0.5, prefix_before_first_difference=(1 + 0.25) / 2, positions_equal=7 / 8)


def test_quality_rows_compare_each_format_with_fp32(long_logs: dict) -> None:
    import bench

    eager = [(fmt, fmt, False) for fmt in I.INFERENCE_WEIGHTS]  # compiled steps: tested against eager above
    rows = bench.bench_quality(str(long_logs["base"]), str(long_logs["logs"]), prompts=3, new_tokens=6, rows=2,
                               paths=eager)
    assert [(r["path"], r["weights"], r["compiled"]) for r in rows] == eager
    fp32 = rows[0]
    assert fp32["identical"] == fp32["positions_equal"] == 1.0 and fp32["val_loss_vs_fp32"] == 0
    for r in rows:
        assert r["decode_path_tokens"] == 2 * 127 and r["val_tokens"] > 0
        assert abs(r["val_loss_vs_fp32"]) < 0.05 and abs(r["decode_path_loss_vs_fp32"]) < 0.05
        assert 0 <= r["positions_equal"] <= 1


def test_decode_path_loss_is_the_full_forward_loss_of_the_same_rows(model: M.GPT) -> None:
    import bench

    tokens = random_tokens(3, 200, seed=6, eot_positions={0: [0, 90], 1: [0], 2: [0, 130]})
    logits = full_logits(model, tokens, WINDOW)[:, :-1]
    want = float(torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].reshape(-1)))
    assert bench.decode_path_loss(model, tokens, WINDOW) == pytest.approx(want, rel=1e-5)
