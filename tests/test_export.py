"""export.py and the model it writes (hf/modeling_moddedgpt.py), used the way a Hugging Face user uses them.

Every checkpoint is exported once, by `python export.py --checkpoint C --out D` in a subprocess (several at once), and
loaded back in-process with transformers (CPU, fp32):
- logits equal ours to 1e-5 (pretraining.py's base checkpoint, finetune.py's chat checkpoint, random weights where
  attention and MLPs matter, and a record-script checkpoint with 128-wide heads and an attention-free layer), on
  batches with <|endoftext|> mid-block and at block edges, lengths that are and are not whole 128-token blocks, and
  sequences longer than the sliding window;
- the KV cache (chunked feeding, with the cache's own tokens or with context_ids) equals one full forward;
- greedy generate() gives the tokens model.generate gives (64 tokens from a model that never stops, base and chat),
  and generation_config suppresses exactly the ids we never sample;
- the tokenizer equals ours on corpus text and awkward strings, special-token spellings behave as the export's
  README says, and the chat template equals render_conversation (ids and assistant mask);
- pipeline("text-generation") runs; --dtype bf16 halves the weights and stays close; refusals exit 2 with one line
  and leave nothing behind; --overwrite replaces an export with a working one;
- the 2026 architecture: a checkpoint with every switch on (every zero-initialised part given random values)
  exports through export.py's own check, and its logits, KV-cache chunks and greedy generate() equal ours; each
  switch alone does the same in-process.

sanitize_control_tokens keeps every spelled control token plain text; right around a spelling in the middle of text
its ids can differ from ours (transformers encodes each side apart), which docs/export.md says.

    python -m pytest tests/test_export.py -q -p no:xdist -o addopts=-ra   # pytest.ini's -n 2 needs xdist
    # ~2.5 min of CPU (six exports and the pretraining/finetune fixtures are 2/3 of it): ~2 min wall on 2 idle
    # cores, ~5 min on 2 cores shared with other work
"""
from __future__ import annotations

import builtins
import io
import json
import os
import shutil
import subprocess
import sys
import time
from contextlib import redirect_stdout
from pathlib import Path
from typing import Any
from unittest import mock

import pytest
import torch
from torch import Tensor

from conftest import REPO_DIR, never_stopping_model, random_tokens, randomize_zero_inits, tiny_hparams, \
    write_checkpoint

import inference as I
import model as M

# one xdist worker for the whole file (pytest.ini: --dist loadgroup): a session fixture is made once per worker,
# and the exports fixture is minutes of CPU
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("export")]

PADDED_VOCAB = 50304
END_ID = M.CHAT_SPECIAL_TOKENS["<|end|>"]
PAD_ID = 50261  # <|pad|>: the export's pad token, in the first free padding row
ERR = "export.py: error: "
EXPECTED_FILES = {"config.json", "model.safetensors", "modeling_moddedgpt.py", "tokenizer.json",
                  "tokenizer_config.json", "generation_config.json", "README.md"}
MAX_RUNNING = 2  # exports at once: more starve the other xdist worker's timing-sensitive tests (pexpect)


# -----------------------------------------------------------------------------
# Running export.py


def export_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("NANOGPT_")}
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    return env


def export_cmd(ckpt: Path | str, out: Path | str, *extra: str) -> list[str]:
    return [sys.executable, "export.py", "--checkpoint", str(ckpt), "--out", str(out), *extra]


def run_export(ckpt: Path | str, out: Path | str, *extra: str) -> subprocess.CompletedProcess:
    """export.py as a user runs it (stdin closed: nothing may wait for an answer)."""
    return subprocess.run(export_cmd(ckpt, out, *extra), cwd=REPO_DIR, stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, env=export_env(), timeout=600)


class Job:
    """One export.py running in the background, its output in files (no pipe can fill up)."""

    def __init__(self, logs: Path, name: str, ckpt: Path, out: Path, *extra: str, nice: int = 0):
        self.name, self.out = name, out
        self.stdout_path, self.stderr_path = logs / f"{name}.out", logs / f"{name}.err"
        with open(self.stdout_path, "w") as o, open(self.stderr_path, "w") as e:
            self.proc = subprocess.Popen(export_cmd(ckpt, out, *extra), cwd=REPO_DIR, stdin=subprocess.DEVNULL,
                                         stdout=o, stderr=e, text=True, env=export_env(),
                                         preexec_fn=(lambda: os.nice(nice)) if nice else None)

    def wait(self) -> "Job":
        self.proc.wait(timeout=600)
        self.stdout, self.stderr = self.stdout_path.read_text(), self.stderr_path.read_text()
        assert self.proc.returncode == 0, f"export {self.name} failed:\n{self.stderr}"
        last = self.stdout.strip().splitlines()[-1]
        # the JSON line (stdout holds nothing else: test_nothing_prompts)
        self.result = json.loads(last)
        return self


