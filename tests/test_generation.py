"""inference.py's generation: the KV cache against the full-forward reference, several samples, sampling, stop
tokens, the KVCache itself and streaming decode (the chat template: tests/test_data.py; checkpoint kinds:
tests/test_config_and_checkpoints.py).

    python -m pytest tests/test_generation.py -q      # CPU, about 15 s on 2 cores
"""
from __future__ import annotations

import pytest
import torch
from torch import Tensor

import inference as I
import model as M
from conftest import (NEW_TOKENS, PROMPTS, WINDOW, build_model, doc_ids, greedy, prompt_tokens, random_documents,
                      random_tokens, randomize_zero_inits, reference_choices, tiny_hparams)

S = M.BLOCK_SIZE  # 128-token attention blocks


# -----------------------------------------------------------------------------
# Helpers


@pytest.fixture(scope="module")
def model() -> M.GPT:
    return build_model()


def padded_dense_rows(docs_BT: Tensor, window_blocks: int) -> Tensor:
    """dense_attention_mask of docs padded to whole blocks with the last document, cut back to (B, 1, T, T)."""
    B, T = docs_BT.shape
    pad = (-T) % S
    docs = torch.cat([docs_BT, docs_BT[:, -1:].expand(B, pad)], dim=1)
    return M.dense_attention_mask(docs, window_blocks)[..., :T, :T]


# -----------------------------------------------------------------------------
# KV cache against the reference


@pytest.mark.parametrize("name", list(PROMPTS))
def test_kv_cache_greedy_equals_reference(model: M.GPT, name: str) -> None:
    # generation has a fast path (the KV cache) and a reference (full recompute): the fast one must pick exactly
    # the reference's tokens, including for prompts whose documents start mid-block and prompts longer than the
    # sliding window (700 > the 256-row rotary table)
    n, eots = PROMPTS[name]
    prompt = prompt_tokens(n, eots, seed=n)
    cached = greedy(model, prompt, NEW_TOKENS, use_cache=True)
    assert len(cached) == NEW_TOKENS
    assert cached == reference_choices(model, prompt, cached)


@pytest.fixture(scope="module")
def eot_model() -> M.GPT:
    """A model whose greedy choice is <|endoftext|> at some steps but not all (its lm_head row made large)."""
    m = build_model()
    with torch.no_grad():
        m.lm_head.weight[M.EOT_ID] = torch.randn(m.model_dim, generator=torch.Generator().manual_seed(5)) * 4
    return m


@pytest.mark.parametrize("n, eots", [(200, [0, 150]), (300, [0, 170, 260])])
def test_kv_cache_equals_reference_when_model_emits_eot_mid_block(eot_model: M.GPT, n: int, eots: list[int]) -> None:
    # A generated <|endoftext|> starts a new document mid-block; the block mask is causal (a block's keys depend on
    # the document of its first token only), so the cached keys stay valid and must equal the full recompute.
    prompt = prompt_tokens(n, eots, seed=3)
    cached = greedy(eot_model, prompt, 60, use_cache=True)
    eot_positions = [len(prompt) + i for i, t in enumerate(cached) if t == M.EOT_ID]
    assert 0 < len(eot_positions) < len(cached), "the forced model must emit <|endoftext|> at some steps only"
    assert any(p % S for p in eot_positions), f"no <|endoftext|> mid-block: {eot_positions}"
    assert cached == reference_choices(eot_model, prompt, cached)
    # with the default stop_ids the same run ends at the first <|endoftext|>, which is not yielded
    stopped = [s[0] for s in I.generate(eot_model, prompt, window_blocks=WINDOW, max_new_tokens=60)]
    assert stopped == cached[:cached.index(M.EOT_ID)]


def test_generate_without_cache_is_the_reference(eot_model: M.GPT) -> None:
    # use_cache=False is the reference that chat.py and eval.py offer (--no-kv-cache); it must agree with the
    # cache too, here across a block boundary and with <|endoftext|> generated mid-block.
    prompt = prompt_tokens(245, [0, 150], seed=3)
    cached = greedy(eot_model, prompt, 20, use_cache=True)
    eot_positions = [len(prompt) + i for i, t in enumerate(cached) if t == M.EOT_ID]
    assert any(p % S for p in eot_positions) and len(prompt) < 2 * S < len(prompt) + len(cached)
    assert greedy(eot_model, prompt, 20, use_cache=False) == cached


