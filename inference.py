"""Running a trained checkpoint: decode weight formats, KV caches, generation, the inference session.

model.py holds the GPT as it trains; this module runs it, and reaches into it through two seams only, so the
model's forward never asks whether it is decoding:
    - a projection (model.CastedLinear.decode, model.CausalSelfAttention.qkv_decode) multiplies by its weight,
      or calls the decode format this module attached to it (WeightFormat, PackedWeight);
    - attention stores its keys and values and attends through the cache layer passed to it (LayerCache,
      RingLayer: their attend()), when one is passed.
Imports go one way: eval.py and chat.py -> inference.py -> model.py; it never imports the harness (runs.py).

Sections, in order:
    Weight formats  fp32 / bf16 / int8 matrices and their one-row kernels; set_inference_weights
    Caches          the cached mask rows, KVCache and prefill, RingCache (the window of one-token steps)
    Generation      decode_step and its compilation, the full-forward reference, sampling, generate
    Session         InferenceModel, load_for_inference, prompts and streamed replies, --weights / --compile

    python chat.py --weights int8 --compile on       # what runs through every section
    python eval.py --prompt "ROMEO." --num-samples 2
"""
from __future__ import annotations

import argparse
import codecs
import contextlib
import copy
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Collection, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor

import model as M
from model import BLOCK_SIZE, EOT_ID, GPT, Hyperparameters, Tokenizer

# -----------------------------------------------------------------------------
# Weight formats: the matrices as decoding reads them, and the one-row kernels of a compiled CPU step

INFERENCE_WEIGHTS = ("fp32", "bf16", "int8")
TILE_ROWS = 16  # output rows per tile of a packed weight's streamed copy: one AVX-512 vector of fp32
PACKED_ROWS = 8  # up to this many rows (decode batches) use the packed kernel; more rows (scoring) a plain GEMM


def compiled_on_cpu(x: Tensor) -> bool:
    """Whether x is traced by torch.compile for a CPU: where a one-token decoding step takes the forms written
    for inductor's loops (streamed_matvec, one_query_attention) instead of the eager kernels."""
    return x.device.type == "cpu" and torch.compiler.is_compiling()


def stored(x: Tensor) -> Tensor:
    """x, computed once into a buffer by compiled code: inductor otherwise inlines a cheap elementwise result (a
    norm's reciprocal root: compiled C keeps errno semantics) into every loop that reads it, once per weight tile
    (PackedWeight.streamed) or cached key (one_query_attention); a reduction (the max of two equal copies) is always
    stored."""
    return torch.stack([x, x], dim=-1).amax(dim=-1)


def streamed_matvec(x: Tensor, weight: Tensor, scale: Tensor | None = None) -> Tensor:
    """One row x @ weight.T (times a per-row scale) in fp32, written as a broadcast product and a sum so that
    torch.compile makes it one loop streaming the weight once, in whatever format it is stored. For a single
    row on a CPU that loop reads memory about twice as fast as the BLAS matrix-vector kernels (bench.py
    --only decode). Only for compiled code: run eagerly it would materialise every product."""
    flat = x.reshape(1, -1).float()
    y = (flat[:, None, :] * weight.float()[None]).sum(-1)
    y = y if scale is None else y * scale.float()
    return y.view(*x.shape[:-1], -1)


class WeightFormat:
    """x @ weight.T as a projection computes it once a format is attached (model.CastedLinear.decode, called with
    the layer's weight): the plain product, except for the one row of a compiled CPU decoding step, which streams
    the weight (streamed_matvec). Attached by compile_decoding to fp32 layers. Its input is not stored first, as a
    packed format's is: a stored copy made inductor vectorise this product across output rows, at about 0.6x the
    speed (docs/measurements.md, "The inference split")."""

    fmt = "fp32"

    def __call__(self, x: Tensor, weight: Tensor) -> Tensor:
        if x.numel() == x.size(-1) and compiled_on_cpu(x):
            return self.streamed(x, weight).to(x.dtype)
        if x.numel() <= PACKED_ROWS * x.size(-1):
            return self.few_rows(x, weight)
        return F.linear(x, weight.type_as(x))

    def few_rows(self, x: Tensor, weight: Tensor | None = None) -> Tensor:
        return F.linear(x, weight.type_as(x))

    def streamed(self, x: Tensor, weight: Tensor | None = None) -> Tensor:
        return streamed_matvec(x, weight)

    def tile(self, on: bool = True) -> None:
        """Make or drop a copy laid out for streamed(); fp32 streams the layer's weight by rows and keeps none."""


