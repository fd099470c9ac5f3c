"""Export a checkpoint as a Hugging Face transformers model directory (no network, no import of this repository).

    python export.py                                         # latest checkpoint -> logs/RUN/hf_step000075/
    python export.py --checkpoint logs/RUN/state_step000075.pt --out my-gpt
    python export.py --checkpoint record/state_step001770.pt --out speedrun-gpt --dtype bf16

Then, anywhere with torch and transformers:

    model = AutoModelForCausalLM.from_pretrained("my-gpt", trust_remote_code=True)
    tokenizer = AutoTokenizer.from_pretrained("my-gpt", trust_remote_code=True)

The directory holds config.json, modeling_moddedgpt.py (the model, written for transformers), model.safetensors,
the GPT-2 tokenizer with the chat special tokens (and chat template v1 for fine-tuned checkpoints),
generation_config.json and a README. It is built in a hidden sibling directory, checked (the exported model's
logits against this repository's model, the tokenizer's ids against ours), and only then moved into place: a
failed or refused export leaves nothing behind and never touches an existing directory unless --overwrite.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

import model as M
import runs as R

MODELING_FILE = M.REPO_DIR / "hf" / "modeling_moddedgpt.py"
AUTO_MAP = {"AutoConfig": "modeling_moddedgpt.ModdedGPTConfig",
            "AutoModelForCausalLM": "modeling_moddedgpt.ModdedGPTForCausalLM"}
# Chat template v1 (model.render_conversation) in Jinja. The roles are spelled out rather than built as
# '<|' + role + '|>' so that no message field can name a control token; {% generation %} marks what
# render_conversation trains on (assistant content and its <|end|>) for return_assistant_tokens_mask.
CHAT_TEMPLATE = (
    "{{- '<|endoftext|>' -}}"
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'system' -%}{{- '<|system|>' + message['content'] + '<|end|>' -}}"
    "{%- elif message['role'] == 'user' -%}{{- '<|user|>' + message['content'] + '<|end|>' -}}"
    "{%- elif message['role'] == 'assistant' -%}{{- '<|assistant|>' -}}"
    "{%- generation -%}{{- message['content'] + '<|end|>' -}}{%- endgeneration -%}"
    "{%- else -%}{{- raise_exception('chat template v1 has the roles system, user and assistant, not '"
    " + message['role']) -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|assistant|>' -}}{%- endif -%}"
)
PAD_TOKEN = ("<|pad|>", M.CHAT_VOCAB_LIMIT)  # export only, in the first free padding row: a pad id that no text
# holds, so transformers never takes a prompt's leading <|endoftext|> for padding when it infers an attention mask
LOGIT_TOLERANCE = 1e-4  # fp32: the exported model and ours agree to ~1e-6 (tests ask 1e-5); more means a bug


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = R.OneLineParser(prog="export.py", description=__doc__.split("\n")[0], allow_abbrev=False)
    p.add_argument("--checkpoint", default="latest", help="'latest' (newest under --log-dir) or a path: pretraining, "
                   "fine-tuning, train_gpt.py or the record script's state_step*.pt")
    p.add_argument("--log-dir", default="logs")
    p.add_argument("--out", help="output directory (default: hf_stepNNNNNN beside the checkpoint)")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"],
                   help="weights on disk: fp32 (exact) or bf16 (half the size; logits move by the rounding)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists (only after a good export)")
    p.add_argument("--no-verify", action="store_true", help="skip loading the export back to compare its logits")
    return p.parse_args(argv)


def load_modeling() -> Any:
    """hf/modeling_moddedgpt.py as a module (it is not part of the library: it is what the export carries)."""
    spec = importlib.util.spec_from_file_location("modeling_moddedgpt", MODELING_FILE)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclass fields (the config) resolve their annotations through it
    spec.loader.exec_module(module)
    return module


def exportable(ckpt: dict[str, Any], hp: M.Hyperparameters, model: M.GPT, path: Path) -> None:
    """Refuse, naming the reason, what the export could not reproduce exactly."""
    if ckpt.get("tokenizer", "gpt2") != "gpt2" or hp.vocab_size != 50257:
        raise M.CheckpointError(f"{path}: trained with tokenizer {ckpt.get('tokenizer')!r} and vocab_size "
                                f"{hp.vocab_size}; the export carries GPT-2's 50,257-id tokenizer only")
    if ckpt.get("kind") == "chat" and ckpt.get("chat_template", M.CHAT_TEMPLATE_VERSION) != M.CHAT_TEMPLATE_VERSION:
        raise M.CheckpointError(f"{path}: fine-tuned on chat template v{ckpt.get('chat_template')}; this export "
                                f"writes v{M.CHAT_TEMPLATE_VERSION}")
    if hp.yarn:
        raise M.CheckpointError(f"{path}: trained with --yarn; the export's modelling file has the base rotary and "
                                f"attention scale only, so it is not exported")
    for name, tensor in model.state_dict().items():
        if not torch.isfinite(tensor).all():
            raise M.CheckpointError(f"{path}: {name} holds NaN or infinite values (a diverged run); not exported")


def architecture_fields(hp: M.Hyperparameters) -> dict[str, Any]:
    """The config fields of the 2026 architecture's switches (the modelling file's defaults where a switch is off)."""
    arch = M.Architecture.from_hparams(hp)

    def layers(values: tuple[int, ...] | None) -> list[int] | None:
        return list(values) if values else None

    return dict(bigram_rows=arch.bigram_rows, bigram_dim=arch.bigram_dim, bigram_sign_rows=arch.bigram_sign_rows,
                smear=arch.smear, value_embed_layers=layers(arch.value_embed_layers),
                value_embed_gates=arch.value_embed_gates, residual_lambdas=arch.residual_lambdas,
                gated_skip_from=arch.gated_skip[0] if arch.gated_skip is not None else -1,
                backout_layer=arch.backout_layer, long_window_layers=layers(arch.long_window_layers),
                key_offset=arch.key_offset, xsa_layers=layers(arch.xsa_layers), attn_gate=arch.attn_gate,
                paired_head_layers=layers(arch.paired_head_layers))


def hf_config(modeling: Any, hp: M.Hyperparameters, kind: str, dtype: torch.dtype) -> Any:
    stop = [M.CHAT_SPECIAL_TOKENS["<|end|>"], M.EOT_ID] if kind == "chat" else M.EOT_ID
    config = modeling.ModdedGPTConfig(
        vocab_size=M.next_multiple_of_n(hp.vocab_size, n=128), hidden_size=hp.model_dim,
        num_hidden_layers=hp.num_layers, num_attention_heads=hp.num_heads, head_dim=hp.head_dim,
        no_attn_layer=hp.no_attn_layer, window_blocks=M.final_window_blocks(hp), block_size=hp.window_block,
        max_position_embeddings=min(hp.row_len or hp.val_seq_len, 8192), eot_token_id=M.EOT_ID,
        bos_token_id=M.EOT_ID, eos_token_id=stop, pad_token_id=PAD_TOKEN[1], logit_cap=hp.logit_cap,
        **architecture_fields(hp))
    config.auto_map = AUTO_MAP
    config.architectures = ["ModdedGPTForCausalLM"]
    config.dtype = dtype
    return config


def build_tokenizer(kind: str, max_length: int) -> Any:
    """GPT-2's BPE from the verified ranks file, with <|endoftext|> and the chat tokens at our ids. It prepends
    <|endoftext|> (add_special_tokens, the default), as every training document starts with it."""
    from tiktoken_ext.openai_public import r50k_pat_str
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    M.get_tokenizer()  # verifies the ranks file's sha256 (or says how to fetch it)
    specials = sorted(dict(M.CHAT_SPECIAL_TOKENS, **{"<|endoftext|>": M.EOT_ID}, **dict([PAD_TOKEN])).items(),
                      key=lambda kv: kv[1])
    backend = TikTokenConverter(vocab_file=str(M.GPT2_RANKS_FILE), pattern=r50k_pat_str,
                                extra_special_tokens=[name for name, _ in specials]).converted()
    for name, token_id in specials:
        if backend.token_to_id(name) != token_id:
            raise M.TokenizerError(f"the converted tokenizer put {name} at {backend.token_to_id(name)}, not {token_id}")
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<|endoftext|>", eos_token="<|end|>" if kind == "chat" else "<|endoftext|>",
        pad_token=PAD_TOKEN[0], add_bos_token=True, model_max_length=max_length, clean_up_tokenization_spaces=False,
        chat_template=CHAT_TEMPLATE if kind == "chat" else None)


def generation_config(config: Any, kind: str, hp: M.Hyperparameters) -> Any:
    """Greedy by default; ids a checkpoint never samples (padding rows; chat tokens for a base model) suppressed."""
    from transformers import GenerationConfig

    limit = M.CHAT_VOCAB_LIMIT if kind == "chat" else hp.vocab_size
    return GenerationConfig(bos_token_id=M.EOT_ID, eos_token_id=config.eos_token_id, pad_token_id=PAD_TOKEN[1],
                            suppress_tokens=list(range(limit, config.vocab_size)), do_sample=False)


def model_card(src: Path, ckpt: dict[str, Any], hp: M.Hyperparameters, kind: str, dtype: str) -> str:
    val = ckpt.get("val_loss")
    return f"""# {src.parent.name}, step {ckpt.get('step', 0)}

