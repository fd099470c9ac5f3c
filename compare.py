"""Recipe studies: the ablation table of pretraining runs, and our training against GPT2LMHeadModel + AdamW.

    python compare.py logs/ablation/muon logs/ablation/adamw-3e-3 --plot docs/muon_vs_adamw.png
    python compare.py logs/ablation-loss/none logs/ablation-loss/ls-0.1 --plot docs/loss_modifiers.png --zoom
    python compare.py logs/base-s0 logs/base-s1 logs/base-s2 logs/lr-s0 --json > ablation.json

    python compare.py --peer --json > peer.json    # ours vs GPT2LMHeadModel + AdamW at our run's wall clock
    python compare.py --peer --quick               # the same in seconds, on a tiny model

ablation: RUN_DIR... are pretraining run directories (the config from run.json, else from the newest checkpoint;
    the curve from the validation rows of metrics.jsonl), finished or not; the first is the reference. Runs whose
    configs differ only in the seed and in BOOKKEEPING_FIELDS (names, logging, checkpoints, device, warm-up: nothing
    that changes what is computed) are one setting, and the first run's setting is the reference setting. For each
    run, and for each setting as mean, sample standard deviation (n - 1) and n over its seeds, it gives the val loss
    - at equal steps: at the last validation step that every run shares (--json: at every shared step),
    - at equal tokens: at the last token count (step x tokens per step) at which every run validated,
    - at equal training time: at the end of the shortest run (its final train_time_ms, validation excluded), each
      run's val loss interpolated linearly between the two validations around that time,
    - at the end: each run's last validation,
    and the training seconds each run needed to reach the reference setting's mean final val loss (linear between
    validations; a run that never gets there is in no mean, and n says how many did). Each setting names the fields
    in which its config differs from the reference's (muon_lr=0.03). For each figure, the difference d of its mean
    from the reference's has the standard error se = s * sqrt(1/n + 1/n_ref), where s is the figure's pooled sample
    standard deviation over every setting with two or more seeds (one recipe's seed noise); |d| > 2 se is marked as
    beyond the seed spread, and with no such setting there is no spread and no mark. A directory that is not a run,
    or a run with no validation yet: one line naming it, exit 2. --json: the rows as JSON on stdout (the tables on
    stderr). --plot PNG (needs matplotlib): val loss against tokens and against training time; --zoom: the second
    panel shows the second half of training by tokens instead.
peer: our 2025 training (`python pretraining.py --preset shakespeare`: Muon + Adam, compiled on CPU) against
    what users would pick instead: transformers' GPT2LMHeadModel (same width, depth, heads, padded vocabulary; tied
    embeddings, dropout off) with torch.optim.AdamW (betas 0.9/0.95, weight decay 0.1 on matrices and embeddings,
    linear warm-up over 5% of the budget then cosine decay to 0.1x, gradient clip 1.0) at each of --peer-lrs, for
    the same training seconds, on the same shards, tokens per step and validation tokens. The clock is
    pretraining.py's train_time_ms (validation, compile warm-up and checkpoints off it), kept the same way for AdamW,
    which runs eager in fp32 or under bf16 autocast, whichever a short probe times faster. Reports each run's val
    loss at the budget, the training seconds each needs to reach the other's final loss, tokens/s, ratios against
    the best AdamW run, and how busy other processes kept the machine meanwhile; every run in its own process. It
    costs our run (its compile included), then per LR the budget plus a process start and the validations.
    --peer-seconds S: each AdamW run trains S seconds instead (our run is unchanged, so the budgets differ and
    equal_budget is false); --quick: a smoke test (tiny model, 4 steps, one LR).
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
from typing import Any

import torch

import bench
import model as M
import pretraining
import runs as R

# -----------------------------------------------------------------------------
# ablation: reading run directories

# Fields that cannot change what a run computes (names, places, logging, checkpointing, the device it was put on,
# the warm-up steps run and undone off the clock, how often it validates): runs that differ only in these and in
# the seed are one setting. Every other field, and any field added later, counts as a difference.
BOOKKEEPING_FIELDS = frozenset({
    "preset", "run_id", "log_dir", "resume", "val_loss_every", "save_every", "save_checkpoint", "keep_checkpoints",
    "warmup_steps", "device", "collective_timeout", "trackers", "tracker_dir", "wandb_project"})
SEED_FIELD = "seed"
SPREAD_SE = 2.0  # a difference of means beyond this many standard errors is marked (two-sided ~95% for a normal)
FIGURES = {  # key: what the settings table says it is
    "final_val_loss": "final val loss (each run's last validation)",
    "val_loss_at_step": "val loss at equal steps: the last validation step every run shares",
    "val_loss_at_tokens": "val loss at equal tokens: the last token count at which every run validated",
    "val_loss_at_time": "val loss at equal training time: the shortest run's final train time, linear between "
                        "validations",
    "seconds_to_reference": "training seconds to reach the reference setting's mean final val loss",
}


class AblationError(ValueError):
    """A run directory that cannot be compared; main() says it in one line and exits 2."""


def read_config(run_dir: Path) -> M.Hyperparameters:
    """A run's config: run.json (written when it started), else its newest checkpoint's, whose tensors stay on
    disk (mmap), so a directory of large checkpoints reads fast."""
    info = R.read_run_info(run_dir)
    if info is not None:
        return M.saved_config(info, run_dir / R.RUN_INFO)
    newest = M.newest_checkpoint(run_dir)
    if newest is None:
        raise AblationError(f"{run_dir}: not a pretraining run directory (no readable {R.RUN_INFO} and no "
                            f"checkpoint holding a config)")
    try:
        ckpt = torch.load(newest, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # noqa: BLE001 - a truncated or foreign file: one line naming it
        raise AblationError(f"{newest}: not a loadable checkpoint ({type(e).__name__})") from None
    return M.saved_config(ckpt, newest)


def read_val_rows(run_dir: Path) -> list[dict[str, Any]]:
    """The validation rows of a run's metrics.jsonl, by step; a step logged twice (a resumed run) counts once, the
    later row. A line a kill cut short is skipped, as runs.trim_metrics drops it on resume."""
    path = run_dir / "metrics.jsonl"
    try:
        lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError as e:
        raise AblationError(f"{path}: cannot be read ({e.strerror}); a run writes it from its first step") from None
    by_step: dict[int, dict[str, Any]] = {}
    for line in lines:
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict) and "val_loss" in row:
            if not isinstance(row.get("step"), int) or not isinstance(row.get("train_time_ms"), (int, float)):
                raise AblationError(f"{path}: a validation row without step and train_time_ms: {line[:80]}")
            by_step[row["step"]] = row
    if not by_step:
        raise AblationError(f"{path}: no validation rows (val_loss) yet; a run compares once it has validated")
    return [by_step[step] for step in sorted(by_step)]


def run_label(hp: M.Hyperparameters) -> str:
    """The optimizer, the loss modifiers that are on and the length: what the ablations of docs/ vary."""
    return ", ".join([("Muon + Adam" if hp.optimizer == "muon" else f"AdamW lr {hp.adamw_lr:g}"),
                      *[f"{name.replace('z_', 'z-').replace('_', ' ')} {getattr(hp, field):g}"
                        for name, (field, _) in M.BUILTIN_MODIFIERS.items() if getattr(hp, field)],
                      *([hp.loss_terms] if hp.loss_terms else []), f"{hp.num_iterations} steps"])


def read_run(run_dir: Path) -> dict[str, Any]:
    """A run's config and validation curve: steps, tokens seen and training seconds (validation excluded) at each
    val loss."""
    if not run_dir.is_dir():
        raise AblationError(f"{run_dir}: not a directory (give pretraining run directories, e.g. logs/RUN_ID)")
    hp = read_config(run_dir)
    val = read_val_rows(run_dir)
    return dict(run=run_dir.name, path=str(run_dir), label=run_label(hp), optimizer=hp.optimizer, seed=hp.seed,
                tokens_per_step=hp.tokens_per_step, hp=hp, steps=[r["step"] for r in val],
                tokens=[M.tokens_through(r["step"], hp) for r in val], seconds=[r["train_time_ms"] / 1000 for r in val],
                val_loss=[r["val_loss"] for r in val])


# -----------------------------------------------------------------------------
# ablation: figures per run, settings, seed spread


def seconds_to_reach(run: dict[str, Any], loss: float) -> float | None:
    """Training seconds at which a run's validation loss first reaches `loss` (linear between validations)."""
    points = list(zip(run["seconds"], run["val_loss"]))
    if points and points[0][1] <= loss:  # already there (a loss above the initial one: a run that diverged)
        return points[0][0]
    for (t0, l0), (t1, l1) in zip(points, points[1:]):
        if l1 <= loss:
            return t1 if l0 == l1 else t0 + (t1 - t0) * (l0 - loss) / (l0 - l1)
    return None


