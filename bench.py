"""Benchmarks that print figures, each against a baseline measured in the same run (never a timed test).

    python bench.py --only gpu --json-out gpu_check.json  # on one GPU: every open GPU question in under 8 minutes

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
peer: our default training (`python pretraining.py`: the shakespeare preset, Muon + Adam, compiled on CPU) against
    what users would pick instead: transformers' GPT2LMHeadModel (same width, depth, heads, padded vocabulary; tied
    embeddings, dropout off) with torch.optim.AdamW (betas 0.9/0.95, weight decay 0.1 on matrices and embeddings,
    linear warm-up over 5% of the budget then cosine decay to 0.1x, gradient clip 1.0) at each of --peer-lrs, for
    the same training seconds, on the same shards, tokens per step and validation tokens. The clock is
    pretraining.py's train_time_ms (validation, compile warm-up and checkpoints off it), kept the same way for AdamW,
    which runs eager in fp32 or under bf16 autocast, whichever a short probe times faster. Reports each run's val
    loss at the budget, the training seconds each needs to reach the other's final loss, tokens/s, ratios against
    the best AdamW run, and how busy other processes kept the machine meanwhile; every run in its own process. Cost:
    our run (about 4-6 min with its compile on 2 CPU cores) plus the budget and about a minute more per LR, about
    20 min in all there. --peer-seconds S: each AdamW run trains S seconds instead (our run is unchanged, so the
    budgets differ and equal_budget is false); --quick: a smoke test (tiny model, 4 steps, one LR; under a minute).

    python bench.py --only peer --json > peer.json    # ours vs GPT2LMHeadModel + AdamW at our run's wall clock
    python bench.py --only peer --quick               # the same in seconds, on a tiny model
gpu: the check for a lent GPU, never part of the default run. tests/test_cuda.py (fast and slow tests apart) and
    tests/test_train_gpt.py::test_cuda_runs_agree side by side, then the speedrun shape's training step alone (cold
    compile, step time, tokens/s against the record's ~481k per H100, MFU, peak memory), then decode; each part in
    its own process group under its own limit (GPU_PARTS), all within --budget-s; a part that fails or runs out of
    time is one line, and the others go on. One summary table on stdout, everything in --json-out (rewritten after
    each part). Without CUDA: one line and exit 2. Offline, data/gpt2.tiktoken and python-dotenv must be there (the
    check's first lines say what is missing).

    python bench.py --ablation logs/ablation/muon logs/ablation/adamw-3e-3 --plot docs/muon_vs_adamw.png

    python bench.py --ablation logs/ablation-loss/none logs/ablation-loss/ls-0.1 --plot docs/loss_modifiers.png

ablation: final val loss of finished pretraining runs and the training time each needed to reach the first run's
    final val loss (docs/muon_vs_adamw.md, docs/loss_modifiers.md), plus a PNG of val loss against tokens and
    against seconds.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import os
import re
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
# GPU check: every open GPU question in one run of fixed length (README, "What is not verified on a GPU")

# The May-2025 record: 1770 steps of 8 x 48*1024 tokens in 180.8 s on 8 H100s, ~481k tokens/s per GPU. One GPU on the
# speedrun shape runs all 8 micro-batches of a step and all of Newton-Schulz, so its tokens/s compare with this directly
# (it skips the record's gradient all-reduce).
RECORD_TOKENS_PER_S_PER_GPU = 1770 * 48 * 1024 / 180.8
GPU_BUDGET_S = 450  # all parts together: 7.5 minutes, which leaves a 15-minute lease room for the machine's start
GPU_MIN_PART_S = 30  # a part with less of the budget left is skipped, not started
GPU_PARTS = {  # name: (seconds it may take at most, what it answers); the three test runs go side by side
    "tests": (210, "tests/test_cuda.py -m 'not slow': FlexAttention vs SDPA, the FP8 head, whole-model compile "
                   "(against eager SDPA too), bf16 embeddings, the KV cache through eval.py's and chat.py's loader"),
    "scripts": (210, "tests/test_cuda.py -m slow: eval.py and chat.py on CUDA against CPU, the Hugging Face export of "
                     "a GPU checkpoint run on the GPU"),
    "train_gpt": (210, "tests/test_train_gpt.py::test_cuda_runs_agree: train_gpt.py and pretraining.py agree on CUDA"),
    "train": (180, "the speedrun shape (124M, 8 micro-batches of 48*1024 tokens per step): cold compile, step time, "
                   "tokens/s against the record's per-H100 rate, MFU, peak memory"),
    "decode": (90, "bench.py --only decode: greedy tokens/s with the KV cache and without, against transformers"),
}
PYTEST_TARGETS = {"tests": ("tests/test_cuda.py", "-m", "not slow"), "scripts": ("tests/test_cuda.py", "-m", "slow"),
                  "train_gpt": ("tests/test_train_gpt.py::test_cuda_runs_agree",)}
# verbose lines survive a kill (a test's outcome is printed as it ends); no xdist (pytest.ini's -n 2) or cache
PYTEST_ARGS = ("-v", "-rfEs", "-p", "no:cacheprovider", "-o", "addopts=", "--durations=0", "--durations-min=1")
PYTEST_RESULT = re.compile(r"^(\S+::\S+) (PASSED|FAILED|SKIPPED|ERROR|XFAIL|XPASS)\b", re.MULTILINE)
PYTEST_PROBLEM = re.compile(r"^(FAILED|ERROR) (\S+)(?: - (.*))?$", re.MULTILINE)  # the -rfE short summary
PYTEST_SKIP = re.compile(r"^SKIPPED \[(\d+)\] (\S+?): (.*)$", re.MULTILINE)
PYTEST_DURATION = re.compile(r"^\s*(\d+\.\d+)s (setup|call|teardown)\s+(\S+)\s*$", re.MULTILINE)
PYTEST_COUNT = re.compile(r"(\d+) (passed|failed|skipped|errors?|xfailed|xpassed)\b")
PYTEST_OUTCOMES = {"PASSED": "passed", "FAILED": "failed", "SKIPPED": "skipped", "ERROR": "errors",
                   "XFAIL": "xfailed", "XPASS": "xpassed"}


def parse_pytest_output(text: str) -> dict[str, Any]:
    """Counts, failing tests (with pytest's one-line reason), skip reasons and per-test seconds from the output of
    `pytest -v -rfEs --durations=0`. A run killed before its summary is counted from its verbose result lines, and
    `running` names the test it was killed in."""
    lines = [line for line in text.splitlines() if line.strip()]
    summary = next((line.strip(" =") for line in reversed(lines) if re.search(r" in \d+(\.\d+)?s\b", line)
                    and (PYTEST_COUNT.search(line) or "no tests ran" in line)), None)
    counts = dict.fromkeys(PYTEST_OUTCOMES.values(), 0)
    if summary is not None:
        for n, word in PYTEST_COUNT.findall(summary):
            counts["errors" if word.startswith("error") else word] = int(n)
    else:
        for _, outcome in PYTEST_RESULT.findall(text):
            counts[PYTEST_OUTCOMES[outcome]] += 1
    failures = [dict(test=test, outcome=kind.lower(), message=message)
                for kind, test, message in PYTEST_PROBLEM.findall(text)]
    if not failures:  # no short summary (killed): the verbose lines still name them
        failures = [dict(test=test, outcome=outcome.lower(), message="")
                    for test, outcome in PYTEST_RESULT.findall(text) if outcome in ("FAILED", "ERROR")]
    durations: dict[str, float] = {}
    for seconds, _, test in PYTEST_DURATION.findall(text):
        durations[test] = round(durations.get(test, 0.0) + float(seconds), 2)
    last = lines[-1].strip() if lines else ""
    running = last if summary is None and re.fullmatch(r"\S+::\S+", last) else None
    skips = [dict(count=int(n), where=where, reason=reason) for n, where, reason in PYTEST_SKIP.findall(text)]
    return dict(summary=summary, **counts, failures=failures, skips=skips, durations=durations, running=running)


def error_line(text: str, limit: int = 300) -> str:
    """The line that says what went wrong: the last exception line of a traceback, else the last line."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    for line in reversed(lines):
        if re.match(r"[\w.]*(Error|Exception|Exit|Interrupt)\b", line):
            return line[:limit]
    return lines[-1][:limit] if lines else "(no output)"


def last_json(text: str) -> Any:
    """The JSON value a child printed last, on lines of its own (after any log lines)."""
    lines = text.rstrip().splitlines()
    for i in range(len(lines) - 1, -1, -1):
        if lines[i].startswith(("{", "[")):
            try:
                return json.loads("\n".join(lines[i:]))
            except json.JSONDecodeError:
                continue
    raise ValueError("no JSON result in its output")


class LimitedProcess:
    """A command in a process session of its own, stdout and stderr in temporary files (no pipe can fill up), killed
    with everything it started (compile workers, the scripts a test runs) when limit_s has passed."""

    def __init__(self, cmd: list[str], limit_s: float, env: dict[str, str] | None = None):
        self.cmd, self.limit_s, self.started = cmd, limit_s, time.monotonic()
        self.out, self.err = tempfile.TemporaryFile(), tempfile.TemporaryFile()
        self.proc = subprocess.Popen(cmd, cwd=M.REPO_DIR, stdin=subprocess.DEVNULL, stdout=self.out, stderr=self.err,
                                     env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
                                     start_new_session=True)

    def done(self) -> bool:
        """Ended, or out of time (then wait() kills it)."""
        return self.proc.poll() is not None or time.monotonic() - self.started >= self.limit_s

    def wait(self) -> dict[str, Any]:
        import signal

        try:
            self.proc.wait(timeout=max(0.0, self.limit_s - (time.monotonic() - self.started)))
            timed_out = False
        except subprocess.TimeoutExpired:
            timed_out = True
        try:  # at the limit, and whatever a finished command left running
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        self.proc.wait()
        outputs = []
        for f in (self.out, self.err):
            f.seek(0)
            outputs.append(f.read().decode("utf-8", errors="replace"))
            f.close()
        return dict(returncode=self.proc.returncode, timed_out=timed_out, stdout=outputs[0], stderr=outputs[1],
                    seconds=round(time.monotonic() - self.started, 1))


def pytest_part(run: dict[str, Any]) -> dict[str, Any]:
    """A pytest run as a part of the check: ok only when pytest exited 0 (every test passed or was skipped)."""
    text = run["stdout"] + run["stderr"]
    found = parse_pytest_output(text)
    status = ("timeout" if run["timed_out"] else "ok" if run["returncode"] == 0 else
              "failed" if run["returncode"] == 1 else "error")  # 2-5: interrupted, internal, usage, no tests
    error = (f"killed at its limit{' in ' + found['running'] if found['running'] else ''}" if status == "timeout"
             else error_line(text) if status == "error" else None)
    return dict(status=status, seconds=run["seconds"], returncode=run["returncode"], error=error, **found,
                output_tail=text[-(3000 if status == "ok" else 100_000):])  # failures: their tracebacks too


def script_part(run: dict[str, Any], figures: Callable[[str], dict[str, Any]]) -> dict[str, Any]:
    """A child script as a part of the check: its figures from its stdout when it exited 0."""
    part: dict[str, Any] = dict(seconds=run["seconds"], returncode=run["returncode"])
    if run["timed_out"]:
        part.update(status="timeout", error=f"killed at its limit; its last line: {error_line(run['stderr'])}")
    elif run["returncode"] != 0:
        part.update(status="error", error=error_line(run["stderr"] or run["stdout"]))
    else:
        try:
            part.update(status="ok", **figures(run["stdout"]))
        except (ValueError, TypeError, AttributeError) as e:  # exited 0 without a readable result
            part.update(status="error", error=f"its result could not be read ({type(e).__name__}: {M.first_line(e)})")
    return dict(part, log_tail=run["stderr"][-4000:])


def guarded(part: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """A part's result, or its error as one line: one part's failure never loses the other parts' figures."""
    try:
        return part()
    except Exception as e:  # noqa: BLE001 - whatever went wrong, the check goes on to the next part
        return dict(status="error", error=f"{type(e).__name__}: {M.first_line(e)}")


def gpu_train_part(device: torch.device, steps: int, warmup: int, matmul_n: int = 8192) -> dict[str, Any]:
    """bench_train_shape on the speedrun shape, plus what its first step cost (the whole-model and Newton-Schulz
    compiles: cold when the caller gives an empty inductor cache), MFU against this GPU's bf16 product rate and
    tokens/s against the record's per-H100 rate."""
    import warnings

    peak = bench_matmul(device, repeats=3, n=matmul_n)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    starts: list[float] = []
    micro_batches = pretraining.train_micro_batches

    def stamped(*args: Any) -> dict[str, torch.Tensor]:  # bench_train_shape calls it once at the start of each step
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        starts.append(time.perf_counter())
        print(f"gpu check: train: step {len(starts)} starts {starts[-1] - begin:.1f} s in", file=sys.stderr, flush=True)
        return micro_batches(*args)

    begin = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pretraining.train_micro_batches = stamped
        try:
            row = bench_train_shape("speedrun-124M", device, steps, warmup)
        finally:
            pretraining.train_micro_batches = micro_batches
    hp = train_config("speedrun-124M", device)
    intervals = [b - a for a, b in zip(starts, starts[1:])] or [float("nan")]  # one step: no second stamp
    messages = list(dict.fromkeys(M.first_line(w.message) for w in caught))
    row.update(gpu=torch.cuda.get_device_name(device) if device.type == "cuda" else str(device),
               fp8_head=M.fp8_supported(device), micro_batch_tokens=hp.train_seq_len, micro_batches=hp.rank_equivalents,
               setup_s=round(starts[0] - begin, 1), first_step_s=round(intervals[0], 1),
               compile_s=round(intervals[0] - row["step_ms"] / 1000, 1),  # the first step's excess over a steady one
               step_intervals_s=[round(s, 3) for s in intervals], matmul_bf16_tflops=round(peak["bf16"] / 1000, 1),
               mfu=round(1000 * row["model_tflops"] / peak["bf16"], 3) if peak["bf16"] else None,
               record_tokens_per_s_per_gpu=round(RECORD_TOKENS_PER_S_PER_GPU),
               vs_record=round(row["tokens_per_s"] / RECORD_TOKENS_PER_S_PER_GPU, 3),
               compile_fallbacks=[m for m in messages if "running it eagerly" in m], warnings=messages[:10])
    if device.type == "cuda":
        row["peak_reserved_mib"] = round(torch.cuda.max_memory_reserved(device) / 2**20)
    return row


def decode_figures(stdout: str) -> dict[str, Any]:
    out = last_json(stdout)
    return dict(bandwidth_gbs=out.get("bandwidth_gbs"), rows=out.get("decode", []))


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


def gpu_machine() -> dict[str, Any]:
    """The GPU, its driver and the software the check ran under."""
    import platform

    props = torch.cuda.get_device_properties(0)
    machine = dict(gpu=props.name, capability=f"{props.major}.{props.minor}",
                   memory_gib=round(props.total_memory / 2**30, 1), multiprocessors=props.multi_processor_count,
                   torch=torch.__version__, cuda=torch.version.cuda, python=platform.python_version(),
                   cpus=os.cpu_count(), driver=None)
    try:
        smi = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20, check=False)
        machine["driver"] = smi.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        pass
    return machine


def gpu_preflight() -> list[str]:
    """What would make a part fail or skip for a reason other than the code under test (a GPU machine may have no
    network and another set of packages)."""
    import importlib.util

    notes = [f"{module} is not installed: {what}" for module, what in (
        ("pytest", "the test parts cannot run"),
        ("dotenv", "pretraining.py cannot start (python-dotenv), so the train_gpt part fails"),
        ("tiktoken", "the tokenizer tests (eval.py, chat.py, export) fail"),
        ("transformers", "the export test skips and the decode part fails"),
    ) if importlib.util.find_spec(module) is None]
    if not M.GPT2_RANKS_FILE.is_file():
        notes.append(f"{M.GPT2_RANKS_FILE.relative_to(M.REPO_DIR)} is missing (python data/shakespeare.py fetches it): "
                     f"the eval.py, chat.py and export tests skip")
    return notes


def write_gpu_json(path: Path | None, results: dict[str, Any]) -> None:
    if path is None:
        return
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with M.atomic_write(path, "w") as f:
            f.write(json.dumps(results, indent=2) + "\n")
    except OSError as e:
        print(f"bench.py: warning: {path} not written ({e.strerror})", file=sys.stderr)


def gpu_check(budget_s: float, json_out: Path | None) -> int:
    """Every part of GPU_PARTS within budget_s, each in its own process group under its own limit; a line per part
    as it ends, one summary table at the end, and everything in json_out (rewritten after each part, so a check cut
    short keeps what it has). Returns 0 when every part passed, else 1."""
    begin = time.monotonic()
    deadline = begin + budget_s
    results: dict[str, Any] = dict(check="python bench.py --only gpu", started=time.strftime("%Y-%m-%d %H:%M:%S"),
                                   budget_s=budget_s, machine=guarded(gpu_machine), preflight=gpu_preflight(),
                                   parts={})
    for note in results["preflight"]:
        print(f"gpu check: warning: {note}", file=sys.stderr, flush=True)

    def limit(name: str) -> float:
        return min(GPU_PARTS[name][0], deadline - time.monotonic())

    def record(name: str, part: dict[str, Any]) -> None:
        results["parts"][name] = dict(about=GPU_PARTS[name][1], **part)
        results["seconds"] = round(time.monotonic() - begin, 1)
        print(f"gpu check: {name}: {part['status']} after {part.get('seconds', 0)} s; {gpu_part_result(name, part)}",
              file=sys.stderr, flush=True)
        write_gpu_json(json_out, results)

    def skipped(name: str) -> dict[str, Any] | None:
        left = limit(name)
        return None if left >= GPU_MIN_PART_S else dict(status="skipped", seconds=0.0,
                                                         error=f"out of time: {max(0, left):.0f} s of the budget left")

    # 1. the test runs at once: tiny models, whose time goes to compiling on the CPU cores and starting scripts
    started = {name: guarded(lambda: dict(proc=LimitedProcess([sys.executable, "-m", "pytest", *PYTEST_ARGS, *target],
                                                              limit(name), env=dict(COLUMNS="300"))))
               for name, target in PYTEST_TARGETS.items()}
    for name, start in started.items():
        if "proc" not in start:
            record(name, start)
    running = {name: start["proc"] for name, start in started.items() if "proc" in start}
    while running:  # each one recorded as it ends, so that its seconds are its own
        for name in [n for n, proc in running.items() if proc.done()]:
            record(name, guarded(lambda: pytest_part(running.pop(name).wait())))
        time.sleep(0.2)
    # 2. the training step alone on the GPU, compiled from an empty cache: the first step's time is a cold compile
    bench = str(Path(__file__).resolve())
    with tempfile.TemporaryDirectory(prefix="gpu-check-inductor-", ignore_cleanup_errors=True) as cache:
        env = dict(TORCHINDUCTOR_CACHE_DIR=cache, TRITON_CACHE_DIR=str(Path(cache) / "triton"))
        cmd = [sys.executable, bench, "--gpu-part", "train", "--device", "cuda", "--steps", "3", "--warmup", "2"]
        record("train", skipped("train") or guarded(lambda: script_part(
            LimitedProcess(cmd, limit("train"), env).wait(), last_json)))
    # 3. decode, with what is left
    cmd = [sys.executable, bench, "--only", "decode", "--json", "--device", "cuda"]
    record("decode", skipped("decode") or guarded(lambda: script_part(
        LimitedProcess(cmd, limit("decode")).wait(), decode_figures)))
    print(gpu_summary(results, json_out))
    return 0 if all(p["status"] == "ok" for p in results["parts"].values()) else 1


def gpu_part_result(name: str, part: dict[str, Any]) -> str:
    """What a part found, as the one line the summary table gives it (the JSON has every figure)."""
    try:
        return part_result_line(part)
    except (KeyError, TypeError, ValueError) as e:  # a figure missing or of another type: the JSON still has them
        return f"{part.get('error') or ''} (figures in the JSON; no summary: {type(e).__name__}: {e})".strip()


def part_result_line(part: dict[str, Any]) -> str:
    if "passed" in part:
        errors = part["errors"]
        text = (f"{part['passed']} passed, {part['failed']} failed, {part['skipped']} skipped, {errors} "
                f"error{'s' * (errors != 1)}")
        if part["failures"]:
            text += "; " + "; ".join(f"{f['outcome']} {f['test'].split('::')[-1]}"
                                     + (f" ({f['message'][:100]})" if f["message"] else "") for f in part["failures"])
        reasons = list(dict.fromkeys(s["reason"] for s in part.get("skips", [])))
        if reasons:
            text += "; skipped: " + "; ".join(reasons)
        return text + (f"; {part['error']}" if part.get("error") else "")
    if part["status"] != "ok":
        return part.get("error") or ""
    if "tokens_per_s" in part:
        gpu = part.get("gpu", "")
        return (f"{part['tokens_per_s']:,} tok/s = {part['vs_record']:.2f}x the record's "
                f"{part['record_tokens_per_s_per_gpu']:,} per H100" + ("" if "H100" in gpu else f" (on an {gpu})")
                + f"; step {part['step_ms']:.0f} ms of {part['micro_batches']} x {part['micro_batch_tokens']:,} tokens "
                f"(fwd+bwd {part['fwd_bwd_ms']:.0f}, Newton-Schulz {part['newton_schulz_ms']:.0f}, rest "
                f"{part['optimizer_rest_ms']:.0f}); first step {part['first_step_s']:.1f} s (compile ~"
                f"{part['compile_s']:.0f} s, cold cache); MFU {part['mfu'] or 0:.0%} of "
                f"{part['matmul_bf16_tflops']:.0f} TFLOP/s bf16; peak {part['peak_memory_mib']:,} MiB"
                + ("; compile FELL BACK to eager" if part.get("compile_fallbacks") else ""))
    if "rows" in part:
        rows = [r for r in part["rows"] if "124M" in str(r.get("shape"))] or part["rows"]
        return "; ".join(f"{r.get('shape')} batch {r.get('batch')}: {r.get('ours_kv', 0):,.0f} tok/s with the KV "
                         f"cache ({r.get('kv_vs_hf', 0):.2f}x transformers)" for r in rows)
    return ""


def gpu_summary(results: dict[str, Any], json_out: Path | None = None) -> str:
    """The check's summary table: the machine, then one line per part (status, seconds, what it found)."""
    m = results.get("machine", {})
    head = (f"GPU check: {m.get('gpu', '?')} (compute capability {m.get('capability', '?')}, "
            f"{m.get('memory_gib', '?')} GiB), torch {m.get('torch', '?')}, CUDA {m.get('cuda', '?')}, driver "
            f"{m.get('driver') or '?'}; {results.get('seconds', 0):.0f} s of a {results['budget_s']:.0f} s budget")
    lines = [head, *(f"warning: {note}" for note in results.get("preflight", [])),
             f"{'part':<10} {'status':<8} {'seconds':>7}  result"]
    for name, part in sorted(results["parts"].items(), key=lambda item: list(GPU_PARTS).index(item[0])):
        lines.append(f"{name:<10} {part['status']:<8} {part.get('seconds', 0):>7.1f}  {gpu_part_result(name, part)}")
    if json_out is not None:
        lines.append(f"everything, with each part's output: {json_out}")
    return "\n".join(lines)


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
    if points and points[0][1] <= loss:  # already there (a loss above the initial one: a run that diverged)
        return points[0][0]
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
# peer: our default training against what users would pick instead (transformers' GPT-2 + AdamW), same wall clock

PEER_LRS = (1e-3, 2e-3, 3e-3)  # AdamW peak LRs swept; around the best of a quick look at shorter budgets
PEER_QUICK_LRS = (3e-3,)  # --quick: one run keeps the smoke test in seconds (the choice of the best is unit-tested)
PEER_WARMUP_FRAC = 0.05  # linear LR warm-up over this share of the budget (nanoGPT and llm.c warm up 2-4%)
PEER_MIN_LR = 0.1  # cosine decay ends at this fraction of the peak LR (nanoGPT: min_lr = learning_rate / 10)
PEER_VAL_EVERY = 5  # our run validates every 5 of its 75 steps: a curve to read times off (docs/muon_vs_adamw.md)
PEER_QUICK = dict(num_layers=2, num_heads=2, head_dim=32, model_dim=64, no_attn_layer=-1, train_seq_len=128,
                  val_seq_len=128, row_len=128, val_tokens=256, num_iterations=4, window_max=128,
                  muon_momentum_warmup=2, compile="off", warmup_steps=1)  # --quick: the tests' tiny model, seconds


def peer_lr_mult(frac: float, warmup_frac: float = PEER_WARMUP_FRAC, min_lr: float = PEER_MIN_LR) -> float:
    """LR multiplier at `frac` of the training budget: linear warm-up, then cosine decay to min_lr at the end
    (nanoGPT's get_lr with training time in place of steps, so the decay ends at the budget however fast a step is)."""
    frac = min(max(frac, 0.0), 1.0)
    if frac < warmup_frac:
        return frac / warmup_frac
    progress = (frac - warmup_frac) / (1 - warmup_frac)
    return min_lr + (1 - min_lr) * 0.5 * (1 + math.cos(math.pi * progress))


def peer_gpt2(hp: M.Hyperparameters) -> Any:
    """GPT2LMHeadModel at our width, depth, heads and padded vocabulary, rows as long as ours; transformers' defaults
    otherwise (tied embeddings, a 4x GELU MLP, its initialisation), with dropout off as for pretraining (nanoGPT)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(vocab_size=M.next_multiple_of_n(hp.vocab_size, n=128), n_positions=hp.max_seq_len,
                        n_embd=hp.model_dim, n_layer=hp.num_layers, n_head=hp.num_heads,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    torch.manual_seed(hp.seed)
    return GPT2LMHeadModel(config)


class PeerLoss(torch.nn.Module):
    """GPT2LMHeadModel behind our forward's (inputs, targets, window) signature: the mean cross-entropy over the
    padded vocabulary in fp32, as ours computes it, so model.evaluate validates both the same way."""

    def __init__(self, hf: Any):
        super().__init__()
        self.hf = hf

    def forward(self, input_BT: torch.Tensor, target_BT: torch.Tensor, window: Any = None) -> torch.Tensor:
        logits = self.hf(input_ids=input_BT.long(), use_cache=False).logits.float()  # (B, T, V); window unused
        return torch.nn.functional.cross_entropy(logits.view(-1, logits.size(-1)), target_BT.reshape(-1).long())


def peer_adamw(model: torch.nn.Module, lr: float) -> torch.optim.AdamW:
    """GPT-2's AdamW as nanoGPT configures it: betas (0.9, 0.95), eps 1e-8, weight decay 0.1 on every matrix and
    embedding (tensors of 2 or more dims), none on biases and layer norms."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [dict(params=[p for p in params if p.ndim >= 2], weight_decay=0.1),
              dict(params=[p for p in params if p.ndim < 2], weight_decay=0.0)]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), eps=1e-8)