A {kind} GPT trained with the modded-nanogpt speedrun recipe, exported by `export.py` from `{src.name}`
({hp.num_layers} layers, width {hp.model_dim}, {hp.num_heads}x{hp.head_dim} heads, preset `{hp.preset}`,
weights in {dtype}{f', validation loss {val:.4f}' if isinstance(val, float) else ''}).

```python
from transformers import AutoModelForCausalLM, AutoTokenizer
model = AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)
tokenizer = AutoTokenizer.from_pretrained(DIR, trust_remote_code=True)  # it reads config.json, which names code
```

- The model code is `modeling_moddedgpt.py` in this directory (torch and transformers only).
- The tokenizer is GPT-2's and prepends `<|endoftext|>`, which starts every training document.
- Like every Hugging Face tokenizer, it turns special-token spellings in text (`<|endoftext|>`, `<|user|>`, ...)
  into special tokens. For text typed by users, encode with `split_special_tokens=True` and call
  `apply_chat_template(..., sanitize_control_tokens=True)` (which keeps such spellings plain text, though the text
  right around one may tokenize a little differently from training).
- Do not left-pad batches: the attention mask and positions come from token positions. Right padding is fine.
"""


def save_export(out: Path, model: M.GPT, hp: M.Hyperparameters, ckpt: dict[str, Any], src: Path,
                dtype: str) -> Any:
    """Write the whole directory into `out` (empty); returns the HF config."""
    modeling = load_modeling()
    kind = "chat" if ckpt.get("kind") == "chat" else "base"
    torch_dtype = torch.bfloat16 if dtype == "bf16" else torch.float32
    config = hf_config(modeling, hp, kind, torch_dtype)
    hf_model = modeling.ModdedGPTForCausalLM(config)
    hf_model.load_state_dict(model.state_dict(), strict=True)  # same parameter names, buffers aside
    hf_model.to(torch_dtype).save_pretrained(out)
    shutil.copy(MODELING_FILE, out / MODELING_FILE.name)
    generation_config(config, kind, hp).save_pretrained(out)
    build_tokenizer(kind, config.max_position_embeddings).save_pretrained(out)
    (out / "README.md").write_text(model_card(src, ckpt, hp, kind, dtype))
    out.chmod(0o755)  # mkdtemp makes it private; an export is meant to be shared
    for f in out.iterdir():
        f.chmod(0o644)
    return config


def check_batch(hp: M.Hyperparameters, window_tokens: int) -> torch.Tensor:
    """Two rows longer than the window (and not whole blocks), with document boundaries in both."""
    gen = torch.Generator().manual_seed(0)
    T = window_tokens + M.BLOCK_SIZE + 37
    tokens = torch.randint(0, M.EOT_ID, (2, T), generator=gen)
    tokens[:, 0] = M.EOT_ID
    tokens[0, T // 3] = tokens[1, T // 2] = M.EOT_ID
    return tokens


@torch.no_grad()
def verify(out: Path, model: M.GPT, hp: M.Hyperparameters, dtype: str) -> dict[str, float]:
    """Load the export as a user would and compare it with our model: logits (fp32; for bf16 against our model
    with the same rounded weights) and the tokenizer's ids. Raises RuntimeError past the tolerance."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ours = model
    if dtype == "bf16":
        ours = M.GPT.from_hparams(hp)
        ours.load_state_dict({k: v.bfloat16().float() for k, v in model.state_dict().items()})
    ours.eval()
    hf_model = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True, dtype=torch.float32).eval()
    tokens = check_batch(hp, M.final_window_blocks(hp) * hp.window_block)
    T = tokens.size(1)
    pad = (-T) % M.BLOCK_SIZE
    ours.ensure_positions(T + pad)
    model.ensure_positions(T + pad)
    diff = rounding = 0.0
    for row in tokens.split(1):  # one row at a time: a row's fp32 logits over 50k ids are already T x 200 kB
        padded = torch.cat([row, row.new_zeros(1, pad)], dim=1)
        expected = ours(padded, None, M.final_window_blocks(hp))[:, :T]
        diff = max(diff, float((hf_model(row, use_cache=False).logits - expected).abs().max()))
        if dtype == "bf16":
            full = model(padded, None, M.final_window_blocks(hp))[:, :T]
            rounding = max(rounding, float((full - expected).abs().max()))
    if diff > LOGIT_TOLERANCE:
        raise RuntimeError(f"the exported model's logits differ from the checkpoint's by {diff:.2e} "
                           f"(> {LOGIT_TOLERANCE}): the export is wrong; please report it")
    sample = "ROMEO.\nBut, soft! what light through yonder window breaks? <|user|> 1,234 words\n\n"
    # trust_remote_code: AutoTokenizer reads config.json, whose auto_map names the model code, and would ask
    tokenizer = AutoTokenizer.from_pretrained(out, trust_remote_code=True)
    if tokenizer(sample, split_special_tokens=True)["input_ids"] != M.get_tokenizer().encode_document(sample):
        raise RuntimeError("the exported tokenizer's ids differ from ours; please report it")
    result = dict(max_logit_diff=diff, tokens=tokens.numel())
    if dtype == "bf16":
        result["bf16_rounding_logit_diff"] = rounding
    return result