def value_at(xs: list[float], ys: list[float], x: float) -> float | None:
    """ys at x, linear between the two points around it (xs ascending); None before the first point or after the
    last."""
    for i, (x1, y1) in enumerate(zip(xs, ys)):
        if x1 >= x:
            if x1 == x:
                return y1
            return None if i == 0 else ys[i - 1] + (y1 - ys[i - 1]) * (x - xs[i - 1]) / (x1 - xs[i - 1])
    return None


def shared(runs: list[dict[str, Any]], key: str) -> list[int]:
    """The steps (or token counts) at which every run validated, ascending."""
    return sorted(set.intersection(*(set(r[key]) for r in runs)))


def math_config(hp: M.Hyperparameters) -> dict[str, Any]:
    """The fields that decide what a run computes: all but the bookkeeping and the seed."""
    return {k: v for k, v in hp.to_dict().items() if k not in BOOKKEEPING_FIELDS and k != SEED_FIELD}


def value_text(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value) if value != "" else '""'


def group_settings(runs: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[int]]:
    """Runs with the same math_config are one setting (their seeds), numbered from 1 in the order each first
    appears; the first is the reference, and every setting names the fields in which it differs from it. Returns
    the settings and each run's setting number."""
    configs = [math_config(r["hp"]) for r in runs]
    members: dict[str, list[int]] = {}
    for i, config in enumerate(configs):
        members.setdefault(json.dumps(config, sort_keys=True), []).append(i)
    settings = []
    for number, indices in enumerate(members.values(), 1):
        config, reference = configs[indices[0]], configs[0]
        changes = {k: v for k, v in config.items() if v != reference[k]}
        settings.append(dict(setting=number, runs=[runs[i]["run"] for i in indices],
                             seeds=[runs[i]["seed"] for i in indices], label=runs[indices[0]]["label"],
                             changes=changes, differs=", ".join(f"{k}={value_text(v)}" for k, v in changes.items())))
    setting_of = {i: number for number, indices in enumerate(members.values(), 1) for i in indices}
    return settings, [setting_of[i] for i in range(len(runs))]


