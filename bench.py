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
optimizer: the optimizer's share of a training step of the 124M speedrun shape (or --shape shakespeare) (Newton-
    Schulz or Polar Express, then the rest of Muon and Adam) with each of the 2026 record's optimizer switches, the
    shakespeare2026 preset's and all of them, each in its own process, as ratios against plain Muon timed first and
    last in the same run.
head: tokens/s and peak memory of the shakespeare preset's training step (or --shape speedrun-124M) with the whole
    soft-capped head, with --head-chunk at three sizes, and with the 2026 cap, multi-token prediction and the
    prefix target, each in its own process, as ratios against the whole head timed first and last in the same run.
trackers: milliseconds per logged step (step line + metrics record) with console and metrics.jsonl only, and with
    TensorBoard, W&B (offline) and both on top, as a ratio against console-only.
decode: greedy tokens/s of model.generate (KV cache, and the full-recompute reference) and of Hugging Face
    transformers' GPT2LMHeadModel.generate (use_cache on and off) at the same width, depth and vocabulary,
    random weights, batch 1 and 8, after one warm-up call; the median of --repeats runs. Each row also gives the
    bytes a decoded token reads (every matrix once per step, shared by the batch, plus its embedding rows and
    cached keys and values) and the memory-bandwidth utilisation (MBU) against a streaming read measured first.
data: tokens/s of the shard loader (the training generator over the Shakespeare shards): shuffled rows (the
    preset) and the record's sequential stream.
quality: each decoding path of a trained checkpoint (DECODE_PATHS) against its fp32 eager decoding: val loss, the
    loss of validation rows decoded step by step, greedy continuations compared token by token; never part of the
    default run.

    python bench.py --only quality --checkpoint latest --log-dir logs

The GPU check is gpu_check.py; the ablation table of training runs and the comparison with GPT2LMHeadModel + AdamW
are compare.py.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import torch

import inference as I
import model as M
import runs as R
import pretraining

# -----------------------------------------------------------------------------
# shared by every benchmark (gpu_check.py and compare.py use them too): timing, provenance, the models decoded

SHAPES = {  # name: (preset, overrides) -- the model shapes users train here
    "shakespeare": ("shakespeare", {}),
    "speedrun-124M": ("speedrun", {}),
    "speedrun2026-124M": ("speedrun2026", {}),
}


def median_seconds(fn: Callable[[], Any], repeats: int) -> float:
    fn()  # warm-up: first-call allocations and kernel selection stay off the clock
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def paired_speedup(fn: Callable[[], Any], baseline: Callable[[], Any], pairs: int) -> float:
    """How many times faster fn runs than baseline: the median over pairs of back-to-back calls (the order
    alternating) of baseline's time over fn's. A VM's speed drifts by more than the gaps this is used for, and
    a pair sees the same machine."""
    def seconds(f: Callable[[], Any]) -> float:
        start = time.perf_counter()
        f()
        return time.perf_counter() - start

    fn(), baseline()  # warm-up, as in median_seconds
    ratios = []
    for i in range(pairs):
        if i % 2:
            b, a = seconds(baseline), seconds(fn)
        else:
            a, b = seconds(fn), seconds(baseline)
        ratios.append(b / a)
    return statistics.median(ratios)


CPU_FEATURES = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_int8")


