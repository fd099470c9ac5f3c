"""Pretrain the speedrun GPT: one process on CPU or one GPU, or data-parallel under torchrun.

    python pretraining.py                                   # Shakespeare on CPU (or speedrun with CUDA + FineWeb)
    python pretraining.py --preset shakespeare --num-iterations 50
    torchrun --nproc_per_node=8 pretraining.py --preset speedrun
    python pretraining.py --resume latest                   # continue the newest run exactly where it stopped

Writes logs/<run_id>/log.txt (code, config, step lines), metrics.jsonl and state_stepNNNNNN.pt checkpoints.
"""
from __future__ import annotations

import copy
import dataclasses
import glob
import math
import time
from pathlib import Path

import torch
import torch.distributed as dist

import model as M
import runs as R
from model import Hyperparameters, Runtime

DEFAULT_REASON = {"speedrun": "CUDA and FineWeb shards found", R.CPU_DEFAULT_PRESET: "no CUDA or no FineWeb shards"}


def read_code() -> dict[str, str]:
    """The source of the files that ran, logged first as the record's logs do."""
    return {name: (M.REPO_DIR / name).read_text() for name in ("pretraining.py", "runs.py", "model.py")}


def resolve_config(argv: list[str] | None) -> tuple[Hyperparameters, R.Resume | None, bool]:
    """Config from CLI/env/preset; on --resume the run's config (its checkpoint's, or run.json's when it died before
    the first checkpoint), with explicit CLI/env values on top.

    Returns (config, what --resume found or None, whether the preset came from the user or the run)."""
    explicit = R.explicit_overrides(argv, prog="pretraining.py")
    hp = R.config_from_overrides(explicit)
    if not hp.resume:
        return hp, None, "preset" in explicit
    resume = R.resolve_resume(hp.resume, hp.log_dir, "pretraining.py")
    explicit.pop("preset", None)
    values = {**resume.config.to_dict(), **explicit, "resume": resume.target,
              "run_id": explicit.get("run_id", resume.run_dir.name),
              "log_dir": explicit.get("log_dir", str(resume.run_dir.parent))}
    return Hyperparameters(**values), resume, True


def ensure_data(hp: Hyperparameters, rt: Runtime) -> None:
    """Build the Shakespeare shards when the preset's own files are missing (rank 0 builds, the others wait)."""
    source = M.preset_data(hp)
    if source == "shakespeare" and not glob.glob(str(M.resolve_path(hp.train_files))):
        if rt.master:
            R.import_data_script("shakespeare").prepare()
        if rt.distributed:
            dist.barrier()
    for pattern in (hp.train_files, hp.val_files):
        try:
            M.list_shards(str(M.resolve_path(pattern)))
        except M.DataError as e:
            hint = "; download them with `python data/fineweb.py`" if source == "fineweb" else ""
            raise M.DataError(f"{e}{hint}") from None
    M.check_data(hp, rt.world_size, str(M.resolve_path(hp.train_files)), str(M.resolve_path(hp.val_files)))


def train_micro_batches(forward, batches: list[tuple], hp: Hyperparameters, rt: Runtime, window: torch.Tensor
                        ) -> dict[str, torch.Tensor]:
    """Forward/backward over this rank's micro-batches; returns this rank's mean loss ("loss") and, with loss
    modifiers, the mean cross-entropy ("ce") and each modifier's term and metrics, all still tensors.

    The record backpropagates the *summed* loss of each rank's 48k tokens and averages over 8 ranks; scaling
    each micro-batch's mean loss by train_seq_len / accumulation reproduces exactly that gradient for any
    world size, so Adam's tiny eps sees the record's gradient scale. A stage schedule's larger batch is several
    global batches (`batches`), each accumulated the same way: the gradient sums over all their tokens, as the
    2026 record's summed loss over its larger batch does.
    """
    accum = hp.rank_equivalents // rt.world_size
    row = hp.row_len or hp.train_seq_len
    total: dict[str, torch.Tensor] = {}
    for inputs, targets, *_ in batches:
        for j in range(accum):
            x = inputs[j * hp.train_seq_len:(j + 1) * hp.train_seq_len].view(-1, row)
            y = targets[j * hp.train_seq_len:(j + 1) * hp.train_seq_len].view(-1, row)
            with rt.autocast():
                loss, parts = forward(x, y, window, None, True)
            (loss * (hp.train_seq_len / accum)).backward()
            for key, value in dict(loss=loss.detach(), **parts).items():
                total[key] = total.get(key, 0.0) + value
    return {key: value / (accum * len(batches)) for key, value in total.items()}