def summary(values: list[float | None]) -> dict[str, Any]:
    """Mean, sample standard deviation (n - 1; None for one value) and n of the values that exist."""
    known = [v for v in values if v is not None]
    return dict(mean=statistics.fmean(known) if known else None,
                std=statistics.stdev(known) if len(known) > 1 else None, n=len(known))


def pooled_spread(stats: list[dict[str, Any]]) -> dict[str, Any]:
    """The seed spread of one figure, pooled over every setting with two or more seeds: s^2 = sum((n_i - 1) s_i^2) /
    sum(n_i - 1), with that sum as its degrees of freedom (one recipe's seed noise, whatever the setting)."""
    seeded = [(s["n"] - 1, s["std"]) for s in stats if s["n"] > 1]
    dof = sum(d for d, _ in seeded)
    return dict(std=math.sqrt(sum(d * s * s for d, s in seeded) / dof) if dof else None, dof=dof)


def against_reference(stat: dict[str, Any], ref: dict[str, Any], spread: dict[str, Any]) -> dict[str, Any]:
    """The difference of means from the reference, its standard error se = s * sqrt(1/n + 1/n_ref) (s: the pooled
    spread), the difference in se, and whether it is beyond SPREAD_SE se (None where there is no spread)."""
    if stat["mean"] is None or ref["mean"] is None:
        return dict(difference=None, se=None, standard_errors=None, beyond_spread=None)
    difference = stat["mean"] - ref["mean"]
    se = None if spread["std"] is None else spread["std"] * math.sqrt(1 / stat["n"] + 1 / ref["n"])
    return dict(difference=difference, se=se, standard_errors=difference / se if se else None,
                beyond_spread=None if se is None else abs(difference) > SPREAD_SE * se)