def provenance() -> dict[str, Any]:
    """Where a set of figures came from, for docs/: the date, the commit (with '+changes' when the tree differs
    from it), the CPU's model name and the Python that ran."""
    import platform

    def git(*args: str) -> str:
        try:
            out = subprocess.run(["git", *args], cwd=M.REPO_DIR, capture_output=True, text=True, timeout=20)
            return out.stdout.strip() if out.returncode == 0 else ""
        except (OSError, subprocess.SubprocessError):
            return ""

    commit = git("rev-parse", "--short", "HEAD") or None
    if commit and git("status", "--porcelain", "--untracked-files=no"):
        commit += "+changes"
    cpu, features = platform.processor() or platform.machine(), []
    try:  # Linux: the model name, and the vector units that decide which kernels are fast (AMX, AVX-512 bf16)
        first = Path("/proc/cpuinfo").read_text().split("\n\n")[0]  # the first processor's block
        info = {k.strip(): v.strip() for k, v in (line.split(":", 1) for line in first.splitlines() if ":" in line)}
        cpu = info.get("model name", cpu)
        features = [f for f in CPU_FEATURES if f in info.get("flags", "").split()]
    except OSError:
        pass
    return dict(date=time.strftime("%Y-%m-%d %H:%M"), commit=commit, cpu=cpu, cpu_features=features,
                python=platform.python_version())


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
    preset = SHAPES[shape][0]
    hp = M.Hyperparameters(**dict(M.PRESETS[preset], preset=preset, device=str(device), warmup_steps=0,
                                  compile=compile, **(overrides or {})))
    if preset != "shakespeare" and device.type != "cuda":
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
    for i, long in enumerate(model.arch.long_windows(hp.num_layers)):
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
    pretraining.attach_extra_targets(raw, hp, rt.device)
    pretraining.schedule_step(raw, window, 0, hp)  # the extra targets' first-stage weights (all of them non-zero)
    window.fill_(window_blocks)
    parts = []
    for step in range(warmup + steps):
        ns_seconds[0] = 0.0
        rt.synchronize()
        t0 = time.perf_counter()
        pretraining.train_micro_batches(forward, [batch], hp, rt, window)
        rt.synchronize()
        t1 = time.perf_counter()
        M.optimizer_step(raw, optimizers, step, hp, rt.world_size)
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
    for shape in ("shakespeare", "speedrun-124M", "speedrun2026-124M"):
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


OPTIMIZER_SETTINGS = [  # the 2026 record's switches (docs/optimizer.md), one at a time and all together
    ("Muon (2025)", {}), ("Polar Express", dict(muon_orthogonalizer="polar_express")), ("NorMuon", dict(normuon=True)),
    ("cautious decay", dict(cautious_weight_decay=True, muon_weight_decay=1.2)),
    ("Q/K head groups", dict(muon_qk_head_groups=2)),
    ("row equilibration", dict(muon_row_equilibration=True)), ("norm snap", dict(muon_norm_snap=True)),
    ("record Adam, every 2", dict(adam_update="record", adam_every=2, adam_table="2026", adam_weight_decay=0.005)),
    ("shakespeare2026's", {k: v for k, v in M.PRESETS["shakespeare2026"].items() if k not in M.PRESETS["shakespeare"]}),
    ("all", dict(muon_orthogonalizer="polar_express", normuon=True, cautious_weight_decay=True, muon_weight_decay=1.2,
                 muon_qk_head_groups=2, adam_update="record", adam_every=2, adam_table="2026", adam_weight_decay=0.005,
                 muon_lr_mults="2026")),
]


def bench_optimizer(device: torch.device, steps: int, warmup: int, compile: str = "auto",
                    shape: str = "speedrun-124M") -> list[dict[str, Any]]:
    """Milliseconds of the optimizer step (orthogonalisation plus the rest) and of the whole step with each setting
    of OPTIMIZER_SETTINGS, against plain Muon timed first and again last (their mean is the baseline)."""
    settings = OPTIMIZER_SETTINGS + [OPTIMIZER_SETTINGS[0]]
    rows = [dict(setting=name, **train_shape_process(shape, device, steps, warmup, compile, over))
            for name, over in settings]
    for row in rows:
        row["optimizer_ms"] = round(row["newton_schulz_ms"] + row["optimizer_rest_ms"], 1)
    plain_opt = statistics.mean([rows[0]["optimizer_ms"], rows[-1]["optimizer_ms"]])
    plain_step = statistics.mean([rows[0]["step_ms"], rows[-1]["step_ms"]])
    for row in rows:
        row["optimizer_vs_muon"] = round(row["optimizer_ms"] / plain_opt, 3)
        row["step_vs_muon"] = round(row["step_ms"] / plain_step, 3)
        print(f"optimizer {shape} {row['setting']:<22} optimizer {row['optimizer_ms']:>7.1f} ms "
              f"({row['optimizer_vs_muon']:.2f}x Muon; orthogonalisation {row['newton_schulz_ms']:.1f})  step "
              f"{row['step_ms']:.0f} ms ({row['step_vs_muon']:.3f}x)", file=sys.stderr, flush=True)
    return rows


