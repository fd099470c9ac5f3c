"""Supervised fine-tuning of a pretrained checkpoint on JSON conversations, into a chat model for chat.py.

    python finetune.py                                            # data/finetune_data.json on the newest pretrained run
    python data/chat_tasks.py && python finetune.py --data data/chat_tasks/train.json \\
        --val-data data/chat_tasks/heldout.json                   # the demo task (docs/finetuning.md)
    python finetune.py --checkpoint logs/RUN/state_step000075.pt --num-iterations 50 --optimizer adamw
    torchrun --nproc_per_node=2 finetune.py --device cpu          # data parallel, same trajectory
    python finetune.py --resume latest                             # continue the newest fine-tuning run

Input: {"conversations": [{"messages": [{"role": "system"|"user"|"assistant", "content": "..."}]}]} or JSONL with
one {"messages": [...]} per line; every record is validated before anything is written. Conversations are
rendered with model.py's chat template v1 and packed into the parent's rows: each starts with <|endoftext|>, so
the document mask keeps them from attending to each other and no token is spent on padding but a row's tail. The
loss covers assistant content and its <|end|> only. Checkpoints go to logs/<run_id>/, marked as chat models.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import random
import time
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.distributed as dist

import model as M
import runs as R
from model import Hyperparameters, Runtime

# Fine-tuning settings on top of the parent's config, chosen on the chat_tasks demo (docs/finetuning.md).
FINETUNE_DEFAULTS: dict[str, Any] = dict(num_iterations=60, val_loss_every=20, cooldown_frac=0.5,
                                         muon_momentum_warmup=1, save_every=0, shuffle_rows=False,
                                         optimizer="muon", adamw_lr=1e-4, adamw_weight_decay=0.0)
# The parent's loss modifiers, plugins, trackers and LR/stage schedule are its own choices: a fine-tune starts with
# none of them (a parent tied until its split step is two matrices by its end: the fine-tune is untied)
FINETUNE_DEFAULTS.update({name: M.Hyperparameters.__dataclass_fields__[name].default for name in (
    "label_smoothing", "z_loss", "entropy_weight", "loss_terms", "plugins", "trackers", "tracker_dir", "lr_floor",
    "stage_schedule", "mtp", "prefix_token", "tie_embed", "doc_aligned")})
# A diverged fine-tuning run: what to change (its LR flags are not pretraining's)
DIVERGENCE_HINT = "Lower --lr-scale (or --adamw-lr) or use --dtype fp32, then start again or --resume"
LR_SCALE = 1.0  # Muon and Adam LRs as a fraction of the parent's: 1.0 was best on the demo (docs/finetuning.md)


# -----------------------------------------------------------------------------
# Config


def build_parser() -> argparse.ArgumentParser:
    parser = R.build_arg_parser("finetune.py", __doc__.split("\n")[0])
    own = parser.add_argument_group("fine-tuning")
    own.add_argument("--data", default="data/finetune_data.json", help="training conversations (.json or .jsonl)")
    own.add_argument("--val-data", help="held-out conversations; default: --val-fraction of --data")
    own.add_argument("--val-fraction", type=float, default=0.1, help="share of --data held out when no --val-data")
    own.add_argument("--checkpoint", default="latest", help="pretrained parent: 'latest' (newest base model) or PATH")
    own.add_argument("--skip-invalid", action="store_true", help="skip invalid records (counted) instead of stopping")
    own.add_argument("--lr-scale", type=float, default=LR_SCALE,
                     help="fraction of the parent's Muon and Adam LRs (with --optimizer adamw the hidden matrices "
                          "take --adamw-lr instead of Muon's)")
    return parser


def resolve(argv: list[str] | None) -> tuple[Hyperparameters, argparse.Namespace, Path, dict, R.Resume | None]:
    """(config, own flags, parent path, parent checkpoint, what --resume found or None)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not 0 < args.lr_scale < float("inf"):
        raise M.ConfigError(f"--lr-scale={args.lr_scale} must be positive")
    explicit = R.explicit_overrides(argv, prog="finetune.py", parser=parser)
    explicit.pop("preset", None)
    if explicit.get("resume"):
        return resume_config(explicit, args, parser)
    log_dir = explicit.get("log_dir", "logs")
    if args.checkpoint == "latest":
        parent_path = M.find_latest_checkpoint(log_dir, kind="base")
        if parent_path is None:
            raise M.CheckpointError(f"no pretrained checkpoint under {log_dir}/ (run pretraining.py first)")
    else:
        parent_path = M.resolve_checkpoint(args.checkpoint, log_dir)
    parent = M.load_checkpoint(parent_path)
    base = (M.saved_config(parent, parent_path) if "hyperparameters" in parent
            else M.infer_hparams(parent["model"]))
    scaled = {name: getattr(base, name) * args.lr_scale for name in ("muon_lr", "head_lr", "embed_lr", "scalar_lr")}
    if base.yarn:  # its rotary and attention scale are the stage schedule's, which a fine-tune drops
        raise M.CheckpointError(f"{parent_path}: trained with --yarn; fine-tuning such a model is not implemented "
                                f"(its rotary tables come from the stage schedule a fine-tune drops)")
    for name in ("stage_schedule", "mtp", "prefix_token", "yarn", "doc_aligned"):
        if explicit.get(name):
            raise M.ConfigError(f"--{name.replace('_', '-')} is pretraining's (its batches are token streams; "
                                f"a fine-tune's are conversations)")
    if explicit.get("tie_embed"):
        raise M.ConfigError("--tie-embed is pretraining's (it splits at a stage schedule's step; a fine-tune starts "
                            "from its parent's two matrices, untied)")
    if "logit_cap" in explicit and explicit["logit_cap"] != base.logit_cap:
        raise M.ConfigError(f"--logit-cap={explicit['logit_cap']}: the parent {parent_path} was trained with "
                            f"--logit-cap {base.logit_cap}, and a fine-tune keeps its model")
    values = {**base.to_dict(), **FINETUNE_DEFAULTS, **scaled, "run_id": "", "resume": "", **explicit}
    return Hyperparameters(**values), args, parent_path, parent, None