def run_figures(run: dict[str, Any], steps: list[int], tokens: list[int], time_s: float,
                target: float) -> dict[str, Any]:
    """One run's row: where it ended, and its val loss at equal steps, tokens and time, and seconds to target."""
    at_steps, at_tokens = dict(zip(run["steps"], run["val_loss"])), dict(zip(run["tokens"], run["val_loss"]))
    reach = seconds_to_reach(run, target)
    return dict(run=run["run"], path=run["path"], label=run["label"], preset=run["hp"].preset, seed=run["seed"],
                steps=run["steps"][-1],
                tokens=run["tokens"][-1], seconds=round(run["seconds"][-1], 1),
                final_val_loss=run["val_loss"][-1], val_loss_at_step=at_steps[steps[-1]] if steps else None,
                val_loss_at_tokens=at_tokens[tokens[-1]] if tokens else None,
                val_loss_at_time=value_at(run["seconds"], run["val_loss"], time_s), seconds_to_reference=reach,
                val_loss_at_shared_steps={s: at_steps[s] for s in steps},
                val_loss_at_shared_tokens={t: at_tokens[t] for t in tokens})


def read_runs(run_dirs: list[Path]) -> list[dict[str, Any]]:
    """read_run of each directory, in the order given; a directory given twice is an error (not a second seed)."""
    resolved = [d.resolve() for d in run_dirs]
    for i, d in enumerate(resolved):
        if d in resolved[:i]:
            raise AblationError(f"{run_dirs[i]}: given twice (each run counts once; seeds are separate runs)")
    return [read_run(d) for d in run_dirs]


def ablation(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Every run's figures (run_figures; the target is the reference setting's mean final val loss), then per
    setting each figure's summary over its seeds and its difference from the reference against the pooled spread."""
    settings, setting_of = group_settings(runs)
    reference = [r for i, r in enumerate(runs) if setting_of[i] == 1]
    target = statistics.fmean(r["val_loss"][-1] for r in reference)
    steps, tokens = shared(runs, "steps"), shared(runs, "tokens")
    shortest = min(runs, key=lambda r: r["seconds"][-1])
    rows = [dict(run_figures(r, steps, tokens, shortest["seconds"][-1], target), setting=setting_of[i])
            for i, r in enumerate(runs)]
    stats = [{f: summary([row[f] for row in rows if row["setting"] == s["setting"]]) for f in FIGURES}
             for s in settings]
    spread = {f: pooled_spread([stat[f] for stat in stats]) for f in FIGURES}
    for s, stat in zip(settings, stats):
        s["figures"] = {f: stat[f] if s["setting"] == 1
                        else dict(stat[f], **against_reference(stat[f], stats[0][f], spread[f])) for f in FIGURES}
    return dict(reference=[r["run"] for r in reference], target_val_loss=target, shared_steps=steps,
                shared_tokens=tokens, equal_time_s=shortest["seconds"][-1], equal_time_run=shortest["run"],
                spread=spread, spread_se=SPREAD_SE, runs=rows, settings=settings)


# -----------------------------------------------------------------------------
# ablation: the tables and the plot