# Chunks that end on block boundaries: 128, 256, 128, 128 tokens of a 640-token batch of two rows.
CHUNKS = [0, 128, 384, 512, 640]


@pytest.mark.parametrize("window_blocks", [1, 2, 3, 1 << 20])
def test_prefill_chunks_equal_forward(model: M.GPT, window_blocks: int) -> None:
    # Prefill and block-wise decoding must reproduce the training forward's logits, with documents starting
    # mid-block (row 0) and one long document (row 1), for windows shorter and longer than the sequence.
    tokens = random_tokens(2, CHUNKS[-1], seed=11, eot_positions={0: [0, 100, 300, 420], 1: [0]})
    model.ensure_positions(CHUNKS[-1])  # the full forward needs the table too, whichever test ran first
    with torch.no_grad():
        full = model(tokens, None, window_blocks)
        cache = I.KVCache(model, 2, CHUNKS[-1])
        parts = [I.prefill(model, tokens[:, a:b], cache, window_blocks) for a, b in zip(CHUNKS, CHUNKS[1:])]
    assert cache.pos == CHUNKS[-1]
    torch.testing.assert_close(torch.cat(parts, dim=1), full, atol=1e-5, rtol=0)
    # the last chunk reads only the window: block 4 (window 1) or blocks 3-4 (window 2: row 0's block 3 is
    # partial, row 1's is its most recent full block), not the whole context
    if window_blocks in (1, 2):
        assert cache.key_start == (5 - window_blocks) * S


@pytest.mark.parametrize("window_blocks", [1, 2, 3, 1 << 20])
def test_cached_mask_rows_equal_dense_rows(window_blocks: int) -> None:
    # The cache builds only the rows of the new tokens over the keys they may see; they must be exactly the
    # dense mask's rows, and no key before the returned start may be visible to any of them.
    cases = [doc_ids(torch.stack([torch.from_numpy(random_documents(600, seed=s, mean_doc_len=90)).long()
                                  for s in (1, 2)])),
             doc_ids(random_tokens(2, 512, seed=4, eot_positions={0: [0, 128, 256], 1: [5, 130, 131]}))]
    for docs in cases:
        T = docs.size(1)
        dense = padded_dense_rows(docs, window_blocks)
        for q_start in (0, 64, 128, 256, T - 1):
            first, rows = I.cached_mask_rows(docs, q_start, window_blocks)
            assert first % S == 0 and first <= q_start
            assert rows.shape == (2, 1, T - q_start, T - first)
            assert torch.equal(rows, dense[:, :, q_start:, first:]), (T, q_start)
            assert not dense[:, :, q_start:, :first].any(), (T, q_start)


def test_rotary_ensure_length_keeps_table_and_allows_long_prompts() -> None:
    # Generation past the training length grows the rotary table; the rows the model was trained with must
    # not move by a single bit, or cached keys and a grown table would disagree.
    m = build_model()
    rotary = m.blocks[0].attn.rotary
    assert all(b.attn.rotary is rotary for b in m.blocks)  # one table shared by every layer
    cos, sin = rotary.cos.clone(), rotary.sin.clone()
    assert cos.size(0) == 256
    rotary.ensure_length(100)  # shorter: nothing to do
    assert torch.equal(rotary.cos, cos)
    rotary.ensure_length(300)
    assert rotary.cos.size(0) == rotary.sin.size(0) == 384  # rounded up to whole blocks
    assert torch.equal(rotary.cos[:256], cos) and torch.equal(rotary.sin[:256], sin)
    assert torch.equal(rotary.cos, rotary._table(384, torch.device("cpu"))[0])  # the same formula, longer
    prompt = prompt_tokens(600, [0, 400], seed=6)
    cached = greedy(m, prompt, 5, use_cache=True)
    assert rotary.cos.size(0) >= 605 and torch.equal(rotary.cos[:256], cos)
    assert cached == reference_choices(m, prompt, cached)