def resume_config(explicit: dict[str, Any], args: argparse.Namespace, parser: argparse.ArgumentParser
                  ) -> tuple[Hyperparameters, argparse.Namespace, Path, dict, R.Resume]:
    """--resume latest | RUN_DIR | CHECKPOINT: the run's config and flags (from its checkpoint, or from run.json
    when it was killed before the first one), with flags given again now on top."""
    resume = R.resolve_resume(explicit["resume"], explicit.get("log_dir", "logs"), "finetune.py")
    lineage = resume.record["finetune"]
    for key, value in lineage["args"].items():  # the run's own flags, unless given again now
        if getattr(args, key, None) == parser.get_default(key):
            setattr(args, key, value)
    values = {**resume.config.to_dict(), **explicit, "resume": resume.target, "run_id": resume.run_dir.name,
              "log_dir": explicit.get("log_dir", str(resume.run_dir.parent))}
    parent_path = Path(lineage["parent"])
    parent = {} if resume.state is not None else M.load_checkpoint(parent_path)
    return Hyperparameters(**values), args, parent_path, parent, resume


# -----------------------------------------------------------------------------
# Data


@dataclasses.dataclass
class Example:
    inputs: list[int]
    targets: list[int]  # M.IGNORE_INDEX where the token is not trained

    @property
    def trained(self) -> int:
        return sum(t != M.IGNORE_INDEX for t in self.targets)


def render_examples(tok: M.Tokenizer, records: list[dict], context: int) -> tuple[list[Example], int, int]:
    """Chat-template examples; a conversation longer than the context keeps its longest prefix that ends with an
    assistant message (a turn boundary), or is dropped. Returns (examples, truncated, dropped)."""
    examples, truncated, dropped = [], 0, 0
    for record in records:
        messages = record["messages"]
        limit = fitting_length(messages, context)
        cut = len(messages)
        while cut > 0:
            if cut <= limit:
                ids, mask = M.render_conversation(tok, messages[:cut])
                if len(ids) - 1 <= context:
                    break
            cut -= 1
            while cut > 0 and messages[cut - 1]["role"] != "assistant":
                cut -= 1
        if cut == 0:
            dropped += 1
            continue
        truncated += cut < len(messages)
        examples.append(Example(ids[:-1], [t if m else M.IGNORE_INDEX for t, m in zip(ids[1:], mask[1:])]))
    return examples, truncated, dropped


def fitting_length(messages: list[dict[str, str]], context: int) -> int:
    """How many leading messages could fit at all: a GPT-2 token is at most GPT2_MAX_TOKEN_BYTES bytes, and a
    character at least one byte, so more characters than that many times the context never fit. Checking this
    first keeps a 100 MB message from being tokenized (docs/measurements.md, oversize records) only to be dropped."""
    budget, total = M.GPT2_MAX_TOKEN_BYTES * (context + 1), 0
    for i, message in enumerate(messages):
        total += len(message["content"])
        if total > budget:
            return i
    return len(messages)


