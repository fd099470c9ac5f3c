"""Evaluate a checkpoint: validation loss, perplexity and bits per byte; generation; multiple-choice accuracy.

    python eval.py                                     # latest checkpoint under logs/: val metrics + samples
    python eval.py --checkpoint logs/RUN/state_step000075.pt --val-tokens 65536
    python eval.py --text notes.txt                    # the same metrics on any UTF-8 text file
    python eval.py --prompt "ROMEO." --num-samples 3 --temperature 0.8 --max-new-tokens 80   # samples only
    python eval.py --val --prompt "ROMEO."             # the val metrics too
    python eval.py --hellaswag data/hellaswag/hellaswag_val.jsonl     # after `python data/hellaswag.py`
    python eval.py --chat-eval data/chat_tasks/heldout.json     # exact match of chat replies + assistant loss
    python eval.py --json                              # the results as JSON on stdout

Results also go to logs/<run_id>/eval_<step>.json beside the checkpoint, merged by section (val, text, choices, chat,
samples) with what earlier runs wrote there, with the settings each section was computed with ("runs").
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

import inference as I
import model as M
import runs as R

MAX_ROW = 8192  # the attention mask is O(row^2) without compiled FlexAttention: longer rows (the speedrun's 256k
# validation rows) are split; the window (<= 1792 tokens) makes the difference small, and the table says so
PROMPTS = {  # seeded samples when no --prompt is given; the play format is what the default corpus looks like
    "shakespeare": ["ROMEO.\n", "KING HENRY.\nNow, my lords,", "To be, or not to be"],
    "web": ["The meaning of life is", "Once upon a time,", "The best way to learn a language is"],
}


def val_budget(text: str) -> int | str:
    """--val-tokens: a token count, or 'all'."""
    return "all" if text.strip().lower() == "all" else int(text)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = R.OneLineParser(prog="eval.py", description=__doc__.split("\n")[0], allow_abbrev=False)
    p.add_argument("--checkpoint", default="latest", help="'latest' (newest under --log-dir) or a path")
    p.add_argument("--log-dir", default="logs")
    p.add_argument("--device", default="auto", help="auto (cuda, mps, cpu) or a torch device")
    p.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp32"],
                   help="autocast for scoring (auto: bf16 where it pays); decoding on CPU runs fp32 unless bf16")
    p.add_argument("--val-files", help="glob of validation shards (default: the checkpoint's)")
    p.add_argument("--val-tokens", type=val_budget, help="token budget for the loss: a multiple of the checkpoint's "
                   "val_seq_len, or 'all' (every full row of the split; default: the checkpoint's budget)")
    p.add_argument("--val", action="store_true", help="score the validation split also when --text, --hellaswag, "
                   "--chat-eval or --prompt is given (without them it is scored anyway)")
    p.add_argument("--text", help="UTF-8 text file to score instead of the validation shards")
    p.add_argument("--hellaswag", help="multiple-choice JSONL (ctx, endings, label per line)")
    p.add_argument("--chat-eval", help="held-out conversations (finetune.py's format): exact match of the generated "
                   "last assistant reply, and the loss on assistant tokens")
    p.add_argument("--limit", type=int, default=0, help="score only the first N multiple-choice / chat examples")
    p.add_argument("--prompt", action="append", help="prompt to continue (repeatable)")
    p.add_argument("--max-new-tokens", type=int, default=100)
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=50, help="0 = no top-k")
    p.add_argument("--top-p", type=float, default=1.0, help="1 = no nucleus cut")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num-samples", type=int, default=1, help="samples per prompt (one prefill shared); 0 = none, "
                   "only the metrics")
    p.add_argument("--no-kv-cache", action="store_true", help="recompute the full context every token (reference)")
    I.add_inference_flags(p, default_weights="fp32")
    p.add_argument("--json", action="store_true", help="print the results as JSON on stdout")
    args = p.parse_args(argv)
    for name in ("max_new_tokens", "num_samples", "limit"):
        if getattr(args, name) < 0:
            p.error(f"--{name.replace('_', '-')}={getattr(args, name)} must be >= 0")
    if isinstance(args.val_tokens, int) and args.val_tokens < 1:
        p.error(f"--val-tokens={args.val_tokens} must be positive")
    for name, ok, rule in (("temperature", args.temperature >= 0, ">= 0"), ("top_k", args.top_k >= 0, ">= 0"),
                           ("top_p", 0 < args.top_p <= 1, "in (0, 1]")):
        if not ok:
            p.error(f"--{name.replace('_', '-')}={getattr(args, name)} must be {rule}")
    return args


@torch.no_grad()
def token_losses(model: M.GPT, inputs: Tensor, targets: Tensor, row_len: int, window_blocks: int,
                 autocast: contextlib.AbstractContextManager | None = None, batch_tokens: int = 8192,
                 head_chunk: int = 2048, bar: Any = None) -> Tensor:
    """Cross-entropy of every target (fp32, shape of targets), the 1-D stream cut into rows of row_len as in
    training (each row starts without context); a shorter last row is padded to whole blocks and its padding
    ignored. The lm_head runs over head_chunk positions at a time, so the full fp32 logits of a long batch are
    never held at once. bar: a runs.progress bar, advanced by the rows of each batch."""
    n = inputs.numel()
    rows_per_batch = max(1, batch_tokens // row_len)
    out = torch.empty(n, dtype=torch.float32, device=inputs.device)
    model.eval()
    for start in range(0, n, row_len * rows_per_batch):
        x = inputs[start:start + row_len * rows_per_batch]
        rows = [x[i:i + row_len] for i in range(0, x.numel(), row_len)]
        width = M.next_multiple_of_n(max(r.numel() for r in rows), n=M.BLOCK_SIZE)
        model.ensure_positions(width)
        x_BT = torch.stack([F.pad(r.long(), (0, width - r.numel())) for r in rows])  # pad id 0 is never EOT
        with autocast or contextlib.nullcontext():
            h = model.hidden_states(x_BT, *model.attention_masks(x_BT, window_blocks))
        h = torch.cat([h[i, :r.numel()] for i, r in enumerate(rows)])  # (tokens, model_dim), padding dropped
        y = targets[start:start + h.size(0)].long()
        for c in range(0, h.size(0), head_chunk):
            with autocast or contextlib.nullcontext():
                logits = model.logits(h[c:c + head_chunk])
            out[start + c:start + c + logits.size(0)] = F.cross_entropy(logits, y[c:c + head_chunk],
                                                                       reduction="none")
        if bar is not None:
            bar.update(len(rows))
    return out


def score_tokens(im: I.InferenceModel, inputs: torch.Tensor, targets: torch.Tensor, row: int,
                 what: str = "val") -> dict[str, Any]:
    """Loss, perplexity and bits per byte of targets given inputs (rows of `row` tokens, as in training); a bar
    on a terminal counts the rows scored (`what` names them)."""
    with R.progress(desc=f"{what} rows", total=-(-targets.numel() // row), unit="row") as bar:
        losses = token_losses(im.model, inputs.to(im.device), targets.to(im.device), row, im.window_blocks,
                              im.autocast(im.score_dtype), bar=bar).cpu().double()
    nbytes = im.tokenizer.byte_lengths(im.model.embed.weight.size(0))[targets.long().cpu()]
    text = nbytes > 0
    loss = float(losses.mean())
    return dict(tokens=targets.numel(), row_len=row, loss=loss, perplexity=math.exp(loss),
                bpb=float(losses[text].sum() / (math.log(2) * nbytes.sum())), bytes=int(nbytes.sum()),
                special_targets_excluded_from_bpb=int((~text).sum()))


def eval_row_len(native: int) -> int:
    """Rows as the checkpoint validates, split at MAX_ROW (the table says so when they are)."""
    return min(native, MAX_ROW)


def eval_val(im: I.InferenceModel, args: argparse.Namespace) -> dict[str, Any]:
    """The checkpoint's validation shards over a fixed budget, batched exactly as training validates; with
    --val-tokens all, every full row of the split (the generator's in-order rows until the shards run out)."""
    hp = im.hp
    files = args.val_files or hp.val_files
    budget = args.val_tokens or hp.val_tokens
    pattern = str(M.resolve_path(files))
    native = hp.row_len or hp.val_seq_len
    if budget == "all":
        loader = M.distributed_data_generator(pattern, native, 0, 1, cycle=False, vocab_size=hp.vocab_size)
        batches = list(loader)
        if not batches:
            raise M.DataError(f"validation files {files!r} hold no full row of {native} tokens")
    else:
        if budget % hp.val_seq_len:
            raise M.ConfigError(f"--val-tokens={budget} must be a multiple of the checkpoint's val_seq_len "
                                f"({hp.val_seq_len})")
        loader = M.distributed_data_generator(pattern, hp.val_seq_len, 0, 1, cycle=False, vocab_size=hp.vocab_size)
        batches = [next(loader, None) for _ in range(budget // hp.val_seq_len)]
        if batches[-1] is None:
            raise M.DataError(f"validation files {files!r} hold fewer than --val-tokens={budget} tokens")
    inputs, targets = torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])
    return dict(files=files, budget=budget, trained_row_len=native,
                **score_tokens(im, inputs, targets, eval_row_len(native)))


def eval_text(im: I.InferenceModel, path: str, budget: int | None) -> dict[str, Any]:
    try:
        text = M.resolve_path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise M.DataError(f"{path}: cannot read as UTF-8 text ({e.__class__.__name__}: {e})") from None
    ids = torch.tensor(im.tokenizer.encode_document(text)[:(budget or 1 << 62) + 1])
    if ids.numel() < 2:
        raise M.DataError(f"{path}: no text to score")
    row = eval_row_len(im.hp.row_len or im.hp.val_seq_len)
    return dict(file=path, **score_tokens(im, ids[:-1], ids[1:], row, what="text"))


def read_choices(path: str, limit: int) -> list[dict[str, Any]]:
    """HellaSwag-format records, each checked: ctx (str), endings (non-empty list of str), label (valid index)."""
    records = []
    try:
        lines = M.resolve_path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise M.DataError(f"{path}: cannot read ({e.__class__.__name__})") from None
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            r = json.loads(line)
        except json.JSONDecodeError as e:
            raise M.DataError(f"{path}:{n}: not JSON ({e.msg})") from None
        ok = isinstance(r, dict) and isinstance(r.get("ctx"), str) and isinstance(r.get("endings"), list) \
            and r["endings"] and all(isinstance(e, str) for e in r["endings"]) and isinstance(r.get("label"), int) \
            and 0 <= r["label"] < len(r["endings"])
        if not ok:
            raise M.DataError(f"{path}:{n}: needs ctx (string), endings (list of strings) and label (index)")
        records.append(r)
        if limit and len(records) == limit:
            break
    if not records:
        raise M.DataError(f"{path}: no records")
    return records


def ending_logprobs(im: I.InferenceModel, ctx: list[int], tails: list[list[int]]) -> list[float]:
    """Summed log-probability of each tail after ctx, all candidates in one batch (one row each, padded)."""
    width = max(len(ctx) + len(t) for t in tails) - 1
    inputs, targets = [], []
    for tail in tails:
        ids = ctx + tail
        pad = [0] * (width - len(ids) + 1)  # after the real tokens, so causality leaves their losses unchanged
        inputs += ids[:-1] + pad
        targets += ids[1:] + pad
    losses = token_losses(im.model, torch.tensor(inputs, device=im.device), torch.tensor(targets, device=im.device),
                          width, im.window_blocks, im.autocast(im.score_dtype)).view(len(tails), width).double().cpu()
    return [-float(losses[i, len(ctx) - 1:len(ctx) - 1 + len(t)].sum()) for i, t in enumerate(tails)]


def eval_choices(im: I.InferenceModel, path: str, limit: int) -> dict[str, Any]:
    """Accuracy by the summed log-likelihood of each ending, and by it per character of the ending (without the
    space that joins it to ctx): lm-evaluation-harness's acc_norm. The ending is scored after <|endoftext|> + ctx."""
    records = read_choices(path, limit)
    correct = correct_norm = 0
    with R.progress(records, desc="multiple choice", unit="example") as bar:
        for r in bar:
            endings = [" " + e.strip() for e in r["endings"]]
            scores = ending_logprobs(im, im.tokenizer.encode_document(r["ctx"]),
                                     [im.tokenizer.encode(e) for e in endings])
            per_char = [score / max(1, len(e) - 1) for score, e in zip(scores, endings)]  # e = " " + ending
            correct += int(max(range(len(scores)), key=scores.__getitem__) == r["label"])
            correct_norm += int(max(range(len(per_char)), key=per_char.__getitem__) == r["label"])
    return dict(file=path, examples=len(records), acc=correct / len(records), acc_norm=correct_norm / len(records))


def eval_chat(im: I.InferenceModel, path: str, limit: int) -> dict[str, Any]:
    """Greedy chat.py-style reply to each conversation's last user turn vs its last assistant message (exact match
    after stripping whitespace, overall and per "task" when records carry one), and the mean loss on assistant
    tokens under chat template v1 (what finetune.py trains)."""
    records = M.load_conversations(M.resolve_path(path))[0][:limit or None]
    hits: dict[str, list[int]] = {}
    loss_sum, loss_count = 0.0, 0
    with R.progress(records, desc="chat eval", unit="conversation") as bar:
        for n, r in enumerate(bar, 1):
            messages = r["messages"]
            last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
            if last == 0 or messages[last - 1]["role"] != "user":
                raise M.DataError(f"{path}: record {n}: the last assistant message must answer a user message")
            reference = messages[last]["content"].strip()
            prompt = I.render_prompt(im.tokenizer, im.kind, messages[:last])
            budget = len(im.tokenizer.encode(reference)) + 16  # room to stop; a reply that does not is wrong anyway
            reply = "".join(I.stream_reply(im, prompt, max_new_tokens=budget)).strip()
            hits.setdefault(str(r.get("task", "all")), []).append(int(reply == reference))
            ids, mask = M.render_conversation(im.tokenizer, messages[:last + 1])
            x, y = torch.tensor(ids[:-1], device=im.device), torch.tensor(ids[1:], device=im.device)
            losses = token_losses(im.model, x, y, len(ids) - 1, im.window_blocks, im.autocast(im.score_dtype))
            trained = torch.tensor(mask[1:], dtype=torch.bool, device=im.device)
            loss_sum += float(losses[trained].double().sum())
            loss_count += int(trained.sum())
    everything = [h for task in hits.values() for h in task]
    return dict(file=path, conversations=len(records), exact_match=sum(everything) / len(everything),
                by_task={task: sum(h) / len(h) for task, h in sorted(hits.items())},
                assistant_loss=loss_sum / loss_count, assistant_tokens=loss_count)


def eval_samples(im: I.InferenceModel, args: argparse.Namespace, prompts: list[str], out: Any) -> list[dict[str, Any]]:
    """Streamed continuations (printed as they come when there is one sample per prompt)."""
    results = []
    for i, prompt in enumerate(prompts):
        start = time.perf_counter()
        decoders = [I.StreamDecoder(im.tokenizer) for _ in range(args.num_samples)]
        texts = [""] * args.num_samples
        samples = f", {args.num_samples} samples" if args.num_samples > 1 else ""
        print(f"--- prompt {i + 1}/{len(prompts)} (seed {args.seed + i}{samples}) ---\n{prompt}", end="", file=out,
              flush=True)
        steps = I.generate(im.model, im.tokenizer.encode_document(prompt), window_blocks=im.window_blocks,
                           max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                           top_p=args.top_p, seed=args.seed + i, num_samples=args.num_samples,
                           vocab_limit=im.vocab_limit,
                           use_cache=not args.no_kv_cache, autocast=im.autocast(im.decode_dtype))
        new_tokens = 0
        for step in steps:
            for j, token in enumerate(step):
                if token is not None:
                    piece = decoders[j].add(token)
                    texts[j] += piece
                    new_tokens += 1
                    if args.num_samples == 1:
                        print(piece, end="", file=out, flush=True)
        texts = [t + d.flush() for t, d in zip(texts, decoders)]
        if args.num_samples > 1:
            print("\n".join(f"\n[{j + 1}] {prompt}{t}" for j, t in enumerate(texts)), end="", file=out)
        seconds = time.perf_counter() - start
        print(f"\n({new_tokens} tokens, {new_tokens / seconds:.1f} tokens/s)", file=out)
        results.append(dict(prompt=prompt, completions=texts, seed=args.seed + i, new_tokens=new_tokens,
                            tokens_per_s=new_tokens / seconds))
    return results


def print_table(im: I.InferenceModel, results: dict[str, Any], out: Any) -> None:
    print(f"device: {im.device}, scoring dtype: {im.score_dtype or torch.float32}, "
          f"weights: {im.weights}, "
          f"attention window: {im.window_blocks * im.model.window_block} tokens", file=out)
    rows = []
    for name in ("val", "text"):
        if name in results:
            r = results[name]
            what = f"{r['tokens']:,} tokens of {r.get('files') or r.get('file')}, rows of {r['row_len']}"
            if r.get("budget") == "all":
                what += " (every full row of the split)"
            if r.get("trained_row_len", r["row_len"]) != r["row_len"]:
                what += f" (split from the checkpoint's {r['trained_row_len']:,}-token validation rows)"
            rows += [(f"{name} loss (nats/token)", f"{r['loss']:.4f}", what),
                     (f"{name} perplexity", f"{r['perplexity']:.2f}", ""),
                     (f"{name} bits per byte", f"{r['bpb']:.4f}", f"{r['bytes']:,} UTF-8 bytes; "
                      f"{r['special_targets_excluded_from_bpb']} special-token targets excluded")]
    if "chat" in results:
        r = results["chat"]
        tasks = ", ".join(f"{t} {a:.2f}" for t, a in r["by_task"].items())
        rows += [("chat exact match", f"{r['exact_match']:.4f}", f"{r['conversations']} conversations of {r['file']}"
                  + (f" ({tasks})" if len(r["by_task"]) > 1 else "")),
                 ("chat assistant loss", f"{r['assistant_loss']:.4f}", f"{r['assistant_tokens']:,} assistant tokens, "
                  f"chat template v{M.CHAT_TEMPLATE_VERSION}")]
    if "choices" in results:
        r = results["choices"]
        rows += [("multiple-choice acc", f"{r['acc']:.4f}", f"{r['examples']} examples of {r['file']}"),
                 ("multiple-choice acc_norm", f"{r['acc_norm']:.4f}", "log-likelihood per character of the ending")]
    for metric, value, note in rows:
        print(f"{metric:<28} {value:>10}  {note}".rstrip(), file=out)


SECTIONS = {"val": ("val",), "text": ("text",), "choices": ("choices",), "chat": ("chat",),
            "samples": ("samples", "sampling")}  # what one kind of evaluation writes into the results file
RUN_SETTINGS = ("device", "dtype", "weights", "compiled_decoding", "window_tokens", "eval_seconds")


def merge_results(old: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    """The results file after this run: every section an earlier run wrote and this one did not compute is kept;
    this run's sections replace theirs; "runs" says, per section, the settings and date it was computed with."""
    merged = {**old, **new}
    settings = {k: new[k] for k in RUN_SETTINGS if k in new} | {"date": time.strftime("%Y-%m-%d %H:%M:%S")}
    merged["runs"] = {**old.get("runs", {}), **{kind: settings for kind, keys in SECTIONS.items() if keys[0] in new}}
    return merged


def write_results(im: I.InferenceModel, results: dict[str, Any]) -> Path | None:
    """logs/<run_id>/eval_<step>.json beside the checkpoint (eval_<step>_int8.json etc. for rounded weights, so they
    never replace the reference's), merged by section with what earlier runs wrote there (merge_results) and
    written atomically; None if not writable."""
    path = im.path.parent / f"eval_{im.step}{'' if im.weights == 'fp32' else '_' + im.weights}.json"
    try:
        old = json.loads(path.read_text()) if path.is_file() else {}
    except (OSError, ValueError):
        old = {}  # unreadable: this run's results replace it
    try:
        with M.atomic_write(path, "w") as f:
            f.write(json.dumps(merge_results(old if isinstance(old, dict) else {}, results), indent=2) + "\n")
    except OSError as e:
        print(f"eval.py: warning: results not saved to {path} ({e.strerror})", file=sys.stderr)
        return None
    return path


def run(args: argparse.Namespace) -> dict[str, Any]:
    out = sys.stderr if args.json else sys.stdout
    im = I.load_for_inference(args.checkpoint, args.log_dir, args.device, args.dtype, weights=args.weights,
                              compile_decode=args.compile == "on")
    results: dict[str, Any] = dict(checkpoint=str(im.path), step=im.step, kind=im.kind, preset=im.hp.preset,
                                   device=str(im.device), dtype=str(im.score_dtype or torch.float32),
                                   weights=im.weights, compiled_decoding=im.compiled,
                                   window_tokens=im.window_blocks * im.model.window_block)
    print(f"checkpoint: {im.describe()}", file=out, flush=True)
    start = time.perf_counter()
    default = not (args.text or args.hellaswag or args.prompt or args.chat_eval)
    if args.prompt and not (args.val or args.text or args.hellaswag or args.chat_eval):
        print("eval.py: --prompt given: samples only (add --val to score the validation split too)", file=out)
    if default or args.val:
        results["val"] = eval_val(im, args)
    if args.text:
        results["text"] = eval_text(im, args.text, None if args.val_tokens == "all" else args.val_tokens)
    if args.hellaswag:
        results["choices"] = eval_choices(im, args.hellaswag, args.limit)
    if args.chat_eval:
        I.announce_decode_compile(im)
        results["chat"] = eval_chat(im, args.chat_eval, args.limit)
    if any(k in results for k in ("val", "text", "choices", "chat")):
        print_table(im, results, out)
    if (default or args.prompt) and args.num_samples:
        if not args.chat_eval:  # that announced it before its first reply
            I.announce_decode_compile(im)
        prompts = args.prompt or PROMPTS["shakespeare" if M.preset_data(im.hp) == "shakespeare" else "web"]
        results["samples"] = eval_samples(im, args, prompts, out)
        results["sampling"] = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                                   top_k=args.top_k, top_p=args.top_p, kv_cache=not args.no_kv_cache)
    results["eval_seconds"] = time.perf_counter() - start
    saved = write_results(im, results)
    if saved:
        print(f"results: {saved}", file=out)
    if args.json:
        print(json.dumps(results, indent=2))
    return results


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    try:
        run(args)
    except M.USER_ERRORS as e:
        R.exit_with(2, "eval.py", str(e))


if __name__ == "__main__":
    main()
