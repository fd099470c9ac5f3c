"""ModdedGPT for Hugging Face transformers: the modded-nanogpt speedrun GPT, as export.py writes it beside the weights.

    from transformers import AutoModelForCausalLM, AutoTokenizer
    model = AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)
    tokenizer = AutoTokenizer.from_pretrained(DIR, trust_remote_code=True)  # it reads config.json too

Self-contained (torch and transformers only) and equal to the training library's GPT: export.py checks the logits
of every export against the checkpoint's model before it finishes. The architecture, in the order a token meets it
(the parts marked 2026 are the 2026 record's, each on only where config.json says so):
- x0 = rms_norm(embed(token)); 2026 smear: before the norm, each token's embedding plus scale * sigmoid(W e[:12])
  times the previous token's (a sequence's first token keeps its own);
- 2026 bigram embedding: a table row picked by an int32 hash of each token and the one before (the record's
  quirks: position 0 gets the last row, position 1 hashes with that row's number, documents are not separated),
  times a fixed +-1 row with bigram_sign_rows, added to the first bigram_dim channels: before layer 0 and after
  every later attention, weighted per layer;
- value embeddings (up to 3 tables, used by the first and the last layers in the same order; 2026: one table per
  layer of value_embed_layers) are added to the attention values of those layers, weighted by per-layer lambdas;
  2026 value_embed_gates: v * lambdas[0] + 2 * sigmoid(W [x[:6], ve[:6]]) * ve per head, output * lambdas[1];
- every block first mixes x = lambdas[0] * x + lambdas[1] * x0, then (except the attention-free layer) adds
  attention over rms_norm(x) and a ReLU^2 MLP over rms_norm(x), with no biases and no learned norm scales; 2026
  residual_lambdas instead: per sublayer x = a * x + b * sublayer(...), and + c * x0 after attention;
- attention: merged QKV weight, RMS-normed queries and keys, rotary embedding on half of each head's dimensions
  (the other half carries no position), a fixed 0.12 logit scale, and a causal mask that never crosses an
  <|endoftext|> and keeps a sliding window counted in 128-token blocks (long on layers 0, 4, ... of each half, or
  2026 on long_window_layers; half as long elsewhere), exactly as the training library's block mask;
- 2026 key offset (long-window layers that are not paired): the keys' unrotated half comes from the token before;
  2026 XSA: a head's output minus tanh(alpha) times its part along the head's own value; 2026 attention gate: each
  head's output times sigmoid(W x[:12]);
- 2026 paired heads (paired_head_layers): heads h and h + H/2 share one softmax over the sequence interleaved token
  by token (2T positions, masked with the document ids repeated twice), head h of token t rotated at 2t + h % 2;
- U-net skips: the output of layer i of the first half is added, weighted, before layer L-1-i; 2026 gated skip
  instead: layer gated_skip_from's output, times sigmoid(s) * 2 * sigmoid(W x0[:12]), added at the no_attn_layer;
- 2026 backout: layers after backout_layer attend over its output, and a weighted share of it leaves the stream
  before the head;
- logits, in fp32, from z = lm_head(rms_norm(x)): 30 * sigmoid(z / (7.5 * sqrt(hidden_size))) (logit_cap "2025"),
  or 23 * sigmoid((z + 5) / 7.5) (logit_cap "2026").

Inputs must not be left-padded: the mask and the rotary positions come from the token positions, so a pad before
the text would change the model. Right padding is harmless (causal: no real token sees a later pad). A model in
generate() gets its document boundaries from the whole sequence (prepare_inputs_for_generation passes it); a
direct call with past_key_values uses the tokens the cache recorded.

Every checkpoint generates through the KV cache (past_key_values), the 2026 parts that carry state from token to
token included: the cache holds each token's keys per head as they are before a key offset or a pairing, which are
applied to the whole cached sequence at every step, and the smear gate and the bigram hash read the token before
from the context tokens. Cached steps equal one forward of the whole sequence (tested).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from huggingface_hub.dataclasses import strict
from torch import Tensor, nn
from transformers import GenerationMixin, PreTrainedConfig, PreTrainedModel
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_outputs import CausalLMOutputWithPast


@strict
class ModdedGPTConfig(PreTrainedConfig):
    """The shape of one checkpoint; written by export.py, never edited by hand."""

    model_type = "moddedgpt"
    keys_to_ignore_at_inference = ["past_key_values"]

    vocab_size: int = 50304  # GPT-2's 50257 ids padded to a multiple of 128 (the chat tokens live in the padding)
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 6
    head_dim: int = 128
    no_attn_layer: int = 7  # the block without attention; -1 = every block attends
    window_blocks: int = 13  # the sliding window the model finished training with, in blocks of block_size
    block_size: int = 128
    max_position_embeddings: int = 8192  # the row length the checkpoint is validated on (lm-eval's max_length)
    eot_token_id: int = 50256  # <|endoftext|>: starts every document
    use_cache: bool = True
    bos_token_id: int | None = 50256
    eos_token_id: int | list[int] | None = 50256
    pad_token_id: int | None = 50261  # <|pad|>, a free padding row: never a prompt's <|endoftext|>
    tie_word_embeddings: bool = False
    logit_cap: str = "2025"  # the logits' soft cap: "2025" or "2026" (see the module docstring)
    # the 2026 record's architecture (the training library's switches of the same names): each default is off
    bigram_rows: int = 0  # rows of the bigram hash table; 0 = no bigram embedding
    bigram_dim: int = 0  # the table's width, added to the stream's first channels; 0 = hidden_size
    bigram_sign_rows: int = 0  # rows of the fixed +-1 table (the buffer bigram.signs); 0 = no signs
    smear: bool = False  # the smear gate on the token embeddings
    value_embed_layers: list[int] | None = None  # the layers with their own value-embedding table; None = 2025's
    value_embed_gates: bool = False  # per-head value-embedding gates, and lambdas that scale v and the output
    residual_lambdas: bool = False  # per-sublayer residual and output lambdas and x0 after attention
    gated_skip_from: int = -1  # the layer the gated skip takes to no_attn_layer; -1 = the U-net skips
    backout_layer: int = -1  # the layer later attention reads and the head backs out; -1 = none
    long_window_layers: list[int] | None = None  # the long-window layers; None = 2025's (0, 4, ... mirrored)
    key_offset: bool = False  # the unrotated half of the keys from the token before, on long non-paired layers
    xsa_layers: list[int] | None = None  # layers with learnable XSA; None = none
    attn_gate: bool = False  # a sigmoid gate on every head's output
    paired_head_layers: list[int] | None = None  # layers with paired-head attention; None = none


def rms_norm(x: Tensor) -> Tensor:
    return F.rms_norm(x, (x.size(-1),))


GATE_INPUTS = 12  # the smear, skip and attention gates read this many channels (record #28)
VE_GATE_INPUTS = 6  # a value-embedding gate reads this many channels of x and of the embedding (record #70)
BIGRAM_MULTS = (36313, 27191)  # the bigram hash's multipliers of a token and of the one before (record #62)


def value_embed_tables(config: ModdedGPTConfig) -> list[int | None]:
    """Which value-embedding table each layer adds: 0, 1, 2 on the first layers and again on the last ones (2025),
    or table j on the j-th layer of value_embed_layers."""
    L = config.num_hidden_layers
    if config.value_embed_layers is not None:
        own = {layer: j for j, layer in enumerate(sorted(config.value_embed_layers))}
        return [own.get(i) for i in range(L)]
    k = min(3, L // 2)
    return list(range(k)) + [None] * (L - 2 * k) + list(range(k))


def long_window_layers(config: ModdedGPTConfig) -> list[bool]:
    L, half = config.num_hidden_layers, config.num_hidden_layers // 2
    if config.long_window_layers is not None:
        return [i in config.long_window_layers for i in range(L)]
    return [(i if i < half else L - 1 - i) % 4 == 0 for i in range(L)]


def add_to_channels(x: Tensor, y: Tensor) -> Tensor:
    """x with y added to its first y.size(-1) channels (the bigram table may be narrower than the stream)."""
    if y.size(-1) == x.size(-1):
        return x + y
    return torch.cat([x[..., :y.size(-1)] + y, x[..., y.size(-1):]], dim=-1)


def bigram_rows(tokens_BT: Tensor, rows: int) -> Tensor:
    """(B, T) the bigram table's row of every position of a sequence that starts at position 0: in int32, which
    wraps as the record's does, (36313 * token xor 27191 * token before) mod (rows - 1). Position 0 takes the spare
    last row, and position 1 hashes with that row's number in place of token 0, as the record computes it."""
    spare = rows - 1
    now = tokens_BT.to(torch.int32)
    before = torch.cat([now.new_full((now.size(0), 1), spare), now[:, :-1]], dim=1)
    before[:, 1:2] = spare
    out = torch.bitwise_xor(BIGRAM_MULTS[0] * now, BIGRAM_MULTS[1] * before) % spare
    out[:, 0] = spare
    return out.long()