def pack(examples: list[Example], row_len: int, order: list[int]) -> list[Example]:
    """Rows of row_len: whole conversations in the given order, first fit; a row's tail is <|endoftext|> padding
    that is not trained (each conversation starts with <|endoftext|>, so none attends to another)."""
    rows: list[Example] = []
    current = Example([], [])
    for i in order:
        ex = examples[i]
        if len(current.inputs) + len(ex.inputs) > row_len:
            rows.append(current)
            current = Example([], [])
        current.inputs += ex.inputs
        current.targets += ex.targets
    rows.append(current)
    for row in rows:
        pad = row_len - len(row.inputs)
        row.inputs += [M.EOT_ID] * pad
        row.targets += [M.IGNORE_INDEX] * pad
    return rows


def row_stream(examples: list[Example], row_len: int, seed: int, start: dict[str, int] | None
               ) -> Iterator[tuple[Example, dict[str, int]]]:
    """Packed rows, repacked in a new seeded order every epoch; the position resumes exactly."""
    pos = dict(epoch=0, row=0) if start is None else dict(start)
    while True:
        order = list(range(len(examples)))
        random.Random(seed * 1_000_003 + pos["epoch"]).shuffle(order)
        rows = pack(examples, row_len, order)
        while pos["row"] < len(rows):
            pos["row"] += 1
            yield rows[pos["row"] - 1], dict(pos)
        pos = dict(epoch=pos["epoch"] + 1, row=0)