def cell(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def print_ablation(result: dict[str, Any], file: Any = None) -> None:
    """The runs table (one row per run, as given), then one table per figure with a row per setting."""
    file = file or sys.stdout
    target, steps, tokens = result["target_val_loss"], result["shared_steps"], result["shared_tokens"]
    print(f"reference: setting 1 ({', '.join(result['reference'])}); target: its mean final val loss {target:.4f}",
          file=file)
    at_steps = (f"step {steps[-1]:,}, the last of the {len(steps)} validation steps every run shares" if steps
                else "no validation step that every run shares")
    at_tokens = (f"{tokens[-1]:,} tokens, the last of {len(tokens)} token counts at which every run validated"
                 if tokens else "no token count at which every run validated")
    print(f"equal steps: {at_steps}; equal tokens: {at_tokens}; equal time: {result['equal_time_s']:.1f} s, the "
          f"end of the shortest run ({result['equal_time_run']})", file=file)
    rows = result["runs"]
    width = max(len(r["run"]) for r in rows)
    print(f"{'run':<{width}} {'set':>3} {'seed':>4} {'steps':>6} {'tokens':>11} {'train s':>8} {'final':>7} "
          f"{'@step':>7} {'@tokens':>7} {'@time':>7}  time to the target; label", file=file)
    first = rows[0]["seconds_to_reference"]
    for r in rows:
        reach = r["seconds_to_reference"]
        ratio = f" ({reach / first:.1f}x)" if reach and first else ""
        print(f"{r['run']:<{width}} {r['setting']:>3} {r['seed']:>4} {r['steps']:>6} {r['tokens']:>11,} "
              f"{r['seconds']:>8.1f} {r['final_val_loss']:>7.4f} {cell(r['val_loss_at_step'], '.4f'):>7} "
              f"{cell(r['val_loss_at_tokens'], '.4f'):>7} {cell(r['val_loss_at_time'], '.4f'):>7}  reaches "
              f"{target:.4f} at " + (f"{reach:.0f} s{ratio}" if reach is not None else "never") + f"; {r['label']}",
              file=file)
    for figure, about in FIGURES.items():
        print_figure(result, figure, about, file)


def print_figure(result: dict[str, Any], figure: str, about: str, file: Any) -> None:
    """One figure's settings table: mean, sample std and n over seeds; the difference from the reference in
    standard errors of the pooled seed spread, marked when beyond SPREAD_SE."""
    spec = ".1f" if figure == "seconds_to_reference" else ".4f"
    spread = result["spread"][figure]
    dof = spread["dof"]
    noise = (f"pooled seed std {spread['std']:{spec}} ({dof} degree{'s' * (dof != 1)} of freedom)" if dof
             else "no setting has two seeds: no spread to judge a difference by")
    print(f"\n{about}; {noise}", file=file)
    beyond_title = f"beyond {SPREAD_SE:g} se"
    print(f"{'set':>3} {'n':>2} {'mean':>8} {'std':>8} {'vs ref':>8} {'se':>8} {beyond_title:>13}  differs from "
          f"the reference", file=file)
    for s in result["settings"]:
        f = s["figures"][figure]
        beyond = ("-" if f.get("beyond_spread") is None else "yes" if f["beyond_spread"] else "no")
        if f.get("standard_errors") is not None:
            beyond += f" ({f['standard_errors']:+.1f} se)"
        print(f"{s['setting']:>3} {f['n']:>2} {cell(f['mean'], spec):>8} {cell(f['std'], spec):>8} "
              f"{cell(f.get('difference'), '+' + spec):>8} {cell(f.get('se'), spec):>8} {beyond:>13}  "
              f"{s['differs'] or '(reference) ' + s['label']}", file=file)


def import_pyplot() -> Any:
    """matplotlib's pyplot on the Agg backend; matplotlib is optional (not in requirements.txt)."""
    try:
        import matplotlib
    except ImportError:
        raise AblationError("--plot needs matplotlib (pip install matplotlib==3.11.2)") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def legend_labels(result: dict[str, Any]) -> list[str]:
    """Each run's label, then, where another setting has the same label, its preset if theirs differ, else what its
    setting changes; then its seed where its setting has several."""
    rows, settings = result["runs"], result["settings"]
    labels = []
    for row in rows:
        setting, label = settings[row["setting"] - 1], row["label"]
        twins = [r for r in rows if r["label"] == label and r["setting"] != row["setting"]]
        if twins and all(r.get("preset") != row.get("preset") for r in twins):
            label += f" ({row['preset']})"
        elif twins:
            label += f" ({setting['differs'] or 'reference'})"
        labels.append(label + (f", seed {row['seed']}" if len(setting["runs"]) > 1 else ""))
    return labels


def plot_ablation(runs: list[dict[str, Any]], result: dict[str, Any], png: Path, zoom: bool = False) -> None:
    """Val loss against tokens and against training time, a curve per run; zoom: the second half of training by
    tokens instead of time (for runs whose wall clocks are not comparable, or whose curves differ by less than a
    line's width)."""
    plt = import_pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=not zoom)
    for run, label in zip(runs, legend_labels(result)):
        style = "-" if run["optimizer"] == "muon" else "--"
        axes[0].plot([t / 1e6 for t in run["tokens"]], run["val_loss"], style, label=label)
        if zoom:
            half = [(t / 1e6, v) for t, v in zip(run["tokens"], run["val_loss"]) if t >= run["tokens"][-1] / 2]
            axes[1].plot(*zip(*half), style + "o", markersize=3, label=label)
        else:
            axes[1].plot([s / 60 for s in run["seconds"]], run["val_loss"], style, label=label)
    axes[0].set_xlabel("training tokens (millions)")
    axes[1].set_xlabel("training tokens (millions), second half" if zoom
                       else "training time (minutes, validation excluded)")

    axes[0].set_ylabel("validation loss (nats)")
    axes[0].set_ylim(top=min(8.0, max(max(r["val_loss"]) for r in runs)))
    for ax in axes:
        ax.axhline(runs[0]["val_loss"][-1], color="gray", linewidth=0.8, linestyle=":")  # the reference's final
        ax.grid(alpha=0.3)
    labels = legend_labels(result)
    if max(map(len, labels)) > 60:  # long setting names would cover the curves: the legend goes below the panels
        fig.legend(*axes[0].get_legend_handles_labels(), loc="upper center", bbox_to_anchor=(0.5, 0.02),
                   fontsize="small")
    else:
        axes[0 if zoom else 1].legend()  # zoomed, the curves fill the second panel
    presets = sorted({r["hp"].preset for r in runs if r["hp"].preset})
    if any(r["optimizer"] != "muon" for r in runs):
        compared = "Muon vs the AdamW ablation"
    elif len(presets) > 1:
        compared = " vs ".join(presets)
    else:
        compared = "loss modifiers" if any(r["label"] != runs[0]["label"] for r in runs) else "ablation"
    fig.suptitle(f"Shakespeare presets on a 2-core CPU: {compared}")
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=110, bbox_inches="tight")  # the legend may sit below the panels
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
    val_files = str(M.resolve_path(hp.val_files))  # as pretraining.py finds it
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
                peak_memory_mib=round(bench.peak_memory_mib(rt.device)), **curve)


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
        raise SystemExit(f"compare.py: {what} failed (exit {proc.returncode}):\n{''.join(tail)[-3000:]}")
    wall, busy_after = time.perf_counter() - start, busy_cpu_seconds()
    others = None if busy is None or busy_after is None else busy_after - busy - (children_cpu_seconds() - own)
    return dict(wall_s=round(wall, 1), other_cores=None if others is None else round(max(others, 0.0) / wall, 2))