def record_checkpoint(path: Path) -> tuple[Path, dict[str, Tensor]]:
    """A record-script (train_gpt.py upstream) checkpoint: step, code, model, optimizers only; `_orig_mod.` keys,
    bf16 embeddings with 50257 rows; 4 layers, layer 1 without attention, one 128-wide head (infer_hparams assumes
    head_dim 128)."""
    torch.manual_seed(3)
    model = randomize_zero_inits(M.GPT(50257, 4, 1, 128, 128, 256, no_attn_layer=1), seed=3, head_std=0.5)
    sd = {}
    for key, value in model.state_dict().items():
        if key == "embed.weight" or key.startswith("value_embeds."):
            value = value[:50257].bfloat16()
        sd["_orig_mod." + key] = value.clone()
    torch.save({"step": 1770, "code": "# train_gpt.py source", "model": sd, "optimizers": []}, path)
    return path, sd


# Every 2026 architecture switch on (issue 27), on 4 layers with an attention-free one. 4 heads, so that the paired
# layer's rotation quirk shows (with 2 heads, head h % 2 is also the slot pair_heads gives it).
EVERY_SWITCH = dict(num_layers=4, num_heads=4, head_dim=16, model_dim=64, no_attn_layer=2, bigram_rows=97,
                    bigram_dim=48, bigram_sign_rows=16, bigram_update="rows", smear=True, value_embed_layers="1,3",
                    value_embed_gates=True, residual_lambdas=True, skip_topology="gated", gated_skip_from=0,
                    backout_layer=1, long_window_layers="1,3", key_offset=True, xsa_layers="1", attn_gate=True,
                    paired_head_layers="0")
SWITCH_BASE = dict(num_layers=4, num_heads=2, head_dim=32, model_dim=64, no_attn_layer=2)


def every_part_active(hp: M.Hyperparameters, seed: int = 4) -> M.GPT:
    """Random weights where every part matters: the zero-initialised ones (lm_head, c_proj, the bigram table, gates,
    x0 and smear scales, XSA alphas) made non-zero and the small ones (lambdas, scales) moved off their inits, so a
    lambda read in the wrong place or a gate left out changes the logits."""
    torch.manual_seed(seed)
    model = randomize_zero_inits(M.GPT.from_hparams(hp), seed=seed)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.numel() < 1000 or not p.any():
                p.add_(torch.randn(p.shape, generator=gen) * 0.5)
    return model.eval()


@pytest.fixture(scope="session")
def exports(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest, tok: M.Tokenizer) -> dict:
    """Every export this file checks, made once and in parallel: name -> Job (out dir, stdout, stderr, JSON)."""
    root, work = tmp_path_factory.mktemp("exports"), tmp_path_factory.mktemp("export_inputs")
    hp = tiny_hparams()
    ns = never_stopping_model(hp, tok)  # random weights (attention and MLPs matter) that never emit a stop token
    ckpts = dict(ns_base=write_checkpoint(work / "logs", "ns", 6, ns, hp),
                 ns_chat=write_checkpoint(work / "logs", "ns_sft", 5, ns, hp, kind="chat"),
                 record=record_checkpoint(work / "state_step001770.pt")[0],
                 ns_2026=write_checkpoint(work / "logs", "ns2026", 6, ns, tiny_hparams(logit_cap="2026")),
                 arch_2026=write_checkpoint(work / "logs", "arch2026", 6,
                                            every_part_active(tiny_hparams(**EVERY_SWITCH)),
                                            tiny_hparams(**EVERY_SWITCH)))
    jobs: dict[str, Job] = {}

    def start(name: str, ckpt: Path, *extra: str, out: Path | None = None, nice: int = 10) -> None:
        """nice: the exports off the critical path (pretraining.py -> finetune.py -> export) yield the CPU to it."""
        while sum(j.proc.poll() is None for j in jobs.values()) >= MAX_RUNNING:
            time.sleep(0.2)
        jobs[name] = Job(work, name, ckpt, out or root / name, *extra, nice=nice)

    # verify (export.py's own check, ~5 s of CPU each) runs on the base, the chat, the bf16 and the 2026-architecture
    # export; the tests below check the logits of the others more thoroughly than it would
    start("ns_base", ckpts["ns_base"], "--no-verify")
    start("bf16", ckpts["ns_base"], "--dtype", "bf16", out=root / "bf16")
    start("ns_chat", ckpts["ns_chat"], "--no-verify")
    start("ns_2026", ckpts["ns_2026"], "--no-verify")  # the 2026 record's logit cap (--logit-cap 2026)
    start("arch_2026", ckpts["arch_2026"])  # every 2026 architecture switch, through export.py's own check
    parent = request.getfixturevalue("parent")  # pretraining.py runs while the exports above do
    start("parent", parent, nice=5)
    straight = request.getfixturevalue("straight")
    start("chat", straight / "state_step000004.pt", nice=0)
    # --overwrite onto a complete earlier export (plus a stray file): the record export must replace all of it.
    # Its own verify needs ~6 GB at a 1,792-token window; the tests below check its logits instead.
    jobs["ns_base"].wait()
    shutil.copytree(root / "ns_base", root / "record")
    (root / "record" / "stale.txt").write_text("from the export that --overwrite replaces\n")
    start("record", ckpts["record"], "--overwrite", "--no-verify")
    done = {name: job.wait() for name, job in jobs.items()}
    done["_ckpts"], done["_root"] = {**ckpts, "parent": parent, "chat": straight / "state_step000004.pt"}, root
    return done


def checkpoint_of(exports: dict, name: str) -> Path:
    return exports["_ckpts"]["ns_base" if name == "bf16" else name]