def default_out(path: Path, step: int) -> Path:
    return path.parent / f"hf_step{step:06d}"


def check_out(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise M.ConfigError(f"--out {out}: exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise M.ConfigError(f"--out {out}: exists and is not empty; pass --overwrite to replace it")
    if not os.access(out.parent if out.parent.exists() else Path.cwd(), os.W_OK):
        raise M.ConfigError(f"--out {out}: cannot write to {out.parent}")


def replace_dir(tmp: Path, out: Path) -> None:
    """Move the finished export into place; an existing directory goes only once the new one is complete."""
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, old)
    os.replace(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def run(args: argparse.Namespace) -> dict[str, Any]:
    start = time.perf_counter()
    src = M.resolve_checkpoint(args.checkpoint, args.log_dir)
    model, hp, ckpt = M.load_model(src)
    out = Path(args.out) if args.out else default_out(src, int(ckpt.get("step", 0)))
    check_out(out, args.overwrite)
    exportable(ckpt, hp, model, src)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # its per-shard bars would fill logs; export prints its own lines
    try:
        print(f"exporting {src} (step {ckpt.get('step', 0)}, {'chat' if ckpt.get('kind') == 'chat' else 'base'} "
              f"model) to {out}", file=sys.stderr)
        with R.progress(total=1 if args.no_verify else 2, desc="export (write, check)", unit="stage") as bar:
            config = save_export(tmp, model, hp, ckpt, src, args.dtype)
            bar.update()
            checked = {} if args.no_verify else verify(tmp, model, hp, args.dtype)
            bar.update(not args.no_verify)
        replace_dir(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    result = dict(checkpoint=str(src), out=str(out), dtype=args.dtype,
                  window_tokens=config.window_blocks * config.block_size,
                  files=sorted(p.name for p in out.iterdir()), seconds=round(time.perf_counter() - start, 1), **checked)
    if checked:
        print(f"checked: exported logits equal ours to {checked['max_logit_diff']:.1e} over {checked['tokens']} "
              f"tokens; tokenizer ids equal", file=sys.stderr)
    print(json.dumps(result))
    return result


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    try:
        run(args)
    except M.USER_ERRORS as e:
        R.exit_with(2, "export.py", str(e))
    except (RuntimeError, OSError) as e:
        R.exit_with(1, "export.py", M.first_line(e))


if __name__ == "__main__":
    main()