def peer_ours(log_dir: Path, device: torch.device, overrides: dict[str, Any], val_every: int) -> dict[str, Any]:
    """Our 2025 training (the measured peer figures are of it), `python pretraining.py --preset shakespeare`, in its
    own process (Muon + Adam, compiled as pretraining compiles), validated every val_every steps; its curve
    (metrics.jsonl) and config (run.json)."""
    flags = dict(preset="shakespeare", device=str(device), log_dir=str(log_dir), run_id="ours",
                 val_loss_every=val_every, save_checkpoint=False, **overrides)  # checkpoints: off the clock anyway
    argv = [arg for name, value in flags.items() for arg in (f"--{name.replace('_', '-')}", str(value))]
    machine = run_echoed([sys.executable, str(M.REPO_DIR / "pretraining.py"), *argv], "our pretraining run")
    run_dir = log_dir / "ours"
    run = read_run(run_dir)
    hp = run["hp"]
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
    with tempfile.TemporaryDirectory(prefix="compare-peer-") as tmp:
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




# -----------------------------------------------------------------------------
# command line


def main(argv: list[str] | None = None) -> None:
    p = R.OneLineParser(prog="compare.py", description=__doc__.split("\n")[0])
    p.add_argument("run_dirs", nargs="*", type=Path, metavar="RUN_DIR",
                   help="pretraining run directories to compare; the first is the reference")
    p.add_argument("--plot", type=Path, metavar="PNG", help="write val loss vs tokens and vs time to this PNG")
    p.add_argument("--zoom", action="store_true", help="with --plot: the second panel shows the second half of "
                   "training by tokens instead of by time")
    p.add_argument("--json", action="store_true", help="print the results as JSON on stdout")
    p.add_argument("--peer", action="store_true", help="our default training against GPT2LMHeadModel + AdamW")
    p.add_argument("--quick", action="store_true", help="--peer: a smoke test (tiny model, a few steps, seconds)")
    p.add_argument("--peer-seconds", type=float, metavar="S",
                   help="--peer: train each AdamW run S seconds instead of our run's training time")
    p.add_argument("--peer-lrs", type=float, nargs="+", metavar="LR",
                   help=f"--peer: AdamW peak LRs to sweep (default {' '.join(f'{lr:g}' for lr in PEER_LRS)})")
    p.add_argument("--device", default="auto", help="--peer: where both train")
    p.add_argument("--peer-adamw", help=argparse.SUPPRESS)  # internal: one AdamW probe or run, its spec as JSON
    args = p.parse_args(argv)
    if args.peer_adamw:
        peer_child(json.loads(args.peer_adamw))
        return
    if args.peer:
        if args.run_dirs or args.plot or args.zoom:
            p.error("--peer trains its own runs: it takes no RUN_DIR, --plot or --zoom")
        if args.peer_seconds is not None and not 0 < args.peer_seconds < math.inf:
            p.error(f"--peer-seconds={args.peer_seconds:g} must be positive")
        if args.peer_lrs and not all(0 < lr < math.inf for lr in args.peer_lrs):
            p.error("--peer-lrs must all be positive")
        try:
            device = M.detect_device(args.device)
        except M.USER_ERRORS as e:
            R.exit_with(2, "compare.py", str(e))
        peer = bench_peer(device, args.quick, args.peer_seconds, args.peer_lrs)
        if args.json:
            print(json.dumps(dict(device=str(device), torch=torch.__version__, threads=torch.get_num_threads(),
                                  **bench.provenance(), peer=peer), indent=2))
        else:
            print_peer(peer)
        return
    if not args.run_dirs:
        p.error("give the pretraining run directories to compare (the first is the reference), or --peer")
    if args.quick or args.peer_seconds is not None or args.peer_lrs:
        p.error("--quick, --peer-seconds and --peer-lrs go with --peer")
    try:
        if args.plot:
            import_pyplot()  # before reading the runs: a missing matplotlib is the first thing said
        runs = read_runs(args.run_dirs)
        result = ablation(runs)
        print_ablation(result, sys.stderr if args.json else sys.stdout)
        if args.plot:
            plot_ablation(runs, result, args.plot, args.zoom)
    except (AblationError, *M.USER_ERRORS) as e:
        R.exit_with(2, "compare.py", str(e))
    if args.json:
        print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