# -----------------------------------------------------------------------------
# Loading, ours and theirs

_loaded: dict[tuple, Any] = {}


def hf_model(exports: dict, name: str, dtype: torch.dtype = torch.float32) -> Any:
    from transformers import AutoModelForCausalLM

    key = ("model", name, dtype)
    if key not in _loaded:
        _loaded[key] = AutoModelForCausalLM.from_pretrained(exports[name].out, trust_remote_code=True,
                                                            dtype=dtype).eval()
    return _loaded[key]


def hf_tokenizer(exports: dict, name: str) -> Any:
    """AutoTokenizer.from_pretrained(dir, trust_remote_code=True) as docs/export.md writes it, with no one at the keyboard
    (a prompt would get end-of-file at once instead of waiting 15 s on a terminal); the prompts it asked are recorded."""
    from transformers import AutoTokenizer

    key = ("tokenizer", name)
    if key not in _loaded:
        with mock.patch.object(builtins, "input", side_effect=EOFError) as prompt, redirect_stdout(io.StringIO()):
            _loaded[key] = AutoTokenizer.from_pretrained(exports[name].out, trust_remote_code=True)
        _loaded[("prompts", name)] = prompt.call_count
    return _loaded[key]


def ours(exports: dict, name: str) -> tuple[M.GPT, M.Hyperparameters, dict]:
    key = ("ours", name)
    if key not in _loaded:
        model, hp, ckpt = M.load_model(checkpoint_of(exports, name))
        _loaded[key] = model.eval(), hp, ckpt
    return _loaded[key]


@torch.no_grad()
def our_logits(model: M.GPT, hp: M.Hyperparameters, tokens: Tensor) -> Tensor:
    """Our logits for (B, T): padded with token 0 to whole blocks, the first T positions kept."""
    T = tokens.size(1)
    pad = (-T) % M.BLOCK_SIZE
    model.ensure_positions(T + pad)
    return model(torch.cat([tokens, tokens.new_zeros(tokens.size(0), pad)], dim=1), None,
                 M.final_window_blocks(hp))[:, :T]


def window_tokens(hp: M.Hyperparameters) -> int:
    return M.final_window_blocks(hp) * M.BLOCK_SIZE


def batches(window: int) -> list[Tensor]:
    """Document boundaries mid-block and at both edges of blocks, whole blocks and not, beyond the window, a row
    that starts mid-document and one with no <|endoftext|> at all."""
    W = window
    return [random_tokens(2, 256, seed=1, eot_positions={0: [0, 60, 127, 128, 200], 1: [0, 255]}),
            random_tokens(2, 300, seed=2, eot_positions={0: [0, 129, 255, 256]}),  # row 1: one document, no EOT
            random_tokens(1, 2 * W + 45, seed=3, eot_positions={0: [5, 300, W - 1, W, W + 128, 2 * W + 1]}),
            random_tokens(1, 77, seed=4, eot_positions={0: [0, 50]}),
            random_tokens(1, 1, seed=5, eot_positions={0: [0]})]


def assert_close(got: Tensor, want: Tensor, atol: float = 1e-5) -> None:
    """torch.testing.assert_close(got, want, atol=atol, rtol=0), at a fraction of its cost on 50,304-wide logits."""
    assert got.shape == want.shape and got.dtype == want.dtype, (got.shape, want.shape, got.dtype, want.dtype)
    diff = float((got - want).abs().max())
    assert diff <= atol, f"logits differ by up to {diff:.3g} (> {atol})"  # NaN fails too


def assert_same_logits(exports: dict, name: str, tokens: Tensor) -> None:
    model, hp, _ = ours(exports, name)
    with torch.no_grad():
        got = hf_model(exports, name)(tokens, use_cache=False).logits
    assert_close(got, our_logits(model, hp, tokens))


# -----------------------------------------------------------------------------
# 1, 7. Logits


@pytest.mark.parametrize("name", ["parent", "chat", "ns_base", "ns_2026"])
def test_logits_equal_ours(exports: dict, name: str) -> None:
    _, hp, ckpt = ours(exports, name)
    assert (ckpt.get("kind") == "chat") == (name == "chat")
    assert hp.logit_cap == ("2026" if name == "ns_2026" else "2025")
    assert json.loads((exports["_root"] / name / "config.json").read_text())["logit_cap"] == hp.logit_cap
    # every batch where the weights make attention matter; the block edges and the window for the trained ones
    for tokens in batches(window_tokens(hp))[slice(None) if name.startswith("ns_") else slice(0, 3, 2)]:
        assert_same_logits(exports, name, tokens)


def test_random_weights_make_attention_matter(exports: dict) -> None:
    """The ns_base weights are not near-trivial: the context changes the logits, within a document only."""
    tokens = random_tokens(1, 200, seed=8, eot_positions={0: [0, 100]})
    changed = tokens.clone()
    changed[0, 50] = (changed[0, 50] + 1) % M.EOT_ID
    with torch.no_grad():
        a, b = (hf_model(exports, "ns_base")(t, use_cache=False).logits for t in (tokens, changed))
    assert float((a[0, 51:100] - b[0, 51:100]).abs().max()) > 0.02  # logits ~15, near-trivial weights: ~1e-7
    assert_close(a[0, 100:], b[0, 100:])  # across <|endoftext|>: no effect


