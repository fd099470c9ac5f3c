"""Benchmarks that print figures, each against a baseline measured in the same run (never a timed test).

    python bench.py                          # every benchmark, on the device it finds
    python bench.py --only decode --json     # decode tokens/s: KV cache vs full recompute vs transformers

decode: greedy tokens/s of model.generate (KV cache, and the full-recompute reference) and of Hugging Face
transformers' GPT2LMHeadModel.generate (use_cache on and off) at the same width, depth and vocabulary, random
weights, batch 1 and 8, after one warm-up call; the median of --repeats runs.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from typing import Any, Callable

import torch

import model as M

SHAPES = {  # name: (preset, overrides) -- the model shapes users train here
    "shakespeare": ("shakespeare", {}),
    "speedrun-124M": ("speedrun", {}),
}


def median_seconds(fn: Callable[[], Any], repeats: int) -> float:
    fn()  # warm-up: first-call allocations and kernel selection stay off the clock
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def ours(hp: M.Hyperparameters, device: torch.device) -> M.GPT:
    torch.manual_seed(0)
    model = M.GPT.from_hparams(hp).to(device).eval()
    with torch.no_grad():  # the zero-initialised head would make every logit equal
        model.lm_head.weight.normal_(0, 0.02)
    return model


def hf_gpt2(hp: M.Hyperparameters, device: torch.device) -> Any:
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(vocab_size=M.next_multiple_of_n(hp.vocab_size, n=128), n_positions=4096,
                        n_embd=hp.model_dim, n_layer=hp.num_layers, n_head=hp.num_heads)
    torch.manual_seed(0)
    return GPT2LMHeadModel(config).to(device).eval()


def bench_decode(device: torch.device, repeats: int, new_tokens: int) -> list[dict[str, Any]]:
    rows = []
    prompt = [M.EOT_ID] + list(range(1000, 1015))  # 16 tokens: decoding dominates
    for shape, (preset, overrides) in SHAPES.items():
        hp = M.Hyperparameters(**dict(M.PRESETS[preset], **overrides))
        model, hf = ours(hp, device), hf_gpt2(hp, device)
        window = M.final_window_blocks(hp)
        for batch in (1, 8):
            def run_ours(cache: bool, n: int) -> None:
                for _ in M.generate(model, prompt, window_blocks=window, max_new_tokens=n, num_samples=batch,
                                    stop_ids=(), use_cache=cache):
                    pass

            def run_hf(cache: bool, n: int) -> None:
                ids = torch.tensor([prompt] * batch, device=device)
                with torch.no_grad():
                    hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                                do_sample=False, use_cache=cache, pad_token_id=M.EOT_ID)

            slow_tokens = max(8, new_tokens // 4)  # the no-cache paths are O(context) per token
            figures = {
                "ours_kv": new_tokens / median_seconds(lambda: run_ours(True, new_tokens), repeats),
                "ours_recompute": slow_tokens / median_seconds(lambda: run_ours(False, slow_tokens), repeats),
                "hf_kv": new_tokens / median_seconds(lambda: run_hf(True, new_tokens), repeats),
                "hf_recompute": slow_tokens / median_seconds(lambda: run_hf(False, slow_tokens), repeats),
            }
            rows.append(dict(shape=shape, batch=batch, new_tokens=new_tokens, **{k: round(v * batch, 1)
                             for k, v in figures.items()}, kv_vs_hf=round(figures["ours_kv"] / figures["hf_kv"], 2),
                             kv_vs_recompute=round(figures["ours_kv"] / figures["ours_recompute"], 1)))
            print(f"decode {shape:<14} batch {batch}: ours KV {rows[-1]['ours_kv']:>7.1f} tok/s, recompute "
                  f"{rows[-1]['ours_recompute']:>6.1f}; transformers KV {rows[-1]['hf_kv']:>7.1f}, recompute "
                  f"{rows[-1]['hf_recompute']:>6.1f}; ours/transformers {rows[-1]['kv_vs_hf']:.2f}x",
                  file=sys.stderr, flush=True)
    return rows


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="bench.py", description=__doc__.split("\n")[0])
    p.add_argument("--only", choices=["decode"], help="run one benchmark")
    p.add_argument("--device", default="auto")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--json", action="store_true", help="print the results as JSON on stdout")
    args = p.parse_args(argv)
    device = M.detect_device(args.device)
    results: dict[str, Any] = dict(device=str(device), torch=torch.__version__, threads=torch.get_num_threads())
    results["decode"] = bench_decode(device, args.repeats, args.new_tokens)
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        print(f"{'shape':<14} {'batch':>5} {'ours KV':>9} {'ours full':>9} {'HF KV':>9} {'HF full':>9} "
              f"{'ours/HF':>8}  (tokens/s, {device}, {results['threads']} threads)")
        for r in results["decode"]:
            print(f"{r['shape']:<14} {r['batch']:>5} {r['ours_kv']:>9.1f} {r['ours_recompute']:>9.1f} "
                  f"{r['hf_kv']:>9.1f} {r['hf_recompute']:>9.1f} {r['kv_vs_hf']:>7.2f}x")


if __name__ == "__main__":
    main()