def test_a_forward_longer_than_the_rotary_table_grows_it(monkeypatch: pytest.MonkeyPatch) -> None:
    # A library user's load_model(...) then model(x): any length works eagerly, as if ensure_positions had been
    # called first; compiled code cannot grow a buffer, so it names the call to make before compiling.
    tokens = random_tokens(1, 384, seed=0, eot_positions={0: [0]})
    grown, sized = build_model(), build_model()
    sized.ensure_positions(384)
    with torch.no_grad():
        assert torch.equal(grown(tokens, None, WINDOW), sized(tokens, None, WINDOW))
    assert grown.blocks[0].attn.rotary.cos.size(0) == 384
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    with pytest.raises(ValueError, match=r"^sequence of 512 tokens exceeds the rotary table \(384\); call "
                                         r"GPT.ensure_positions before compiling$"):
        grown(random_tokens(1, 512, seed=1, eot_positions={0: [0]}), None, WINDOW)


# -----------------------------------------------------------------------------
# Several samples, sampling, stop tokens


def test_num_samples(model: M.GPT) -> None:
    # One prefilled cache is expanded to n samples: greedy samples must all equal the single-sample run,
    # sampled ones must differ from each other and be reproducible from the seed.
    prompt = prompt_tokens(150, [0, 70], seed=2)
    kw = dict(window_blocks=WINDOW, max_new_tokens=20, stop_ids=())
    one = [s[0] for s in I.generate(model, prompt, **kw)]
    three = list(I.generate(model, prompt, num_samples=3, **kw))
    assert [list(s) for s in zip(*three)] == [one] * 3
    sampled = [list(s) for s in zip(*I.generate(model, prompt, temperature=1.0, seed=3, num_samples=3, **kw))]
    assert len(sampled) == 3 and all(len(s) == 20 for s in sampled)
    assert sampled[0] != sampled[1] and sampled[1] != sampled[2] and sampled[0] != sampled[2]
    again = [list(s) for s in zip(*I.generate(model, prompt, temperature=1.0, seed=3, num_samples=3, **kw))]
    assert again == sampled
    other = [list(s) for s in zip(*I.generate(model, prompt, temperature=1.0, seed=4, num_samples=3, **kw))]
    assert other != sampled


def draws(logits_V: Tensor, n: int = 4000, seed: int = 0, **kw: float) -> list[int]:
    """n samples of sample_next from one row of logits (one call on n copies of the row)."""
    gen = torch.Generator().manual_seed(seed)
    return I.sample_next(logits_V.expand(n, -1), gen, **kw).tolist()


def test_sample_next_seed_and_temperature_zero() -> None:
    # The same seed gives the same draws (reproducible chat and eval), another seed others; temperature 0 is
    # argmax for every row.
    logits = torch.randn(50)
    assert draws(logits, seed=1, temperature=1.0) == draws(logits, seed=1, temperature=1.0)
    assert draws(logits, seed=1, temperature=1.0) != draws(logits, seed=2, temperature=1.0)
    rows = torch.randn(64, 1000)
    greedy_ids = I.sample_next(rows, torch.Generator().manual_seed(0), temperature=0.0)
    assert torch.equal(greedy_ids, rows.argmax(dim=-1))


@pytest.mark.parametrize("top_k", [1, 3, 7])
def test_top_k_samples_only_the_k_largest(top_k: int) -> None:
    # top_k must cut the tail: every draw is among the k largest logits, and each of them is reachable.
    logits = torch.randn(30, generator=torch.Generator().manual_seed(top_k))
    allowed = set(logits.topk(top_k).indices.tolist())
    assert set(draws(logits, temperature=1.0, top_k=top_k)) == allowed


# Probabilities with clear gaps between cumulative sums: .38 .62 .78 .89 .96 1.0 (shuffled below).
NUCLEUS_PROBS = torch.tensor([0.07, 0.24, 0.04, 0.38, 0.11, 0.16])


@pytest.mark.parametrize("top_p, temperature", [(0.3, 1.0), (0.5, 1.0), (0.7, 1.0), (0.85, 1.0), (0.93, 1.0),
                                                (0.7, 0.5), (0.7, 2.0)])
def test_top_p_samples_only_the_nucleus(top_p: float, temperature: float) -> None:
    # Nucleus sampling keeps the smallest set of most likely tokens whose probability reaches top_p (computed
    # here by hand from the softmax at this temperature), and every member of that set can be drawn.
    logits = NUCLEUS_PROBS.log()
    probs = (logits / temperature).softmax(dim=-1)
    order = probs.argsort(descending=True)
    size = int((probs[order].cumsum(dim=0) < top_p).sum()) + 1
    nucleus = set(order[:size].tolist())
    assert set(draws(logits, temperature=temperature, top_p=top_p)) == nucleus