class ModdedGPTBigram(nn.Module):
    """The bigram hash embedding: rows picked by bigram_rows, each times a fixed +-1 row (previous token xor token,
    mod the sign table's rows; row 0 at position 0) when the export has a sign table."""

    def __init__(self, config: ModdedGPTConfig):
        super().__init__()
        dim = config.bigram_dim or config.hidden_size
        self.embed = nn.Embedding(config.bigram_rows, dim)
        self.signs = nn.Buffer(torch.ones(config.bigram_sign_rows, dim)) if config.bigram_sign_rows else None

    def forward(self, tokens_BT: Tensor, start: int) -> Tensor:
        """(B, T - start, dim): positions start.. of tokens_BT, every token from position 0."""
        out = self.embed(bigram_rows(tokens_BT, self.embed.num_embeddings)[:, start:])
        if self.signs is not None:
            before = torch.cat([tokens_BT[:, :1], tokens_BT[:, :-1]], dim=1)
            sign_row = torch.bitwise_xor(before, tokens_BT) % self.signs.size(0)
            sign_row[:, 0] = 0
            out = out * self.signs[sign_row[:, start:]].type_as(out)
        return out


class ModdedGPTSmear(nn.Module):
    def __init__(self):
        super().__init__()
        self.gate = nn.Linear(GATE_INPUTS, 1, bias=False)
        self.scale = nn.Parameter(torch.empty(1))

    def forward(self, e_BTD: Tensor, before_BD: Tensor | None) -> Tensor:
        """The embeddings e plus their gated predecessors; before_BD: the embedding of the token before e's first
        (None: e starts the sequence, and its first token keeps its own)."""
        gate = self.scale * torch.sigmoid(self.gate(e_BTD[..., :GATE_INPUTS]))
        if before_BD is None:
            return torch.cat([e_BTD[:, :1], e_BTD[:, 1:] + gate[:, 1:] * e_BTD[:, :-1]], dim=1)
        return e_BTD + gate * torch.cat([before_BD[:, None], e_BTD[:, :-1]], dim=1)