HEAD_SETTINGS = [  # the head and loss switches of issue 26 (docs/head_and_schedule.md)
    ("whole head", {}), ("--head-chunk 512", dict(head_chunk=512)), ("--head-chunk 1024", dict(head_chunk=1024)),
    ("--head-chunk 2048", dict(head_chunk=2048)), ("--logit-cap 2026", dict(logit_cap="2026")),
    ("--mtp", dict(stage_schedule="2026", mtp=True)),
    ("--mtp --prefix-token", dict(stage_schedule="2026", mtp=True, prefix_token=True)),
    ("--mtp --prefix-token chunked", dict(stage_schedule="2026", mtp=True, prefix_token=True, head_chunk=1024)),
]


ARCH_SETTINGS = [  # the architecture switches of issue 27 (docs/architecture.md), each alone, then together
    ("2025 GPT", {}), ("--bigram-rows 50304", dict(bigram_rows=50304, bigram_sign_rows=8192)),
    ("--bigram-rows 377280 (record)", dict(bigram_rows=377280, bigram_sign_rows=8192)),
    ("--bigram-rows 377280 rows update", dict(bigram_rows=377280, bigram_sign_rows=8192, bigram_update="rows")),
    ("--smear", dict(smear=True)), ("--value-embed-gates", dict(value_embed_gates=True)),
    ("--residual-lambdas", dict(residual_lambdas=True)), ("--key-offset", dict(key_offset=True)),
    ("--xsa-layers 1,2,3,4", dict(xsa_layers="1,2,3,4")), ("--attn-gate", dict(attn_gate=True)),
    ("--paired-head-layers 1,2", dict(paired_head_layers="1,2")), ("--backout-layer 4", dict(backout_layer=4)),
    ("gated skip into layer 3", dict(skip_topology="gated", no_attn_layer=3, gated_skip_from=1)),
]


def settings_against_baseline(settings: list[tuple[str, dict]], shape: str, device: torch.device, steps: int,
                              warmup: int, compile: str, suffix: str) -> list[dict[str, Any]]:
    """One training-shape process per setting, then the first setting (the baseline) again; each row's tokens/s and
    peak memory as ratios (vs_<suffix>, memory_vs_<suffix>) to the mean of the baseline's first and last runs."""
    rows = [dict(setting=name, **train_shape_process(shape, device, steps, warmup, compile, over))
            for name, over in settings + [settings[0]]]
    base = statistics.mean([rows[0]["tokens_per_s"], rows[-1]["tokens_per_s"]])
    base_mib = statistics.mean([rows[0]["peak_memory_mib"], rows[-1]["peak_memory_mib"]])
    for row in rows:
        row[f"vs_{suffix}"] = round(row["tokens_per_s"] / base, 3)
        row[f"memory_vs_{suffix}"] = round(row["peak_memory_mib"] / base_mib, 3)
    return rows


def bench_arch(device: torch.device, steps: int, warmup: int, compile: str = "auto",
               shape: str = "shakespeare") -> list[dict[str, Any]]:
    """Tokens/s and peak memory of a training step with each setting of ARCH_SETTINGS, each in its own process,
    against the 2025 GPT timed first and again last (their mean is the baseline)."""
    rows = settings_against_baseline(ARCH_SETTINGS, shape, device, steps, warmup, compile, "2025")
    for row in rows:
        print(f"arch {shape} {row['setting']:<32} {row['tokens_per_s']:>7,} tok/s ({row['vs_2025']:.3f}x)  "
              f"optimizer {row['optimizer_rest_ms']:.0f} ms  peak memory {row['peak_memory_mib']:,} MiB "
              f"({row['memory_vs_2025']:.2f}x)  compile {row['compile']}", file=sys.stderr, flush=True)
    return rows


