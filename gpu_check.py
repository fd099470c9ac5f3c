"""The check for a lent GPU: every open GPU question in one run of fixed length.

    python gpu_check.py --json-out gpu_check.json               # on one GPU: under 8 minutes in all
    python gpu_check.py --json-out gpu_check.json --budget-s 300

The questions are the README's "What is not verified on a GPU". The parts: tests/test_cuda.py (fast and slow tests
apart) and tests/test_train_gpt.py::test_cuda_runs_agree side by side, then the speedrun shape's training step
alone (cold compile, step time, tokens/s against the record's ~481k per H100, MFU, peak memory; this script again,
behind its hidden --part train), then `bench.py --only decode`; each part in its own process group under its own
limit (GPU_PARTS), all within --budget-s. A part that fails or runs out of time is one line, and the others go on.
One summary table on stdout, everything in --json-out (rewritten after each part). Without CUDA: one line and exit
2. Offline, data/gpt2.tiktoken and python-dotenv must be there (the check's first lines say what is missing).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import torch

import bench
import model as M
import pretraining
import runs as R

# -----------------------------------------------------------------------------
# parts: what each answers and how long it may take

# The May-2025 record: 1770 steps of 8 x 48*1024 tokens in 180.8 s on 8 H100s, ~481k tokens/s per GPU. One GPU on the
# speedrun shape runs all 8 micro-batches of a step and all of Newton-Schulz, so its tokens/s compare with this directly
# (it skips the record's gradient all-reduce).
RECORD_TOKENS_PER_S_PER_GPU = 1770 * 48 * 1024 / 180.8
# Record #89 (f411b3d3): 1285 steps in 1.23 minutes on 8 H100s, of 8 x 16k tokens (423 steps), 8 x 32k (424) and
# 8 x 48k (438): ~574k tokens/s per GPU averaged over its run. The speedrun2026 shape's step here is stage 1's batch.
RECORD_2026_TOKENS_PER_S_PER_GPU = (423 * 1 + 424 * 2 + 438 * 3) * 8 * 16 * 1024 / (1.23 * 60) / 8
SHAPE_RECORDS = {"speedrun-124M": RECORD_TOKENS_PER_S_PER_GPU, "speedrun2026-124M": RECORD_2026_TOKENS_PER_S_PER_GPU}
GPU_BUDGET_S = 450  # all parts together: 7.5 minutes, which leaves a 15-minute lease room for the machine's start
GPU_MIN_PART_S = 30  # a part with less of the budget left is skipped, not started
GPU_PARTS = {  # name: (seconds it may take at most, what it answers); the three test runs go side by side
    "tests": (210, "tests/test_cuda.py -m 'not slow': FlexAttention vs SDPA, the FP8 head, whole-model compile "
                   "(against eager SDPA too), bf16 embeddings, the KV cache through eval.py's and chat.py's loader"),
    "scripts": (210, "tests/test_cuda.py -m slow: eval.py and chat.py on CUDA against CPU, the Hugging Face export of "
                     "a GPU checkpoint run on the GPU"),
    "train_gpt": (210, "tests/test_train_gpt.py::test_cuda_runs_agree: train_gpt.py and pretraining.py agree on CUDA"),
    "train": (150, "the speedrun shape (124M, 8 micro-batches of 48*1024 tokens per step): cold compile, step time, "
                   "tokens/s against the record's per-H100 rate, MFU, peak memory"),
    "train2026": (100, "the speedrun2026 shape (record #89 without MUDD and its kernels; 8 micro-batches of 16k "
                       "tokens, stage 1's step): step time, tokens/s against record #89's per-H100 rate"),
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


# -----------------------------------------------------------------------------
# reading a part's output: pytest's lines, a traceback's last line, a child's JSON


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


# -----------------------------------------------------------------------------
# running a part: its own process group, its own limit; a part's result from its run


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


# -----------------------------------------------------------------------------
# the training part (this script's --part train) and the decode part's figures


def gpu_train_part(device: torch.device, steps: int, warmup: int, matmul_n: int = 8192,
                   shape: str = "speedrun-124M") -> dict[str, Any]:
    """bench_train_shape on the speedrun shape, plus what its first step cost (the whole-model and Newton-Schulz
    compiles: cold when the caller gives an empty inductor cache), MFU against this GPU's bf16 product rate and
    tokens/s against the record's per-H100 rate."""
    import warnings

    peak = bench.bench_matmul(device, repeats=3, n=matmul_n)
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
            row = bench.bench_train_shape(shape, device, steps, warmup)
        finally:
            pretraining.train_micro_batches = micro_batches
    hp = bench.train_config(shape, device)
    intervals = [b - a for a, b in zip(starts, starts[1:])] or [float("nan")]  # one step: no second stamp
    messages = list(dict.fromkeys(M.first_line(w.message) for w in caught))
    row.update(gpu=torch.cuda.get_device_name(device) if device.type == "cuda" else str(device),
               fp8_head=M.fp8_supported(device), micro_batch_tokens=hp.train_seq_len, micro_batches=hp.rank_equivalents,
               setup_s=round(starts[0] - begin, 1), first_step_s=round(intervals[0], 1),
               compile_s=round(intervals[0] - row["step_ms"] / 1000, 1),  # the first step's excess over a steady one
               step_intervals_s=[round(s, 3) for s in intervals], matmul_bf16_tflops=round(peak["bf16"] / 1000, 1),
               mfu=round(1000 * row["model_tflops"] / peak["bf16"], 3) if peak["bf16"] else None,
               record_tokens_per_s_per_gpu=round(SHAPE_RECORDS[shape]),
               vs_record=round(row["tokens_per_s"] / SHAPE_RECORDS[shape], 3),
               compile_fallbacks=[m for m in messages if "running it eagerly" in m], warnings=messages[:10])
    if device.type == "cuda":
        row["peak_reserved_mib"] = round(torch.cuda.max_memory_reserved(device) / 2**20)
    return row