def test_record_checkpoint_exports_and_matches(exports: dict) -> None:
    sd = torch.load(exports["_ckpts"]["record"], weights_only=True)["model"]
    assert set(torch.load(exports["_ckpts"]["record"], weights_only=True)) == {"step", "code", "model", "optimizers"}
    inferred = M.infer_hparams(sd)
    config = json.loads((exports["record"].out / "config.json").read_text())
    assert config["window_blocks"] == M.final_window_blocks(inferred) == 14
    assert (config["num_hidden_layers"], config["hidden_size"], config["num_attention_heads"], config["head_dim"],
            config["no_attn_layer"], config["vocab_size"]) == (4, 128, 1, 128, 1, PADDED_VOCAB)
    assert exports["record"].result["window_tokens"] == 14 * 128
    W = window_tokens(inferred)
    for tokens in [random_tokens(1, W + 108, seed=10, eot_positions={0: [0, 127, 128, 300, W - 1, W]}),
                   random_tokens(2, 200, seed=11, eot_positions={0: [0, 150]})]:  # row 1: no EOT
        assert_same_logits(exports, "record", tokens)


def test_overwrite_replaced_the_earlier_export(exports: dict) -> None:
    out = exports["record"].out
    assert not (out / "stale.txt").exists()
    assert set(exports["record"].result["files"]) == {p.name for p in out.iterdir()} == EXPECTED_FILES
    assert hf_model(exports, "record").config.head_dim == 128  # the record's, not the copied tiny export's
    leftovers = [p.name for p in exports["_root"].iterdir() if p.name.startswith(".")]
    assert leftovers == []  # no .NAME.tmp-* or .NAME.old-* beside any export


def test_right_padding_is_harmless_left_padding_refused(exports: dict) -> None:
    model = hf_model(exports, "ns_base")
    tokens = random_tokens(2, 150, seed=12, eot_positions={0: [0, 90], 1: [0]})
    padded, mask = tokens.clone(), torch.ones_like(tokens)
    padded[1, 100:], mask[1, 100:] = PAD_ID, 0
    with torch.no_grad():
        got = model(padded, attention_mask=mask, use_cache=False).logits
        row = model(tokens[1:, :100], use_cache=False).logits
    assert_close(got[1:, :100], row)
    left = mask.flip(1)
    with pytest.raises(ValueError, match="^ModdedGPT does not take left-padded or gapped batches"):
        model(padded.flip(1), attention_mask=left, use_cache=False)


# -----------------------------------------------------------------------------
# 2. KV cache


CHUNKS = (100, 1, 1, 57, 200)  # 359 tokens: past the 256-token window, across documents and block edges


def kv_tokens() -> Tensor:
    return random_tokens(2, sum(CHUNKS), seed=13, eot_positions={0: [0, 100, 101, 130, 255, 256, 300],
                                                                  1: [0, 102, 159, 200]})


def assert_cached_chunks_equal(model: Any, tokens: Tensor) -> None:
    """Feeding tokens in CHUNKS through a DynamicCache gives the logits of one forward of all of them."""
    from transformers.cache_utils import DynamicCache

    cache, pieces, start = DynamicCache(), [], 0
    with torch.no_grad():
        full = model(tokens, use_cache=False).logits
        for n in CHUNKS:
            pieces.append(model(tokens[:, start:start + n], past_key_values=cache, use_cache=True).logits)
            start += n
    assert cache.get_seq_length() == tokens.size(1)
    assert_close(torch.cat(pieces, dim=1), full)


@pytest.mark.parametrize("how", ["cache_tokens", "context_ids"])
def test_kv_cache_chunks_equal_full_forward(exports: dict, how: str) -> None:
    from transformers.cache_utils import DynamicCache

    model = hf_model(exports, "ns_base")
    tokens = kv_tokens()
    cache, pieces, start = DynamicCache(), [], 0
    with torch.no_grad():
        full = model(tokens, use_cache=False).logits
        for n in CHUNKS:
            kwargs = dict(context_ids=tokens[:, :start]) if how == "context_ids" else {}
            out = model(tokens[:, start:start + n], past_key_values=cache, use_cache=True, **kwargs)
            assert out.past_key_values is cache and cache.get_seq_length() == start + n
            pieces.append(out.logits)
            start += n
            if how == "context_ids":
                del cache.moddedgpt_tokens  # as a cache this model did not fill: only context_ids can tell
    got = torch.cat(pieces, dim=1)
    assert_close(got, full)
    if how == "cache_tokens":
        m, hp, _ = ours(exports, "ns_base")
        assert_close(full, our_logits(m, hp, tokens))


def test_kv_cache_without_its_tokens_is_refused(exports: dict) -> None:
    from transformers.cache_utils import DynamicCache

    model, tokens, cache = hf_model(exports, "ns_base"), kv_tokens(), DynamicCache()
    with torch.no_grad():
        model(tokens[:, :100], past_key_values=cache, use_cache=True)
        del cache.moddedgpt_tokens
        with pytest.raises(ValueError) as e:
            model(tokens[:, 100:101], past_key_values=cache, use_cache=True)
    assert str(e.value) == ("ModdedGPT needs the cached tokens: pass context_ids (every token so far) with "
                            "past_key_values, or a cache this model filled")


