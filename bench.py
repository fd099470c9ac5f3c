"""Benchmarks that print figures, each against a baseline measured in the same run (never a timed test).

    python bench.py                          # every benchmark, on the device it finds
    python bench.py --only matmul train      # the matrix-product peak, then training throughput and MFU
    python bench.py --only decode --json     # decode tokens/s: KV cache vs full recompute vs transformers

matmul: the machine's matrix-product rate in fp32 and bf16 (square products, median of --repeats): the peak that
    model-FLOPs utilisation (MFU) is measured against.
train: tokens/s of full training steps (forward+backward, Newton-Schulz, the rest of the optimizer step) for the
    shakespeare preset and the 124M speedrun shape, after --warmup steps, with MFU against this run's matmul peak
    (model FLOPs: 6 per matmul weight per token, plus attention over the keys each query attends), and peak
    memory. Each shape runs in its own process, so peak memory is that shape's.
modifiers: tokens/s of the shakespeare preset's training step with each loss modifier (label smoothing, z-loss,
    entropy, all three), each in its own process, against the plain step timed first and last in the same run.
trackers: milliseconds per logged step (step line + metrics record) with console and metrics.jsonl only, and with
    TensorBoard, W&B (offline) and both on top, as a ratio against console-only.
decode: greedy tokens/s of model.generate (KV cache, and the full-recompute reference) and of Hugging Face
    transformers' GPT2LMHeadModel.generate (use_cache on and off) at the same width, depth and vocabulary,
    random weights, batch 1 and 8, after one warm-up call; the median of --repeats runs. Each row also gives the
    bytes a decoded token reads (every matrix once per step, shared by the batch, plus its embedding rows and
    cached keys and values) and the memory-bandwidth utilisation (MBU) against a streaming read measured first.
data: tokens/s of the shard loader (the training generator over the Shakespeare shards, shuffled rows).

    python bench.py --ablation logs/ablation/muon logs/ablation/adamw-3e-3 --plot docs/muon_vs_adamw.png

    python bench.py --ablation logs/ablation-loss/none logs/ablation-loss/ls-0.1 --plot docs/loss_modifiers.png

ablation: final val loss of finished pretraining runs and the training time each needed to reach the first run's
    final val loss (docs/muon_vs_adamw.md, docs/loss_modifiers.md), plus a PNG of val loss against tokens and
    against seconds.
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch

import model as M
import runs as R
import pretraining

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


# -----------------------------------------------------------------------------
# matmul peak


def bench_matmul(device: torch.device, repeats: int, n: int = 2048) -> dict[str, float]:
    """GFLOP/s of an n x n x n product in fp32 and bf16: the reference for utilisation."""
    rates = {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)

        def product() -> None:
            for _ in range(4):
                torch.mm(a, b)
            if device.type == "cuda":
                torch.cuda.synchronize()

        rates[name] = round(4 * 2 * n**3 / median_seconds(product, repeats) / 1e9, 1)
    print(f"matmul {n}x{n}: fp32 {rates['fp32']:.0f} GFLOP/s, bf16 {rates['bf16']:.0f} GFLOP/s", file=sys.stderr)
    return rates


# -----------------------------------------------------------------------------
# training throughput


def train_config(shape: str, device: torch.device, compile: str = "auto",
                 overrides: dict[str, Any] | None = None) -> M.Hyperparameters:
    """The shakespeare preset as `python pretraining.py` runs it; the 124M speedrun shape with the record's
    micro-batch on a GPU, and on a CPU one 4096-token micro-batch per step (a record step of 393k tokens would
    take minutes there)."""
    preset = "shakespeare" if shape == "shakespeare" else "speedrun"
    hp = M.Hyperparameters(**dict(M.PRESETS[preset], preset=preset, device=str(device), warmup_steps=0,
                                  compile=compile, **(overrides or {})))
    if preset == "speedrun" and device.type != "cuda":
        hp.train_seq_len, hp.rank_equivalents = 4096, 1
    return hp.validate()


def mean_keys_per_query(row: int, window: int) -> float:
    """Keys a query attends to on average in a causal row of `row` tokens with a `window`-token sliding window."""
    w = min(window, row)
    return (w * (w + 1) / 2 + (row - w) * w) / row


def model_flops_per_token(model: M.GPT, hp: M.Hyperparameters, window_blocks: int) -> float:
    """Forward + backward FLOPs per trained token: 6 per matmul weight (lm_head included, embedding lookups not),
    plus 12 * head width * attended keys per attention layer (QK^T and AV, forward and backward)."""
    matmul = sum(p.numel() for n, p in model.named_parameters() if p.ndim >= 2 and "embed" not in n)
    row = hp.row_len or hp.train_seq_len
    flops = 6.0 * matmul
    for i, long in enumerate(M.long_window_layers(hp.num_layers)):
        if i != hp.no_attn_layer:
            blocks = window_blocks if long else window_blocks // 2
            flops += 12 * hp.num_heads * hp.head_dim * mean_keys_per_query(row, blocks * M.BLOCK_SIZE)
    return flops


def peak_memory_mib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB; the process's peak RSS


def bench_train_shape(shape: str, device: torch.device, steps: int, warmup: int, compile: str = "auto",
                      overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """Full optimizer steps on random tokens, timed in three parts: forward+backward, Newton-Schulz (inside
    Muon.step), and the rest of the optimizer step (Adam, Muon's momentum and all-gathers)."""
    hp = train_config(shape, device, compile, overrides)
    rt = M.init_runtime(hp, whole_model_on_cpu=True)  # what pretraining.py runs
    torch.manual_seed(0)
    raw, forward = M.build_model(hp, rt)
    optimizers = M.setup_optimizers(raw, hp, compile_ns=rt.compile)
    muon = optimizers[-1]
    ns_seconds = [0.0]
    orthogonalise = muon.orthogonalise

    def timed_orthogonalise(g: torch.Tensor, ns_steps: int) -> torch.Tensor:
        start = time.perf_counter()
        out = orthogonalise(g, ns_steps)
        rt.synchronize()
        ns_seconds[0] += time.perf_counter() - start
        return out

    muon.orthogonalise = timed_orthogonalise
    tokens = torch.randint(0, hp.vocab_size, (hp.tokens_per_step + 1,), device=rt.device)
    batch = (tokens[:-1].to(torch.int32), tokens[1:].to(torch.int64))
    window_blocks = M.get_window_size_blocks(hp.num_iterations - 1, hp)
    window = torch.tensor(window_blocks, dtype=torch.int32, device=rt.device)
    parts = []
    for step in range(warmup + steps):
        ns_seconds[0] = 0.0
        rt.synchronize()
        t0 = time.perf_counter()
        pretraining.train_micro_batches(forward, batch, hp, rt, window)
        rt.synchronize()
        t1 = time.perf_counter()
        M.apply_schedules(optimizers, step, hp)
        for opt in optimizers:
            opt.step()
        raw.zero_grad(set_to_none=True)
        rt.synchronize()
        t2 = time.perf_counter()
        if step >= warmup:
            parts.append((t1 - t0, ns_seconds[0], t2 - t1 - ns_seconds[0]))
    fwd_bwd, ns, rest = (statistics.median(p[i] for p in parts) for i in range(3))
    total = fwd_bwd + ns + rest
    flops = model_flops_per_token(raw, hp, window_blocks) * hp.tokens_per_step
    return dict(shape=shape, device=str(rt.device), dtype=str(rt.autocast_dtype or torch.float32).split(".")[-1],
                compile="model" if rt.compile else "loss-head" if rt.compile_head else "off",
                tokens_per_step=hp.tokens_per_step, params=M.param_counts(raw)["total"],
                step_ms=round(1000 * total, 1), tokens_per_s=round(hp.tokens_per_step / total),
                fwd_bwd_ms=round(1000 * fwd_bwd, 1), newton_schulz_ms=round(1000 * ns, 1),
                optimizer_rest_ms=round(1000 * rest, 1), model_tflops=round(flops / total / 1e12, 4),
                peak_memory_mib=round(peak_memory_mib(rt.device)))


def bench_train(device: torch.device, steps: int, warmup: int, peak: dict[str, float],
                compile: str = "auto") -> list[dict[str, Any]]:
    """Each shape in a fresh process (its own peak memory); MFU against the matmul peak of the training dtype."""
    rows = []
    for shape in ("shakespeare", "speedrun-124M"):
        row = train_shape_process(shape, device, steps, warmup, compile)
        reference = peak.get(row["dtype"].replace("bfloat16", "bf16").replace("float32", "fp32"))
        row["mfu"] = round(1000 * row["model_tflops"] / reference, 3) if reference else None
        rows.append(row)
        print(f"train {shape:<14} {row['tokens_per_s']:>8,} tok/s  step {row['step_ms']:.0f} ms (fwd+bwd "
              f"{row['fwd_bwd_ms']:.0f}, Newton-Schulz {row['newton_schulz_ms']:.0f}, "
              f"rest {row['optimizer_rest_ms']:.0f})"
              f"  {1000 * row['model_tflops']:.0f} GFLOP/s = MFU {row['mfu']:.0%} of {row['dtype']} peak  "
              f"peak memory {row['peak_memory_mib']:,} MiB", file=sys.stderr, flush=True)
    return rows


# -----------------------------------------------------------------------------
# loss modifiers and trackers: what each costs against the plain run, in the same sitting

MODIFIER_SETTINGS = [("plain cross-entropy", {}), ("label smoothing 0.1", dict(label_smoothing=0.1)),
                     ("z-loss 1e-4", dict(z_loss=1e-4)), ("entropy -0.01", dict(entropy_weight=-0.01)),
                     ("all three", dict(label_smoothing=0.1, z_loss=1e-4, entropy_weight=-0.01))]


def train_shape_process(shape: str, device: torch.device, steps: int, warmup: int, compile: str,
                        overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--train-shape", shape, "--device", str(device),
           "--steps", str(steps), "--warmup", str(warmup), "--compile", compile,
           "--overrides", json.dumps(overrides or {})]
    out = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise SystemExit(f"bench.py: training benchmark of {shape} {overrides or ''} failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout)


def bench_modifiers(device: torch.device, steps: int, warmup: int, compile: str = "auto") -> list[dict[str, Any]]:
    """Tokens/s of the shakespeare preset's training step with each loss modifier, against the plain step timed
    first and again last (their mean is the baseline, which cancels a slow drift of the machine)."""
    settings = MODIFIER_SETTINGS + [MODIFIER_SETTINGS[0]]
    rows = [dict(setting=name, **train_shape_process("shakespeare", device, steps, warmup, compile, over))
            for name, over in settings]
    plain = statistics.mean([rows[0]["tokens_per_s"], rows[-1]["tokens_per_s"]])
    for row in rows:
        row["vs_plain"] = round(row["tokens_per_s"] / plain, 3)
        print(f"modifiers {row['setting']:<20} {row['tokens_per_s']:>7,} tok/s  {row['vs_plain']:.3f}x plain  "
              f"peak memory {row['peak_memory_mib']:,} MiB", file=sys.stderr, flush=True)
    return rows


def bench_trackers(calls: int = 200) -> list[dict[str, Any]]:
    """Seconds per logged step (a step line on the console plus its metrics record) with console + metrics.jsonl
    only, then with TensorBoard and with W&B offline as well; the ratio is against console-only."""
    import contextlib
    import io
    import os
    import tempfile

    os.environ.setdefault("WANDB_MODE", "offline")
    record = dict(train_loss=4.6, train_ce=4.5, train_z_loss=0.07, train_time_ms=1e5, lr_mult=0.5)
    rows = []
    for trackers in ("", "tensorboard", "wandb", "tensorboard,wandb"):
        with tempfile.TemporaryDirectory() as tmp:
            run_dir = Path(tmp) / "bench"
            run_dir.mkdir()
            hp = M.Hyperparameters(trackers=trackers, run_id="bench").validate()
            rt = M.Runtime(device=torch.device("cpu"))
            with contextlib.redirect_stdout(io.StringIO()):
                log = R.RunLog(rt, run_dir, R.open_trackers(hp, rt, run_dir, resumed=False))
                log.header(hp, {"model.py": "# code"})
                start = time.perf_counter()
                for step in range(1, calls + 1):
                    log.print(f"step:{step} train_loss:4.6000")
                    log.metrics(step=step, **record)
                per_step = (time.perf_counter() - start) / calls
                log.close()
        rows.append(dict(trackers=trackers or "console + metrics.jsonl", ms_per_step=round(1000 * per_step, 3)))
    for row in rows:
        row["vs_console"] = round(row["ms_per_step"] / rows[0]["ms_per_step"], 1)
        print(f"trackers {row['trackers']:<24} {row['ms_per_step']:>8.3f} ms per logged step  "
              f"{row['vs_console']:.1f}x console-only", file=sys.stderr, flush=True)
    return rows


# -----------------------------------------------------------------------------
# data loader


def bench_data(batches: int = 200) -> list[dict[str, Any]]:
    """Tokens/s of the training generator over the Shakespeare shards: shuffled rows (the preset) and the record's
    sequential stream."""
    R.import_data_script("shakespeare").prepare()
    pattern = str(M.REPO_DIR / M.PRESETS["shakespeare"]["train_files"])
    rows = []
    for mode, shuffle in (("shuffled rows", 0), ("sequential", None)):
        loader = M.distributed_data_generator(pattern, 8192, 0, 1, row_len=256, shuffle_seed=shuffle,
                                              vocab_size=50257)
        next(loader)
        start = time.perf_counter()
        for _ in range(batches):
            next(loader)
        rate = batches * 8192 / (time.perf_counter() - start)
        rows.append(dict(mode=mode, batch_tokens=8192, tokens_per_s=round(rate)))
        print(f"data {mode:<14} {rate:>12,.0f} tok/s", file=sys.stderr, flush=True)
    return rows


# -----------------------------------------------------------------------------
# optimizer ablation (reads finished pretraining runs)


def read_run(run_dir: Path) -> dict[str, Any]:
    """A run's validation curve: tokens seen and training seconds (validation excluded) at each val loss."""
    hp = M.saved_config(json.loads((run_dir / R.RUN_INFO).read_text()), run_dir / R.RUN_INFO)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    val = [r for r in rows if "val_loss" in r]
    label = ", ".join([("Muon + Adam" if hp.optimizer == "muon" else f"AdamW lr {hp.adamw_lr:g}"),
                       *[f"{name.replace('z_', 'z-').replace('_', ' ')} {getattr(hp, field):g}"
                         for name, (field, _) in M.BUILTIN_MODIFIERS.items() if getattr(hp, field)],
                       *([hp.loss_terms] if hp.loss_terms else []), f"{hp.num_iterations} steps"])
    return dict(run=run_dir.name, label=label, optimizer=hp.optimizer, steps=[r["step"] for r in val],
                tokens=[r["step"] * hp.tokens_per_step for r in val], seconds=[r["train_time_ms"] / 1000 for r in val],
                val_loss=[r["val_loss"] for r in val])


def seconds_to_reach(run: dict[str, Any], loss: float) -> float | None:
    """Training seconds at which a run's validation loss first reaches `loss` (linear between validations)."""
    points = list(zip(run["seconds"], run["val_loss"]))
    for (t0, l0), (t1, l1) in zip(points, points[1:]):
        if l1 <= loss:
            return t1 if l0 == l1 else t0 + (t1 - t0) * (l0 - loss) / (l0 - l1)
    return None


def ablation(run_dirs: list[Path], png: Path | None, zoom: bool = False) -> list[dict[str, Any]]:
    """Final val loss per run, and how long each run needed to reach the first (reference) run's final loss."""
    runs = [read_run(d) for d in run_dirs]
    target = runs[0]["val_loss"][-1]
    rows = [dict(run=r["run"], label=r["label"], tokens=r["tokens"][-1], seconds=round(r["seconds"][-1], 1),
                 final_val_loss=round(r["val_loss"][-1], 4), seconds_to_reference=seconds_to_reach(r, target))
            for r in runs]
    for row in rows:
        reach = row["seconds_to_reference"]
        ratio = f"{reach / rows[0]['seconds_to_reference']:.1f}x" if reach and rows[0]["seconds_to_reference"] else ""
        print(f"{row['label']:<44} {row['tokens']:>9,} tokens {row['seconds']:>7.0f} s  val {row['final_val_loss']:.4f}"
              f"  reaches {target:.4f} at " + (f"{reach:.0f} s ({ratio})" if reach else "never"))
    if png is not None:
        plot_ablation(runs, png, zoom)
    return rows


def plot_ablation(runs: list[dict[str, Any]], png: Path, zoom: bool = False) -> None:
    """Val loss against tokens and against training time; zoom: the second half of training by tokens instead
    of time (for runs whose wall clocks are not comparable, or whose curves differ by less than a line's width)."""
    try:
        import matplotlib
    except ImportError:
        raise SystemExit("bench.py: error: --plot needs matplotlib (pip install matplotlib==3.11.2)") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=not zoom)
    for run in runs:
        style = "-" if run["optimizer"] == "muon" else "--"
        axes[0].plot([t / 1e6 for t in run["tokens"]], run["val_loss"], style, label=run["label"])
        if zoom:
            half = [(t / 1e6, v) for t, v in zip(run["tokens"], run["val_loss"]) if t >= run["tokens"][-1] / 2]
            axes[1].plot(*zip(*half), style + "o", markersize=3, label=run["label"])
        else:
            axes[1].plot([s / 60 for s in run["seconds"]], run["val_loss"], style, label=run["label"])
    axes[0].set_xlabel("training tokens (millions)")
    axes[1].set_xlabel("training tokens (millions), second half" if zoom
                       else "training time (minutes, validation excluded)")

    axes[0].set_ylabel("validation loss (nats)")
    axes[0].set_ylim(top=min(8.0, max(max(r["val_loss"]) for r in runs)))
    for ax in axes:
        ax.axhline(runs[0]["val_loss"][-1], color="gray", linewidth=0.8, linestyle=":")  # the reference's final
        ax.grid(alpha=0.3)
    axes[0 if zoom else 1].legend()  # zoomed, the curves fill the second panel
    compared = "Muon vs the AdamW ablation" if any(r["optimizer"] != "muon" for r in runs) else "loss modifiers"
    fig.suptitle(f"Shakespeare preset on a 2-core CPU: {compared}")
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=110)
    print(f"plot: {png}", file=sys.stderr)