def decode_figures(stdout: str) -> dict[str, Any]:
    out = last_json(stdout)
    return dict(bandwidth_gbs=out.get("bandwidth_gbs"), rows=out.get("decode", []))


# -----------------------------------------------------------------------------
# the check: the machine, what is missing, the parts in order, the JSON and the summary


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
        print(f"gpu_check.py: warning: {path} not written ({e.strerror})", file=sys.stderr)


def gpu_check(budget_s: float, json_out: Path | None) -> int:
    """Every part of GPU_PARTS within budget_s, each in its own process group under its own limit; a line per part
    as it ends, one summary table at the end, and everything in json_out (rewritten after each part, so a check cut
    short keeps what it has). Returns 0 when every part passed, else 1."""
    begin = time.monotonic()
    deadline = begin + budget_s
    results: dict[str, Any] = dict(check="python gpu_check.py", started=time.strftime("%Y-%m-%d %H:%M:%S"),
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
    this, bench_py = str(Path(__file__).resolve()), str(M.REPO_DIR / "bench.py")
    with tempfile.TemporaryDirectory(prefix="gpu-check-inductor-", ignore_cleanup_errors=True) as cache:
        env = dict(TORCHINDUCTOR_CACHE_DIR=cache, TRITON_CACHE_DIR=str(Path(cache) / "triton"))
        cmd = [sys.executable, this, "--part", "train", "--device", "cuda", "--steps", "3", "--warmup", "2"]
        record("train", skipped("train") or guarded(lambda: script_part(
            LimitedProcess(cmd, limit("train"), env).wait(), last_json)))
        cmd = [sys.executable, this, "--part", "train2026", "--device", "cuda", "--steps", "3", "--warmup", "2"]
        record("train2026", skipped("train2026") or guarded(lambda: script_part(
            LimitedProcess(cmd, limit("train2026"), env).wait(), last_json)))
    # 3. decode, with what is left
    cmd = [sys.executable, bench_py, "--only", "decode", "--json", "--device", "cuda"]
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
# command line


def main(argv: list[str] | None = None) -> None:
    p = R.OneLineParser(prog="gpu_check.py", description=__doc__.split("\n")[0])
    p.add_argument("--json-out", type=Path, metavar="PATH", help="write everything the check found to this file")
    p.add_argument("--budget-s", type=float, default=GPU_BUDGET_S,
                   help=f"seconds for all its parts together (default {GPU_BUDGET_S})")
    p.add_argument("--part", choices=("train", "train2026"), help=argparse.SUPPRESS)  # internal: a training part
    p.add_argument("--device", default="cuda", help=argparse.SUPPRESS)  # internal: --part's device
    p.add_argument("--steps", type=int, default=3, help=argparse.SUPPRESS)  # internal: --part's timed steps
    p.add_argument("--warmup", type=int, default=2, help=argparse.SUPPRESS)  # internal: --part's untimed steps
    args = p.parse_args(argv)
    if args.part:  # before the CUDA check: a child that finds no GPU fails as a part, in the parent's table
        shape = "speedrun2026-124M" if args.part == "train2026" else "speedrun-124M"
        print(json.dumps(gpu_train_part(M.detect_device(args.device), args.steps, args.warmup, shape=shape)))
        return
    if not torch.cuda.is_available():
        p.error("the GPU check needs a CUDA GPU; this machine has none")
    if not 0 < args.budget_s < math.inf:
        p.error(f"--budget-s={args.budget_s:g} must be positive")
    sys.exit(gpu_check(args.budget_s, args.json_out))


if __name__ == "__main__":
    main()