def train_step(forward, raw_model, optimizers, batches: list[tuple], step: int, hp: Hyperparameters, rt: Runtime,
               window: torch.Tensor) -> dict[str, torch.Tensor]:
    """One optimizer step: micro-batches, then model.optimizer_step (gradients averaged, schedules, Adam + Muon)."""
    train_loss = train_micro_batches(forward, batches, hp, rt, window)
    M.optimizer_step(raw_model, optimizers, step, hp, rt.world_size)
    return train_loss


def attach_extra_targets(raw_model, hp: Hyperparameters, device: torch.device) -> None:
    """The tensors schedule_step fills each step for --mtp and --prefix-token (fixed shapes, so the compiled model
    never recompiles for them), and the prefix table."""
    if hp.mtp or hp.prefix_token:
        raw_model.mtp_weights = torch.zeros(M.MTP_TARGETS, device=device)
    if hp.prefix_token:
        raw_model.prefix_table = M.prefix_token_table(M.get_tokenizer(), raw_model.lm_head.weight.size(0)).to(device)
        raw_model.prefix_weight = torch.zeros(1, device=device)


def schedule_step(raw_model, window: torch.Tensor, step: int, hp: Hyperparameters) -> None:
    """What the model reads of the schedules at this step: the attention window, YaRN's rotary and attention scale,
    and the extra targets' weights."""
    window.fill_(M.get_window_size_blocks(step, hp))
    at = min(step, hp.num_iterations - 1)
    if hp.yarn:  # the rotary and attention scale for the windows trained with so far (rebuilt on growth only)
        windows, freqs, scale = M.yarn_state_at(step, hp)
        if windows != raw_model.yarn_windows:
            raw_model.set_yarn(windows, freqs, scale)
    if hp.mtp or hp.prefix_token:  # without --mtp, the next token alone (weights 1, 0, 0)
        weights = M.mtp_weights_at(at, hp) if hp.mtp else [1.0] + [0.0] * (M.MTP_TARGETS - 1)
        raw_model.mtp_weights.copy_(torch.tensor(weights))
    if hp.prefix_token:
        raw_model.prefix_weight.fill_(M.stage_at(at, hp).prefix_weight)


def stage_text(step: int, hp: Hyperparameters) -> str:
    """The step line's account of a stage schedule: the stage, its batch in tokens, the long window in blocks."""
    if not hp.stage_schedule:
        return ""
    point = M.stage_at(step, hp)
    return (f" stage:{point.stage + 1} batch:{point.batch_mult * hp.tokens_per_step} window:{point.windows[1]} "
            f"lr_mult:{point.lr_mult:.3f}")


def make_train_loader(hp: Hyperparameters, rt: Runtime, start: dict | None = None):
    """The training batches from `start` (a saved data position) on; read them with next_batches."""
    if hp.doc_aligned:
        return M.doc_aligned_generator(str(M.resolve_path(hp.train_files)), hp.tokens_per_step, rt.rank,
                                       rt.world_size, row_len=hp.row_len or hp.train_seq_len, device=rt.device,
                                       start=start, vocab_size=hp.vocab_size)
    return M.distributed_data_generator(str(M.resolve_path(hp.train_files)), hp.tokens_per_step, rt.rank, rt.world_size,
                                        device=rt.device, start=start, row_len=hp.row_len,
                                        shuffle_seed=hp.seed if hp.shuffle_rows else None, vocab_size=hp.vocab_size)


def next_batches(loader, step: int, hp: Hyperparameters) -> list[tuple]:
    """The step's global batches (the stage's batch multiple of them); --doc-aligned ones cut the documents at the
    step's maximum length, given with each batch so that a resume in any stage cuts as the run did."""
    if hp.doc_aligned:
        return [loader.send(M.max_doc_len(step, hp)) for _ in range(M.batch_mult(step, hp))]
    return [next(loader) for _ in range(M.batch_mult(step, hp))]


