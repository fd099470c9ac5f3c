"""ModdedGPT for Hugging Face transformers: the modded-nanogpt speedrun GPT, as export.py writes it beside the weights.

    from transformers import AutoModelForCausalLM, AutoTokenizer
    model = AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)
    tokenizer = AutoTokenizer.from_pretrained(DIR, trust_remote_code=True)  # it reads config.json too

Self-contained (torch and transformers only) and equal to the training library's GPT: export.py checks the logits
of every export against the checkpoint's model before it finishes. The architecture, in the order a token meets it:
- x0 = rms_norm(embed(token)); value embeddings (up to 3 tables, used by the first and the last layers in the
  same order) are added to the attention values of those layers, weighted by per-layer lambdas;
- every block first mixes x = lambdas[0] * x + lambdas[1] * x0, then (except the attention-free layer) adds
  attention over rms_norm(x) and a ReLU^2 MLP over rms_norm(x), with no biases and no learned norm scales;
- attention: merged QKV weight, RMS-normed queries and keys, rotary embedding on half of each head's dimensions
  (the other half carries no position), a fixed 0.12 logit scale, and a causal mask that never crosses an
  <|endoftext|> and keeps a sliding window counted in 128-token blocks (long on layers 0, 4, ... of each half,
  half as long elsewhere), exactly as the training library's block mask;
- U-net skips: the output of layer i of the first half is added, weighted, before layer L-1-i;
- logits, in fp32, from z = lm_head(rms_norm(x)): 30 * sigmoid(z / (7.5 * sqrt(hidden_size))) (logit_cap "2025"),
  or 23 * sigmoid((z + 5) / 7.5) (logit_cap "2026").

Inputs must not be left-padded: the mask and the rotary positions come from the token positions, so a pad before
the text would change the model. Right padding is harmless (causal: no real token sees a later pad). A model in
generate() gets its document boundaries from the whole sequence (prepare_inputs_for_generation passes it); a
direct call with past_key_values uses the tokens the cache recorded.
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


def rms_norm(x: Tensor) -> Tensor:
    return F.rms_norm(x, (x.size(-1),))


def value_embed_layout(num_layers: int) -> list[int | None]:
    """Which value embedding each layer adds: 0, 1, 2 on the first layers and again on the last ones."""
    k = min(3, num_layers // 2)
    return list(range(k)) + [None] * (num_layers - 2 * k) + list(range(k))


def long_window_layers(num_layers: int) -> list[bool]:
    half = num_layers // 2
    return [(i if i < half else num_layers - 1 - i) % 4 == 0 for i in range(num_layers)]


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


def rotary_table(start: int, end: int, head_dim: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """cos and sin (end - start, head_dim / 2): a quarter of the frequencies span 1 .. 1/1024, the rest are 0."""
    freqs = (1 / 1024) ** torch.linspace(0, 1, steps=head_dim // 4, dtype=torch.float32, device=device)
    freqs = torch.cat([freqs, freqs.new_zeros(head_dim // 4)])
    theta = torch.outer(torch.arange(start, end, dtype=torch.float32, device=device), freqs)
    return theta.cos(), theta.sin()


def rotate(x_BTHD: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    x1, x2 = x_BTHD.float().chunk(2, dim=-1)
    cos, sin = cos[None, :, None, :], sin[None, :, None, :]
    return torch.cat((x1 * cos + x2 * sin, x2 * cos - x1 * sin), dim=-1).type_as(x_BTHD)


class ModdedGPTAttention(nn.Module):
    def __init__(self, config: ModdedGPTConfig, cache_index: int):
        super().__init__()
        self.num_heads, self.head_dim = config.num_attention_heads, config.head_dim
        hdim = self.num_heads * self.head_dim
        self.qkv_w = nn.Parameter(torch.empty(3, hdim, config.hidden_size))
        self.lambdas = nn.Parameter(torch.empty(2))
        self.c_proj = nn.Linear(hdim, config.hidden_size, bias=False)
        self.cache_index = cache_index  # this layer's slot in the cache (attention layers only, in order)

    def forward(self, x: Tensor, ve: Tensor | None, mask: Tensor, rotary: tuple[Tensor, Tensor],
                cache: Cache | None) -> Tensor:
        B, T = x.size(0), x.size(1)
        qkv = F.linear(x, self.qkv_w.flatten(end_dim=1).type_as(x))
        q, k, v = qkv.view(B, T, 3 * self.num_heads, self.head_dim).chunk(3, dim=-2)
        q, k = rotate(rms_norm(q), *rotary), rotate(rms_norm(k), *rotary)
        v = self.lambdas[0] * v + (self.lambdas[1] * ve.view_as(v) if ve is not None else 0)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2).type_as(q)
        if cache is not None:
            k, v = cache.update(k, v, self.cache_index)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=0.12)
        return self.c_proj(y.transpose(1, 2).contiguous().view(B, T, -1))


class ModdedGPTMLP(nn.Module):
    def __init__(self, config: ModdedGPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.hidden_size, 4 * config.hidden_size, bias=False)
        self.c_proj = nn.Linear(4 * config.hidden_size, config.hidden_size, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.c_proj(F.relu(self.c_fc(x)).square())


class ModdedGPTBlock(nn.Module):
    def __init__(self, config: ModdedGPTConfig, cache_index: int | None):
        super().__init__()
        self.attn = ModdedGPTAttention(config, cache_index) if cache_index is not None else None
        self.mlp = ModdedGPTMLP(config)
        self.lambdas = nn.Parameter(torch.empty(2))

    def forward(self, x: Tensor, ve: Tensor | None, x0: Tensor, mask: Tensor, rotary: tuple[Tensor, Tensor],
                cache: Cache | None) -> Tensor:
        x = self.lambdas[0] * x + self.lambdas[1] * x0
        if self.attn is not None:
            x = x + self.attn(rms_norm(x), ve, mask, rotary, cache)
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
        layout = value_embed_layout(L)
        self.embed = nn.Embedding(V, dim)
        self.value_embeds = nn.ModuleList(nn.Embedding(V, dim) for _ in range(max((i for i in layout if i is not None),
                                                                                    default=-1) + 1))
        attends = [i != config.no_attn_layer for i in range(L)]
        slots = [sum(attends[:i]) if attends[i] else None for i in range(L)]
        self.blocks = nn.ModuleList(ModdedGPTBlock(config, slots[i]) for i in range(L))
        self.lm_head = nn.Linear(dim, V, bias=False)
        self.skip_weights = nn.Parameter(torch.ones(L // 2))
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
        docs = (tokens == cfg.eot_token_id).cumsum(dim=1)
        long_mask = attention_rows(docs, past, cfg.window_blocks, cfg.block_size)
        short_mask = attention_rows(docs, past, cfg.window_blocks // 2, cfg.block_size)
        L = cfg.num_hidden_layers
        masks = [long_mask if is_long else short_mask for is_long in long_window_layers(L)]
        rotary = rotary_table(past, past + input_ids.size(1), cfg.head_dim, input_ids.device)
        cache = past_key_values  # a passed cache is read and extended; use_cache only decides whether one is returned

        value_embeds = [ve(input_ids) for ve in self.value_embeds]
        ves = [value_embeds[i] if i is not None else None for i in value_embed_layout(L)]
        x = x0 = rms_norm(self.embed(input_ids))
        skips, half = [], L // 2
        for i, block in enumerate(self.blocks):
            if i >= half:
                x = x + self.skip_weights[i - half] * skips.pop()
            x = block(x, ves[i], x0, masks[i], rotary, cache)
            if i < half:
                skips.append(x)
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