class PackedWeight(WeightFormat):
    """A matrix in a decode format: bf16, or int8 with one bf16 scale per output row (symmetric, absmax / 127).

    Decoding a few rows is memory-bound, so the bytes of the weights set the speed: int8 reads a quarter of fp32.
    The kernel for int8 (torch._weight_int8pack_mm, the one gpt-fast uses) takes bf16 activations and is fast
    only for a few rows (few_rows), so more rows (scoring) go through a plain GEMM with the layer's weight, which
    set_inference_weights rounds to exactly what this format holds. The weight the layer passes is not read
    otherwise: this format's own copy is. A compiled decoding step of one row reads a
    second copy in tiles of TILE_ROWS rows instead (streamed), made by tile() when compile_decoding switches
    compiled steps on, so that eager decoding keeps one copy.
    """

    def __init__(self, weight: Tensor, fmt: str):
        if fmt not in ("bf16", "int8"):
            raise ValueError(f"unknown packed weight format {fmt!r} (bf16 or int8)")
        self.fmt = fmt
        w = weight.detach().float()
        if fmt == "int8":
            scale = (w.abs().amax(dim=1) / 127).clamp_min(torch.finfo(torch.bfloat16).tiny).bfloat16()
            self.q = (w / scale.float()[:, None]).round().clamp(-127, 127).to(torch.int8)
            self.scale = scale
        else:
            self.w = w.bfloat16()
        self.tiled: Tensor | None = None

    def tile(self, on: bool = True) -> None:
        """Make (on) or drop the tiled copy (out / TILE_ROWS, in, TILE_ROWS) that streamed() reads; a matrix whose
        rows are not a multiple of TILE_ROWS has none and streams by rows."""
        matrix = self.q if self.fmt == "int8" else self.w
        on = on and matrix.size(0) % TILE_ROWS == 0
        self.tiled = matrix.view(-1, TILE_ROWS, matrix.size(1)).transpose(1, 2).contiguous() if on else None

    def dequantized(self) -> Tensor:
        """The fp32 matrix this format represents exactly: what every other path computes with."""
        return self.q.float() * self.scale.float()[:, None] if self.fmt == "int8" else self.w.float()

    def streamed(self, x: Tensor, weight: Tensor | None = None) -> Tensor:
        """One row (compiled decoding) through the tiled copy, with bf16 activations as in few_rows: for each
        tile of TILE_ROWS output rows, a sum over the input of x times a contiguous (in, TILE_ROWS) slab, which
        torch.compile makes into a loop with one vector accumulator per tile and no horizontal sums. The input is
        stored first (stored): inlined, a norm's reciprocal root would be recomputed for every tile it meets."""
        x = stored(x)
        scale = self.scale if self.fmt == "int8" else None
        if self.tiled is None:
            return streamed_matvec(x.to(torch.bfloat16), self.q if scale is not None else self.w, scale)
        flat = x.reshape(1, -1).to(torch.bfloat16).float()
        y = (flat[:, None, :, None] * self.tiled.float()[None]).sum(2).view(1, -1)  # (1, out)
        y = y if scale is None else y * scale.float()
        return y.view(*x.shape[:-1], -1)

    def few_rows(self, x: Tensor, weight: Tensor | None = None) -> Tensor:
        """The packed kernel: bf16 activations, the format's matrix, bf16 out (returned in x's dtype)."""
        flat = x.reshape(-1, x.size(-1)).to(torch.bfloat16)
        if self.fmt == "bf16":
            y = F.linear(flat, self.w)
        elif flat.device.type == "cpu":
            y = torch._weight_int8pack_mm(flat, self.q, self.scale)
        else:  # no int8 kernel assumed off the CPU: the same numbers from a bf16 product
            y = F.linear(flat, self.q.to(torch.bfloat16)) * self.scale
        return y.view(*x.shape[:-1], -1).to(x.dtype)


def projections(model: GPT) -> Iterator[tuple[object, str, Tensor]]:
    """(module, seam attribute, fp32 matrix) of every product a token passes through: each CastedLinear (the
    blocks' and lm_head) and each attention's merged QKV. The embedding tables are not products: a token reads
    one row of each."""
    for module in model.modules():
        if isinstance(module, M.CastedLinear):
            yield module, "decode", module.weight
        elif isinstance(module, M.CausalSelfAttention):
            yield module, "qkv_decode", module.qkv_w.flatten(end_dim=1)


def set_inference_weights(model: GPT, fmt: str) -> GPT:
    """Round every matrix a token passes through to `fmt` ('fp32' leaves the model as it is) and attach a packed
    copy for decoding. Scoring, the KV cache and the full-recompute reference then all compute with the same
    rounded weights, so a quality check of one (eval.py's val loss) holds for the others."""
    if fmt not in INFERENCE_WEIGHTS:
        raise M.ConfigError(f"--weights={fmt}: expected one of {', '.join(INFERENCE_WEIGHTS)}")
    if fmt == "fp32":
        return model
    with torch.no_grad():
        for module, seam, weight in projections(model):
            packed = PackedWeight(weight, fmt)
            weight.copy_(packed.dequantized())  # in place: a view of the merged QKV writes through
            setattr(module, seam, packed)
    return model