def bench_head(device: torch.device, steps: int, warmup: int, compile: str = "auto",
               shape: str = "shakespeare") -> list[dict[str, Any]]:
    """Tokens/s and peak memory of a training step with each setting of HEAD_SETTINGS, each in its own process
    (its own peak), against the whole head timed first and again last (their mean is the baseline)."""
    rows = settings_against_baseline(HEAD_SETTINGS, shape, device, steps, warmup, compile, "whole")
    for row in rows:
        print(f"head {shape} {row['setting']:<28} {row['tokens_per_s']:>7,} tok/s ({row['vs_whole']:.3f}x whole)  "
              f"peak memory {row['peak_memory_mib']:,} MiB ({row['memory_vs_whole']:.2f}x)  compile "
              f"{row['compile']}", file=sys.stderr, flush=True)
    return rows


def bench_trackers(calls: int = 200) -> list[dict[str, Any]]:
    """Seconds per logged step (a step line on the console plus its metrics record) with console + metrics.jsonl
    only, then with TensorBoard and with W&B offline as well; the ratio is against console-only."""
    import contextlib
    import io

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


def decode_keys(context: int, window_blocks: int, whole_blocks: bool = True) -> int:
    """Keys each attention layer reads for the token at position context - 1: the ring cache's occupied slots (in
    whole blocks for a compiled step), up to its size of window_blocks + 1 blocks (model.RingCache; the mask hides
    the rest)."""
    filled = M.next_multiple_of_n(context, n=M.BLOCK_SIZE) if whole_blocks else context
    return min(filled, (window_blocks + 1) * M.BLOCK_SIZE)


WEIGHT_BYTES = {"fp32": 4, "bf16": 2, "int8": 1}