# -----------------------------------------------------------------------------
# decode: memory bandwidth, the bytes a decoded token reads, tokens/s against transformers


def bench_bandwidth(device: torch.device, repeats: int, mib: int = 1024) -> float:
    """GB/s of a streaming read: summing a tensor of `mib` MiB (far beyond any cache), median of repeats. The
    ceiling a memory-bound decode step is measured against (MBU)."""
    x = torch.ones(mib * 2**20 // 4, device=device)

    def read() -> None:
        x.sum()
        if device.type == "cuda":
            torch.cuda.synchronize()

    rate = x.numel() * x.element_size() / median_seconds(read, repeats) / 1e9
    print(f"memory bandwidth ({mib} MiB streaming read): {rate:.1f} GB/s", file=sys.stderr)
    return round(rate, 2)


def decode_keys(context: int, window_blocks: int) -> int:
    """Keys each attention layer reads for the token at position context - 1: the KV cache reads one range for all
    layers, from the first block the long window keeps (model.cached_mask_rows) to the token itself."""
    docs = torch.ones(1, context, dtype=torch.long)  # one document: the window alone bounds the keys
    start, _ = M.cached_mask_rows(docs, context - 1, window_blocks)
    return context - start


def decode_bytes_per_token(model: M.GPT, context: int, window_blocks: int, batch: int = 1,
                           weight_bytes: int = 4, cache_bytes: int = 4) -> dict[str, float]:
    """Bytes one decode step reads, per token of the batch: every matrix once per step (shared by the batch), the
    embedding rows of each sequence's token, and each sequence's cached keys and values in every attention layer.
    Scalars (lambdas, skip weights) are counted with the matrices; activations are not counted (they stay in cache)."""
    rows = sum(p.numel() for n, p in model.named_parameters() if "embed" not in n)  # matrices and scalars
    embed_rows = (1 + len(model.value_embeds)) * model.model_dim  # one row of each table per sequence
    attn_layers = sum(b.attn is not None for b in model.blocks)
    head_width = next(b.attn.num_heads * b.attn.head_dim for b in model.blocks if b.attn is not None)
    kv = attn_layers * 2 * head_width * decode_keys(context, window_blocks)
    weights = rows * weight_bytes / batch
    cache = (kv * cache_bytes + embed_rows * weight_bytes)
    return dict(weights=weights, cache_and_embeddings=cache, total=weights + cache)


def bench_decode(device: torch.device, repeats: int, new_tokens: int,
                 bandwidth: float | None = None) -> list[dict[str, Any]]:
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
            context = len(prompt) + new_tokens // 2  # the middle of the timed run
            read = decode_bytes_per_token(model, context, window, batch)
            tokens_per_s = figures["ours_kv"] * batch
            rows.append(dict(shape=shape, batch=batch, new_tokens=new_tokens, **{k: round(v * batch, 1)
                             for k, v in figures.items()}, kv_vs_hf=round(figures["ours_kv"] / figures["hf_kv"], 2),
                             kv_vs_recompute=round(figures["ours_kv"] / figures["ours_recompute"], 1),
                             bytes_per_token=round(read["total"]), weight_bytes_per_token=round(read["weights"]),
                             mbu=round(read["total"] * tokens_per_s / (bandwidth * 1e9), 3) if bandwidth else None))
            print(f"decode {shape:<14} batch {batch}: ours KV {rows[-1]['ours_kv']:>7.1f} tok/s, recompute "
                  f"{rows[-1]['ours_recompute']:>6.1f}; transformers KV {rows[-1]['hf_kv']:>7.1f}, recompute "
                  f"{rows[-1]['hf_recompute']:>6.1f}; ours/transformers {rows[-1]['kv_vs_hf']:.2f}x; "
                  f"{read['total'] / 1e6:.1f} MB per token" +
                  (f", MBU {rows[-1]['mbu']:.0%}" if bandwidth else ""), file=sys.stderr, flush=True)
    return rows


BENCHMARKS = ("matmul", "train", "modifiers", "trackers", "decode", "data")


def print_table(results: dict[str, Any]) -> None:
    if "matmul" in results:
        m = results["matmul"]
        print(f"matmul peak: fp32 {m['fp32']:.0f} GFLOP/s, bf16 {m['bf16']:.0f} GFLOP/s ({results['device']}, "
              f"{results['threads']} threads)")
    if "train" in results:
        print(f"{'train shape':<14} {'tok/s':>8} {'step ms':>8} {'fwd+bwd':>8} {'N-S':>7} {'opt rest':>8} "
              f"{'GFLOP/s':>8} {'MFU':>6} {'dtype':>9} {'peak MiB':>9}")
        for r in results["train"]:
            print(f"{r['shape']:<14} {r['tokens_per_s']:>8,} {r['step_ms']:>8.0f} {r['fwd_bwd_ms']:>8.0f} "
                  f"{r['newton_schulz_ms']:>7.0f} {r['optimizer_rest_ms']:>8.0f} {1000 * r['model_tflops']:>8.0f} "
                  f"{r['mfu']:>6.0%} {r['dtype']:>9} {r['peak_memory_mib']:>9,}")
    for r in results.get("modifiers", []):
        print(f"training with {r['setting']:<20} {r['tokens_per_s']:>7,} tok/s  {r['vs_plain']:.3f}x plain")
    for r in results.get("trackers", []):
        print(f"logging to {r['trackers']:<24} {r['ms_per_step']:>8.3f} ms/step  {r['vs_console']:.1f}x console-only")
    if "decode" in results:
        print(f"{'decode shape':<14} {'batch':>5} {'ours KV':>9} {'ours full':>9} {'HF KV':>9} {'HF full':>9} "
              f"{'ours/HF':>8} {'MB/token':>9} {'MBU':>6}  (tokens/s; bandwidth {results.get('bandwidth_gbs')} GB/s)")
        for r in results["decode"]:
            mbu = f"{r['mbu']:.0%}" if r.get("mbu") is not None else "-"
            print(f"{r['shape']:<14} {r['batch']:>5} {r['ours_kv']:>9.1f} {r['ours_recompute']:>9.1f} "
                  f"{r['hf_kv']:>9.1f} {r['hf_recompute']:>9.1f} {r['kv_vs_hf']:>7.2f}x "
                  f"{r['bytes_per_token'] / 1e6:>9.2f} {mbu:>6}")
    for r in results.get("data", []):
        print(f"data loader ({r['mode']}): {r['tokens_per_s']:,} tok/s")


def main(argv: list[str] | None = None) -> None:
    p = R.OneLineParser(prog="bench.py", description=__doc__.split("\n")[0])
    p.add_argument("--only", nargs="+", choices=BENCHMARKS, help="run only these benchmarks")
    p.add_argument("--device", default="auto")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--steps", type=int, default=3, help="timed training steps per shape (median)")
    p.add_argument("--warmup", type=int, default=2, help="untimed training steps first (compilation, allocation)")
    p.add_argument("--compile", default="auto", choices=("auto", "on", "head", "off"),
                   help="training benchmark: pretraining.py's --compile (on = whole model, head = the loss only)")
    p.add_argument("--json", action="store_true", help="print the results as JSON on stdout")
    p.add_argument("--ablation", nargs="+", type=Path, metavar="RUN_DIR",
                   help="compare finished pretraining runs (the first is the reference) instead of benchmarking")
    p.add_argument("--plot", type=Path, help="with --ablation: write val loss vs tokens and vs time to this PNG")
    p.add_argument("--zoom", action="store_true", help="with --plot: the second panel shows the second half of "
                   "training by tokens instead of by time")
    p.add_argument("--train-shape", help=argparse.SUPPRESS)  # internal: one training shape in a fresh process
    p.add_argument("--overrides", default="{}", help=argparse.SUPPRESS)  # internal: config fields, as JSON
    args = p.parse_args(argv)
    if args.ablation:
        rows = ablation(args.ablation, args.plot, args.zoom)
        if args.json:
            print(json.dumps(rows, indent=2))
        return
    device = M.detect_device(args.device)
    if args.train_shape:
        print(json.dumps(bench_train_shape(args.train_shape, device, args.steps, args.warmup, args.compile,
                                           json.loads(args.overrides))))
        return
    chosen = args.only or BENCHMARKS
    results: dict[str, Any] = dict(device=str(device), torch=torch.__version__, threads=torch.get_num_threads())
    if "matmul" in chosen or "train" in chosen:
        results["matmul"] = bench_matmul(device, args.repeats)
    if "train" in chosen:
        results["train"] = bench_train(device, args.steps, args.warmup, results["matmul"], args.compile)
    if "modifiers" in chosen:
        results["modifiers"] = bench_modifiers(device, args.steps, args.warmup, args.compile)
    if "trackers" in chosen:
        results["trackers"] = bench_trackers()
    if "decode" in chosen:
        results["bandwidth_gbs"] = bench_bandwidth(device, args.repeats)
        results["decode"] = bench_decode(device, args.repeats, args.new_tokens, results["bandwidth_gbs"])
    if "data" in chosen:
        results["data"] = bench_data()
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        print_table(results)


if __name__ == "__main__":
    main()