def warm_up(forward, raw_model, optimizers, hp: Hyperparameters, rt: Runtime, window: torch.Tensor) -> int:
    """Run steps to compile kernels, then restore the initial weights and optimizer state (as the record does),
    so the clock never counts compilation and the trajectory is that of a run without warm-up."""
    steps = R.warm_up_steps(hp, rt)
    if steps == 0:
        return 0
    initial = dict(model=copy.deepcopy(raw_model.state_dict()),
                   optimizers=[copy.deepcopy(opt.state_dict()) for opt in optimizers])
    loader = make_train_loader(hp, rt)
    for step in range(steps):
        schedule_step(raw_model, window, step, hp)
        train_step(forward, raw_model, optimizers, next_batches(loader, step, hp), step, hp, rt, window)
    raw_model.load_state_dict(initial["model"])
    for opt, state in zip(optimizers, initial["optimizers"]):
        opt.load_state_dict(state)
    rt.synchronize()
    return steps


def open_log(rt: Runtime, hp: Hyperparameters, code: dict[str, str], raw_model, run_dir: Path, preset_given: bool,
             start_step: int | None) -> R.RunLog:
    """The run's log and trackers: code and config first, then what runs where and how large it is."""
    log = R.RunLog(rt, run_dir, R.open_trackers(hp, rt, run_dir, resumed=start_step is not None))
    log.header(hp, code)
    counts = M.param_counts(raw_model)
    step_tokens = hp.tokens_per_step
    compiled = "model" if rt.compile else "loss-head" if rt.compile_head else "off"
    log.print(f"preset:{hp.preset}{'' if preset_given else ' (default: ' + DEFAULT_REASON[hp.preset] + ')'} "
              f"device:{rt.device} dtype:{rt.autocast_dtype or torch.float32} compile:{compiled} "
              f"world_size:{rt.world_size} run:{run_dir}")
    log.print(f"params:{counts['total']:,} (non-embedding {counts['non_embedding']:,}) "
              f"tokens/step:{step_tokens:,}{' (times the stage batch multiple)' if hp.stage_schedule else ''} "
              f"budget:{M.tokens_through(hp.num_iterations, hp):,} tokens "
              f"accumulation:{hp.rank_equivalents // rt.world_size}" +
              (f" resumed_from:{hp.resume} step:{start_step}" if start_step is not None else ""))
    log.print(f"dtype_choice: {rt.dtype_reason}")
    return log