def decode_bytes_per_token(model: M.GPT, context: int, window_blocks: int, batch: int = 1, weights: str = "fp32",
                           cache_bytes: int = 4, whole_blocks: bool = True) -> dict[str, float]:
    """Bytes one decode step reads, per token of the batch: every matrix once per step (shared by the batch) in
    its format (int8: one byte per weight and a bf16 scale per row), the embedding rows of each sequence's token,
    and each sequence's cached keys and values in every attention layer. Scalars (lambdas, skip weights) count as
    fp32; activations are not counted (they stay in cache)."""
    matrices = [p for n, p in model.named_parameters() if "embed" not in n and p.ndim >= 2]
    scalars = sum(p.numel() for n, p in model.named_parameters() if "embed" not in n and p.ndim < 2)
    scales = sum(p.numel() // p.size(-1) for p in matrices) * 2 if weights == "int8" else 0
    matrix_bytes = sum(p.numel() for p in matrices) * WEIGHT_BYTES[weights] + scales
    embed_rows = (1 + len(model.value_embeds)) * model.model_dim  # one fp32 row of each table per sequence
    attn_layers = sum(b.attn is not None for b in model.blocks)
    head_width = next(b.attn.num_heads * b.attn.head_dim for b in model.blocks if b.attn is not None)
    kv = attn_layers * 2 * head_width * decode_keys(context, window_blocks, whole_blocks)
    per_step = (matrix_bytes + scalars * 4) / batch
    cache = kv * cache_bytes + embed_rows * 4
    return dict(weights=per_step, cache_and_embeddings=cache, total=per_step + cache)


PAIRS = 7  # back-to-back pairs of the eager fp32 path and the KVCache steps (paired_speedup)

# how our decoding runs: (label, weights, compiled); the first is the reference (the checkpoint's fp32, eager)
DECODE_PATHS = [("fp32", "fp32", False), ("fp32 compiled", "fp32", True), ("bf16 compiled", "bf16", True),
                ("int8", "int8", False), ("int8 compiled", "int8", True)]


def kv_cache_steps(model: M.GPT, prompt: list[int], window: int, n: int, batch: int) -> None:
    """Greedy decoding through the growing KVCache and inference.prefill, one token per step: the step path before
    the ring cache (kept as the baseline that batch 8 must not fall behind)."""
    with torch.no_grad():
        cache = I.KVCache(model, 1, len(prompt) + n)
        logits = I.prefill(model, torch.tensor([prompt], device=model.embed.weight.device), cache, window)[:, -1]
        cache, logits = cache.expand(batch), logits.expand(batch, -1)
        for _ in range(n - 1):
            logits = I.prefill(model, logits.argmax(-1)[:, None], cache, window)[:, -1]


def bench_decode(device: torch.device, repeats: int, new_tokens: int, bandwidth: float | None = None,
                 paths: list[tuple[str, str, bool]] | None = None) -> list[dict[str, Any]]:
    """Greedy tokens/s of each decoding path against transformers' cached generate of the same shape, per shape
    and batch; the KVCache step path of before and both full-recompute references as further baselines."""
    rows = []
    prompt = [M.EOT_ID] + list(range(1000, 1015))  # 16 tokens: decoding dominates
    for shape, (preset, overrides) in SHAPES.items():
        # dynamo keeps one cache per function (step_logits), 8 entries deep; each model and batch adds one or two,
        # and past the limit a "compiled" path silently runs eagerly, so every shape starts with an empty cache
        torch._dynamo.reset()
        hp = M.Hyperparameters(**dict(M.PRESETS[preset], **overrides))
        hf, window = hf_gpt2(hp, device), M.final_window_blocks(hp)
        formats = {w for _, w, _ in paths or DECODE_PATHS}
        models = {fmt: I.set_inference_weights(ours(hp, device), fmt) for fmt in formats}
        compiled = {fmt: I.compile_decoding(models[fmt]).decode_fn for fmt in models}  # one per model
        for batch in (1, 8):
            def run_ours(model: M.GPT, cache: bool, n: int) -> None:
                for _ in I.generate(model, prompt, window_blocks=window, max_new_tokens=n, num_samples=batch,
                                    stop_ids=(), use_cache=cache):
                    pass

            def run_hf(cache: bool, n: int) -> None:
                ids = torch.tensor([prompt] * batch, device=device)
                with torch.no_grad():
                    hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                                do_sample=False, use_cache=cache, pad_token_id=M.EOT_ID)

            slow_tokens = max(8, new_tokens // 4)  # the no-cache paths are O(context) per token
            reference = models["fp32"] if "fp32" in models else ours(hp, device)
            reference.decode_fn = None
            hf_kv = new_tokens / median_seconds(lambda: run_hf(True, new_tokens), repeats)
            base = dict(shape=shape, batch=batch, new_tokens=new_tokens, hf_kv=round(hf_kv * batch, 1),
                        hf_recompute=round(batch * slow_tokens / median_seconds(lambda: run_hf(False, slow_tokens),
                                                                                repeats), 1),
                        ours_recompute=round(batch * slow_tokens / median_seconds(
                            lambda: run_ours(reference, False, slow_tokens), repeats), 1),
                        kv_cache_before=round(batch * new_tokens / median_seconds(
                            lambda: kv_cache_steps(reference, prompt, window, new_tokens, batch), repeats), 1))
            context = len(prompt) + new_tokens // 2  # the middle of the timed run
            for label, fmt, on in paths or DECODE_PATHS:
                model = models[fmt]
                model.decode_fn = compiled[fmt] if on else None
                start = time.perf_counter()  # a compiled path's first call includes its compile (or cache load)
                run_ours(model, True, new_tokens)
                first_call = time.perf_counter() - start
                rate = batch * new_tokens / median_seconds(lambda: run_ours(model, True, new_tokens), repeats)
                read = decode_bytes_per_token(model, context, window, batch, fmt, whole_blocks=on)
                # the eager path against the KVCache steps it replaced, paired ("batch 8 must not get slower")
                paired = None if on or fmt != "fp32" else round(paired_speedup(
                    lambda: run_ours(model, True, new_tokens),
                    lambda: kv_cache_steps(reference, prompt, window, new_tokens, batch), PAIRS), 3)
                rows.append(dict(base, path=label, weights=fmt, compiled=on, first_call_s=round(first_call, 2),
                                 vs_kv_cache_paired=paired,
                                 tokens_per_s=round(rate, 1),
                                 vs_hf=round(rate / base["hf_kv"], 2),
                                 vs_kv_cache_before=round(rate / base["kv_cache_before"], 2),
                                 bytes_per_token=round(read["total"]), weight_bytes_per_token=round(read["weights"]),
                                 mbu=round(read["total"] * rate / (bandwidth * 1e9), 3) if bandwidth else None))
                print(f"decode {shape:<14} batch {batch} {label:<14} {rate:>8.1f} tok/s  {rows[-1]['vs_hf']:.2f}x "
                      f"transformers ({base['hf_kv']:.1f})  {rows[-1]['vs_kv_cache_before']:.2f}x the KVCache steps "
                      f"({base['kv_cache_before']:.1f})" + (f" ({paired:.2f}x paired)" if paired else "") +
                      f"  {read['total'] / 1e6:.1f} MB per token" +
                      (f", MBU {rows[-1]['mbu']:.0%}" if bandwidth else ""), file=sys.stderr, flush=True)
    return rows


def decode_path_loss(model: M.GPT, tokens_BT: torch.Tensor, window_blocks: int) -> float:
    """Mean cross-entropy of rows of tokens decoded one step at a time (ring cache, packed kernels: what a reply
    runs), teacher-forced from their first token; the full forward of the same rows is the reference."""
    B, T = tokens_BT.shape
    with torch.no_grad():
        cache = I.KVCache(model, B, 1)
        logits = [I.prefill(model, tokens_BT[:, :1], cache, window_blocks)[:, -1]]
        ring = I.RingCache(cache, window_blocks)
        logits += [I.decode_step(model, tokens_BT[:, t], ring) for t in range(1, T - 1)]
        return float(torch.nn.functional.cross_entropy(torch.stack(logits, 1).flatten(0, 1),
                                                       tokens_BT[:, 1:].reshape(-1)))


def greedy_agreement(tokens: list[list[int]], reference: list[list[int]]) -> dict[str, float]:
    """How far greedy continuations follow the reference's: the share that equal it entirely, the mean share of
    tokens before the first difference, and the share of positions that hold the same token."""
    first_diff = [next((i for i, (a, b) in enumerate(zip(t, r)) if a != b), len(r)) for t, r in zip(tokens, reference)]
    same = sum(a == b for t, r in zip(tokens, reference) for a, b in zip(t, r))
    return dict(identical=round(sum(d == len(r) for d, r in zip(first_diff, reference)) / len(reference), 3),
                prefix_before_first_difference=round(sum(d / len(r) for d, r in zip(first_diff, reference))
                                                     / len(reference), 3),
                positions_equal=round(same / sum(len(r) for r in reference), 3))


def bench_quality(checkpoint: str, log_dir: str, prompts: int = 24, new_tokens: int = 100, rows: int = 8,
                  paths: list[tuple[str, str, bool]] | None = None) -> list[dict[str, Any]]:
    """Each decoding path (DECODE_PATHS: a weight format, eager or compiled) of a trained checkpoint against the
    first, fp32 eager: eval.py's val loss (the matrices rounded, computed in fp32; one figure per format, as
    compiling changes only the decoding steps), the loss of `rows` validation rows decoded step by step (what a
    reply runs: the ring cache, packed kernels or the compiled step), and greedy continuations of `prompts`
    prompts (the first 32 tokens of validation rows, seeded choice) compared token by token with fp32's."""
    import argparse as ap

    import eval as evaluation

    out, reference, loaded = [], None, {}
    for label, fmt, on in paths or DECODE_PATHS:
        if fmt not in loaded:
            im = I.load_for_inference(checkpoint, log_dir, "cpu", "fp32", weights=fmt)
            loaded[fmt] = im, evaluation.eval_val(im, ap.Namespace(val_files=None, val_tokens=None))
        im, val = loaded[fmt]
        if on:
            torch._dynamo.reset()  # dynamo's 8-entry cache for step_logits would fill over the formats (bench_decode)
        I.compile_decoding(im.model, on)
        if not out:  # one checkpoint: every path decodes the same validation rows and prompts
            row_len = im.hp.row_len or 256
            loader = M.distributed_data_generator(str(M.resolve_path(im.hp.val_files)), row_len * max(prompts, rows),
                                                  0, 1, cycle=False, vocab_size=im.hp.vocab_size)
            val_rows = next(loader)[0].long().view(-1, row_len)
            order = torch.randperm(val_rows.size(0), generator=torch.Generator().manual_seed(0))
            starts = [val_rows[i, :32].tolist() for i in order[:prompts]]
        continuations = [[s[0] for s in I.generate(im.model, p, window_blocks=im.window_blocks,
                                                   max_new_tokens=new_tokens, stop_ids=(),
                                                   vocab_limit=im.vocab_limit)] for p in starts]
        row = dict(path=label, weights=fmt, compiled=on, val_loss=round(val["loss"], 5), val_tokens=val["tokens"],
                   decode_path_loss=round(decode_path_loss(im.model, val_rows[:rows], im.window_blocks), 5),
                   decode_path_tokens=rows * (row_len - 1), prompts=prompts, new_tokens=new_tokens)
        reference = reference or dict(row, continuations=continuations)
        row.update(val_loss_vs_fp32=round(row["val_loss"] - reference["val_loss"], 5),
                   decode_path_loss_vs_fp32=round(row["decode_path_loss"] - reference["decode_path_loss"], 5),
                   **greedy_agreement(continuations, reference["continuations"]))
        out.append(row)
        print(f"quality {label}: val loss {row['val_loss']:.4f} ({row['val_loss_vs_fp32']:+.4f}), decoded rows "
              f"{row['decode_path_loss']:.4f} ({row['decode_path_loss_vs_fp32']:+.4f}), greedy: {row['identical']:.0%} "
              f"identical, {row['positions_equal']:.0%} of positions equal", file=sys.stderr, flush=True)
    return out


# the default run; quality on demand
BENCHMARKS = ("matmul", "train", "modifiers", "optimizer", "head", "arch", "trackers", "decode", "data")


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
    for r in results.get("optimizer", []):
        print(f"optimizer: {r['setting']:<22} {r['optimizer_ms']:>8.1f} ms  {r['optimizer_vs_muon']:.2f}x Muon  step "
              f"{r['step_vs_muon']:.3f}x")
    for r in results.get("head", []):
        print(f"head: {r['setting']:<28} {r['tokens_per_s']:>7,} tok/s  {r['vs_whole']:.3f}x whole  peak "
              f"{r['peak_memory_mib']:,} MiB  {r['memory_vs_whole']:.2f}x whole  (compile {r['compile']})")
    for r in results.get("arch", []):
        print(f"arch: {r['setting']:<32} {r['tokens_per_s']:>7,} tok/s  {r['vs_2025']:.3f}x 2025  peak "
              f"{r['peak_memory_mib']:,} MiB  {r['memory_vs_2025']:.2f}x 2025  (compile {r['compile']})")
    for r in results.get("trackers", []):
        print(f"logging to {r['trackers']:<24} {r['ms_per_step']:>8.3f} ms/step  {r['vs_console']:.1f}x console-only")
    if "decode" in results:
        print(f"{'decode shape':<14} {'batch':>5} {'path':<14} {'tok/s':>8} {'vs HF':>6} {'vs before':>9} "
              f"{'paired':>6} {'MB/token':>9} {'MBU':>5} {'1st call':>8}  (bandwidth {results.get('bandwidth_gbs')} "
              f"GB/s; paired: against the KVCache steps, back to back)")
        for r in results["decode"]:
            mbu = f"{r['mbu']:.0%}" if r.get("mbu") is not None else "-"
            paired = f"{r['vs_kv_cache_paired']:.2f}x" if r.get("vs_kv_cache_paired") else "-"
            print(f"{r['shape']:<14} {r['batch']:>5} {r['path']:<14} {r['tokens_per_s']:>8.1f} {r['vs_hf']:>5.2f}x "
                  f"{r['vs_kv_cache_before']:>8.2f}x {paired:>6} {r['bytes_per_token'] / 1e6:>9.2f} {mbu:>5} "
                  f"{r.get('first_call_s', 0):>7.1f}s")
        print("baselines (tok/s): " + "; ".join(
            f"{r['shape']} batch {r['batch']}: transformers KV {r['hf_kv']}, full {r['hf_recompute']}, ours full "
            f"{r['ours_recompute']}, KVCache steps {r['kv_cache_before']}"
            for r in results["decode"] if r["path"] == results["decode"][0]["path"]))
    for r in results.get("data", []):
        print(f"data loader ({r['mode']}): {r['tokens_per_s']:,} tok/s")
    if "quality" in results:
        print(f"{'path':<14} {'val loss':>9} {'vs fp32':>8} {'decoded':>8} {'vs fp32':>8} {'identical':>9} "
              f"{'prefix':>7} {'positions':>9}  (greedy continuations against fp32's)")
        for r in results["quality"]:
            print(f"{r['path']:<14} {r['val_loss']:>9.4f} {r['val_loss_vs_fp32']:>+8.4f} {r['decode_path_loss']:>8.4f} "
                  f"{r['decode_path_loss_vs_fp32']:>+8.4f} {r['identical']:>9.0%} "
                  f"{r['prefix_before_first_difference']:>7.0%} {r['positions_equal']:>9.0%}")


def main(argv: list[str] | None = None) -> None:
    p = R.OneLineParser(prog="bench.py", description=__doc__.split("\n")[0])
    p.add_argument("--only", nargs="+", choices=(*BENCHMARKS, "quality"),
                   help="run only these benchmarks (quality: never part of the default run)")
    p.add_argument("--checkpoint", default="latest", help="quality: the trained checkpoint ('latest' under --log-dir)")
    p.add_argument("--log-dir", default="logs", help="quality: where 'latest' is looked for")
    p.add_argument("--device", default="auto")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--steps", type=int, default=3, help="timed training steps per shape (median)")
    p.add_argument("--warmup", type=int, default=2, help="untimed training steps first (compilation, allocation)")
    p.add_argument("--compile", default="auto", choices=("auto", "on", "head", "off"),
                   help="training benchmark: pretraining.py's --compile (on = whole model, head = the loss only)")
    p.add_argument("--shape", choices=sorted(SHAPES),
                   help="optimizer, head: the model shape (default speedrun-124M for optimizer, shakespeare for head)")
    p.add_argument("--json", action="store_true", help="print the results as JSON on stdout")
    p.add_argument("--train-shape", help=argparse.SUPPRESS)  # internal: one training shape in a fresh process
    p.add_argument("--overrides", default="{}", help=argparse.SUPPRESS)  # internal: config fields, as JSON
    args = p.parse_args(argv)
    try:
        device = M.detect_device(args.device)
    except M.USER_ERRORS as e:
        R.exit_with(2, "bench.py", str(e))
    if args.train_shape:
        print(json.dumps(bench_train_shape(args.train_shape, device, args.steps, args.warmup, args.compile,
                                           json.loads(args.overrides))))
        return
    chosen = args.only or BENCHMARKS
    results: dict[str, Any] = dict(device=str(device), torch=torch.__version__, threads=torch.get_num_threads(),
                                   **provenance())
    if "matmul" in chosen or "train" in chosen:
        results["matmul"] = bench_matmul(device, args.repeats)
    if "train" in chosen:
        results["train"] = bench_train(device, args.steps, args.warmup, results["matmul"], args.compile)
    if "modifiers" in chosen:
        results["modifiers"] = bench_modifiers(device, args.steps, args.warmup, args.compile)
    if "optimizer" in chosen:
        results["optimizer"] = bench_optimizer(device, args.steps, args.warmup, args.compile,
                                               args.shape or "speedrun-124M")
    if "head" in chosen:
        results["head"] = bench_head(device, args.steps, args.warmup, args.compile, args.shape or "shakespeare")
    if "arch" in chosen:
        results["arch"] = bench_arch(device, args.steps, args.warmup, args.compile, args.shape or "shakespeare")
    if "trackers" in chosen:
        results["trackers"] = bench_trackers()
    if "decode" in chosen:
        results["bandwidth_gbs"] = bench_bandwidth(device, args.repeats)
        results["decode"] = bench_decode(device, args.repeats, args.new_tokens, results["bandwidth_gbs"])
    if "data" in chosen:
        results["data"] = bench_data()
    if "quality" in chosen:
        try:
            results["quality"] = bench_quality(args.checkpoint, args.log_dir)
        except M.USER_ERRORS as e:
            R.exit_with(2, "bench.py", str(e))
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        print_table(results)


if __name__ == "__main__":
    main()