def test_top_p_tiny_keeps_the_top_token() -> None:
    # However small top_p is, the most likely token stays, so sampling degenerates to greedy, never to nothing.
    rows = torch.randn(200, 100)
    ids = I.sample_next(rows, torch.Generator().manual_seed(0), temperature=1.0, top_p=1e-6)
    assert torch.equal(ids, rows.argmax(dim=-1))


def test_vocab_limit_is_never_exceeded(model: M.GPT, monkeypatch: pytest.MonkeyPatch) -> None:
    # Padding rows (and chat tokens for a base model) are never sampled, even when their logits are the largest.
    prompt = prompt_tokens(40, [0], seed=8)
    expected = greedy(model, prompt, 10, use_cache=True)
    real_logits = model.logits

    def prefer_padding(x: Tensor) -> Tensor:
        out = real_logits(x).clone()
        out[..., M.EOT_ID + 1:] = 100.0  # above every soft-capped logit, which lie in (0, 30)
        return out

    monkeypatch.setattr(model, "logits", prefer_padding)
    kw = dict(window_blocks=WINDOW, max_new_tokens=10, stop_ids=())
    assert [s[0] for s in I.generate(model, prompt, vocab_limit=M.EOT_ID + 1, **kw)] == expected
    chat = [s[0] for s in I.generate(model, prompt, vocab_limit=M.CHAT_VOCAB_LIMIT, **kw)]
    assert chat == [min(M.CHAT_SPECIAL_TOKENS.values())] * 10  # greedy takes the first of the tied maxima
    sampled = {t for step in I.generate(model, prompt, vocab_limit=M.CHAT_VOCAB_LIMIT, temperature=1.0,
                                        num_samples=8, **kw) for t in step}
    assert sampled == set(M.CHAT_SPECIAL_TOKENS.values())  # all four chat tokens, nothing at or above the limit


def test_stop_ids(model: M.GPT) -> None:
    # A sample that produces a stop token yields None from then on while the others go on (the stop token
    # itself is never yielded); generation ends when every sample has stopped.
    prompt = prompt_tokens(60, [0, 30], seed=9)
    kw = dict(window_blocks=WINDOW, max_new_tokens=12, temperature=1.0, seed=7, num_samples=3)
    free = list(I.generate(model, prompt, stop_ids=(), **kw))
    assert len(free) == 12 and all(None not in step for step in free)
    samples = [list(s) for s in zip(*free)]
    stops = (samples[0][3], samples[1][5], samples[2][8])  # sample i stops at step 3, 5 and 8
    assert all(not set(stops) & set(s[:n]) for s, n in zip(samples, (3, 5, 8)))  # no earlier stop
    assert all(stops[0] not in s for s in samples[1:])

    one_stops = list(I.generate(model, prompt, stop_ids=(stops[0],), **kw))
    assert len(one_stops) == 12  # the others continue to max_new_tokens
    assert [step[0] for step in one_stops] == samples[0][:3] + [None] * 9
    assert [step[1:] for step in one_stops] == [step[1:] for step in free]

    all_stop = list(I.generate(model, prompt, stop_ids=stops, **kw))
    assert len(all_stop) == 8  # step 8, where the last sample stops, is not yielded
    expected = [s[:n] + [None] * (8 - n) for s, n in zip(samples, (3, 5, 8))]
    assert [list(s) for s in zip(*all_stop)] == expected


def test_generate_bounds_and_errors(model: M.GPT) -> None:
    # max_new_tokens bounds the number of steps (0 yields nothing); an empty prompt is a clear error.
    prompt = prompt_tokens(10, [0], seed=10)
    assert len(list(I.generate(model, prompt, window_blocks=WINDOW, max_new_tokens=7, stop_ids=()))) == 7
    assert list(I.generate(model, prompt, window_blocks=WINDOW, max_new_tokens=0)) == []
    with pytest.raises(ValueError, match="needs a non-empty prompt"):
        next(I.generate(model, [], window_blocks=WINDOW, max_new_tokens=5))