def to_batch(rows: list[Example], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.tensor([r.inputs for r in rows], dtype=torch.int32, device=device)
    y = torch.tensor([r.targets for r in rows], dtype=torch.int64, device=device)
    return x, y


def load_data(hp: Hyperparameters, args: argparse.Namespace, tok: M.Tokenizer, rt: Runtime) -> dict[str, Any]:
    """Validated, rendered train and held-out examples plus what was skipped, cut or dropped."""
    records, skipped = M.load_conversations(M.resolve_path(args.data), args.skip_invalid)
    if args.val_data:
        val_records, val_skipped = M.load_conversations(M.resolve_path(args.val_data), args.skip_invalid)
        skipped += [f"{args.val_data}: {s}" for s in val_skipped]
    else:
        if not 0 < args.val_fraction < 1:
            raise M.ConfigError(f"--val-fraction={args.val_fraction} must be in (0, 1) when there is no --val-data")
        shuffled = records[:]
        random.Random(hp.seed).shuffle(shuffled)
        n_val = max(1, round(len(shuffled) * args.val_fraction))
        if n_val >= len(shuffled):
            raise M.DataError(f"{args.data}: {len(records)} conversation(s) cannot be split for validation; "
                              f"pass --val-data")
        val_records, records = shuffled[:n_val], shuffled[n_val:]
    row = hp.row_len or hp.train_seq_len
    train, truncated, dropped = render_examples(tok, records, row)
    val, val_truncated, val_dropped = render_examples(tok, val_records, row)
    if not train or not val:
        raise M.DataError(f"no conversation fits the {row}-token context ({'train' if not train else 'held-out'})")
    return dict(train=train, val=val, skipped=skipped, truncated=truncated + val_truncated,
                dropped=dropped + val_dropped)


# -----------------------------------------------------------------------------
# Training


def conversation_weights(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, int]:
    """For --loss-normalization sequence: each trained token's 1 / (trained tokens of its conversation), and how
    many conversations have trained tokens. Divided by the step's conversation count, every conversation's tokens
    weigh 1 in total, however many there are. Conversations are told apart by the <|endoftext|> each starts with."""
    docs = (x == M.EOT_ID).cumsum(dim=1).long()
    docs = docs + docs.size(1) * torch.arange(docs.size(0), device=docs.device)[:, None]  # unique across rows
    trained = y != M.IGNORE_INDEX
    counts = torch.zeros(docs.numel(), dtype=torch.float64, device=x.device)
    counts.index_add_(0, docs.flatten(), trained.flatten().double())
    weights = torch.where(trained, 1 / counts[docs].clamp(min=1), 0.0)
    return weights, int((counts > 0).sum())


def train_step(forward, raw, optimizers, rows: list[Example], step: int, hp: Hyperparameters, rt: Runtime,
               window: int) -> tuple[float, int, dict[str, float]]:
    """Loss averaged over every trained token of the step on all ranks (or, with --loss-normalization sequence,
    over conversations, each counting the same); returns (loss, trained tokens, cross-entropy and modifier terms)."""
    accum = hp.rank_equivalents // rt.world_size
    per_micro = len(rows) // accum
    micro = [to_batch(rows[j * per_micro:(j + 1) * per_micro], rt.device) for j in range(accum)]
    counts = torch.tensor([int((y != M.IGNORE_INDEX).sum()) for _, y in micro], dtype=torch.float64)
    by_conversation = hp.loss_normalization == "sequence"
    weights = [conversation_weights(x, y) for x, y in micro] if by_conversation else [(None, 0)] * accum
    totals = torch.tensor([float(counts.sum()), float(sum(n for _, n in weights))], dtype=torch.float64,
                          device=rt.device)
    if rt.distributed:
        dist.all_reduce(totals)
    total, conversations = totals[0], totals[1]
    if float(total) == 0:
        raise M.DataError(f"step {step}: the batch has no assistant tokens to train on (loss mask empty)")
    sums: dict[str, torch.Tensor] = {}
    for (x, y), n, (w, _) in zip(micro, counts, weights):
        if n == 0:
            continue
        with rt.autocast():
            loss, parts = forward(x, y, window, None if w is None else (w / conversations).float(), True)
        # per token: a micro-batch's mean weighs its share of the step's tokens; per conversation the weights
        # already sum to the micro-batch's share. Either way x world_size, as gradients are then averaged over ranks.
        share = 1.0 if by_conversation else n
        (loss * float(share * rt.world_size / (1.0 if by_conversation else total))).backward()
        for key, value in dict(loss=loss.detach(), **parts).items():
            sums[key] = sums.get(key, 0.0) + value.double() * share
    M.optimizer_step(raw, optimizers, step, hp, rt.world_size)
    reduced = M.reduce_metrics(sums, rt.world_size, op="sum")  # one sync for the loss and every term
    scale = 1.0 if by_conversation else float(total)
    result = {key: value / scale for key, value in reduced.items()}
    return result.pop("loss"), int(total), result


@torch.no_grad()
def validate(forward, val: list[Example], hp: Hyperparameters, rt: Runtime, window: int) -> float:
    """Mean loss over every held-out assistant token (each rank computes all of it: no collective needed)."""
    row = hp.row_len or hp.train_seq_len
    rows = pack(val, row, list(range(len(val))))
    per_batch = max(1, hp.train_seq_len // row)
    total, count = 0.0, 0
    was_training = forward.training
    forward.eval()
    for i in range(0, len(rows), per_batch):
        x, y = to_batch(rows[i:i + per_batch], rt.device)
        n = int((y != M.IGNORE_INDEX).sum())
        if n:
            with rt.autocast():
                total += float(forward(x, y, window)) * n
            count += n
    forward.train(was_training)
    return total / count


def train(run: R.ScriptRun, hp: Hyperparameters, args: argparse.Namespace, rt: Runtime, parent_path: Path,
          parent: dict, resume: R.Resume | None) -> float | None:
    tok = M.get_tokenizer()
    data = load_data(hp, args, tok, rt)  # every record is checked before anything is written
    code = {name: (M.REPO_DIR / name).read_text() for name in ("finetune.py", "runs.py", "model.py")}
    M.seed_everything(hp.seed)
    raw, forward = M.build_model(hp, rt, chat=True)
    resumed = resume.state if resume else None
    M.load_state_into(raw, (resumed or parent)["model"], str(parent_path))
    optimizers = M.setup_optimizers(raw, hp, rt.rank, rt.world_size, compile_ns=rt.compile)
    start_step, data_pos, val_loss = 0, None, None
    if resumed is not None:
        start_step, data_pos, val_loss = M.restore(resumed, hp, raw, optimizers)
    lineage = dict(parent=str(parent_path), args=vars(args))
    run.run_dir = R.open_run_dir(hp, rt, "finetune.py", start_step if resume else None,
                                 R.checkpoint_bytes(raw, optimizers), info=dict(finetune=lineage))
    hp = dataclasses.replace(hp, run_id=run.run_dir.run_id)  # the config as checkpoints and log.txt record it
    log = R.RunLog(rt, run.run_dir.path, R.open_trackers(hp, rt, run.run_dir.path, resumed=resume is not None))
    log.header(hp, code)
    saver = R.Saver(rt, run.run_dir, hp, code, hint=DIVERGENCE_HINT,
                    extra=dict(kind="chat", chat_template=M.CHAT_TEMPLATE_VERSION, finetune=lineage))
    window = M.final_window_blocks(hp)
    rows_per_step = hp.tokens_per_step // (hp.row_len or hp.train_seq_len)
    n_train = sum(e.trained for e in data["train"])
    state = f"resumed at step {start_step}" if resume else "new"
    log.print(f"fine-tuning {parent_path} -> {run.run_dir.path} ({state})"
              f" device:{rt.device} dtype:{rt.autocast_dtype or torch.float32} world_size:{rt.world_size} "
              f"optimizer:{hp.optimizer}")
    log.print(f"dtype_choice: {rt.dtype_reason}")
    log.print(f"data: {len(data['train'])} train / {len(data['val'])} held-out conversations ({n_train:,} trained "
              f"tokens per epoch), {len(data['skipped'])} invalid skipped, {data['truncated']} truncated at a turn "
              f"boundary, {data['dropped']} dropped (longer than the {hp.row_len or hp.train_seq_len}-token "
              f"context); packed {rows_per_step} rows per step")
    for line in data["skipped"][:5]:
        log.print(f"  skipped {line}")
    stream = row_stream(data["train"], hp.row_len or hp.train_seq_len, hp.seed, data_pos)
    stop = R.StopSignal(rt.rank).install()
    R.announce_compile(rt)
    elapsed_ms, t0 = 0.0, time.perf_counter()
    val_step = resumed.get("val_step") if resumed else None

    def save(step: int) -> Path | None:
        return saver.save(step, raw, optimizers, data_pos, val_loss, val_step)

    try:
        for step in range(start_step, hp.num_iterations + 1):
            last = step == hp.num_iterations
            if not last and stop.requested(rt):  # SIGTERM / Ctrl-C: keep the finished steps, exit 0
                log.print(stop.report(step, None if step == start_step else save(step), "finetune.py"))
                return val_loss
            if last or (hp.val_loss_every and step % hp.val_loss_every == 0):
                elapsed_ms += 1000 * (time.perf_counter() - t0)
                if step > start_step:
                    save(step)
                val_loss, val_step = validate(forward, data["val"], hp, rt, window), step
                if not math.isfinite(val_loss):
                    raise saver.diverged(f"step {step}: the held-out loss is {val_loss}")
                log.print(f"step:{step}/{hp.num_iterations} val_loss:{val_loss:.4f} train_time:{elapsed_ms:.0f}ms")
                log.metrics(step=step, val_loss=val_loss, train_time_ms=elapsed_ms)
                if last:  # the final checkpoint carries its own val loss (also when resumed at the end)
                    save(step)
                t0 = time.perf_counter()
            if last:
                break
            picked = [next(stream) for _ in range(rows_per_step)]
            data_pos = picked[-1][1]
            per_rank = rows_per_step // rt.world_size  # contiguous slices: rank r's rows are 1 process's micro-batch r
            mine = [r for r, _ in picked][rt.rank * per_rank:(rt.rank + 1) * per_rank]
            loss, trained, parts = train_step(forward, raw, optimizers, mine, step, hp, rt, window)
            if not math.isfinite(loss):
                raise saver.diverged(f"step {step + 1}: the training loss is {loss}")
            ms = elapsed_ms + 1000 * (time.perf_counter() - t0)
            log.print(f"step:{step + 1}/{hp.num_iterations} train_loss:{loss:.4f}{R.loss_parts_text(parts)} "
                      f"trained_tokens:{trained} train_time:{ms:.0f}ms step_avg:{ms / (step + 1 - start_step):.2f}ms")
            log.metrics(step=step + 1, train_loss=loss, **{f"train_{k}": v for k, v in parts.items()},
                        trained_tokens=trained, train_time_ms=ms)
    finally:
        stop.restore()
        log.close()
    log.print(f"chat model: {M.checkpoint_path(hp.log_dir, hp.run_id, hp.num_iterations)} (python chat.py loads it)")
    return val_loss


def main(argv: list[str] | None = None) -> None:
    with R.exit_policy(R.ScriptRun("finetune.py")) as run:
        run.hp, args, parent_path, parent, resume = resolve(argv)
        run.rt = M.init_runtime(run.hp, whole_model_on_cpu=True)  # compiled on a CPU too, as pretraining is
        run.hp.validate(run.rt.world_size)
        R.check_extensions(run.hp)
        train(run, run.hp, args, run.rt, parent_path, parent, resume)


if __name__ == "__main__":
    main()