class ModdedGPTGatedSkip(nn.Module):
    def __init__(self):
        super().__init__()
        self.gate = nn.Linear(GATE_INPUTS, 1, bias=False)
        self.scale = nn.Parameter(torch.empty(1))

    def forward(self, x0: Tensor) -> Tensor:
        """(B, T, 1) the weight of the skipped layer's output, from the normed embedding."""
        return torch.sigmoid(self.scale) * 2 * torch.sigmoid(self.gate(x0[..., :GATE_INPUTS]))


def kept_blocks(docs_BT: Tensor, window_blocks: int, block_size: int) -> Tensor:
    """(B, NB, NB): the key blocks each query block attends to. A block pair is "full" when both blocks lie in one
    document with the key block strictly earlier, "partial" when they share a document otherwise; a query block keeps
    its window_blocks - 1 most recent full blocks and max(window_blocks - number of full blocks, 1) most recent
    partial ones (the diagonal is always the most recent partial block)."""
    B, T = docs_BT.shape
    NB = T // block_size
    blk = torch.arange(NB, device=docs_BT.device)
    first = docs_BT.view(B, NB, block_size)[:, :, 0]
    last = docs_BT.view(B, NB, block_size)[:, :, -1]
    overlap = (first[:, :, None] <= last[:, None, :]) & (last[:, :, None] >= first[:, None, :])
    same = (first[:, :, None] == last[:, None, :]) & (last[:, :, None] == first[:, None, :])
    full = (blk[:, None] > blk[None, :]) & same
    partial = (blk[:, None] >= blk[None, :]) & overlap & ~full
    n_full = full.sum(-1, keepdim=True)
    full_rank = full.flip(-1).cumsum(-1).flip(-1)  # 1 = the most recent full block of the row
    partial_rank = partial.flip(-1).cumsum(-1).flip(-1)
    return (full & (full_rank <= window_blocks - 1)) | \
        (partial & (partial_rank <= torch.clamp(window_blocks - n_full, min=1)))