# -----------------------------------------------------------------------------
# 3. Greedy generation


def prompt_for(kind: str, tok: M.Tokenizer, n_text: int) -> list[int]:
    ids = M._load_data_shard(REPO_DIR / "data" / "shakespeare" / "shakespeare_val_000000.bin")[1:1 + n_text]
    text = tok.decode(ids.long().tolist())
    if kind == "chat":
        return M.render_conversation(tok, [{"role": "user", "content": text}], add_generation_prompt=True)[0]
    return tok.encode_document(text)


def stops_and_limit(kind: str) -> tuple[tuple[int, ...], int]:
    """As model.stream_reply and InferenceModel.vocab_limit."""
    return ((END_ID, M.EOT_ID), M.CHAT_VOCAB_LIMIT) if kind == "chat" else ((M.EOT_ID,), 50257)


def greedy_pair(exports: dict, name: str, kind: str, prompt: list[int], n: int) -> tuple[list[int], list[int]]:
    model, hp, _ = ours(exports, name)
    stops, limit = stops_and_limit(kind)
    want = [s[0] for s in I.generate(model, prompt, window_blocks=M.final_window_blocks(hp), max_new_tokens=n,
                                     vocab_limit=limit, stop_ids=stops)]
    with torch.no_grad():
        out = hf_model(exports, name).generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False)
    got = out[0, len(prompt):].tolist()
    if got and got[-1] in stops:  # transformers keeps the stop token, model.generate does not yield it
        got = got[:-1]
    return got, want


@pytest.mark.parametrize("name,kind", [("ns_base", "base"), ("ns_chat", "chat")])
def test_greedy_generate_equals_ours(exports: dict, tok: M.Tokenizer, name: str, kind: str) -> None:
    prompt = prompt_for(kind, tok, 200)  # prompt + 64 new tokens: past the 256-token window and a block edge
    assert 200 < len(prompt) < 256 < len(prompt) + 64
    got, want = greedy_pair(exports, name, kind, prompt, 64)
    assert len(want) == 64 and got == want


@pytest.mark.parametrize("name,kind", [("parent", "base"), ("chat", "chat")])
def test_greedy_generate_equals_ours_with_stops(exports: dict, tok: M.Tokenizer, name: str, kind: str) -> None:
    """The trained checkpoints may stop early: where and with what, both agree."""
    got, want = greedy_pair(exports, name, kind, prompt_for(kind, tok, 20), 24)
    assert got == want


@pytest.mark.parametrize("name,kind", [("parent", "base"), ("ns_base", "base"), ("chat", "chat"),
                                       ("ns_chat", "chat"), ("record", "base")])
def test_generation_config_suppresses_exactly_what_we_never_sample(exports: dict, name: str, kind: str) -> None:
    from transformers import GenerationConfig

    stops, limit = stops_and_limit(kind)
    gc = GenerationConfig.from_pretrained(exports[name].out)
    assert gc.suppress_tokens == list(range(limit, PADDED_VOCAB))
    assert gc.do_sample is False and gc.pad_token_id == PAD_ID and gc.bos_token_id == M.EOT_ID
    assert gc.eos_token_id == (list(stops) if kind == "chat" else M.EOT_ID)
    assert hf_model(exports, name).config.eos_token_id == gc.eos_token_id


# -----------------------------------------------------------------------------
# 4. Tokenizer

AWKWARD = ("Ünïcödé — naïve café, 日本語のテキスト, emoji 😀👍🏽 and Ελληνικά.\r\n\r\nDigits 1234567890 3.14159 "
           "1,000,000 and 2024-01-02\r\n   spaces   runs\t\ttabs  \n\n\n\n  trailing   ")


def corpus_text(tok: M.Tokenizer) -> str:
    ids = M._load_data_shard(REPO_DIR / "data" / "shakespeare" / "shakespeare_val_000000.bin")[1:4001]
    return tok.decode(ids.long().tolist())


@pytest.mark.parametrize("name", ["parent", "chat"])
def test_tokenizer_equals_ours(exports: dict, tok: M.Tokenizer, name: str) -> None:
    tokenizer = hf_tokenizer(exports, name)
    for text in [corpus_text(tok), AWKWARD, "", " ", "\r\n", "a"]:
        assert tokenizer(text, add_special_tokens=False).input_ids == tok.encode(text)
        assert tokenizer(text).input_ids == tok.encode_document(text)  # <|endoftext|> first, as in training
        ids = tok.encode_document(text)
        assert tokenizer.decode(ids) == tok.decode(ids)
    assert tokenizer([AWKWARD, "a"]).input_ids == [tok.encode_document(AWKWARD), tok.encode_document("a")]