def peer_step(loss_fn: PeerLoss, opt: torch.optim.Optimizer, batch: tuple, hp: M.Hyperparameters,
              rt: M.Runtime) -> float:
    """One AdamW step on the batch ours takes: rank_equivalents micro-batches of train_seq_len tokens as rows of
    row_len, the mean loss (no loss scale: clipping sees the true gradient norm), clipped to norm 1.0 (GPT-2)."""
    accum, row = hp.rank_equivalents, hp.row_len or hp.train_seq_len
    total = torch.zeros(())
    for j in range(accum):
        part = slice(j * hp.train_seq_len, (j + 1) * hp.train_seq_len)
        with rt.autocast():
            loss = loss_fn(batch[0][part].view(-1, row), batch[1][part].view(-1, row))
        (loss / accum).backward()
        total += loss.detach().float().cpu()
    torch.nn.utils.clip_grad_norm_(loss_fn.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return float(total / accum)


def peer_probe(hp: M.Hyperparameters, steps: int) -> dict[str, Any]:
    """Milliseconds per AdamW step in fp32 and under bf16 autocast (median of `steps` after one untimed step); the
    AdamW runs use the faster, whatever ours picked."""
    step_ms = {}
    for dtype in ("fp32", "bf16"):
        rt = M.init_runtime(dataclasses.replace(hp, dtype=dtype, compile="off"))
        loss_fn = PeerLoss(peer_gpt2(hp)).to(rt.device).train()
        opt, loader, times = peer_adamw(loss_fn, PEER_LRS[0]), pretraining.make_train_loader(hp, rt), []
        for _ in range(steps + 1):
            start = time.perf_counter()
            peer_step(loss_fn, opt, next(loader), hp, rt)
            rt.synchronize()
            times.append(time.perf_counter() - start)
        step_ms[dtype] = round(1000 * statistics.median(times[1:]), 1)
    return dict(step_ms=step_ms, chosen=min(step_ms, key=step_ms.get))


def warm_up_peer(loss_fn: PeerLoss, opt: torch.optim.Optimizer, hp: M.Hyperparameters, rt: M.Runtime) -> float:
    """One step run and undone before the clock starts, as pretraining.py warms ours up: first-touch allocations
    (optimizer state, activation buffers) stay off the clock, and the trajectory is that of a run without it.
    Returns the step's seconds: the first estimate of a step's time."""
    initial = dict(model=copy.deepcopy(loss_fn.state_dict()), optimizer=copy.deepcopy(opt.state_dict()))
    start = time.perf_counter()
    peer_step(loss_fn, opt, next(pretraining.make_train_loader(hp, rt)), hp, rt)
    rt.synchronize()
    seconds = time.perf_counter() - start
    loss_fn.load_state_dict(initial["model"])
    opt.load_state_dict(initial["optimizer"])
    return seconds


def train_peer(hp: M.Hyperparameters, lr: float, dtype: str, budget_s: float, val_every_s: float) -> dict[str, Any]:
    """AdamW on GPT2LMHeadModel for budget_s seconds of training, clocked as pretraining.py clocks ours (data
    loading and steps on it, validation off it): the LR follows peer_lr_mult of the training time at the end of each
    step (estimated by the step before), the val loss is taken every val_every_s seconds and at the end, and after
    the first no step starts that the last step's time says would end past the budget."""
    rt = M.init_runtime(dataclasses.replace(hp, dtype=dtype, compile="off"))
    loss_fn = PeerLoss(peer_gpt2(hp)).to(rt.device).train()
    opt = peer_adamw(loss_fn, lr)
    step_s = warm_up_peer(loss_fn, opt, hp, rt)
    loader = pretraining.make_train_loader(hp, rt)
    val_files = str(M.REPO_DIR / hp.val_files)  # relative to the repository, as pretraining.py resolves it
    curve = dict(steps=[0], tokens=[0], seconds=[0.0], val_loss=[M.evaluate(loss_fn, hp, rt, 0, val_files)])
    elapsed, steps, tokens = 0.0, 0, 0
    while True:  # the first step always runs; then each runs if the one before says it ends within the budget
        for group in opt.param_groups:
            group["lr"] = lr * peer_lr_mult((elapsed + step_s) / budget_s)
        start = time.perf_counter()
        batch = next(loader)
        train_loss = peer_step(loss_fn, opt, batch, hp, rt)
        rt.synchronize()
        step_s = time.perf_counter() - start
        elapsed, steps, tokens = elapsed + step_s, steps + 1, tokens + batch[0].numel()
        last = elapsed + step_s > budget_s or not math.isfinite(train_loss)  # diverged: its val loss says so
        if last or elapsed >= len(curve["seconds"]) * val_every_s:
            for key, value in dict(steps=steps, tokens=tokens, seconds=elapsed,
                                   val_loss=M.evaluate(loss_fn, hp, rt, 0, val_files)).items():
                curve[key].append(value)
            print(f"adamw lr:{lr:g} step:{steps} train_loss:{train_loss:.4f} val_loss:{curve['val_loss'][-1]:.4f} "
                  f"train_time:{1000 * elapsed:.0f}ms", file=sys.stderr, flush=True)
        if last:
            break
    return dict(lr=lr, dtype=dtype, label=f"GPT2LMHeadModel + AdamW lr {lr:g}", train_steps=steps,
                tokens_per_step=tokens // steps, budget_s=budget_s, train_s=round(elapsed, 2),
                tokens_per_s=round(tokens / elapsed),
                final_val_loss=curve["val_loss"][-1], params=M.param_counts(loss_fn)["total"],
                peak_memory_mib=round(peak_memory_mib(rt.device)), **curve)


def busy_cpu_seconds() -> float | None:
    """CPU seconds the whole machine has been busy, all cores and processes (/proc/stat); None where unreadable."""
    try:
        ticks = [int(t) for t in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    except (OSError, ValueError):
        return None
    return (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")  # all but idle and iowait


def children_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_echoed(cmd: list[str], what: str) -> dict[str, float | None]:
    """Run cmd with its output echoed to stderr line by line (minutes of progress); one clear line on failure.
    Returns its wall seconds and the cores other processes kept busy meanwhile on average: a shared machine slows
    a wall-clock comparison, and this says how much it was shared."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    busy, own, start = busy_cpu_seconds(), children_cpu_seconds(), time.perf_counter()
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env) as proc:
        tail = []
        for line in proc.stdout:
            print(line, end="", file=sys.stderr, flush=True)
            tail = (tail + [line])[-40:]
    if proc.returncode != 0:
        raise SystemExit(f"bench.py: {what} failed (exit {proc.returncode}):\n{''.join(tail)[-3000:]}")
    wall, busy_after = time.perf_counter() - start, busy_cpu_seconds()
    others = None if busy is None or busy_after is None else busy_after - busy - (children_cpu_seconds() - own)
    return dict(wall_s=round(wall, 1), other_cores=None if others is None else round(max(others, 0.0) / wall, 2))


def peer_ours(log_dir: Path, device: torch.device, overrides: dict[str, Any], val_every: int) -> dict[str, Any]:
    """Our default training, `python pretraining.py --preset shakespeare` in its own process (Muon + Adam, compiled
    as pretraining compiles), validated every val_every steps; its curve (metrics.jsonl) and config (run.json)."""
    flags = dict(preset="shakespeare", device=str(device), log_dir=str(log_dir), run_id="ours",
                 val_loss_every=val_every, save_checkpoint=False, **overrides)  # checkpoints: off the clock anyway
    argv = [arg for name, value in flags.items() for arg in (f"--{name.replace('_', '-')}", str(value))]
    machine = run_echoed([sys.executable, str(M.REPO_DIR / "pretraining.py"), *argv], "our pretraining run")
    run_dir = log_dir / "ours"
    hp = M.saved_config(json.loads((run_dir / R.RUN_INFO).read_text()), run_dir / R.RUN_INFO)
    run = read_run(run_dir)
    header = re.search(r"dtype:torch\.(\w+) compile:(\S+)", (run_dir / "log.txt").read_text())
    return dict(run, hp=hp, label="ours: modded-nanogpt GPT + Muon/Adam", train_steps=run["steps"][-1],
                train_s=round(run["seconds"][-1], 2), tokens_per_step=hp.tokens_per_step,
                tokens_per_s=round(run["tokens"][-1] / run["seconds"][-1]),
                final_val_loss=run["val_loss"][-1], params=M.param_counts(M.GPT.from_hparams(hp))["total"],
                dtype=header and header[1], compile=header and header[2], **machine)


def peer_process(spec: dict[str, Any], tmp: Path, what: str) -> dict[str, Any]:
    """One AdamW probe or run in a fresh process (its own memory and allocator state, as ours has)."""
    out = tmp / f"peer-{time.monotonic_ns()}.json"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--peer-adamw", json.dumps(dict(spec, out=str(out)))]
    machine = run_echoed(cmd, what)
    return dict(json.loads(out.read_text()), **machine)


def peer_child(spec: dict[str, Any]) -> None:
    """The hidden --peer-adamw subcommand: the probe (spec["probe"]) or one AdamW run, its result to spec["out"]."""
    hp = M.Hyperparameters.from_dict(spec["config"])
    if spec.get("probe"):
        result = peer_probe(hp, spec["steps"])
    else:
        result = train_peer(hp, spec["lr"], spec["dtype"], spec["budget_s"], spec["val_every_s"])
    Path(spec["out"]).write_text(json.dumps(result))


def safe_ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a is not None and b else None


def peer_comparison(ours: dict[str, Any], adamw: list[dict[str, Any]]) -> dict[str, Any]:
    """Ours against the best AdamW run (lowest final val loss): both final losses, the training seconds each needs
    to reach the other's final loss (None: not within its run), and ours-vs-AdamW ratios: speedup_to_adamw_loss is
    AdamW's training time over the time ours needs for AdamW's final loss; speedup_to_ours_loss the time AdamW
    needs for ours' final loss over ours' training time (None when AdamW never gets there: more than its budget)."""
    best = min(adamw, key=lambda r: r["final_val_loss"] if math.isfinite(r["final_val_loss"]) else math.inf)
    ours_to_adamw = seconds_to_reach(ours, best["final_val_loss"])
    adamw_to_ours = seconds_to_reach(best, ours["final_val_loss"])
    return dict(best_lr=best["lr"], ours_val_loss=round(ours["final_val_loss"], 4),
                adamw_val_loss=round(best["final_val_loss"], 4),
                val_loss_gap=round(best["final_val_loss"] - ours["final_val_loss"], 4),
                ours_seconds_to_adamw_loss=ours_to_adamw and round(ours_to_adamw, 1),
                adamw_seconds_to_ours_loss=adamw_to_ours and round(adamw_to_ours, 1),
                speedup_to_adamw_loss=safe_ratio(best["train_s"], ours_to_adamw),
                speedup_to_ours_loss=safe_ratio(adamw_to_ours, ours["train_s"]),
                tokens_per_s_ratio=safe_ratio(ours["tokens_per_s"], best["tokens_per_s"]))


def bench_peer(device: torch.device, quick: bool = False, budget_s: float | None = None,
               lrs: list[float] | None = None) -> dict[str, Any]:
    """Our default run, then GPT2LMHeadModel + AdamW at each LR for the same training seconds (or budget_s), on the
    same shards, tokens per step and validation tokens; the AdamW dtype is the faster of fp32 and bf16 autocast."""
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-peer-") as tmp:
        ours = peer_ours(Path(tmp), device, PEER_QUICK if quick else {}, 2 if quick else PEER_VAL_EVERY)
        hp = ours.pop("hp")
        budget = budget_s or ours["train_s"]
        val_every_s = budget / max(len(ours["seconds"]) - 1, 1)
        probe = peer_process(dict(probe=True, config=hp.to_dict(), steps=1 if quick else 3), Path(tmp),
                             "AdamW dtype probe")
        print(f"peer: AdamW step fp32 {probe['step_ms']['fp32']:.0f} ms, bf16 autocast "
              f"{probe['step_ms']['bf16']:.0f} ms: {probe['chosen']}", file=sys.stderr, flush=True)
        spec = dict(config=hp.to_dict(), dtype=probe["chosen"], budget_s=budget, val_every_s=val_every_s)
        adamw = [peer_process(dict(spec, lr=lr), Path(tmp), f"AdamW run lr {lr:g}")
                 for lr in lrs or (PEER_QUICK_LRS if quick else PEER_LRS)]
    comparison = peer_comparison(ours, adamw)
    for run in [ours, *adamw]:
        print(f"peer {run['label']:<38} val {run['final_val_loss']:.4f} after {run['train_s']:.0f} s "
              f"({run['train_steps']} steps) {run['tokens_per_s']:,} tok/s", file=sys.stderr, flush=True)
    return dict(quick=quick, budget_s=round(budget, 2), equal_budget=budget_s is None,
                clock="training seconds: validation, compile warm-up and checkpoints excluded (pretraining.py's "
                      "train_time_ms); AdamW runs eager, its clock kept the same way",
                tokens_per_step=hp.tokens_per_step, val_tokens=hp.val_tokens, adamw_dtype=probe["chosen"],
                dtype_probe_step_ms=probe["step_ms"], ours=ours, adamw=adamw, comparison=comparison,
                wall_s=round(time.perf_counter() - started, 1))


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
        models = {fmt: I.set_inference_weights(ours(hp, device), fmt) for fmt in {w for _, w, _ in paths or DECODE_PATHS}}
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
            loader = M.distributed_data_generator(str(M.REPO_DIR / im.hp.val_files), row_len * max(prompts, rows),
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


BENCHMARKS = ("matmul", "train", "modifiers", "trackers", "decode", "data", "peer")


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
    if "peer" in results:
        print_peer(results["peer"])


def print_peer(peer: dict[str, Any]) -> None:
    """The peer comparison: one row per run, then time-to-loss both ways and the ratios against the best AdamW."""
    def reach(seconds: float | None, ratio: float | None, what: str) -> str:
        return "never (not within its run)" if seconds is None else f"{seconds:.0f} s ({ratio}x {what})"

    c, probe = peer["comparison"], peer["dtype_probe_step_ms"]
    print(f"peer: {peer['budget_s']:.1f} s of training each ({peer['clock']}); {peer['tokens_per_step']:,} tokens "
          f"per step, {peer['val_tokens']:,} val tokens; AdamW under {peer['adamw_dtype']} (step fp32 "
          f"{probe['fp32']:.0f} ms, bf16 autocast {probe['bf16']:.0f} ms)")
    print(f"{'run':<38} {'steps':>6} {'train s':>8} {'tok/s':>8} {'val loss':>9} {'wall s':>7} {'others':>7}")
    for r in [peer["ours"], *peer["adamw"]]:
        others = "-" if r["other_cores"] is None else f"{r['other_cores']:.2f}"
        print(f"{r['label']:<38} {r['train_steps']:>6} {r['train_s']:>8.1f} {r['tokens_per_s']:>8,} "
              f"{r['final_val_loss']:>9.4f} {r['wall_s']:>7.0f} {others:>7}")
    print(f"ours reaches the best AdamW's (lr {c['best_lr']:g}) final {c['adamw_val_loss']:.4f} at "
          f"{reach(c['ours_seconds_to_adamw_loss'], c['speedup_to_adamw_loss'], 'faster than AdamW')}; AdamW "
          f"reaches ours' {c['ours_val_loss']:.4f} at "
          f"{reach(c['adamw_seconds_to_ours_loss'], c['speedup_to_ours_loss'], 'our time')}; val loss gap "
          f"{c['val_loss_gap']:+.4f}; tok/s ours/AdamW {c['tokens_per_s_ratio']}x "
          f"(others: cores busy with other work during each run, on average)")


def main(argv: list[str] | None = None) -> None:
    p = R.OneLineParser(prog="bench.py", description=__doc__.split("\n")[0])
    p.add_argument("--only", nargs="+", choices=(*BENCHMARKS, "gpu", "quality"),
                   help="run only these benchmarks (gpu: the whole GPU check, alone; never part of the default run)")
    p.add_argument("--json-out", type=Path, metavar="PATH", help="--only gpu: write everything it found to this file")
    p.add_argument("--budget-s", type=float, default=GPU_BUDGET_S,
                   help=f"--only gpu: seconds for all its parts together (default {GPU_BUDGET_S})")
    p.add_argument("--checkpoint", default="latest", help="quality: the trained checkpoint ('latest' under --log-dir)")
    p.add_argument("--log-dir", default="logs", help="quality: where 'latest' is looked for")
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
    p.add_argument("--quick", action="store_true", help="peer: a smoke test (tiny model, a few steps, seconds)")
    p.add_argument("--peer-seconds", type=float, metavar="S",
                   help="peer: train each AdamW run S seconds instead of our run's training time")
    p.add_argument("--peer-lrs", type=float, nargs="+", metavar="LR",
                   help=f"peer: AdamW peak LRs to sweep (default {' '.join(f'{lr:g}' for lr in PEER_LRS)})")
    p.add_argument("--train-shape", help=argparse.SUPPRESS)  # internal: one training shape in a fresh process
    p.add_argument("--overrides", default="{}", help=argparse.SUPPRESS)  # internal: config fields, as JSON
    p.add_argument("--gpu-part", choices=("train",), help=argparse.SUPPRESS)  # internal: the GPU check's training
    p.add_argument("--peer-adamw", help=argparse.SUPPRESS)  # internal: one AdamW probe or run, its spec as JSON
    args = p.parse_args(argv)
    if args.gpu_part:
        print(json.dumps(gpu_train_part(M.detect_device(args.device), args.steps, args.warmup)))
        return
    if args.only and "gpu" in args.only:
        if len(args.only) > 1:
            p.error("--only gpu runs alone (it runs the tests, training and decode benchmarks itself)")
        if not torch.cuda.is_available():
            p.error("--only gpu needs a CUDA GPU; this machine has none")
        if not 0 < args.budget_s < math.inf:
            p.error(f"--budget-s={args.budget_s:g} must be positive")
        sys.exit(gpu_check(args.budget_s, args.json_out))
    if args.peer_adamw:
        peer_child(json.loads(args.peer_adamw))
        return
    if args.peer_seconds is not None and not 0 < args.peer_seconds < math.inf:
        p.error(f"--peer-seconds={args.peer_seconds:g} must be positive")
    if args.peer_lrs and not all(0 < lr < math.inf for lr in args.peer_lrs):
        p.error("--peer-lrs must all be positive")
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
    results: dict[str, Any] = dict(device=str(device), torch=torch.__version__, threads=torch.get_num_threads(),
                                   **provenance())
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
    if "quality" in chosen:
        try:
            results["quality"] = bench_quality(args.checkpoint, args.log_dir)
        except M.USER_ERRORS as e:
            R.exit_with(2, "bench.py", str(e))
    if "peer" in chosen:
        results["peer"] = bench_peer(device, args.quick, args.peer_seconds, args.peer_lrs)
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        print_table(results)


if __name__ == "__main__":
    main()