# -----------------------------------------------------------------------------
# KVCache


def test_kv_cache_expand_copies_are_independent(model: M.GPT) -> None:
    # Samples share one prefilled prompt; after expand() each sample's keys must be its own, and the
    # prefilled cache must be untouched (generate() may expand it again).
    prompt = torch.tensor([prompt_tokens(100, [0, 50], seed=12)])
    new_B1 = torch.tensor([[11], [22], [33]])
    with torch.no_grad():
        cache = I.KVCache(model, 1, 256)
        I.prefill(model, prompt, cache, WINDOW)
        k0, v0, tokens0 = [k.clone() for k in cache.k], [v.clone() for v in cache.v], cache.tokens.clone()
        a, b = cache.expand(3), cache.expand(3)
        logits_a = I.prefill(model, new_B1, a, WINDOW)[:, -1]
        singles = [I.prefill(model, new_B1[r:r + 1], cache.expand(1), WINDOW)[:, -1] for r in range(3)]
    assert (cache.pos, a.pos, b.pos) == (100, 101, 100)
    assert torch.equal(cache.tokens, tokens0) and torch.equal(b.tokens, tokens0.expand(3, -1))
    assert a.tokens[:, 100].tolist() == [11, 22, 33]
    for i in range(len(model.blocks)):
        assert torch.equal(cache.k[i], k0[i]) and torch.equal(cache.v[i], v0[i])
        assert torch.equal(b.k[i], k0[i].expand(3, -1, -1, -1)) and torch.equal(b.v[i], v0[i].expand(3, -1, -1, -1))
        assert torch.equal(a.k[i][:, :, :100], k0[i][:, :, :100].expand(3, -1, -1, -1))  # shared prompt unchanged
        rows = a.k[i][:, :, 100]
        assert not torch.equal(rows[0], rows[1]) and not torch.equal(rows[1], rows[2])
    for r in range(3):  # each row is what a single-sequence cache computes for its token
        torch.testing.assert_close(logits_a[r:r + 1], singles[r], atol=1e-5, rtol=0)


@pytest.mark.parametrize("prefill, extra", [
    (128, 1),  # full cache, one more token
    (100, 50),  # a chunk that crosses the end
    (0, 129),  # a prefill longer than the cache
])
def test_kv_cache_overflow_is_a_clear_error(model: M.GPT, prefill: int, extra: int) -> None:
    # Feeding more tokens than the cache holds must fail with a message naming both sizes, leaving it as it was.
    cache = I.KVCache(model, 1, 100)
    assert cache.capacity == 128  # rounded up to whole blocks
    tokens = torch.tensor([prompt_tokens(prefill + extra, [0], seed=13)])
    with torch.no_grad():
        if prefill:
            I.prefill(model, tokens[:, :prefill], cache, WINDOW)
        with pytest.raises(ValueError, match=f"KV cache holds 128 tokens; {prefill + extra} requested"):
            I.prefill(model, tokens[:, prefill:], cache, WINDOW)
    assert cache.pos == prefill


def test_final_window_blocks() -> None:
    # Generation uses the window the model finished training with: window_max rounded up to whole blocks.
    assert M.final_window_blocks(tiny_hparams()) == 2  # window_max=256
    assert M.final_window_blocks(M.Hyperparameters()) == 14  # record: 1728 -> 1792 tokens


# -----------------------------------------------------------------------------
# Streaming decode


def is_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def test_stream_decoder_holds_split_characters(tok: M.Tokenizer) -> None:
    # GPT-2 tokens split multi-byte characters; streamed text must never show U+FFFD for them, and the pieces
    # must add up to the original string.
    text = "héllo — 世界 🎉"
    ids = tok.encode(text)
    split = [t for t in ids if not is_utf8(tok.token_bytes(t))]
    assert len(split) >= 4, "the example must split characters across tokens"
    assert "\ufffd" in "".join(tok.decode([t]) for t in ids)  # what decoding token by token would show
    decoder = I.StreamDecoder(tok)
    pieces = [decoder.add(t) for t in ids] + [decoder.flush()]
    assert "".join(pieces) == text
    assert not any("\ufffd" in p for p in pieces)
    assert "" in pieces  # some tokens were held back until their character completed