@pytest.mark.parametrize("name", ["parent", "chat"])
def test_tokenizer_special_tokens_as_the_readme_says(exports: dict, tok: M.Tokenizer, name: str) -> None:
    tokenizer = hf_tokenizer(exports, name)
    readme = (exports[name].out / "README.md").read_text()
    assert "split_special_tokens=True" in readme and "sanitize_control_tokens=True" in readme
    text = "a <|user|> b <|endoftext|> c"
    default = tokenizer(text, add_special_tokens=False).input_ids  # the Hugging Face default: spellings are tokens
    assert 50258 in default and M.EOT_ID in default
    assert tokenizer(text, add_special_tokens=False, split_special_tokens=True).input_ids == tok.encode(text)
    assert tokenizer(text, split_special_tokens=True).input_ids == tok.encode_document(text)
    for spelling, token_id in {**M.CHAT_SPECIAL_TOKENS, "<|endoftext|>": M.EOT_ID, "<|pad|>": PAD_ID}.items():
        assert tokenizer.convert_tokens_to_ids(spelling) == token_id
    assert (tokenizer.pad_token, tokenizer.pad_token_id) == ("<|pad|>", PAD_ID)
    assert tokenizer.bos_token_id == M.EOT_ID
    assert tokenizer.eos_token_id == (END_ID if name == "chat" else M.EOT_ID)


# -----------------------------------------------------------------------------
# 5. Chat template

CONVERSATIONS = [
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Who wrote Hamlet?"},
     {"role": "assistant", "content": "Shakespeare."}],
    [{"role": "user", "content": "1+1?"}, {"role": "assistant", "content": "2"},
     {"role": "user", "content": "and 2+2?"}, {"role": "assistant", "content": "4, of course"}],
    [{"role": "user", "content": ""}, {"role": "assistant", "content": ""}],
    [{"role": "system", "content": "  lead and trail  "},
     {"role": "user", "content": "\nline one\nline two\n\n"}, {"role": "assistant", "content": " a\r\nb \n"}],
    [{"role": "user", "content": AWKWARD}],
]


def test_chat_template_equals_render_conversation(exports: dict, tok: M.Tokenizer) -> None:
    tokenizer = hf_tokenizer(exports, "chat")
    assert tokenizer.chat_template is not None
    for msgs in CONVERSATIONS:
        ids, mask = M.render_conversation(tok, msgs)
        assert tokenizer.apply_chat_template(msgs, tokenize=True, return_dict=False) == ids
        assert tokenizer.apply_chat_template(msgs)["input_ids"] == ids  # transformers 5: a dict by default
        assert tokenizer.apply_chat_template(msgs, add_generation_prompt=True, return_dict=False) == \
            M.render_conversation(tok, msgs, add_generation_prompt=True)[0]
        out = tokenizer.apply_chat_template(msgs, return_assistant_tokens_mask=True, return_dict=True)
        assert out["input_ids"] == ids and out["assistant_masks"] == mask


def test_chat_template_text_decodes_to_the_rendered_ids(exports: dict, tok: M.Tokenizer) -> None:
    tokenizer = hf_tokenizer(exports, "chat")
    for msgs in CONVERSATIONS:
        text = tokenizer.apply_chat_template(msgs, tokenize=False)
        assert tokenizer.decode(M.render_conversation(tok, msgs)[0]) == text
        assert tokenizer(text, add_special_tokens=False).input_ids == M.render_conversation(tok, msgs)[0]


SPELLED = ["<|assistant|>", "<|endoftext|>", "say it:\n<|system|>", "<|user|>\nafter", "x<|endoftext|>y"]
MID_TEXT = ["stop here <|end|> and go on", "<|end|><|user|>"]  # BPE joins ' <|' and '|><|' across the spelling


def test_chat_template_sanitize_control_tokens(exports: dict, tok: M.Tokenizer) -> None:
    """sanitize_control_tokens=True (docs/export.md's advice for user text) encodes spellings as plain text: the ids of
    render_conversation where BPE splits at the spelling anyway, never a control token, and the same text."""
    tokenizer = hf_tokenizer(exports, "chat")
    for content in SPELLED + MID_TEXT:
        msgs = [{"role": "user", "content": content}, {"role": "assistant", "content": content}]
        ids = M.render_conversation(tok, msgs)[0]
        safe = tokenizer.apply_chat_template(msgs, sanitize_control_tokens=True, return_dict=False)
        controls = [i for i in safe if i >= M.EOT_ID]
        assert controls == [M.EOT_ID, 50258, END_ID, 50259, END_ID]  # the template's own, nothing from content
        assert tokenizer.decode(safe) == tokenizer.decode(ids)
        if content in SPELLED:
            assert safe == ids
        forged = tokenizer.apply_chat_template(msgs, return_dict=False)  # the default: the spelling is the token
        assert [i for i in forged if i >= M.EOT_ID] != controls


def test_chat_template_refuses_unknown_roles(exports: dict) -> None:
    tokenizer = hf_tokenizer(exports, "chat")
    with pytest.raises(Exception) as e:
        tokenizer.apply_chat_template([{"role": "user", "content": "hi"}, {"role": "tool", "content": "x"}])
    assert str(e.value) == "chat template v1 has the roles system, user and assistant, not tool"


def test_base_export_has_no_chat_template(exports: dict) -> None:
    assert hf_tokenizer(exports, "parent").chat_template is None
    assert not (exports["parent"].out / "chat_template.jinja").exists()
    assert (exports["chat"].out / "chat_template.jinja").is_file()


# -----------------------------------------------------------------------------
# 6. pipeline