def weight_formats(model: GPT) -> list[WeightFormat]:
    """The decode formats attached to the model's projections (set_inference_weights, compile_decoding)."""
    return [getattr(module, seam) for module, seam, _ in projections(model) if getattr(module, seam) is not None]


# -----------------------------------------------------------------------------
# Caches: the keys and values of earlier tokens, the masks of new ones, prefill


def cached_mask_rows(docs_BT: Tensor, q_start: int, window_blocks: int, block: int = BLOCK_SIZE) -> tuple[int, Tensor]:
    """Rows q_start.. of model.dense_attention_mask for a sequence that ends after docs_BT, over the keys that any
    of them may see: returns (first key position, boolean (B, 1, T - q_start, T - first)).

    The sequence is padded to whole blocks with its last document, as a full forward of tokens padded with
    non-<|endoftext|> ids sees it. The record's block mask is causal: a query block keeps the window_blocks most
    recent blocks that share the document of its *first* token (block_keep_mask works out to that), so tokens
    appended later, <|endoftext|> included, never change rows already computed and cached keys stay valid.
    block: tokens per window block (the model's window_block).
    """
    B, T = docs_BT.shape
    pad = (-T) % block
    docs = torch.cat([docs_BT, docs_BT[:, -1:].expand(B, pad)], dim=1)
    keep_full, keep_partial = M.block_keep_mask(docs, window_blocks, block)
    q = torch.arange(q_start, T, device=docs_BT.device)
    rows_BQN = (keep_full | keep_partial)[:, q // block]  # (B, Tq, NB): key blocks each query keeps
    first_block = int(rows_BQN.flatten(0, 1).any(0).nonzero()[0])  # the diagonal block is always kept
    k = torch.arange(first_block * block, T, device=docs_BT.device)
    mask = rows_BQN[:, :, k // block] & (k[None, :] <= q[:, None])[None]
    mask &= docs_BT[:, q, None] == docs_BT[:, None, k]
    return first_block * block, mask[:, None]


class KVCache:
    """Preallocated keys and values of every attention layer for B sequences of up to `capacity` tokens.

    prefill() passes layer(i) to each attention layer, whose attend() stores the chunk's keys and values; pos
    counts the cached tokens; key_start is the first key position the current chunk's queries may see (the
    sliding window), so attention reads only the window and decoding costs O(window) per token, not O(context).
    """

    def __init__(self, model: GPT, batch_size: int, capacity: int):
        capacity = M.next_multiple_of_n(capacity, n=BLOCK_SIZE)
        model.ensure_positions(capacity)
        self.capacity, self.pos, self.key_start = capacity, 0, 0
        self.block, self.short_max = model.window_block, model.short_window_max  # the model's window geometry
        self.tokens = torch.zeros(batch_size, capacity, dtype=torch.long, device=model.embed.weight.device)
        self.k: list[Tensor | None] = [None] * len(model.blocks)
        self.v: list[Tensor | None] = [None] * len(model.blocks)
        # paired-head layers (record #58) cache two keys per token, in pair_heads' interleaved order, and see
        # their own window over that sequence; key_start_paired is its first key position
        self.paired = set(model.arch.paired_head_layers)
        self.key_start_paired = 0
        self.last_key: list[Tensor | None] = [None] * len(model.blocks)  # a key offset's previous raw key

    def swap_last_key(self, i: int, k_BTHD: Tensor) -> Tensor | None:
        """Layer i's raw key of the position before this chunk (None at position 0); keeps this chunk's last."""
        before = self.last_key[i] if self.pos else None
        self.last_key[i] = k_BTHD[:, -1:].clone()
        return before

    def layer(self, i: int) -> "LayerCache":
        return LayerCache(self, i)

    def masks(self, T: int, window_blocks: int, paired: bool = False) -> tuple[int, Tensor, Tensor]:
        """(first key position, long-window rows, short-window rows) for T new tokens; paired: over pair_heads'
        interleaved sequence (positions 2 * pos ..)."""
        end = self.pos + T
        if end > self.capacity:
            raise ValueError(f"KV cache holds {self.capacity} tokens; {end} requested")
        docs = (self.tokens[:, :end] == EOT_ID).cumsum(dim=1)
        q_start = self.pos
        if paired:
            docs, q_start = M.paired_docs(docs), 2 * self.pos
        start_long, long_mask = cached_mask_rows(docs, q_start, window_blocks, self.block)
        short = M.short_window(window_blocks, self.short_max)
        start_short, short_mask = cached_mask_rows(docs, q_start, short, self.block)
        start = min(start_long, start_short)  # one key range for both: pad the narrower rows on the left
        return start, F.pad(long_mask, (start_long - start, 0)), F.pad(short_mask, (start_short - start, 0))

    def expand(self, n: int) -> "KVCache":
        """n copies of a one-sequence cache (several samples from one prefilled prompt)."""
        out = copy.copy(self)
        out.tokens = self.tokens.expand(n, -1).clone()
        out.k = [None if t is None else t.expand(n, -1, -1, -1).clone() for t in self.k]
        out.v = [None if t is None else t.expand(n, -1, -1, -1).clone() for t in self.v]
        out.last_key = [None if t is None else t.expand(n, -1, -1, -1).clone() for t in self.last_key]
        return out


@dataclass
class LayerCache:
    """Layer `index`'s view of a KVCache: what its attention stores into and attends over."""

    cache: KVCache
    index: int

    @property
    def offset(self) -> int:
        return self.cache.pos

    def swap_last_key(self, k_BTHD: Tensor) -> Tensor | None:
        return self.cache.swap_last_key(self.index, k_BTHD)

    def attend(self, q_BHTD: Tensor, k_BHTD: Tensor, v_BHTD: Tensor, mask: Tensor, scale: float) -> Tensor:
        """Store this chunk's keys and values; attend over those of positions key_start .. pos + T (of the
        interleaved sequence, two per token, for a paired-head layer)."""
        c, i, T = self.cache, self.index, k_BHTD.size(2)
        per_token = 2 if i in c.paired else 1
        pos, key_start = per_token * c.pos, c.key_start_paired if i in c.paired else c.key_start
        if c.k[i] is None:
            B, H, _, D = k_BHTD.shape
            c.k[i] = k_BHTD.new_zeros(B, H, per_token * c.capacity, D)
            c.v[i] = v_BHTD.new_zeros(B, H, per_token * c.capacity, D)
        c.k[i][:, :, pos:pos + T] = k_BHTD
        c.v[i][:, :, pos:pos + T] = v_BHTD
        k, v = c.k[i][:, :, key_start:pos + T], c.v[i][:, :, key_start:pos + T]
        return M.attention(q_BHTD, k, v, mask, scale)


def prefill(model: GPT, input_BT: Tensor, cache: KVCache, window_blocks: int) -> Tensor:
    """Logits (B, T, V) of T new tokens that follow the cache's tokens; their keys and values join the cache.

    Equal to rows cache.pos.. of the model's forward of the whole sequence (tested), at the cost of the new rows.
    """
    T = input_BT.size(1)
    if cache.pos + T > cache.capacity:
        raise ValueError(f"KV cache holds {cache.capacity} tokens; {cache.pos + T} requested")
    cache.tokens[:, cache.pos:cache.pos + T] = input_BT
    start, long_mask, short_mask = cache.masks(T, window_blocks)
    cache.key_start = start
    paired = (None, None)
    if cache.paired:
        cache.key_start_paired, *paired = cache.masks(T, window_blocks, paired=True)
    x = model.hidden_states(input_BT, long_mask, short_mask, *paired, cache=cache)
    cache.pos += T
    return model.logits(x)


def one_query_attention(q_BH1D: Tensor, k_BHSD: Tensor, v_BHSD: Tensor, mask_B11S: Tensor, scale: float) -> Tensor:
    """Attention of one query per sequence (a compiled decoding step) as products and sums that torch.compile
    fuses into a couple of loops; SDPA's CPU kernel costs more in setup than a few hundred keys cost to read. The
    mask always keeps the query's own key, so no row is empty."""
    scores = (stored(q_BH1D) * k_BHSD).sum(-1, keepdim=True) * scale  # (B, H, S, 1); q's norm and rotation once
    scores = scores.masked_fill(~mask_B11S.transpose(-1, -2), float("-inf"))
    probs = scores.float().softmax(dim=2).type_as(v_BHSD)
    return (probs * v_BHSD).sum(2, keepdim=True)  # (B, H, 1, D)


class RingCache:
    """What a one-token decoding step can see: the keys and values of the last (window_blocks + 1) blocks of
    positions, position p in slot p % size, taken over from a prefilled KVCache.

    A query sees keys of its own document in its own block and the window_blocks blocks before it (block_keep_mask),
    so older keys can be overwritten and a step reads at most `size` keys whatever the context. Which keys of
    earlier blocks the current block's queries may see is fixed when the block begins (the record's mask depends
    on the document of a block's first token only: cached_mask_rows), so a step only adds "same document".
    """

    def __init__(self, kv: KVCache, window_blocks: int):
        self.block_size, self.short_max = kv.block, kv.short_max
        self.size = (window_blocks + 1) * self.block_size
        self.window_blocks, self.pos, self.block = window_blocks, kv.pos, -1
        device = kv.tokens.device
        positions = torch.arange(max(0, kv.pos - self.size), kv.pos, device=device)
        slots = positions % self.size

        def ring(t: Tensor | None) -> Tensor | None:  # slots no step reads yet stay unwritten (_start_block)
            return None if t is None else t.new_empty(*t.shape[:2], self.size, t.size(3)).index_copy_(
                2, slots, t[:, :, positions])

        self.k, self.v = [ring(t) for t in kv.k], [ring(t) for t in kv.v]
        docs = (kv.tokens[:, :kv.pos] == EOT_ID).cumsum(dim=1)
        B = docs.size(0)
        self.doc = docs[:, -1].clone()  # (B,) document of the newest token
        self.slot_doc = torch.zeros(B, self.size, dtype=torch.long, device=device).index_copy_(
            1, slots, docs[:, positions])
        self.seen_long = torch.zeros(B, self.size, dtype=torch.bool, device=device)
        self.seen_short = torch.zeros_like(self.seen_long)
        self.pos_t = torch.zeros(1, dtype=torch.long, device=device)  # pos and its slot as tensors: a compiled
        self.slot_t = torch.zeros(1, dtype=torch.long, device=device)  # step must not specialise on them
        self.used = 0  # slots a step attends over, up to size

    @property
    def slot_pos(self) -> Tensor:
        """(size,) the position each slot holds: the newest p < pos with p % size == slot, or -1 while empty."""
        slots = torch.arange(self.size, device=self.slot_doc.device)
        newest = slots + (self.pos - 1 - slots).div(self.size, rounding_mode="floor") * self.size
        return torch.where(newest >= 0, newest, -1)

    def layer(self, i: int) -> "RingLayer":
        return RingLayer(self, i)

    def advance(self, ids_B: Tensor, whole_blocks: bool = True) -> tuple[Tensor, Tensor]:
        """Place the token at position pos (ids_B, one per sequence); masks (B, 1, 1, n) over the first n slots for
        its long- and short-window layers. whole_blocks: n counts whole blocks of slots, so that a compiled step
        sees a few shapes; otherwise (eager) only the filled slots, which the attention kernel then reads."""
        p, slot = self.pos, self.pos % self.size
        self.pos_t.fill_(p)
        self.slot_t.fill_(slot)
        self.doc += ids_B == EOT_ID
        self.slot_doc[:, slot] = self.doc
        if p // self.block_size != self.block:
            self.block = p // self.block_size
            self._start_block()
        else:
            self.seen_long[:, slot] = self.seen_short[:, slot] = True
        # slots past pos stay empty (unseen) until the ring wraps
        self.used = n = min(M.next_multiple_of_n(p + 1, n=self.block_size) if whole_blocks else p + 1, self.size)
        same_doc = self.slot_doc[:, :n] == self.doc[:, None]
        return (self.seen_long[:, :n] & same_doc)[:, None, None], (self.seen_short[:, :n] & same_doc)[:, None, None]

    def _start_block(self) -> None:
        """Which cached keys the queries of the block beginning at (or containing) pos may see: the row of pos.
        Before the ring first wraps, the block's slots from pos on hold no key yet; a step over whole blocks
        reads them (masked), so they are zeroed here: garbage there could be NaN, and 0 x NaN is NaN. (Zeroing
        the whole ring up front writes every layer's full window for each reply, however short.)"""
        p = self.pos
        if p < self.size:
            for t in self.k + self.v:
                if t is not None:
                    t[:, :, p:min(self.size, (self.block + 1) * self.block_size)].zero_()
        first = max(0, self.block - self.window_blocks) * self.block_size  # keys before this are outside every window
        slots = torch.arange(first, p + 1, device=self.slot_doc.device) % self.size
        docs = self.slot_doc[:, slots]
        short = M.short_window(self.window_blocks, self.short_max)
        for window, seen in ((self.window_blocks, self.seen_long), (short, self.seen_short)):
            start, rows = cached_mask_rows(docs, p - first, window, self.block_size)
            seen.zero_()
            seen[:, slots[start:]] = rows[:, 0, 0]


@dataclass
class RingLayer:
    """Layer `index`'s view of a RingCache: one token's key and value in, attention over the ring's slots."""

    cache: RingCache
    index: int

    @property
    def offset(self) -> Tensor:
        return self.cache.pos_t

    def attend(self, q_BH1D: Tensor, k_BH1D: Tensor, v_BH1D: Tensor, mask_B11S: Tensor, scale: float) -> Tensor:
        """Store the step's key and value in its slot; attend over the slots the step reads (one_query_attention
        in a compiled CPU step, SDPA otherwise)."""
        c, i = self.cache, self.index
        c.k[i].index_copy_(2, c.slot_t, k_BH1D)
        c.v[i].index_copy_(2, c.slot_t, v_BH1D)
        k, v = c.k[i][:, :, :c.used], c.v[i][:, :, :c.used]
        if compiled_on_cpu(q_BH1D):
            return one_query_attention(q_BH1D, k, v, mask_B11S, scale)
        return M.attention(q_BH1D, k, v, mask_B11S, scale)


# -----------------------------------------------------------------------------
# Generation: the decoding step, its compilation, the full-forward reference, sampling


def step_logits(model: GPT, ids_B: Tensor, long_mask: Tensor, short_mask: Tensor, ring: RingCache) -> Tensor:
    """The tensor work of a decoding step (what compile_decoding compiles): every layer, the ring's writes, logits."""
    return model.logits(model.hidden_states(ids_B[:, None], long_mask, short_mask, cache=ring))[:, -1]


def compile_decoding(model: GPT, on: bool = True) -> GPT:
    """Run this model's decoding steps through torch.compile (or eagerly again with on=False); sets model.decode_fn,
    which decode_step calls. A step is a few hundred small operators around a few matrix-vector products;
    compiled, the small ones fuse into a few loops and the per-operator overhead, most of a small model's step on
    a CPU, goes. On a CPU the compiled step of one token also takes forms written for inductor's loops: products as
    streamed sums over the weights (every projection gets a WeightFormat; packed ones a tiled copy), which read
    memory faster than the BLAS matrix-vector kernels, and attention that stores the query (one_query_attention).
    Shapes: the batch, and the attended slots (whole blocks, up to the ring's size) as one symbol, so a generation
    compiles about twice."""
    for module, seam, _ in projections(model):
        fmt = getattr(module, seam)
        if fmt is None and on:
            setattr(module, seam, WeightFormat())
        elif type(fmt) is WeightFormat and not on:  # the fp32 format only streams: eagerly it is the plain product
            setattr(module, seam, None)
        elif fmt is not None:
            fmt.tile(on)
    model.decode_fn = M.compile_with_fallback(step_logits, "the decoding step", dynamic=None) if on else None
    return model


def ring_decodes(model: GPT) -> bool:
    """Whether generation decodes through the RingCache's one-token steps. Parts of the 2026 architecture that carry
    state from token to token (the smear gate and the bigram hash read the token before, a key offset the key
    before, paired heads cache two keys a token) decode through the KVCache instead, one prefill of one token a
    step: the same attention over the window, without the ring's compiled step."""
    arch = model.arch
    return not (arch.smear or arch.bigram_rows or arch.key_offset or arch.paired_head_layers)


def decode_step(model: GPT, ids_B: Tensor, ring: RingCache) -> Tensor:
    """Logits (B, V) after one more token per sequence: ids_B at position ring.pos, which then advances."""
    compiled = getattr(model, "decode_fn", None)
    long_mask, short_mask = ring.advance(ids_B, whole_blocks=compiled is not None)
    logits = (compiled or step_logits)(model, ids_B, long_mask, short_mask, ring)
    ring.pos += 1
    return logits


def reference_logits(model: GPT, tokens_BT: Tensor, window_blocks: int) -> Tensor:
    """Next-token logits (B, V) from a full forward of the whole context (the path the KV cache must equal)."""
    B, T = tokens_BT.shape
    pad = (-T) % BLOCK_SIZE  # padding follows the last token, so causality leaves row T-1 unchanged
    padded = torch.cat([tokens_BT, tokens_BT.new_zeros(B, pad)], dim=1)
    model.ensure_positions(T + pad)
    return model(padded, None, window_blocks)[:, T - 1]


def sample_next(logits_BV: Tensor, generator: torch.Generator, temperature: float = 0.0, top_k: int = 0,
                top_p: float = 1.0) -> Tensor:
    """One token per row: greedy at temperature 0, else sampled from the top-k and then top-p (nucleus) set."""
    logits = logits_BV.float()
    if temperature <= 0:
        return logits.argmax(dim=-1)
    logits = logits / temperature
    if 0 < top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        outside = probs.cumsum(dim=-1) - probs >= top_p  # mass before this token already reaches top_p
        outside[:, 0] = False  # the most likely token always stays (top_p -> 0 is greedy)
        sorted_logits = sorted_logits.masked_fill(outside, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    return torch.multinomial(logits.softmax(dim=-1), 1, generator=generator)[:, 0]


@torch.no_grad()
def generate(model: GPT, prompt: list[int], *, window_blocks: int, max_new_tokens: int, temperature: float = 0.0,
             top_k: int = 0, top_p: float = 1.0, seed: int = 0, num_samples: int = 1,
             stop_ids: Collection[int] = (EOT_ID,), vocab_limit: int = 50257, use_cache: bool = True,
             autocast: contextlib.AbstractContextManager | None = None) -> Iterator[list[int | None]]:
    """Stream num_samples continuations of prompt: one list per step with each sample's new token id, or None
    once that sample has produced a stop token (stop tokens are not yielded). Ends when every sample stopped
    or after max_new_tokens steps.

    use_cache=True prefills a KV cache once (shared by all samples) and then feeds one token per step;
    use_cache=False recomputes the whole context every step (the reference). Ids >= vocab_limit (padding rows,
    and chat tokens for a base model) are never sampled.
    """
    if not prompt:
        raise ValueError("generate() needs a non-empty prompt (start it with <|endoftext|>)")
    device = model.embed.weight.device
    generator = torch.Generator(device=device).manual_seed(seed)
    ctx = autocast or contextlib.nullcontext()
    prompt_BT = torch.tensor([prompt], dtype=torch.long, device=device)
    stop = torch.tensor(sorted(stop_ids), dtype=torch.long, device=device)
    model.eval()
    with ctx:
        ring_steps = use_cache and ring_decodes(model)
        if use_cache:
            model.ensure_positions(len(prompt) + max_new_tokens)
            # the prompt's keys; the ring holds the window after that, else this cache grows one token a step
            cache = KVCache(model, 1, len(prompt) + (0 if ring_steps else max_new_tokens))
            logits = prefill(model, prompt_BT, cache, window_blocks)[:, -1]
            if num_samples > 1:
                cache, logits = cache.expand(num_samples), logits.expand(num_samples, -1)
            if ring_steps:
                ring = RingCache(cache, window_blocks)
        else:
            tokens = prompt_BT.expand(num_samples, -1)
            logits = reference_logits(model, tokens, window_blocks)
    done = torch.zeros(num_samples, dtype=torch.bool, device=device)
    for step in range(max_new_tokens):
        next_ids = sample_next(logits[:, :vocab_limit], generator, temperature, top_k, top_p)
        done |= torch.isin(next_ids, stop)
        if bool(done.all()):
            return
        yield [None if d else t for d, t in zip(done.tolist(), next_ids.tolist())]
        if step == max_new_tokens - 1:
            return
        with ctx:
            if not use_cache:
                tokens = torch.cat([tokens, next_ids[:, None]], dim=1)
                logits = reference_logits(model, tokens, window_blocks)
            elif ring_steps:
                logits = decode_step(model, next_ids, ring)
            else:
                logits = prefill(model, next_ids[:, None], cache, window_blocks)[:, -1]


# -----------------------------------------------------------------------------
# Session: a checkpoint loaded to answer, prompts, streamed replies, the flags of eval.py and chat.py


class StreamDecoder:
    """Token ids to text as they arrive: bytes of a character split across tokens are held until complete."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def add(self, token_id: int) -> str:
        return self._utf8.decode(self.tokenizer.token_bytes(token_id))

    def flush(self) -> str:
        return self._utf8.decode(b"", final=True)


@dataclass
class InferenceModel:
    """A checkpoint loaded for eval.py and chat.py, with how to run it."""

    path: Path
    model: GPT
    hp: Hyperparameters
    kind: str  # "chat" (fine-tuned on the chat template) or "base"
    step: int
    tokenizer: Tokenizer
    device: torch.device
    score_dtype: torch.dtype | None  # autocast for batched scoring
    decode_dtype: torch.dtype | None  # autocast for token-by-token decoding
    weights: str = "fp32"  # the matrices' format (set_inference_weights)
    compiled: bool = False  # decoding steps through torch.compile (compile_decoding)

    @property
    def window_blocks(self) -> int:
        return M.final_window_blocks(self.hp)

    @property
    def vocab_limit(self) -> int:
        return M.CHAT_VOCAB_LIMIT if self.kind == "chat" else self.hp.vocab_size

    def autocast(self, dtype: torch.dtype | None) -> contextlib.AbstractContextManager | None:
        return torch.autocast(self.device.type, dtype=dtype) if dtype else None

    def describe(self) -> str:
        weights = "" if self.weights == "fp32" else f", {self.weights} weights"
        return f"{self.path} (step {self.step}, {self.kind} model, preset {self.hp.preset}{weights})"


def load_for_inference(spec: str = "latest", log_dir: str | Path = "logs", device: str = "auto",
                       dtype: str = "auto", prefer_chat: bool = False, weights: str = "fp32",
                       compile_decode: bool = False) -> InferenceModel:
    """'latest' (the newest chat checkpoint first when prefer_chat; model.find_latest_checkpoint says which is
    newest) or a path, on the chosen device; weights: the matrices rounded to bf16 or int8
    (set_inference_weights), or 'auto': int8 on a CPU, where it decodes faster than fp32 at the same val loss
    (docs/decoding.md), the checkpoint's fp32 elsewhere; compile_decode: compiled decoding steps."""
    if spec == "latest" and prefer_chat:
        path = M.find_latest_checkpoint(log_dir, kind="chat") or M.resolve_checkpoint("latest", log_dir)
    else:
        path = M.resolve_checkpoint(spec, log_dir)
    dev = M.detect_device(device)
    if dev.type == "cpu":
        M.keep_freed_memory()  # batched scoring allocates and frees large logits too
    model, hp, ckpt = M.load_model(path, dev)
    weights = ("int8" if dev.type == "cpu" else "fp32") if weights == "auto" else weights
    compile_decoding(set_inference_weights(model, weights), compile_decode)
    score_dtype = M.choose_autocast(dtype, dev, hp.model_dim, model.lm_head.weight.size(0)).dtype
    # batch-1 decoding is memory-bound: on CPU autocast re-casts every weight for every token, which costs more than
    # bf16 saves (docs/decoding.md)
    decode_dtype = score_dtype if dev.type != "cpu" or dtype == "bf16" else None
    return InferenceModel(path=path, model=model.eval(), hp=hp, kind="chat" if ckpt.get("kind") == "chat" else "base",
                          step=int(ckpt.get("step", 0)), tokenizer=M.get_tokenizer(), device=dev,
                          score_dtype=score_dtype, decode_dtype=decode_dtype, weights=weights,
                          compiled=compile_decode)


BASE_SPEAKERS = ("USER.", "ASSISTANT.")  # play format of the default corpus: NAME. on its own line, then the speech
BASE_STOP = "\n\n"  # a speech ends at a blank line, where the next speaker would begin


def render_prompt(tokenizer: Tokenizer, kind: str, messages: list[dict[str, str]]) -> list[int]:
    """Prompt ids for the reply to a conversation that ends with a user message: chat template v1 for chat models,
    a plain-text play-format dialogue for base models (which never saw the chat tokens)."""
    if kind == "chat":
        return M.render_conversation(tokenizer, messages, add_generation_prompt=True)[0]
    you, bot = BASE_SPEAKERS
    text = "".join(f"{m['content']}\n\n" if m["role"] == "system" else
                   f"{you if m['role'] == 'user' else bot}\n{m['content']}\n\n" for m in messages)
    return tokenizer.encode_document(f"{text}{bot}\n")


def stream_reply(im: InferenceModel, ids: list[int], *, max_new_tokens: int, temperature: float = 0.0,
                 top_k: int = 0, top_p: float = 1.0, seed: int = 0, use_cache: bool = True) -> Iterator[str]:
    """Text of the reply as it is generated. A chat model stops at <|end|>; a base model's reply ends at its first
    blank line (trailing newlines are held back until it is clear they do not end the speech)."""
    stops = (M.CHAT_SPECIAL_TOKENS["<|end|>"], EOT_ID) if im.kind == "chat" else (EOT_ID,)
    decoder = StreamDecoder(im.tokenizer)
    steps = generate(im.model, ids, window_blocks=im.window_blocks, max_new_tokens=max_new_tokens,
                     temperature=temperature, top_k=top_k, top_p=top_p, seed=seed, stop_ids=stops,
                     vocab_limit=im.vocab_limit, use_cache=use_cache, autocast=im.autocast(im.decode_dtype))
    base = im.kind == "base"
    text, shown = "", 0
    for step in steps:
        text += decoder.add(step[0])
        body = text.lstrip("\n") if base else text
        if base and BASE_STOP in body:
            yield body[shown:body.index(BASE_STOP)]
            return
        safe = len(body.rstrip("\n")) if base else len(body)
        yield body[shown:safe]
        shown = safe
    body = (text + decoder.flush()).lstrip("\n") if base else text + decoder.flush()
    yield body[shown:].rstrip("\n")


def add_inference_flags(p: argparse.ArgumentParser, default_weights: str) -> None:
    """--weights and --compile of eval.py and chat.py: how the checkpoint's matrices are held, and whether the
    decoding step is compiled (set_inference_weights, compile_decoding)."""
    auto = " (int8 on a CPU, fp32 on a GPU)" if default_weights == "auto" else ""
    p.add_argument("--weights", default=default_weights, choices=(*INFERENCE_WEIGHTS, "auto"),
                   help=f"matrices for scoring and decoding: fp32 (the checkpoint's), bf16, or int8 (one scale per "
                   f"row; decoding reads a quarter of the bytes); default {default_weights}{auto}")
    p.add_argument("--compile", default="off", choices=("on", "off"),
                   help="compile the decoding step with torch.compile (several times faster decoding on a CPU, "
                   "after a one-time compile at the first reply)")


def announce_decode_compile(im: InferenceModel) -> None:
    """Say, before the first compiled reply, what the pause is (stderr): rounded ranges of the decoding step's
    compile measured on CPUs (docs/decoding.md)."""
    if im.compiled:
        print("compiling the decoding step with torch.compile (at the first reply and once more past 128 tokens; "
              "about 15-35 s each on a CPU, seconds once inductor's cache holds it) ...", file=sys.stderr, flush=True)