def attention_rows(docs_BT: Tensor, q_start: int, window_blocks: int, block_size: int) -> Tensor:
    """Boolean (B, 1, T - q_start, T) mask of queries q_start.. over keys 0..T-1 of a sequence with these
    document ids. Blocks are counted from position 0, and the sequence is extended to whole blocks with its last
    document, which is what the training library sees when it pads with a token other than <|endoftext|>."""
    B, T = docs_BT.shape
    pad = (-T) % block_size
    padded = torch.cat([docs_BT, docs_BT[:, -1:].expand(B, pad)], dim=1)
    blocks = kept_blocks(padded, window_blocks, block_size)
    q = torch.arange(q_start, T, device=docs_BT.device)
    k = torch.arange(T, device=docs_BT.device)
    mask = blocks[:, q // block_size][:, :, k // block_size] & (k[None, :] <= q[:, None])[None]
    return (mask & (docs_BT[:, q, None] == docs_BT[:, None, :]))[:, None]


def rotary_table(positions_TH: Tensor, head_dim: int) -> tuple[Tensor, Tensor]:
    """cos and sin (T, H or 1, head_dim / 2) at these positions: a quarter of the frequencies span 1 .. 1/1024, the
    rest are 0 (the channels no position reaches: still_channels)."""
    freqs = (1 / 1024) ** torch.linspace(0, 1, steps=head_dim // 4, dtype=torch.float32, device=positions_TH.device)
    freqs = torch.cat([freqs, freqs.new_zeros(head_dim // 4)])
    theta = positions_TH.float()[..., None] * freqs
    return theta.cos(), theta.sin()


def still_channels(head_dim: int, device: torch.device) -> Tensor:
    """(head_dim,) True on the channels rotary_table's zero frequencies leave where they are."""
    return torch.arange(head_dim, device=device) % (head_dim // 2) >= head_dim // 4


def rotate(x_BTHD: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    x1, x2 = x_BTHD.float().chunk(2, dim=-1)
    cos, sin = cos[None], sin[None]
    return torch.cat((x1 * cos + x2 * sin, x2 * cos - x1 * sin), dim=-1).type_as(x_BTHD)


def shift_still_keys(k_BHSD: Tensor) -> Tensor:
    """The key offset: every key's unrotated channels from the position before (the first position keeps its own),
    so a query that matches a token finds the one after it. Documents are not separated, as in the record (a
    document's first key takes the last of the previous one, which none of its queries sees)."""
    before = torch.cat([k_BHSD[:, :, :1], k_BHSD[:, :, :-1]], dim=2)
    return torch.where(still_channels(k_BHSD.size(-1), k_BHSD.device), before, k_BHSD)


def pair_heads(x_BHTD: Tensor) -> Tensor:
    """(B, H, T, D) -> (B, H/2, 2T, D): position 2t holds heads 0..H/2-1 of token t, 2t+1 heads H/2..H-1."""
    B, H, T, D = x_BHTD.shape
    return x_BHTD.transpose(1, 2).reshape(B, 2 * T, H // 2, D).transpose(1, 2)


def xsa(y_BTHD: Tensor, v_BTHD: Tensor, alpha_H: Tensor) -> Tensor:
    """Each head's output minus tanh(alpha) times its component along the head's own value at that position."""
    along = (y_BTHD * v_BTHD).sum(-1, keepdim=True) / v_BTHD.square().sum(-1, keepdim=True).clamp_min(1e-8)
    return y_BTHD - torch.tanh(alpha_H).type_as(y_BTHD)[:, None] * along * v_BTHD


class ModdedGPTAttention(nn.Module):
    def __init__(self, config: ModdedGPTConfig, layer: int, cache_index: int):
        super().__init__()
        self.num_heads, self.head_dim = config.num_attention_heads, config.head_dim
        hdim = self.num_heads * self.head_dim
        self.qkv_w = nn.Parameter(torch.empty(3, hdim, config.hidden_size))
        self.lambdas = nn.Parameter(torch.empty(2))  # 2025: the mix of v and ve; value_embed_gates: v and out scales
        self.c_proj = nn.Linear(hdim, config.hidden_size, bias=False)
        self.cache_index = cache_index  # this layer's slot in the cache (attention layers only, in order)
        self.scales = config.value_embed_gates
        self.paired = layer in (config.paired_head_layers or ())
        self.key_offset = config.key_offset and long_window_layers(config)[layer] and not self.paired
        H, gated_ve = self.num_heads, config.value_embed_gates and value_embed_tables(config)[layer] is not None
        self.ve_gate = nn.Parameter(torch.empty(H, 2 * VE_GATE_INPUTS)) if gated_ve else None
        self.xsa_alpha = nn.Parameter(torch.empty(H)) if layer in (config.xsa_layers or ()) else None
        self.gate = nn.Parameter(torch.empty(H, GATE_INPUTS)) if config.attn_gate else None

    def values(self, x: Tensor, v: Tensor, ve: Tensor | None) -> Tensor:
        """(B, T, H, D): the values with the value embedding (B, T, H*D) mixed in, if the layer has one."""
        if not self.scales:
            return self.lambdas[0] * v + (self.lambdas[1] * ve.view_as(v) if ve is not None else 0)
        v = self.lambdas[0] * v
        if ve is None:
            return v
        if self.ve_gate is None:
            return v + ve.view_as(v)
        gate_in = torch.cat([x[..., :VE_GATE_INPUTS], ve[..., :VE_GATE_INPUTS].type_as(x)], dim=-1)
        return v + 2 * torch.sigmoid(F.linear(gate_in, self.ve_gate.type_as(x)))[..., None] * ve.view_as(v)

    def forward(self, x: Tensor, ve: Tensor | None, mask: Tensor, rotary: tuple[Tensor, Tensor],
                cache: Cache | None) -> Tensor:
        B, T = x.size(0), x.size(1)
        qkv = F.linear(x, self.qkv_w.flatten(end_dim=1).type_as(x))
        q, k, v = qkv.view(B, T, 3 * self.num_heads, self.head_dim).chunk(3, dim=-2)
        q, k = rotate(rms_norm(q), *rotary), rotate(rms_norm(k), *rotary)
        v_BTHD = v = self.values(x, v, ve)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2).type_as(q)
        if cache is not None:  # one key per token and head, before the offset and the pairing: (B, H, S, D)
            k, v = cache.update(k, v, self.cache_index)
        if self.key_offset:
            k = shift_still_keys(k)
        if self.paired:
            q, k, v = pair_heads(q), pair_heads(k), pair_heads(v)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=0.12)
        y = y.transpose(1, 2).reshape(B, T, self.num_heads, self.head_dim)  # a paired layer's 2T rows back to heads
        if self.xsa_alpha is not None:
            y = xsa(y, v_BTHD.type_as(y), self.xsa_alpha)
        if self.gate is not None:
            y = y * torch.sigmoid(F.linear(x[..., :GATE_INPUTS], self.gate.type_as(x)))[..., None].type_as(y)
        y = y.reshape(B, T, -1)
        return self.c_proj(self.lambdas[1] * y if self.scales else y)


class ModdedGPTMLP(nn.Module):
    def __init__(self, config: ModdedGPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.hidden_size, 4 * config.hidden_size, bias=False)
        self.c_proj = nn.Linear(4 * config.hidden_size, config.hidden_size, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.c_proj(F.relu(self.c_fc(x)).square())


class ModdedGPTBlock(nn.Module):
    def __init__(self, config: ModdedGPTConfig, layer: int, cache_index: int | None):
        super().__init__()
        self.attn = ModdedGPTAttention(config, layer, cache_index) if cache_index is not None else None
        self.mlp = ModdedGPTMLP(config)
        self.residual_lambdas = config.residual_lambdas
        if config.residual_lambdas:  # per sublayer (attention, MLP): the stream's scale and the sublayer's
            self.resid_lambdas = nn.Parameter(torch.empty(2))
            self.post_lambdas = nn.Parameter(torch.empty(2))
            if self.attn is not None:
                self.x0_lambda = nn.Parameter(torch.empty(1))
        else:
            self.lambdas = nn.Parameter(torch.empty(2))
        if config.bigram_rows and (layer == 0 or self.attn is not None):  # layer 0's share goes in before layer 0
            self.bigram_lambda = nn.Parameter(torch.empty(1))

    def forward(self, x: Tensor, ve: Tensor | None, x0: Tensor, mask: Tensor, rotary: tuple[Tensor, Tensor],
                cache: Cache | None, attn_in: Tensor | None = None, skip: Tensor | None = None,
                bigram: Tensor | None = None) -> Tensor:
        """attn_in: what the attention reads instead of x (the backout layer's output); skip: the gated skip, added
        where an attention-free layer's attention would be; bigram: the bigram embedding, added after attention."""
        if not self.residual_lambdas:
            x = self.lambdas[0] * x + self.lambdas[1] * x0
        if self.attn is not None:
            y = self.attn(rms_norm(x if attn_in is None else attn_in), ve, mask, rotary, cache)
            if self.residual_lambdas:
                x = self.resid_lambdas[0] * x + self.post_lambdas[0] * y + self.x0_lambda * x0
            else:
                x = x + y
            if bigram is not None:
                x = add_to_channels(x, self.bigram_lambda * bigram)
        elif skip is not None:
            x = x + skip
        if self.residual_lambdas:
            return self.resid_lambdas[1] * x + self.post_lambdas[1] * self.mlp(rms_norm(x))
        return x + self.mlp(rms_norm(x))


class ModdedGPTForCausalLM(PreTrainedModel, GenerationMixin):
    config_class = ModdedGPTConfig
    base_model_prefix = "moddedgpt"
    _no_split_modules = ["ModdedGPTBlock"]
    _supports_sdpa = True

    def __init__(self, config: ModdedGPTConfig):
        super().__init__(config)
        if config.logit_cap not in ("2025", "2026"):
            raise ValueError(f"logit_cap {config.logit_cap!r} is not one this file implements (2025, 2026)")
        L, V, dim = config.num_hidden_layers, config.vocab_size, config.hidden_size
        tables = value_embed_tables(config)
        self.embed = nn.Embedding(V, dim)
        self.value_embeds = nn.ModuleList(nn.Embedding(V, dim) for _ in range(max((i for i in tables if i is not None),
                                                                                    default=-1) + 1))
        attends = [i != config.no_attn_layer for i in range(L)]
        slots = [sum(attends[:i]) if attends[i] else None for i in range(L)]
        self.blocks = nn.ModuleList(ModdedGPTBlock(config, i, slots[i]) for i in range(L))
        self.lm_head = nn.Linear(dim, V, bias=False)
        if config.gated_skip_from < 0:
            self.skip_weights = nn.Parameter(torch.ones(L // 2))
        self.skip = ModdedGPTGatedSkip() if config.gated_skip_from >= 0 else None
        self.smear = ModdedGPTSmear() if config.smear else None
        self.bigram = ModdedGPTBigram(config) if config.bigram_rows else None
        self.backout_lambda = nn.Parameter(torch.empty(1)) if config.backout_layer >= 0 else None
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        """Only for weights a directory lacks (an export holds all of them): small random values."""
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)

    def get_input_embeddings(self) -> nn.Module:
        return self.embed

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.embed = value

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head

    def _context(self, input_ids: Tensor, past: int, cache: Cache | None, context_ids: Tensor | None) -> Tensor:
        """All tokens up to the last new one: the document boundaries of the mask depend on the earlier ones."""
        if past == 0:
            return input_ids
        earlier = context_ids if context_ids is not None else getattr(cache, "moddedgpt_tokens", None)
        if earlier is None or earlier.size(1) < past:
            raise ValueError("ModdedGPT needs the cached tokens: pass context_ids (every token so far) with "
                             "past_key_values, or a cache this model filled")
        return torch.cat([earlier[:, :past].to(input_ids.device), input_ids], dim=1)

    @staticmethod
    def _check_padding(attention_mask: Tensor | None, past: int) -> None:
        if attention_mask is None or attention_mask.ndim != 2 or bool(attention_mask.all()):
            return
        m = attention_mask.bool()
        if past == 0 and bool((m[:, 1:] <= m[:, :-1]).all()):
            return  # right padding: no real token attends to a later pad
        raise ValueError("ModdedGPT does not take left-padded or gapped batches (its attention mask and positions "
                         "come from token positions): pad on the right for scoring, and generate prompts of equal "
                         "length together or one at a time")

    def _masks_and_rotaries(self, tokens: Tensor, past: int) -> tuple[list[Tensor], list[tuple[Tensor, Tensor]]]:
        """Every layer's attention mask and rotary table for the tokens after the first `past` of `tokens`. A paired
        layer's are over the interleaved sequence: the document ids repeated twice, head h of token t at 2t + h % 2
        (the record rotates adjacent heads 2j, 2j + 1 for the two slots of a token, whatever slot they take)."""
        cfg = self.config
        docs = (tokens == cfg.eot_token_id).cumsum(dim=1)
        windows = {True: cfg.window_blocks, False: cfg.window_blocks // 2}  # long and short, in blocks
        plain = {is_long: attention_rows(docs, past, w, cfg.block_size) for is_long, w in windows.items()}
        t = torch.arange(past, tokens.size(1), device=tokens.device)
        rotary = rotary_table(t[:, None], cfg.head_dim)
        paired_layers = set(cfg.paired_head_layers or ())
        paired, paired_rotary = plain, rotary
        if paired_layers:
            twice = docs.repeat_interleave(2, dim=1)
            paired = {is_long: attention_rows(twice, 2 * past, w, cfg.block_size) for is_long, w in windows.items()}
            heads = torch.arange(cfg.num_attention_heads, device=tokens.device)
            paired_rotary = rotary_table(2 * t[:, None] + heads % 2, cfg.head_dim)
        longs = long_window_layers(cfg)
        masks = [(paired if i in paired_layers else plain)[longs[i]] for i in range(cfg.num_hidden_layers)]
        rotaries = [paired_rotary if i in paired_layers else rotary for i in range(cfg.num_hidden_layers)]
        return masks, rotaries

    def _embeddings(self, input_ids: Tensor, tokens: Tensor, past: int) -> tuple[Tensor, Tensor, Tensor | None]:
        """x, x0 and the bigram embedding (None without one) of the new tokens; the smear gate and the bigram
        read the token before each, from the context."""
        e = self.embed(input_ids)
        if self.smear is not None:
            e = self.smear(e, self.embed(tokens[:, past - 1]) if past else None)
        x = x0 = rms_norm(e)
        bigram = None
        if self.bigram is not None:
            bigram = self.bigram(tokens, past)
            x = add_to_channels(x, self.blocks[0].bigram_lambda * bigram)
        return x, x0, bigram

    def forward(self, input_ids: Tensor | None = None, attention_mask: Tensor | None = None,
                past_key_values: Cache | None = None, labels: Tensor | None = None, use_cache: bool | None = None,
                logits_to_keep: int = 0, context_ids: Tensor | None = None, inputs_embeds: Tensor | None = None,
                **kwargs) -> CausalLMOutputWithPast:
        if input_ids is None or inputs_embeds is not None:
            raise ValueError("ModdedGPT needs input_ids: its attention mask comes from the <|endoftext|> positions")
        cfg = self.config
        use_cache = cfg.use_cache if use_cache is None else use_cache
        if use_cache and past_key_values is None:
            past_key_values = DynamicCache()
        past = past_key_values.get_seq_length() if past_key_values is not None else 0
        self._check_padding(attention_mask, past)
        tokens = self._context(input_ids, past, past_key_values, context_ids)
        masks, rotaries = self._masks_and_rotaries(tokens, past)
        cache = past_key_values  # a passed cache is read and extended; use_cache only decides whether one is returned
        x, x0, bigram = self._embeddings(input_ids, tokens, past)
        value_embeds = [ve(input_ids) for ve in self.value_embeds]
        ves = [value_embeds[i] if i is not None else None for i in value_embed_tables(cfg)]
        skip_gate = self.skip(x0) if self.skip is not None else None
        skips, saved, half, back = [], {}, cfg.num_hidden_layers // 2, cfg.backout_layer
        for i, block in enumerate(self.blocks):
            if self.skip is None and i >= half:
                x = x + self.skip_weights[i - half] * skips.pop()
            skip = skip_gate * saved[cfg.gated_skip_from] if self.skip is not None and i == cfg.no_attn_layer else None
            x = block(x, ves[i], x0, masks[i], rotaries[i], cache, attn_in=saved[back] if 0 <= back < i else None,
                      skip=skip, bigram=bigram if i else None)
            if self.skip is None and i < half:
                skips.append(x)
            if i in (back, cfg.gated_skip_from):
                saved[i] = x
        if back >= 0:
            x = x - self.backout_lambda * saved[back]
        x = rms_norm(x)
        if logits_to_keep:
            x = x[:, -logits_to_keep:]
        z = self.lm_head(x).float()
        if cfg.logit_cap == "2026":
            logits = 23 * torch.sigmoid((z + 5) / 7.5)
        else:
            logits = 30 * torch.sigmoid(z / (7.5 * cfg.hidden_size**0.5))
        loss = None
        if labels is not None:
            shifted = labels[:, 1:].to(logits.device)
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)), shifted.reshape(-1),
                                   ignore_index=-100)
        if cache is not None:
            cache.moddedgpt_tokens = tokens
        return CausalLMOutputWithPast(loss=loss, logits=logits, past_key_values=cache if use_cache else None)

    def prepare_inputs_for_generation(self, input_ids: Tensor, **kwargs) -> dict:
        inputs = super().prepare_inputs_for_generation(input_ids, **kwargs)
        inputs["context_ids"] = input_ids  # the whole sequence, beams reordered: the mask needs its documents
        return inputs


__all__ = ["ModdedGPTConfig", "ModdedGPTForCausalLM"]