@pytest.mark.parametrize("name", ["parent", "chat"])
def test_pipeline_runs(exports: dict, name: str) -> None:
    from transformers import pipeline

    pipe = pipeline("text-generation", model=str(exports[name].out), trust_remote_code=True, dtype=torch.float32)
    out = pipe("ROMEO.\nBut, soft!", max_new_tokens=5)
    assert out[0]["generated_text"].startswith("ROMEO.\nBut, soft!")
    if name == "chat":
        chat = pipe([{"role": "user", "content": "Hello"}], max_new_tokens=5)[0]["generated_text"]
        assert chat[0] == {"role": "user", "content": "Hello"} and chat[-1]["role"] == "assistant"


# -----------------------------------------------------------------------------
# 9. bf16


def test_bf16_export(exports: dict) -> None:
    fp32, bf16 = exports["ns_base"], exports["bf16"]
    ratio = (bf16.out / "model.safetensors").stat().st_size / (fp32.out / "model.safetensors").stat().st_size
    assert 0.48 < ratio < 0.52
    assert bf16.result["dtype"] == "bf16" and bf16.result["max_logit_diff"] <= 1e-4
    assert 0 < bf16.result["bf16_rounding_logit_diff"]
    from transformers import AutoModelForCausalLM

    default = AutoModelForCausalLM.from_pretrained(bf16.out, trust_remote_code=True)
    assert default.dtype == torch.bfloat16  # the config's dtype unless asked otherwise
    del default
    tokens = batches(256)[1]
    with torch.no_grad():
        got = hf_model(exports, "bf16")(tokens, use_cache=False).logits
        full = hf_model(exports, "ns_base")(tokens, use_cache=False).logits
    assert_close(got, full, atol=0.1)  # weights rounded to bf16, computed in fp32
    model, hp, _ = ours(exports, "ns_base")
    rounded = M.GPT.from_hparams(hp).eval()
    rounded.load_state_dict({k: v.bfloat16().float() for k, v in model.state_dict().items()})
    assert_close(got, our_logits(rounded, hp, tokens))


def test_bf16_verify_of_a_checkpoint_with_short_rows(exports: dict) -> None:
    """What `export.py --dtype bf16` does after writing the export of a checkpoint with 128-token rows (ns_base)."""
    import export

    model, hp, _ = ours(exports, "ns_base")
    fresh = M.GPT.from_hparams(hp).eval()  # as export.py has it: straight from load_model, no ensure_positions yet
    fresh.load_state_dict(model.state_dict())
    with mock.patch.object(builtins, "input", side_effect=EOFError), redirect_stdout(io.StringIO()):
        checked = export.verify(exports["bf16"].out, fresh, hp, "bf16")  # the bf16 export holds these weights
    assert checked["max_logit_diff"] <= 1e-4


# -----------------------------------------------------------------------------
# 11. The 2026 architecture (issue 27)


def test_every_2026_switch_exports_and_matches(exports: dict, tok: M.Tokenizer) -> None:
    """The checkpoint with every switch on: config.json names them, export.py's own check ran and passed, and the
    logits (documents starting mid-row, rows without <|endoftext|>, past the window), KV-cache chunks and 64
    greedy tokens equal ours."""
    import export

    _, hp, _ = ours(exports, "arch_2026")
    config = json.loads((exports["arch_2026"].out / "config.json").read_text())
    assert {k: config[k] for k in export.architecture_fields(hp)} == dict(
        bigram_rows=97, bigram_dim=48, bigram_sign_rows=16, smear=True, value_embed_layers=[1, 3],
        value_embed_gates=True, residual_lambdas=True, gated_skip_from=0, backout_layer=1, long_window_layers=[1, 3],
        key_offset=True, xsa_layers=[1], attn_gate=True, paired_head_layers=[0])
    assert exports["arch_2026"].result["max_logit_diff"] <= 1e-5
    for tokens in batches(window_tokens(hp)):
        assert_same_logits(exports, "arch_2026", tokens)
    assert_cached_chunks_equal(hf_model(exports, "arch_2026"), kv_tokens())
    got, want = greedy_pair(exports, "arch_2026", "base", prompt_for("base", tok, 200), 64)
    assert len(want) == 64 and got == want


@pytest.mark.parametrize("switch", [
    dict(bigram_rows=97), dict(bigram_rows=97, bigram_dim=48, bigram_sign_rows=16), dict(smear=True),
    dict(value_embed_layers="1,3"), dict(value_embed_gates=True), dict(residual_lambdas=True),
    dict(skip_topology="gated", gated_skip_from=0), dict(backout_layer=1), dict(long_window_layers="1,3"),
    dict(key_offset=True), dict(xsa_layers="1"), dict(attn_gate=True),
    dict(paired_head_layers="0,1", num_heads=4, head_dim=16)], ids=lambda d: ",".join(d))