def train(run: R.ScriptRun, hp: Hyperparameters, rt: Runtime, resume: R.Resume | None,
          preset_given: bool = True) -> float | None:
    code = read_code()
    ensure_data(hp, rt)
    M.seed_everything(hp.seed)
    raw_model, forward = M.build_model(hp, rt)
    attach_extra_targets(raw_model, hp, rt.device)
    optimizers = M.setup_optimizers(raw_model, hp, rt.rank, rt.world_size, compile_ns=rt.compile)
    ckpt = resume.state if resume else None
    start_step, data_pos, val_loss = 0, None, None
    if ckpt is not None:
        start_step, data_pos, val_loss = M.restore(ckpt, hp, raw_model, optimizers)
    run.run_dir = R.open_run_dir(hp, rt, "pretraining.py", start_step if resume else None,
                                 R.checkpoint_bytes(raw_model, optimizers))
    hp = dataclasses.replace(hp, run_id=run.run_dir.run_id)  # the config as checkpoints and log.txt record it
    run_dir = run.run_dir.path
    log = open_log(rt, hp, code, raw_model, run_dir, preset_given, start_step if resume else None)
    saver = R.Saver(rt, run.run_dir, hp, code)
    window = torch.zeros((), dtype=torch.int32, device=rt.device)  # a tensor, so compile does not recompile
    R.announce_compile(rt)
    warmed = warm_up(forward, raw_model, optimizers, hp, rt, window)
    if warmed:
        log.print(f"warm-up: {warmed} steps run and undone before the clock starts")
    train_loader = make_train_loader(hp, rt, start=data_pos)
    stop = R.StopSignal(rt.rank).install()
    training_time_ms = ckpt.get("train_time_ms", 0.0) if ckpt else 0.0
    val_step = ckpt.get("val_step") if ckpt else None
    timed_from = 0 if training_time_ms else start_step  # steps the clock covers start here

    def save(step: int, time_ms: float) -> Path | None:
        return saver.save(step, raw_model, optimizers, data_pos, val_loss, val_step, train_time_ms=time_ms)

    t0 = time.perf_counter()
    try:
        for step in range(start_step, hp.num_iterations + 1):
            last_step = step == hp.num_iterations
            schedule_step(raw_model, window, step, hp)
            if not last_step and stop.requested(rt):  # SIGTERM / Ctrl-C: keep the finished steps, exit 0
                now_ms = training_time_ms + 1000 * (time.perf_counter() - t0)
                log.print(stop.report(step, None if step == start_step else save(step, now_ms), "pretraining.py"))
                return val_loss
            if last_step or (hp.val_loss_every and step % hp.val_loss_every == 0):
                rt.synchronize()
                training_time_ms += 1000 * (time.perf_counter() - t0)
                if step > start_step:  # checkpoint first, so a failed evaluation loses nothing
                    save(step, training_time_ms)
                val_loss, val_step = M.evaluate(forward, hp, rt, window, str(M.resolve_path(hp.val_files))), step
                if not math.isfinite(val_loss):
                    raise saver.diverged(f"step {step}: the validation loss is {val_loss}")
                log.print(f"step:{step}/{hp.num_iterations} val_loss:{val_loss:.4f} "
                          f"train_time:{training_time_ms:.0f}ms "
                          f"step_avg:{training_time_ms / max(step - timed_from, 1):.2f}ms")
                log.metrics(step=step, val_loss=val_loss, train_time_ms=training_time_ms)
                if last_step:  # the final checkpoint carries its own val loss (also when resumed at the end)
                    save(step, training_time_ms)
                rt.synchronize()
                t0 = time.perf_counter()
            elif hp.save_every and step % hp.save_every == 0 and step > start_step:
                save(step, training_time_ms + 1000 * (time.perf_counter() - t0))
            if last_step:
                break
            batches = next_batches(train_loader, step, hp)
            data_pos = batches[-1][2]
            parts = M.reduce_metrics(train_step(forward, raw_model, optimizers, batches, step, hp, rt, window),
                                     rt.world_size)  # one sync for the loss and every modifier's term
            train_loss = parts.pop("loss")
            if not math.isfinite(train_loss):
                raise saver.diverged(f"step {step + 1}: the training loss is {train_loss}")
            elapsed = training_time_ms + 1000 * (time.perf_counter() - t0)
            done = step + 1 - timed_from
            tokens = M.tokens_through(step + 1, hp) - M.tokens_through(timed_from, hp)
            log.print(f"step:{step + 1}/{hp.num_iterations} train_loss:{train_loss:.4f}{R.loss_parts_text(parts)} "
                      f"train_time:{elapsed:.0f}ms step_avg:{elapsed / done:.2f}ms "
                      f"tok/s:{tokens / (elapsed / 1000):.0f}{stage_text(step, hp)}")
            log.metrics(step=step + 1, train_loss=train_loss, **{f"train_{k}": v for k, v in parts.items()},
                        train_time_ms=elapsed, lr_mult=M.get_lr(step, hp))
    finally:
        stop.restore()
        log.close()
    if rt.master and hp.save_checkpoint:
        log.print(f"checkpoint: {M.checkpoint_path(hp.log_dir, hp.run_id, hp.num_iterations)}")
    return val_loss


def main(argv: list[str] | None = None) -> None:
    with R.exit_policy(R.ScriptRun("pretraining.py")) as run:
        run.hp, resume, preset_given = resolve_config(argv)
        ckpt = resume.state if resume else None
        if ckpt is not None and ckpt["step"] >= run.hp.num_iterations and ckpt.get("val_step") == ckpt["step"]:
            print(f"pretraining.py: {run.hp.resume} is the end of its run (step {ckpt['step']} of "
                  f"{run.hp.num_iterations}); nothing to resume (pass a larger --num-iterations to train on)")
            return
        run.rt = M.init_runtime(run.hp, whole_model_on_cpu=True)
        run.hp.validate(run.rt.world_size)
        if run.hp.loss_normalization != "token":
            raise M.ConfigError(f"--loss-normalization={run.hp.loss_normalization} is for fine-tuning "
                                "(pretraining rows are a token stream, not conversations)")
        R.check_extensions(run.hp)
        train(run, run.hp, run.rt, resume, preset_given)


if __name__ == "__main__":
    main()