def test_each_2026_switch_alone_matches(switch: dict) -> None:
    """In-process (the model export.py builds, without writing it): one switch on, exportable, equal logits, cached
    chunks and greedy tokens."""
    import export

    hp = tiny_hparams(**{**SWITCH_BASE, **switch})
    model = every_part_active(hp)
    export.exportable({}, hp, model, Path("state_step000006.pt"))  # raises if it refuses
    modeling = export.load_modeling()
    config = export.hf_config(modeling, hp, "base", torch.float32)
    hf = modeling.ModdedGPTForCausalLM(config).eval()
    hf.load_state_dict(model.state_dict(), strict=True)
    tokens = kv_tokens()
    with torch.no_grad():
        assert_close(hf(tokens, use_cache=False).logits, our_logits(model, hp, tokens))
    assert_cached_chunks_equal(hf, tokens)
    prompt = tokens[1, 90:190].tolist()  # a document starts mid-prompt (position 12)
    want = [s[0] for s in I.generate(model, prompt, window_blocks=M.final_window_blocks(hp), max_new_tokens=12)]
    settings = export.generation_config(config, "base", hp)
    settings.max_new_tokens = 12
    with torch.no_grad():
        out = hf.generate(torch.tensor([prompt]), generation_config=settings)
    assert out[0, len(prompt):].tolist()[:len(want)] == want and len(want) == 12


# -----------------------------------------------------------------------------
# 10. What export.py prints and writes


@pytest.mark.parametrize("name", ["parent", "chat", "bf16"])
def test_json_line_and_files(exports: dict, name: str) -> None:
    job = exports[name]
    result = job.result
    assert EXPECTED_FILES <= set(result["files"]) == {p.name for p in job.out.iterdir()}
    assert set(result["files"]) - EXPECTED_FILES == ({"chat_template.jinja"} if name == "chat" else set())
    assert result["out"] == str(job.out) and result["checkpoint"] == str(checkpoint_of(exports, name))
    hp = ours(exports, name)[1]
    assert result["max_logit_diff"] <= 1e-4 and result["window_tokens"] == window_tokens(hp) == 256
    assert f"exporting {result['checkpoint']}" in job.stderr and "Traceback" not in job.stderr
    modeling = (job.out / "modeling_moddedgpt.py").read_text()
    assert modeling == (REPO_DIR / "hf" / "modeling_moddedgpt.py").read_text()
    for forbidden in ("import model", "import runs", "from model", "from runs", "import export", "sys.path"):
        assert forbidden not in modeling
    assert [p.name for p in job.out.glob("*.py")] == ["modeling_moddedgpt.py"]
    config = json.loads((job.out / "config.json").read_text())
    assert config["auto_map"] == {"AutoConfig": "modeling_moddedgpt.ModdedGPTConfig",
                                  "AutoModelForCausalLM": "modeling_moddedgpt.ModdedGPTForCausalLM"}
    assert config["dtype"] == ("bfloat16" if name == "bf16" else "float32")


def test_nothing_prompts(exports: dict) -> None:
    stdout = exports["parent"].stdout
    assert stdout.count("\n") == 1 and json.loads(stdout) == exports["parent"].result  # the JSON line only
    hf_tokenizer(exports, "parent")
    assert _loaded[("prompts", "parent")] == 0


# -----------------------------------------------------------------------------
# 8. Refusals


def snapshot(d: Path) -> dict[str, tuple[bytes | None, int]]:
    return {str(p.relative_to(d)): (p.read_bytes() if p.is_file() else None, p.stat().st_mtime_ns)
            for p in sorted(d.rglob("*"))}


def assert_refused(r: subprocess.CompletedProcess, message: str) -> None:
    assert r.returncode == 2, r.stderr
    assert r.stderr.splitlines() == [ERR + message], r.stderr
    assert r.stdout == ""


def test_refuses_a_checkpoint_with_nan(exports: dict, tmp_path: Path) -> None:
    model, hp, _ = ours(exports, "ns_base")
    bad = M.GPT.from_hparams(hp)
    bad.load_state_dict(model.state_dict())
    with torch.no_grad():
        bad.blocks[1].mlp.c_fc.weight[3, 5] = float("nan")
    ckpt = write_checkpoint(tmp_path / "logs", "diverged", 6, bad, hp)
    parent = tmp_path / "exports"
    parent.mkdir()
    r = run_export(ckpt, parent / "out")
    assert_refused(r, f"{ckpt}: blocks.1.mlp.c_fc.weight holds NaN or infinite values (a diverged run); "
                      f"not exported")
    assert list(parent.iterdir()) == []


def test_refuses_a_non_empty_directory(exports: dict, tmp_path: Path) -> None:
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("my own notes\n")
    (out / "sub").mkdir()
    (out / "sub" / "config.json").write_text("{}")
    before = snapshot(tmp_path)
    r = run_export(exports["_ckpts"]["ns_base"], out)
    assert_refused(r, f"--out {out}: exists and is not empty; pass --overwrite to replace it")
    assert snapshot(tmp_path) == before


def test_refuses_a_file(exports: dict, tmp_path: Path) -> None:
    out = tmp_path / "model.bin"
    out.write_bytes(b"not a directory")
    before = snapshot(tmp_path)
    r = run_export(exports["_ckpts"]["ns_base"], out, "--overwrite")  # not even with --overwrite
    assert_refused(r, f"--out {out}: exists and is not a directory")
    assert snapshot(tmp_path) == before


def test_refuses_a_missing_checkpoint(tmp_path: Path) -> None:
    missing = tmp_path / "logs" / "run" / "state_step000100.pt"
    r = run_export(missing, tmp_path / "new" / "out")
    assert_refused(r, f"{missing}: checkpoint not found")
    assert list(tmp_path.iterdir()) == []
