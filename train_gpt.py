"""The speedrun in one file: config, runtime, GPT, Muon, data, checkpoints, schedules and the training loop.

Self-contained (standard library, torch and numpy only), so a record is one file whose log begins with its
own source. tests/test_train_gpt.py keeps it equal to model.py + pretraining.py: the same flags, the same
losses and the same final weights, bit for bit on CPU. Use pretraining.py for everything else (resume, .env
files, the data download); this file is for records and single-file reproductions.

    torchrun --nproc_per_node=8 train_gpt.py               # the speedrun preset (CUDA + FineWeb shards)
    torchrun --nproc_per_node=2 train_gpt.py               # any world size dividing 8: accumulation keeps the math
    python train_gpt.py --preset shakespeare               # the CPU preset (shards from data/shakespeare.py)

Writes logs/<run_id>.txt (this file, versions, nvidia-smi, config, step lines), logs/<run_id>/metrics.jsonl
and logs/<run_id>/state_stepNNNNNN.pt checkpoints in pretraining.py's format (eval.py, chat.py and
`pretraining.py --resume` load them).
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import glob
import hashlib
import inspect
import json
import math
import os
import platform
import re
import shutil
import subprocess
import sys
import time
import uuid
import warnings
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

REPO_DIR = Path(__file__).resolve().parent

# -----------------------------------------------------------------------------
# Errors: both exit 2 with one line (main)


class ConfigError(ValueError):
    """A user-supplied setting is invalid; printed as one line, exit 2."""


class DataError(ValueError):
    """A data file is missing or malformed; the message names the file."""


# -----------------------------------------------------------------------------
# Config


@dataclass
class Hyperparameters:
    # bookkeeping
    preset: str = ""  # preset these values started from (set by --preset or the default choice)
    run_id: str = ""  # run directory name under log_dir; "" = timestamp + random suffix
    log_dir: str = "logs"  # where run directories (log.txt, metrics.jsonl, checkpoints) go
    # data
    train_files: str = "data/fineweb10B/fineweb_train_*.bin"  # glob of training shards
    val_files: str = "data/fineweb10B/fineweb_val_*.bin"  # glob of validation shards
    val_tokens: int = 10_485_760  # validation budget in tokens; fixed so runs compare (record value)
    train_seq_len: int = 48 * 1024  # tokens per rank-equivalent per step (record: 48*1024 per H100)
    val_seq_len: int = 4 * 64 * 1024  # tokens per rank per validation step (record: 4*64*1024)
    row_len: int = 0  # split each sequence into rows of this many tokens; 0 = one long row (record layout)
    rank_equivalents: int = 8  # micro-batches summed per step; gradient accumulation = this // world_size
    shuffle_rows: bool = False  # train on row_len rows in a seeded random order per epoch; False = record's stream
    # model
    vocab_size: int = 50257  # GPT-2 BPE; embeddings and lm_head are padded to a multiple of 128
    num_layers: int = 12  # transformer blocks; must be even (U-net skips pair layer i with 2L-1-i)
    num_heads: int = 6  # attention heads per block
    head_dim: int = 128  # width of each head
    model_dim: int = 768  # residual stream width
    no_attn_layer: int = 7  # block without attention (record drops layer 7's); -1 = every block attends
    window_max: int = 1728  # sliding window grows linearly from 128 to this many tokens, in 128-token blocks
    # optimisation (record values; provenance in setup_optimizers)
    num_iterations: int = 1770  # optimizer steps
    cooldown_frac: float = 0.4  # final fraction of steps with the LR decaying linearly to 0.1x
    muon_lr: float = 0.05  # Muon LR for the hidden matrices
    muon_momentum: float = 0.95  # Muon momentum after warm-up
    muon_momentum_start: float = 0.85  # Muon momentum at step 0
    muon_momentum_warmup: int = 300  # steps over which momentum rises from start to final
    muon_weight_decay: float = 0.0  # decoupled weight decay on Muon matrices (record: 0)
    head_lr: float = 0.22  # Adam LR of lm_head
    embed_lr: float = 0.6  # Adam LR of token and value embeddings
    scalar_lr: float = 0.04  # Adam LR of lambdas and skip weights
    adam_beta1: float = 0.8  # Adam beta1 (record)
    adam_beta2: float = 0.95  # Adam beta2 (record)
    adam_eps: float = 1e-10  # Adam epsilon; tiny so updates do not depend on the loss scale (record)
    optimizer: str = "muon"  # hidden matrices: muon (record) or adamw (GPT-2-style AdamW: the ablation of Muon)
    adamw_lr: float = 1e-3  # AdamW LR of the hidden matrices; best of four on Shakespeare (docs/muon_vs_adamw.md)
    adamw_weight_decay: float = 0.1  # AdamW decoupled weight decay of the hidden matrices (GPT-2)
    muon_orthogonalizer: str = "newton_schulz"  # newton_schulz (2025 record) or polar_express (record #38)
    normuon: bool = False  # NorMuon: Muon's update normalised per neuron by a second-moment EMA (record #41)
    normuon_beta2: float = 0.9  # NorMuon's EMA factor of each neuron's mean squared update (record #41)
    cautious_weight_decay: bool = False  # decay only where update and weight agree in sign, with the decay tied
    #   to the square of the scheduled LR (Muon: record #43; Adam: record #50, with --adam-update record)
    adam_update: str = "torch"  # Adam's arithmetic: torch (2025 record) or record (the 2026 record's bias
    #   correction and epsilon, LR-squared weight decay, --adam-every)
    adam_table: str = "2025"  # Adam betas and LR / decay multipliers per group: 2025, or 2026 (the record's table)
    adam_weight_decay: float = 0.0  # Adam weight decay times each group's multiplier; needs --adam-update record
    #   (record #50: 0.005)
    adam_every: int = 1  # step Adam every N optimizer steps on the summed gradients; needs --adam-update record
    #   (record #39: 2)
    muon_lr_mults: str = "shape"  # Muon LR per matrix: shape (2025: max(1, rows/cols)^0.5) or 2026 (record PR 168)
    muon_momentum_cooldown: int = 0  # final steps over which Muon momentum falls back to its start (record: 50)
    muon_qk_head_groups: int = 0  # orthogonalise Q and K per group of this many heads; 0 = whole (record #80: 2)
    muon_row_equilibration: bool = False  # MuonEq: rows to the mean row norm before orthogonalising (nanochat)
    muon_norm_snap: bool = False  # Muon+: the orthogonalised update to Frobenius norm sqrt(min(rows, cols)) (nanochat)
    # schedule, head and loss (the 2026 record's; issue 26)
    lr_floor: float = 0.1  # LR multiplier the cooldown ends at (2025 record: 0.1; record #89: 0.15)
    stage_schedule: str = ""  # "" = none, or 2026: record #89's stages of batch, windows, LR and multi-token
    #   weights (model.STAGES_2026), scaled to num_iterations
    mtp: bool = False  # multi-token prediction on the same head (record #53): each position is also scored on the
    #   2 tokens after its next one, weighted by the stage schedule (needs --stage-schedule; validation stays plain)
    prefix_token: bool = False  # auxiliary target (record #88): each position is also scored on the longest proper
    #   byte-prefix token of its next token, weighted by the stage schedule (needs --stage-schedule)
    tie_embed: bool = False  # one matrix for the token embedding and lm_head (record #51, PR 175) until the split
    #   step, the start of the stage schedule's third stage made odd, then two (record #53, PR 178); needs
    #   --stage-schedule
    logit_cap: str = "2025"  # soft cap of the logits: 2025, 30*sigmoid(z/(7.5*sqrt(dim))), or 2026 (record #54),
    #   23*sigmoid((z+5)/7.5); every path to the logits uses it: training, validation, eval.py, generation, export
    head_chunk: int = 0  # compute the head's loss and gradient over this many positions at a time (training and
    #   validation): the same loss to rounding at a fraction of the memory; 0 = the whole micro-batch at once
    #   (the record's). Not with loss modifiers or the FP8 head; fine-tuning's weighted loss stays whole
    window_block: int = 128  # tokens per attention window block: the window schedules and the masks count these
    #   (record: 128); a divisor of 128 (so it divides every row); CUDA (FlexAttention) needs 128
    yarn: bool = False  # YaRN (record #31, PR 122): when the stage schedule's long window grows, rescale the rotary
    #   frequencies and the attention scale; the final validation's long window is 20 blocks (record #89)
    doc_aligned: bool = False  # every row starts at a document start and holds whole documents cut at the stage's
    #   maximum length, the tail of a cut one dropped (record #89's BOS-aligned loader; its cuts, 896 then 2048
    #   tokens, need --stage-schedule; without one a document is cut only by the row's end)
    # architecture (the 2026 record's; issue 27): every switch off = the 2025 record's GPT. docs/architecture.md
    bigram_rows: int = 0  # bigram hash embedding (record #62, PR 201): rows of a zero-initialised table indexed by a
    #   hash of each token and the one before it, added to the residual stream before layer 0 and after every later
    #   attention; 0 = off (record #89: 50304 * 15 // 2 = 377,280)
    bigram_dim: int = 0  # the table's width: it feeds the first this-many channels of the stream; 0 = --model-dim
    bigram_sign_rows: int = 0  # sign trick (record #83, PR 299): each position's bigram row times a fixed random
    #   +-1 vector, row (previous token xor token) mod this of a seeded table; 0 = off (record: 8192)
    bigram_update: str = "dense"  # the bigram table's Adam: dense (the record's: every row, every Adam step) or rows
    #   (lazy: only the rows with a gradient this step, so the cost follows the batch, not the table)
    smear: bool = False  # smear gate (record #34, PR 130): each token's embedding plus a gated share of the one before
    value_embed_layers: str = ""  # "" = the 2025 layout (3 tables shared 012...012); else comma-separated layers,
    #   each with its own table (record #89: 1,2,8,9,10)
    value_embed_gates: bool = False  # per-head value-embedding gates 2*sigmoid(W [x[:6], ve[:6]]) (records #55, #70)
    #   with the record's attention lambdas (v scale 0.5, output scale 1: record #47) and 0.01-scale tables (#65)
    residual_lambdas: bool = False  # per-sublayer residual and output lambdas, sqrt(1.1) and 1, and the x0 share
    #   added after attention (records #45-#77), instead of the 2025 mix of x and x0 before each block
    skip_topology: str = "unet"  # unet (2025: layer i feeds layer L-1-i) or gated (record #45/#55: one skip from the
    #   output of --gated-skip-from into the --no-attn-layer, gated by sigmoid(-1.5 + ...) * 2 * sigmoid(W x0[:12]))
    gated_skip_from: int = 3  # the gated skip's source layer (record: 3)
    backout_layer: int = -1  # backout (record #40, PR 140): subtract a learned share (init 0.5) of this layer's
    #   output from the stream before the head, and later layers' attention reads it (record #77); -1 = off (record 7)
    long_window_layers: str = ""  # "" = the 2025 rule (0, 4, ... mirrored); else the comma-separated long-window
    #   layers (record #89: 3,10); the others get the short window
    key_offset: bool = False  # partial key offset (record #49): on long-window layers, the keys' non-rotating half
    #   comes from the token before, so one layer can form an induction head
    xsa_layers: str = ""  # learnable XSA (record #82, PR 264) on these comma-separated layers: each head's output
    #   minus tanh(alpha) of its component along its own value (record #84: 1,3,4,7,8,10)
    attn_gate: bool = False  # sparse attention output gate (record #28, PR 117): each head's output times
    #   sigmoid(W x[:12]) on every attention layer (record #89 computes this gate from its MUDD networks instead)
    paired_head_layers: str = ""  # paired-head attention (record #58) on these comma-separated layers: heads h and
    #   h + H/2 share one softmax over the sequence interleaved token by token (record #89: 0,2,5,9)
    # loss modifiers: all off by default; validation and eval.py report plain cross-entropy
    label_smoothing: float = 0.0  # share of each target's probability spread evenly over the real vocabulary
    #   (rows below vocab_size, plus the chat tokens in a fine-tune; never the padding rows)
    z_loss: float = 0.0  # weight of the mean squared log-partition, logsumexp(logits)^2 (PaLM used 1e-4)
    entropy_weight: float = 0.0  # adds this times the mean predictive entropy in nats: < 0 rewards spread-out
    #   predictions (a confidence penalty), > 0 rewards confident ones
    loss_terms: str = ""  # registered custom modifiers as name=weight,... (model.register_loss_modifier)
    plugins: str = ""  # comma-separated modules imported before the run, e.g. to register custom modifiers
    loss_normalization: str = "token"  # fine-tuning: token (every assistant token counts the same) or sequence
    #   (every conversation counts the same, however few assistant tokens it has)
    # evaluation, logging and checkpoints
    val_loss_every: int = 125  # steps between validations; 0 = only at the last step
    save_every: int = 0  # steps between checkpoints; 0 = only before validations and at the end
    save_checkpoint: bool = True  # write checkpoints at all
    keep_checkpoints: int = 2  # newest checkpoints kept per run (older ones deleted after a save); 0 = all
    resume: str = ""  # "" = fresh run; "latest" or a path to state_stepNNNNNN.pt
    # runtime
    seed: int = 0  # seed for weights and sampling
    warmup_steps: int = -1  # steps run then undone to compile kernels off the clock; -1 = 10 compiled on CUDA,
    #   2 compiled on CPU (no per-window kernels there), else 0
    device: str = "auto"  # auto (cuda, mps, cpu) or a torch device string
    dtype: str = "auto"  # autocast dtype: auto (bf16 where it pays), bf16 or fp32
    compile: str = "auto"  # torch.compile: on (whole model), head (the loss only), off; auto = on for CUDA and CPU,
    #   head elsewhere
    fp8_head: str = "auto"  # FP8 lm_head matmul: auto (GPUs with compute capability >= 8.9), on, off
    collective_timeout: int = 600  # seconds a rank waits for the others in a collective before the run stops
    # experiment trackers: log.txt and metrics.jsonl are always written
    trackers: str = ""  # comma-separated: tensorboard, wandb; "" = none
    tracker_dir: str = ""  # where tracker files go: "" = the run directory, else DIR/<run_id>/
    wandb_project: str = "modded-nanogpt"  # W&B project; WANDB_MODE=offline records locally with no network

    def validate(self, world_size: int = 1) -> "Hyperparameters":
        """Raise ConfigError naming the flag (the same checks and messages as model.py)."""
        positive = ["val_tokens", "train_seq_len", "val_seq_len", "rank_equivalents", "vocab_size", "num_layers",
                    "num_heads", "head_dim", "model_dim", "window_max", "num_iterations", "muon_momentum_warmup",
                    "collective_timeout"]
        for name in positive:
            if getattr(self, name) <= 0:
                raise ConfigError(f"--{_flag(name)}={getattr(self, name)} must be positive")
        if self.warmup_steps < -1:
            raise ConfigError(f"--warmup-steps={self.warmup_steps} must be -1 (auto) or >= 0")
        for name in ["row_len", "val_loss_every", "save_every", "keep_checkpoints"]:
            if getattr(self, name) < 0:
                raise ConfigError(f"--{_flag(name)}={getattr(self, name)} must be >= 0")
        for name in ["muon_lr", "head_lr", "embed_lr", "scalar_lr", "adam_eps", "adamw_lr"]:
            if not 0 < getattr(self, name) < math.inf:
                raise ConfigError(f"--{_flag(name)}={getattr(self, name)} must be positive and finite")
        if not 0 < self.cooldown_frac <= 1:
            raise ConfigError(f"--cooldown-frac={self.cooldown_frac} must be in (0, 1]")
        for name in ["adam_beta1", "adam_beta2", "muon_momentum", "muon_momentum_start"]:
            if not 0 <= getattr(self, name) < 1:
                raise ConfigError(f"--{_flag(name)}={getattr(self, name)} must be in [0, 1)")
        if self.num_heads * self.head_dim != self.model_dim:
            raise ConfigError(f"--num-heads * --head-dim = {self.num_heads * self.head_dim} must equal --model-dim="
                              f"{self.model_dim} (value embeddings are added to the attention values)")
        if self.num_layers % 2:
            raise ConfigError(f"--num-layers={self.num_layers} must be even (U-net skip connections pair layers)")
        if self.no_attn_layer >= self.num_layers or self.no_attn_layer < -1:
            raise ConfigError(f"--no-attn-layer={self.no_attn_layer} must be -1 or a layer index below "
                              f"--num-layers={self.num_layers}")
        for name in ["train_seq_len", "val_seq_len"]:
            row = self.row_len or getattr(self, name)
            if getattr(self, name) % row:
                raise ConfigError(f"--{_flag(name)}={getattr(self, name)} must be a multiple of --row-len={row}")
            if row % BLOCK_SIZE:
                raise ConfigError(f"row length {row} (--{_flag(name)} / --row-len) must be a multiple of "
                                  f"{BLOCK_SIZE} (attention blocks)")
        if self.shuffle_rows and not self.row_len:
            raise ConfigError("--shuffle-rows needs --row-len > 0 (rows are the unit that is shuffled)")
        if self.rank_equivalents % world_size:
            raise ConfigError(f"--rank-equivalents={self.rank_equivalents} must be divisible by the world size "
                              f"{world_size} (each process accumulates rank_equivalents / world_size micro-batches)")
        if self.val_tokens % (world_size * self.val_seq_len):
            raise ConfigError(f"--val-tokens={self.val_tokens} must be a multiple of world_size * --val-seq-len = "
                              f"{world_size * self.val_seq_len}")
        if not 0 <= self.adamw_weight_decay < math.inf:
            raise ConfigError(f"--adamw-weight-decay={self.adamw_weight_decay} must be >= 0")
        for name, choices in [("optimizer", ("muon", "adamw")), ("dtype", ("auto", "bf16", "fp32")),
                              ("compile", ("auto", "on", "head", "off")),
                              ("fp8_head", ("auto", "on", "off"))]:
            if getattr(self, name) not in choices:
                raise ConfigError(f"--{_flag(name)}={getattr(self, name)!r} must be one of {', '.join(choices)}")
        if self.run_id and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}", self.run_id):
            raise ConfigError(f"--run-id={self.run_id!r} may hold only letters, digits, '.', '_' and '-'")
        return self

    @property
    def tokens_per_step(self) -> int:
        return self.rank_equivalents * self.train_seq_len

    @property
    def max_seq_len(self) -> int:
        return self.row_len or max(self.train_seq_len, self.val_seq_len)


# Fields of the shared config that only the library scripts implement (refuse_library_only)
LIBRARY_ONLY = ("label_smoothing", "z_loss", "entropy_weight", "loss_terms", "plugins", "loss_normalization",
                "trackers", "tracker_dir", "wandb_project", "muon_orthogonalizer", "normuon", "normuon_beta2",
                "cautious_weight_decay", "adam_update", "adam_table", "adam_weight_decay", "adam_every",
                "muon_lr_mults", "muon_momentum_cooldown", "muon_qk_head_groups", "muon_row_equilibration",
                "muon_norm_snap", "lr_floor", "stage_schedule", "mtp", "prefix_token", "logit_cap",
                "window_block", "yarn", "tie_embed", "head_chunk", "doc_aligned", "bigram_rows", "bigram_dim",
                "bigram_sign_rows", "bigram_update", "smear", "value_embed_layers", "value_embed_gates",
                "residual_lambdas", "skip_topology", "gated_skip_from", "backout_layer", "long_window_layers",
                "key_offset", "xsa_layers", "attn_gate", "paired_head_layers")

# Only the fields that differ from the defaults (the record); reasons in model.py, measurements in docs/measurements.md.
PRESETS: dict[str, dict[str, Any]] = {
    "speedrun": {},
    "shakespeare": dict(
        train_files="data/shakespeare/shakespeare_train_*.bin", val_files="data/shakespeare/shakespeare_val_*.bin",
        val_tokens=32_768, train_seq_len=4096, val_seq_len=8192, row_len=256, rank_equivalents=2,
        shuffle_rows=True, num_layers=6, num_heads=4, head_dim=64, model_dim=256, no_attn_layer=-1,
        window_max=256, num_iterations=75, cooldown_frac=0.4, muon_momentum_warmup=100, val_loss_every=25,
        head_lr=0.11, embed_lr=0.3, scalar_lr=0.02,
    ),
}
ENV_PREFIX = "NANOGPT_"  # NANOGPT_NUM_ITERATIONS=20 sets num_iterations (process environment only, no .env)


def _flag(name: str) -> str:
    return name.replace("_", "-")


def _coerce(name: str, value: Any) -> Any:
    """A CLI or environment string to the field's type, naming the field on failure."""
    kind = {f.name: f.type for f in dataclasses.fields(Hyperparameters)}[name]
    try:
        if kind in ("bool", bool):
            low = str(value).strip().lower()
            if low not in ("1", "true", "yes", "on", "0", "false", "no", "off"):
                raise ValueError(f"expected true/false, got {value!r}")
            return low in ("1", "true", "yes", "on")
        if kind in ("int", int):
            return int(str(value).strip())
        return float(value) if kind in ("float", float) else str(value)
    except ValueError as e:
        raise ConfigError(f"--{_flag(name)}: invalid value {value!r} ({e})") from None


def did_you_mean(name: str, choices: list[str], prefix: str = "") -> str:
    """' (did you mean --num-iterations?)' for a close known name, else '' (as pretraining.py says it)."""
    import difflib

    close = difflib.get_close_matches(name, choices, n=1, cutoff=0.75)
    return f" (did you mean {prefix}{close[0]}?)" if close else ""


class _OneLineParser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        if message.startswith("unrecognized arguments: "):
            unknown = [w.split("=")[0] for w in message.split(": ", 1)[1].split() if w.startswith("--")]
            message += did_you_mean(unknown[0], list(self._option_string_actions)) if unknown else ""
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_arg_parser() -> argparse.ArgumentParser:
    """Every Hyperparameters field as a flag (--num-iterations 20 or --num_iterations 20), as pretraining.py."""
    parser = _OneLineParser(prog="train_gpt.py", allow_abbrev=False, epilog=f"Every flag is also an environment "
                            f"variable ({ENV_PREFIX}NUM_ITERATIONS=20); CLI > environment > preset > default.")
    parser.add_argument("--preset", choices=sorted(PRESETS), help="default: speedrun with CUDA and FineWeb "
                        "shards, else shakespeare")
    source = inspect.getsource(Hyperparameters).replace("\n    #   ", " ")  # a wrapped comment's hanging indent
    comments = dict(re.findall(r"^    (\w+): \w+ = .*?  # (.*)$", source, re.MULTILINE))
    for f in dataclasses.fields(Hyperparameters)[1:]:  # [0] is preset
        flags = [f"--{_flag(f.name)}"] + ([f"--{f.name}"] if "_" in f.name else [])
        parser.add_argument(*flags, dest=f.name, default=argparse.SUPPRESS, metavar=str(f.type).upper(),
                            help=f"{comments.get(f.name, '')} (default {f.default!r})")
    return parser


def load_config(argv: list[str] | None = None, env: dict[str, str] | None = None) -> Hyperparameters:
    """CLI > process environment > preset > default; the preset defaults to speedrun with CUDA and FineWeb, else
    shakespeare (pretraining.py's CPU default is the 2026 preset, whose switches this file does not have)."""
    env = dict(os.environ if env is None else env)
    known = {f.name for f in dataclasses.fields(Hyperparameters)}
    values: dict[str, Any] = {}
    for key, raw in env.items():
        if key.startswith(ENV_PREFIX) and key != "NANOGPT_RANKS_FILE":
            if key[len(ENV_PREFIX):].lower() not in known:
                hint = did_you_mean(key[len(ENV_PREFIX):], [k.upper() for k in known], ENV_PREFIX)
                raise ConfigError(f"environment variable {key} names no hyperparameter{hint}")
            values[key[len(ENV_PREFIX):].lower()] = raw
    values.update({k: "--" if v == [] else v for k, v in vars(build_arg_parser().parse_args(argv)).items()})
    values = {k: _coerce(k, v) for k, v in values.items() if v is not None}  # argparse reads `--flag=--` as []
    preset = values.pop("preset", None) or default_preset()
    if preset not in PRESETS:
        raise ConfigError(f"--preset={preset!r} must be one of {', '.join(sorted(PRESETS))}")
    return Hyperparameters(**dict(PRESETS[preset], preset=preset, **values))


def default_preset() -> str:
    has_fineweb = bool(glob.glob(str(REPO_DIR / Hyperparameters.train_files)))
    return "speedrun" if torch.cuda.is_available() and has_fineweb else "shakespeare"


# -----------------------------------------------------------------------------
# Runtime


@dataclass
class Runtime:
    device: torch.device
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    autocast_dtype: torch.dtype | None = None  # None = fp32
    dtype_reason: str = ""  # why this dtype, for the run header
    compile: bool = False  # whole model
    compile_head: bool = False  # only the soft-capped cross-entropy (the CPU hot spot)

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def master(self) -> bool:
        return self.rank == 0

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.autocast_dtype)

    def synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def detect_device(name: str = "auto") -> torch.device:
    """cuda, then mps, then cpu; an explicit name is checked for availability."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        mps = getattr(torch.backends, "mps", None)
        return torch.device("mps" if mps is not None and mps.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"--device={name!r} is not a torch device (try auto, cpu, cuda, cuda:1, mps)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device={name} but CUDA is not available on this machine")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"--device={name} but MPS is not available on this machine")
    return device


BF16_MIN_SPEEDUP = 1.2  # bf16 autocast rounds every product's inputs: a CPU takes it only where clearly faster
DTYPE_PROBE_ROWS = 128  # rows of the probed products: well under a second in fp32 on 2 cores at the default shape


def cpu_model_name() -> str:
    """The CPU's model name and its bf16 instruction sets, from /proc/cpuinfo ('' where there is none)."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""
    name = re.search(r"^model name\s*:\s*(.*)$", info, re.MULTILINE)
    units = sorted(set(re.findall(r"\b(avx512_bf16|amx_bf16)\b", info)))
    return " ".join([name.group(1).strip() if name else platform.machine(), *units])


def bf16_speedup(model_dim: int, vocab: int, rows: int = DTYPE_PROBE_ROWS, repeats: int = 2) -> float:
    """fp32 seconds over bf16 seconds of the lm_head forward, its input gradient and an MLP product of this shape,
    best of `repeats` after one untimed call (an AVX-512 BF16 CPU without AMX ran bf16 slower: docs/measurements.md)."""
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(rows, model_dim, generator=g), torch.randn(vocab, model_dim, generator=g)
    dy, w_mlp = torch.randn(rows, vocab, generator=g), torch.randn(4 * model_dim, model_dim, generator=g)

    def seconds(dtype: torch.dtype) -> float:
        a, b, c, d = (t.to(dtype) for t in (x, w, dy, w_mlp))
        best = math.inf
        for i in range(repeats + 1):
            start = time.perf_counter()
            F.linear(a, b), c @ b, F.linear(a, d)
            best = best if i == 0 else min(best, time.perf_counter() - start)
        return best

    return seconds(torch.float32) / seconds(torch.bfloat16)


def cpu_dtype_choice(model_dim: int, vocab: int) -> tuple[torch.dtype | None, str]:
    """--dtype auto on a CPU, as model.py chooses it and from the same per-machine cache file, so both scripts make
    the same choice on a machine: fp32 without bf16 instructions, else bf16 where the probe finds it at least
    BF16_MIN_SPEEDUP times as fast."""
    machine = cpu_model_name()
    if not re.search(r"\b(avx512_bf16|amx_bf16)\b", machine):
        return None, "auto: fp32, this CPU has no bf16 instructions (avx512_bf16, amx_bf16)"
    key = f"{machine} | torch {torch.__version__} | dim {model_dim} vocab {vocab}"
    root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "modded-nanogpt"
    path = root / f"cpu_dtype_{hashlib.sha256(key.encode()).hexdigest()[:16]}.json"
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        record = dict(key=key, speedup=round(bf16_speedup(model_dim, vocab), 2))
        try:  # whole to a temporary file, then linked into place; the first process to link it wins
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.{os.getpid()}")
            tmp.write_text(json.dumps(record))
            try:
                os.link(tmp, path)
            except FileExistsError:
                record = json.loads(path.read_text())
            finally:
                tmp.unlink(missing_ok=True)
        except (OSError, ValueError):
            pass
    speedup = float(record["speedup"])
    dtype = torch.bfloat16 if speedup >= BF16_MIN_SPEEDUP else None
    return dtype, (f"auto: {'bf16' if dtype else 'fp32'}, bf16 products ran {speedup:.2f}x fp32's speed in a probe of "
                   f"this model's shapes on this CPU ({path})")


def pick_autocast_dtype(choice: str, device: torch.device, model_dim: int, vocab: int) -> tuple[torch.dtype | None, str]:
    """The autocast dtype and why: as given; auto: bf16 on CUDA GPUs that support it, the probe's choice on a CPU."""
    if choice != "auto":
        return torch.bfloat16 if choice == "bf16" else None, f"--dtype {choice}"
    if device.type == "cuda":
        ok = torch.cuda.is_bf16_supported()
        return torch.bfloat16 if ok else None, f"auto: {'bf16' if ok else 'fp32, no bf16'} on this GPU"
    if device.type == "cpu":
        return cpu_dtype_choice(model_dim, vocab)
    return None, f"auto: fp32 on {device.type}"


def keep_freed_memory() -> bool:
    """glibc malloc: keep freed memory for reuse. By default each block above 32 MB (logits, activations) is
    mmap'ed and unmapped when freed, so every CPU step page-faults gigabytes of fresh pages (docs/measurements.md,
    allocator). PyTorch's CPU tuning guide advises jemalloc/tcmalloc for the same reason. False elsewhere."""
    if not sys.platform.startswith("linux"):
        return False
    import ctypes

    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):  # not glibc
        return False
    m_trim_threshold, m_mmap_max = -1, -4  # <malloc.h>
    return bool(mallopt(m_mmap_max, 0)) and bool(mallopt(m_trim_threshold, 2**31 - 1))


def init_runtime(hp: Hyperparameters) -> Runtime:
    """torchrun's RANK / WORLD_SIZE / LOCAL_RANK; plain python is one process with no process group."""
    rank, world_size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = detect_device(hp.device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if device.type == "cpu":
        keep_freed_memory()
        torch.use_deterministic_algorithms(True, warn_only=True)  # compiled scatter-adds are atomic otherwise
    if world_size > 1 and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, device_id=device if backend == "nccl" else None,
                                timeout=timedelta(seconds=hp.collective_timeout))  # a dead rank stops the others
    whole = device.type in ("cuda", "cpu")  # CPU too: docs/measurements.md, "Whole-model compile"
    box = [None]
    if rank == 0 or not (world_size > 1 and device.type == "cpu" and hp.dtype == "auto"):
        box = [pick_autocast_dtype(hp.dtype, device, hp.model_dim, next_multiple_of_n(hp.vocab_size, n=128))]
    if world_size > 1 and device.type == "cpu" and hp.dtype == "auto":
        dist.broadcast_object_list(box, src=0)  # rank 0's probe decides for every rank and node
    dtype, reason = box[0]
    return Runtime(device=device, rank=rank, local_rank=local_rank, world_size=world_size,
                   autocast_dtype=dtype, dtype_reason=reason,
                   compile=hp.compile == "on" or (hp.compile == "auto" and whole),
                   compile_head=hp.compile == "head" or (hp.compile == "auto" and not whole))


def compile_with_fallback(fn: Any, name: str) -> Any:
    """torch.compile(fn) (a function or module), run eagerly (one warning) if compiling fails, e.g. no C++ compiler.
    An error eager raises too is the caller's: it propagates and the compiled version stays."""
    state = {"fn": torch.compile(fn, dynamic=False)}  # one kernel per shape (Newton-Schulz: a few)

    def call(*args: Any, **kwargs: Any) -> Any:
        try:
            return state["fn"](*args, **kwargs)
        except Exception as e:  # noqa: BLE001 - any compiler failure; eager gives the same numbers, slower
            if state["fn"] is fn:
                raise
            out = fn(*args, **kwargs)  # forward and Newton-Schulz are pure: running them again is safe
            msg = (str(e).strip().splitlines() or [""])[0][:200]
            warnings.warn(f"torch.compile of {name} failed ({type(e).__name__}: {msg}); running it eagerly")
            state["fn"] = fn
            return out

    return call


class CompiledModule(nn.Module):
    """A module called through compile_with_fallback; train() / eval() reach the wrapped module."""

    def __init__(self, module: nn.Module, name: str):
        super().__init__()
        self.module = module
        self.call = compile_with_fallback(module, name)

    def forward(self, *args: Any) -> Any:
        return self.call(*args)


def print0(rt: Runtime, msg: str, logfile: Path | None = None, console: bool = True) -> None:
    if not rt.master:
        return
    if console:
        print(msg, flush=True)
    if logfile is not None:
        with open(logfile, "a", encoding="utf-8") as f:
            f.write(msg + "\n")


# -----------------------------------------------------------------------------
# Model

BLOCK_SIZE = 128  # attention block size of FlexAttention block masks; window sizes count these blocks
EOT_ID = 50256  # <|endoftext|>: starts every document, so attention never crosses it


def next_multiple_of_n(v: float | int, *, n: int) -> int:
    return n * max(1, math.ceil(v / n))


def norm(x: Tensor) -> Tensor:
    return F.rms_norm(x, (x.size(-1),))


def _register_fp8_ops() -> None:
    """The FP8 lm_head matmul as custom ops (CUDA, compute capability >= 8.9), defined on first use."""
    if hasattr(torch.ops.moddedgpt, "fp8_mm"):
        return

    @torch.library.custom_op("moddedgpt::fp8_mm", mutates_args=())
    def fp8_mm(x: Tensor, w: Tensor, x_s: float, w_s: float, grad_s: float) -> tuple[Tensor, Tensor, Tensor]:
        x_f8, w_f8 = x.div(x_s).to(torch.float8_e4m3fn), w.div(w_s).to(torch.float8_e4m3fn)
        out = torch._scaled_mm(x_f8, w_f8.T, out_dtype=torch.bfloat16, use_fast_accum=True,
                               scale_a=x.new_tensor(x_s, dtype=torch.float32),
                               scale_b=x.new_tensor(w_s, dtype=torch.float32))
        return out, x_f8, w_f8

    @fp8_mm.register_fake
    def _(x: Tensor, w: Tensor, *_: float) -> tuple[Tensor, Tensor, Tensor]:
        return x @ w.T, x.to(torch.float8_e4m3fn), w.to(torch.float8_e4m3fn)

    @torch.library.custom_op("moddedgpt::fp8_mm_backward", mutates_args=())
    def fp8_mm_backward(g: Tensor, x_f8: Tensor, w_f8: Tensor, x_s: float, w_s: float,
                        grad_s: float) -> tuple[Tensor, Tensor]:
        g_f8 = g.div(grad_s).to(torch.float8_e5m2)
        grad_scale = g.new_tensor(grad_s, dtype=torch.float32)
        grad_x = torch._scaled_mm(g_f8, w_f8.T.contiguous().T, out_dtype=torch.bfloat16, scale_a=grad_scale,
                                  scale_b=g.new_tensor(w_s, dtype=torch.float32))
        grad_w = torch._scaled_mm(x_f8.T.contiguous(), g_f8.T.contiguous().T, out_dtype=torch.float32,
                                  scale_a=g.new_tensor(x_s, dtype=torch.float32), scale_b=grad_scale).T
        return grad_x, grad_w

    @fp8_mm_backward.register_fake
    def _(g: Tensor, x_f8: Tensor, w_f8: Tensor, *_: float) -> tuple[Tensor, Tensor]:
        return x_f8.to(torch.bfloat16), w_f8.T.contiguous().T.to(torch.float32)

    def backward(ctx: Any, grad_out: Tensor, *_: Any) -> tuple[Tensor, Tensor, None, None, None]:
        x_f8, w_f8 = ctx.saved_tensors
        grad_x, grad_w = torch.ops.moddedgpt.fp8_mm_backward(grad_out.contiguous(), x_f8, w_f8, *ctx.scales)
        return grad_x, grad_w, None, None, None

    def setup_context(ctx: Any, inputs: tuple, output: tuple) -> None:
        ctx.save_for_backward(output[1], output[2])
        ctx.scales = inputs[2:]
        ctx.set_materialize_grads(False)

    fp8_mm.register_autograd(backward, setup_context=setup_context)


def fp8_supported(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9)


class CastedLinear(nn.Linear):
    """Bias-free linear whose weight stays fp32 (autocast casts it); optional FP8 matmul for lm_head in training."""

    def __init__(self, in_features: int, out_features: int, x_s: float = 1.0, w_s: float = 1.0,
                 grad_s: float = 1.0):
        super().__init__(in_features, out_features, bias=False)
        self.use_fp8 = False
        self.x_s, self.w_s, self.grad_s = x_s, w_s, grad_s

    def reset_parameters(self) -> None:
        bound = 3**0.5 * 0.5 * self.in_features**-0.5  # std 0.5/sqrt(in) beats the default 1/sqrt(3) (record)
        with torch.no_grad():
            self.weight.uniform_(-bound, bound)

    def forward(self, x: Tensor) -> Tensor:
        if self.use_fp8 and self.training:
            flat = x.flatten(0, -2).contiguous()
            out = torch.ops.moddedgpt.fp8_mm(flat, self.weight, self.x_s, self.w_s, self.grad_s)[0]
            return out.reshape(*x.shape[:-1], -1)
        return F.linear(x, self.weight.type_as(x))


class Rotary(nn.Module):
    """Half-truncated RoPE: half the dims rotate with base 1024 frequencies, the other half not at all (record)."""

    def __init__(self, head_dim: int, max_seq_len: int):
        super().__init__()
        freqs = (1 / 1024) ** torch.linspace(0, 1, steps=head_dim // 4, dtype=torch.float32)
        freqs = torch.cat([freqs, freqs.new_zeros(head_dim // 4)])
        theta = torch.outer(torch.arange(max_seq_len, dtype=torch.float32), freqs)  # (T, D/2)
        self.cos = nn.Buffer(theta.cos(), persistent=False)
        self.sin = nn.Buffer(theta.sin(), persistent=False)

    def forward(self, x_BTHD: Tensor) -> Tensor:
        T = x_BTHD.size(-3)
        cos, sin = self.cos[None, :T, None, :], self.sin[None, :T, None, :]
        x1, x2 = x_BTHD.float().chunk(2, dim=-1)
        return torch.cat((x1 * cos + x2 * sin, x2 * cos - x1 * sin), dim=-1).type_as(x_BTHD)


def attention(q_BHTD: Tensor, k_BHTD: Tensor, v_BHTD: Tensor, mask: Any, scale: float) -> Tensor:
    """FlexAttention for block masks (CUDA), SDPA for the equal boolean masks (CPU, MPS)."""
    if isinstance(mask, Tensor):
        return F.scaled_dot_product_attention(q_BHTD, k_BHTD, v_BHTD, attn_mask=mask, scale=scale)
    from torch.nn.attention.flex_attention import flex_attention

    return flex_attention(q_BHTD, k_BHTD, v_BHTD, block_mask=mask, scale=scale)


class CausalSelfAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int, head_dim: int, rotary: Rotary):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, head_dim
        hdim = num_heads * head_dim
        bound = 3**0.5 * 0.5 * dim**-0.5  # same init scale as CastedLinear (record)
        self.qkv_w = nn.Parameter(torch.empty(3, hdim, dim).uniform_(-bound, bound))  # merged QKV
        self.lambdas = nn.Parameter(torch.tensor([0.5, 0.5]))  # mix of v and the value embedding
        self.rotary = rotary  # one table shared by all layers (non-persistent buffers)
        self.c_proj = CastedLinear(hdim, dim)
        self.c_proj.weight.detach().zero_()  # zero-init output projection (record)
        self.attn_scale = 0.12  # fixed logit scale instead of 1/sqrt(head_dim) (record)

    def forward(self, x: Tensor, ve: Tensor | None, mask: Any) -> Tensor:
        B, T = x.size(0), x.size(1)
        qkv = F.linear(x, self.qkv_w.flatten(end_dim=1).type_as(x))
        q, k, v = qkv.view(B, T, 3 * self.num_heads, self.head_dim).chunk(3, dim=-2)  # (B, T, H, D) each
        q, k = norm(q), norm(k)  # QK-norm
        q, k = self.rotary(q), self.rotary(k)
        v = self.lambdas[0] * v + (self.lambdas[1] * ve.view_as(v) if ve is not None else 0)
        y = attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2).type_as(q), mask, self.attn_scale)
        y = y.transpose(1, 2).contiguous().view(B, T, self.num_heads * self.head_dim)  # (B, T, H*D)
        return self.c_proj(y)


class MLP(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.c_fc = CastedLinear(dim, 4 * dim)
        self.c_proj = CastedLinear(4 * dim, dim)
        self.c_proj.weight.detach().zero_()

    def forward(self, x: Tensor) -> Tensor:
        return self.c_proj(F.relu(self.c_fc(x)).square())  # ReLU^2: https://arxiv.org/abs/2109.08668


class Block(nn.Module):
    def __init__(self, dim: int, num_heads: int, head_dim: int, rotary: Rotary, has_attn: bool):
        super().__init__()
        self.attn = CausalSelfAttention(dim, num_heads, head_dim, rotary) if has_attn else None
        self.mlp = MLP(dim)
        self.lambdas = nn.Parameter(torch.tensor([1.0, 0.0]))  # mix of the residual x and the embedding x0

    def forward(self, x: Tensor, ve: Tensor | None, x0: Tensor, mask: Any) -> Tensor:
        x = self.lambdas[0] * x + self.lambdas[1] * x0
        if self.attn is not None:
            x = x + self.attn(norm(x), ve, mask)
        return x + self.mlp(norm(x))


def value_embed_layout(num_layers: int) -> list[int | None]:
    """Value embedding per layer: 012...012 (record); k = L/2 < 3 shared ones for shallow models."""
    k = min(3, num_layers // 2)
    return list(range(k)) + [None] * (num_layers - 2 * k) + list(range(k))


def long_window_layers(num_layers: int) -> list[bool]:
    """Long windows on layers 0, 4, ... of the first half, mirrored in the second (record: 0, 4, 7, 11)."""
    half = num_layers // 2
    return [(i if i < half else num_layers - 1 - i) % 4 == 0 for i in range(num_layers)]


def block_keep_mask(docs_BT: Tensor, window_blocks: Tensor | int) -> tuple[Tensor, Tensor]:
    """(B, NB, NB) full and partial blocks kept by the record's sliding-window document block mask: a query
    block keeps its window_blocks - 1 most recent full blocks and max(window_blocks - num_full, 1) partial ones."""
    B, T = docs_BT.shape
    NB = T // BLOCK_SIZE
    blk = torch.arange(NB, device=docs_BT.device)
    causal_any, causal_all = blk[:, None] >= blk[None, :], blk[:, None] > blk[None, :]
    low = docs_BT.view(B, NB, BLOCK_SIZE)[:, :, 0]
    high = docs_BT.view(B, NB, BLOCK_SIZE)[:, :, -1]
    doc_any = (low[:, :, None] <= high[:, None, :]) & (high[:, :, None] >= low[:, None, :])
    doc_all = (low[:, :, None] == high[:, None, :]) & (high[:, :, None] == low[:, None, :])
    full = causal_all & doc_all
    partial = causal_any & doc_any & ~full
    num_full = full.sum(-1, keepdim=True)
    recency_full = full.flip(-1).cumsum(-1).flip(-1)  # 1 = most recent full block of the row
    recency_partial = partial.flip(-1).cumsum(-1).flip(-1)
    keep_full = full & (recency_full <= window_blocks - 1)
    keep_partial = partial & (recency_partial <= torch.clamp(window_blocks - num_full, min=1))
    return keep_full, keep_partial


def dense_attention_mask(docs_BT: Tensor, window_blocks: Tensor | int) -> Tensor:
    """Boolean (B, 1, T, T) mask equal to the FlexAttention block mask, for SDPA."""
    T = docs_BT.size(1)
    keep_full, keep_partial = block_keep_mask(docs_BT, window_blocks)
    keep = (keep_full | keep_partial).repeat_interleave(BLOCK_SIZE, 1).repeat_interleave(BLOCK_SIZE, 2)
    causal = torch.ones(T, T, dtype=torch.bool, device=docs_BT.device).tril()
    return (keep & causal & (docs_BT[:, :, None] == docs_BT[:, None, :]))[:, None]


def flex_block_mask(docs_BT: Tensor, window_blocks: Tensor | int) -> Any:
    """The same mask as a FlexAttention BlockMask (CUDA)."""
    from torch.nn.attention.flex_attention import BlockMask

    keep_full, keep_partial = block_keep_mask(docs_BT, window_blocks)
    keep_BNN = keep_full | keep_partial  # the window again, for eager flex_attention, which reads only mask_mod

    def ordered(dense: Tensor) -> tuple[Tensor, Tensor]:
        num = dense.sum(-1, dtype=torch.int32)[:, None].contiguous()  # (B, 1, NB)
        idx = dense.to(torch.int8).argsort(dim=-1, descending=True, stable=True).to(torch.int32)
        return num, idx[:, None].contiguous()  # (B, 1, NB, NB)

    def document_causal(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        in_window = keep_BNN[b, q_idx // BLOCK_SIZE, kv_idx // BLOCK_SIZE]
        return in_window & (q_idx >= kv_idx) & (docs_BT[b, q_idx] == docs_BT[b, kv_idx])

    partial_num, partial_idx = ordered(keep_partial)
    full_num, full_idx = ordered(keep_full)
    return BlockMask.from_kv_blocks(partial_num, partial_idx, full_num, full_idx, BLOCK_SIZE=BLOCK_SIZE,
                                    mask_mod=document_causal)


def softcap(logits: Tensor, model_dim: int) -> Tensor:
    """30 * sigmoid(logits / (7.5 * sqrt(model_dim))): logits in (0, 30) (record)."""
    return 30 * torch.sigmoid(logits / (7.5 * model_dim**0.5))


def softcap_cross_entropy(x_normed: Tensor, head_weight: Tensor, targets: Tensor) -> Tensor:
    """Mean cross-entropy of the soft-capped logits; pure, so CPU runs can compile just this hot spot."""
    logits = softcap(F.linear(x_normed, head_weight.type_as(x_normed)).float(), x_normed.size(-1))
    return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1).long())


class GPT(nn.Module):
    """The record's GPT for any size, with model.py's parameter names (checkpoints are interchangeable)."""

    def __init__(self, vocab_size: int, num_layers: int, num_heads: int, head_dim: int, model_dim: int,
                 max_seq_len: int, no_attn_layer: int = 7):
        super().__init__()
        padded_vocab = next_multiple_of_n(vocab_size, n=128)  # 50257 -> 50304: free rows for chat tokens
        self.num_layers, self.model_dim = num_layers, model_dim
        self.embed = nn.Embedding(padded_vocab, model_dim)
        num_ve = max((i for i in value_embed_layout(num_layers) if i is not None), default=-1) + 1
        self.value_embeds = nn.ModuleList([nn.Embedding(padded_vocab, model_dim) for _ in range(num_ve)])
        rotary = Rotary(head_dim, max_seq_len)
        self.blocks = nn.ModuleList([Block(model_dim, num_heads, head_dim, rotary, i != no_attn_layer)
                                     for i in range(num_layers)])
        # FP8 scales: inputs are RMS-normed (|x| <= sqrt(dim)), 448 is the e4m3 max (record)
        self.lm_head = CastedLinear(model_dim, padded_vocab, x_s=model_dim**0.5 / 448, w_s=24 / 448,
                                    grad_s=1 / 448)
        self.lm_head.weight.detach().zero_()
        self.skip_weights = nn.Parameter(torch.ones(num_layers // 2))  # U-net skips (record)
        self.use_flex = False
        self.loss_fn = softcap_cross_entropy

    def forward(self, input_BT: Tensor, target_BT: Tensor | None = None,
                sliding_window_num_blocks: Tensor | int = 1 << 30) -> Tensor:
        """(B, T) tokens. With targets: mean cross-entropy; without: soft-capped logits (B, T, V)."""
        docs = (input_BT == EOT_ID).cumsum(dim=1)  # document id of every token
        build = flex_block_mask if self.use_flex else dense_attention_mask
        long_mask, short_mask = build(docs, sliding_window_num_blocks), build(docs, sliding_window_num_blocks // 2)
        masks = [long_mask if is_long else short_mask for is_long in long_window_layers(self.num_layers)]
        value_embeds = [ve(input_BT) for ve in self.value_embeds]
        ves = [value_embeds[i] if i is not None else None for i in value_embed_layout(self.num_layers)]
        x = x0 = norm(self.embed(input_BT))  # (B, T, model_dim)
        skips, n = [], self.num_layers // 2
        for i, block in enumerate(self.blocks):
            if i >= n:
                x = x + self.skip_weights[i - n] * skips.pop()
            x = block(x, ves[i], x0, masks[i])
            if i < n:
                skips.append(x)
        x = norm(x)
        if target_BT is None or (self.lm_head.use_fp8 and self.training):
            logits = softcap(self.lm_head(x).float(), self.model_dim)
            if target_BT is None:
                return logits
            return F.cross_entropy(logits.view(-1, logits.size(-1)), target_BT.reshape(-1).long())
        return self.loss_fn(x, self.lm_head.weight, target_BT)


def build_model(hp: Hyperparameters, rt: Runtime) -> tuple[GPT, nn.Module]:
    """The raw model (checkpoints, optimizers) and the module to call (compiled where asked)."""
    model = GPT(hp.vocab_size, hp.num_layers, hp.num_heads, hp.head_dim, hp.model_dim, hp.max_seq_len,
                hp.no_attn_layer).to(rt.device)
    if rt.device.type == "cuda":
        for m in model.modules():
            if isinstance(m, nn.Embedding):
                m.bfloat16()  # embeddings in bf16 on GPU (record); fp32 elsewhere for accuracy
        model.use_flex = True
    if hp.fp8_head == "on" and not fp8_supported(rt.device):
        raise ConfigError(f"--fp8-head=on needs a GPU with compute capability >= 8.9, not {rt.device}")
    if hp.fp8_head == "on" or (hp.fp8_head == "auto" and fp8_supported(rt.device)):
        _register_fp8_ops()
        model.lm_head.use_fp8 = True
    if rt.distributed:
        for p in model.parameters():
            dist.broadcast(p.detach(), 0)
    if rt.compile_head and not rt.compile:
        model.loss_fn = compile_with_fallback(softcap_cross_entropy, "the loss head")
    return model, CompiledModule(model, "the model") if rt.compile else model


# -----------------------------------------------------------------------------
# Muon optimizer


def zeropower_via_newtonschulz5(G: Tensor, steps: int = 5) -> Tensor:
    """Approximately orthogonalise G (batched over leading dims) with a quintic Newton-Schulz iteration in bf16.

    The coefficients maximise the slope at zero, so singular values land near Uniform(0.5, 1.5), which trains
    as well as UV^T (https://kellerjordan.github.io/posts/muon/).
    """
    a, b, c = (3.4445, -4.7750, 2.0315)
    X = G.bfloat16()
    transposed = G.size(-2) > G.size(-1)
    if transposed:
        X = X.mT
    X = X / (X.norm(dim=(-2, -1), keepdim=True) + 1e-7)  # spectral norm <= Frobenius norm <= 1
    for _ in range(steps):
        A = X @ X.mT
        B = b * A + c * A @ A
        X = a * X + B @ X
    if transposed:
        X = X.mT
    return X.type_as(G)


class Muon(torch.optim.Optimizer):
    """MomentUm Orthogonalized by Newton-Schulz, for the hidden matrices. Every rank keeps all momentum (cheap),
    rank r orthogonalises matrices r, r+W, ... and all-gathers them; no collective at world size 1."""

    def __init__(self, params: list[Tensor], lr: float = 0.05, momentum: float = 0.95, weight_decay: float = 0.0,
                 rank: int = 0, world_size: int = 1, ns_steps: int = 5, compile_ns: bool = False):
        self.rank, self.world_size, self.ns_steps = rank, world_size, ns_steps
        self.orthogonalise = compile_with_fallback(zeropower_via_newtonschulz5, "Newton-Schulz") if compile_ns \
            else zeropower_via_newtonschulz5
        by_shape: dict[tuple[int, ...], list[Tensor]] = {}
        for p in params:  # one group per shape, in first-appearance order (deterministic)
            by_shape.setdefault(tuple(p.shape), []).append(p)
        super().__init__([dict(params=ps) for ps in by_shape.values()],
                         dict(lr=lr, momentum=momentum, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self) -> None:  # type: ignore[override]
        pending = []
        for group in self.param_groups:
            params: list[Tensor] = group["params"]
            for p in params:
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p)
                state["momentum_buffer"].lerp_(p.grad, 1 - group["momentum"])
            for base in range(0, len(params), self.world_size):
                chunk = params[base:base + self.world_size]
                if self.rank < len(chunk):
                    self._update(chunk[self.rank], group)
                if self.world_size > 1:
                    pending.append(self._gather(chunk))
        for work, buffer, chunk in pending:
            work.wait()
            for i, p in enumerate(chunk):
                p.copy_(buffer[i].view_as(p))

    def _update(self, p: Tensor, group: dict[str, Any]) -> None:
        g = p.grad.lerp(self.state[p]["momentum_buffer"], group["momentum"])  # Nesterov
        v = self.orthogonalise(g, self.ns_steps)
        if group["weight_decay"]:
            p.mul_(1 - group["lr"] * group["weight_decay"])
        p.add_(v, alpha=-group["lr"] * max(1, p.size(-2) / p.size(-1)) ** 0.5)

    def _gather(self, chunk: list[Tensor]) -> tuple[Any, Tensor, list[Tensor]]:
        ref = chunk[0]
        mine = chunk[self.rank] if self.rank < len(chunk) else torch.zeros_like(ref)
        buffer = torch.empty(self.world_size * ref.numel(), dtype=ref.dtype, device=ref.device)
        gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor  # renamed in torch 2.13
        work = gather(buffer, mine.detach().contiguous().view(-1), async_op=True)
        return work, buffer.view(self.world_size, -1), chunk


def setup_optimizers(model: GPT, hp: Hyperparameters, rank: int = 0, world_size: int = 1,
                     compile_ns: bool = False) -> list[torch.optim.Optimizer]:
    """Adam for lm_head, embeddings and scalars (record: LRs 0.22 / 0.6 / 0.04, betas (0.8, 0.95), eps 1e-10,
    @YouJiacheng's fix for the world-size dependence of the update size); Muon for the hidden matrices, or with
    --optimizer adamw GPT-2-style AdamW (betas (0.9, 0.95), eps 1e-8, weight decay) for them instead."""
    hidden = [p for n, p in model.blocks.named_parameters() if p.ndim >= 2]
    embeds = [p for n, p in model.named_parameters() if "embed" in n]
    scalars = [p for p in model.parameters() if p.ndim < 2]
    adam_groups = [dict(params=[model.lm_head.weight], lr=hp.head_lr), dict(params=embeds, lr=hp.embed_lr),
                   dict(params=scalars, lr=hp.scalar_lr)]
    fused = next(model.parameters()).device.type == "cuda"
    adam = torch.optim.Adam(adam_groups, betas=(hp.adam_beta1, hp.adam_beta2), eps=hp.adam_eps, fused=fused)
    if hp.optimizer == "adamw":
        hidden_opt = torch.optim.AdamW(hidden, lr=hp.adamw_lr, betas=(0.9, 0.95), eps=1e-8,
                                       weight_decay=hp.adamw_weight_decay, fused=fused)
    else:
        hidden_opt = Muon(hidden, lr=hp.muon_lr, momentum=hp.muon_momentum, weight_decay=hp.muon_weight_decay,
                          rank=rank, world_size=world_size, compile_ns=compile_ns)
    for opt in (adam, hidden_opt):
        for group in opt.param_groups:
            group["initial_lr"] = group["lr"]
    return [adam, hidden_opt]


def all_reduce_gradients(model: nn.Module, world_size: int) -> None:
    if world_size == 1:
        return
    works = [dist.all_reduce(p.grad, op=dist.ReduceOp.AVG, async_op=True)
             for p in model.parameters() if p.grad is not None]
    for work in works:
        work.wait()


# -----------------------------------------------------------------------------
# Data

SHARD_MAGIC = 20240520  # llm.c / modded-nanogpt shard header: 256 int32 (magic, version, tokens), then uint16
HEADER_INTS = 256


def _load_data_shard(path: Path) -> Tensor:
    """Validate the header and size, then memory-map the tokens as a uint16 tensor."""
    try:
        size = path.stat().st_size
        header = np.fromfile(path, dtype=np.int32, count=HEADER_INTS)
    except OSError as e:
        raise DataError(f"{path}: cannot read shard ({e.strerror})") from None
    if len(header) < HEADER_INTS or header[0] != SHARD_MAGIC or header[1] != 1:
        raise DataError(f"{path}: not a version-1 token shard (truncated header, wrong magic or version)")
    num_tokens = int(header[2])
    if num_tokens == 0 or size != HEADER_INTS * 4 + 2 * num_tokens:
        raise DataError(f"{path}: truncated or empty shard: header claims {num_tokens} tokens, file has {size} bytes")
    arr = np.memmap(path, dtype=np.uint16, mode="c", offset=HEADER_INTS * 4, shape=(num_tokens,))
    return torch.from_numpy(arr)


def list_shards(pattern: str) -> list[Path]:
    files = [Path(f) for f in sorted(glob.glob(pattern))]
    if not files:
        raise DataError(f"no files match {pattern!r}")
    return files


def check_data(hp: Hyperparameters, world_size: int) -> None:
    """Before anything is written: every shard's header and size, a validation split that covers --val-tokens, and
    the token ids of the validation shards and the first training shard (uint16 holds ids past the vocabulary)."""
    train, val = list_shards(repo_path(hp.train_files)), list_shards(repo_path(hp.val_files))
    for path in train:
        if len(_load_data_shard(path)) <= hp.tokens_per_step + 1:
            raise DataError(f"{path}: {len(_load_data_shard(path))} tokens; one batch needs more than "
                            f"{hp.tokens_per_step + 1}: lower the sequence length or merge shards")
    val_batch = world_size * hp.val_seq_len
    sizes = [len(_load_data_shard(path)) for path in val]
    if sum((n - val_batch - 2) // val_batch + 1 for n in sizes if n > val_batch + 1) < hp.val_tokens // val_batch:
        raise DataError(f"validation files {hp.val_files!r} hold fewer than --val-tokens={hp.val_tokens} tokens; "
                        f"lower --val-tokens")
    for path in [train[0], *val]:
        top = int(_load_data_shard(path).numpy().max())
        if top >= hp.vocab_size:
            raise DataError(f"{path}: token id {top} is outside the vocabulary (--vocab-size={hp.vocab_size})")


def distributed_data_generator(pattern: str, batch_size: int, rank: int, world_size: int, *,
                               device: torch.device | str = "cpu", start: dict[str, int] | None = None,
                               cycle: bool = True, row_len: int = 0,
                               shuffle_seed: int | None = None) -> Iterator[tuple[Tensor, Tensor, dict[str, int]]]:
    """Yield (inputs, targets, position) with rank's slice of each global batch of batch_size tokens.

    Rank r takes tokens [pos + r*local, pos + (r+1)*local + 1) as in the record; with cycle the shards repeat.
    With shuffle_seed, shards are cut into rows of row_len (+1 target) tokens visited in a seeded order per epoch.
    """
    files = list_shards(pattern)
    if batch_size % world_size:
        raise DataError(f"batch of {batch_size} tokens is not divisible by world size {world_size}")
    if shuffle_seed is not None and (row_len <= 0 or batch_size % (row_len * world_size)):
        raise DataError(f"shuffled rows need a batch of {batch_size} tokens divisible by row_len * world_size")
    local = batch_size // world_size

    def load(i: int) -> Tensor:
        tokens = _load_data_shard(files[i])
        if batch_size + 1 >= len(tokens):
            raise DataError(f"{files[i]}: {len(tokens)} tokens; one batch needs more than {batch_size + 1}: "
                            f"lower the sequence length or merge shards")
        return tokens

    def row_order(tokens: Tensor) -> Tensor | None:
        if shuffle_seed is None:
            return None
        g = torch.Generator().manual_seed(shuffle_seed * 1_000_003 + pos["epoch"] * 1009 + pos["shard"])
        return torch.randperm((len(tokens) - 1) // row_len, generator=g) * row_len  # row start offsets

    def exhausted(tokens: Tensor, order: Tensor | None) -> bool:
        if order is None:
            return pos["pos"] + batch_size + 1 >= len(tokens)  # record's rule: move on before the last token
        return pos["pos"] + batch_size > len(order) * row_len

    pos = dict(shard=0, pos=0, epoch=0) if start is None else dict(start)
    tokens = load(pos["shard"])
    order = row_order(tokens)
    while True:
        if exhausted(tokens, order):
            pos["shard"] += 1
            if pos["shard"] == len(files):
                if not cycle:
                    return
                pos["shard"], pos["epoch"] = 0, pos["epoch"] + 1
            pos["pos"] = 0
            tokens = load(pos["shard"])
            order = row_order(tokens)
        start_tok = pos["pos"] + rank * local
        if order is None:
            buf = tokens[start_tok:start_tok + local + 1].to(torch.int64)
            inputs, targets = buf[:-1], buf[1:]
        else:
            starts = order[start_tok // row_len:(start_tok + local) // row_len].tolist()
            rows = torch.stack([tokens[s:s + row_len + 1].to(torch.int64) for s in starts])  # (rows, row_len+1)
            inputs, targets = rows[:, :-1].reshape(-1), rows[:, 1:].reshape(-1)
        pos["pos"] += batch_size
        yield (inputs.to(device=device, dtype=torch.int32, non_blocking=True),
               targets.to(device=device, non_blocking=True), dict(pos))


@torch.no_grad()
def evaluate(forward: Any, hp: Hyperparameters, rt: Runtime, window: Tensor | int, val_files: str) -> float:
    """Mean validation loss over exactly hp.val_tokens tokens, averaged over ranks (the record's protocol)."""
    val_batch = rt.world_size * hp.val_seq_len
    steps = hp.val_tokens // val_batch
    row = hp.row_len or hp.val_seq_len
    loader = distributed_data_generator(val_files, val_batch, rt.rank, rt.world_size, device=rt.device, cycle=False)
    total = torch.zeros((), device=rt.device)
    was_training = forward.training
    forward.eval()
    for i in range(steps):
        batch = next(loader, None)
        if batch is None:
            raise DataError(f"validation files {val_files!r} hold fewer than --val-tokens={hp.val_tokens} tokens "
                            f"(ran out after {i * val_batch}); lower --val-tokens")
        with rt.autocast():
            total += forward(batch[0].view(-1, row), batch[1].view(-1, row), window).float()
    forward.train(was_training)
    total /= steps
    if rt.distributed:
        dist.all_reduce(total, op=dist.ReduceOp.AVG)
    return float(total)


# -----------------------------------------------------------------------------
# Checkpoints

CHECKPOINT_FORMAT = 1  # model.py's format: eval.py, chat.py and pretraining.py --resume read these files


def save_checkpoint(path: Path, *, step: int, model: nn.Module, optimizers: list[torch.optim.Optimizer],
                    hp: Hyperparameters, code: dict[str, str], data_position: dict[str, int] | None,
                    val_loss: float | None, val_step: int | None, train_time_ms: float) -> None:
    """Tensors and plain types only, written to a temporary file and renamed into place."""
    state = dict(format=CHECKPOINT_FORMAT, step=step, code=code, model=model.state_dict(),
                 optimizers=[opt.state_dict() for opt in optimizers], hyperparameters=dataclasses.asdict(hp),
                 tokenizer="gpt2", data_position=data_position or {},
                 rng=dict(torch=torch.get_rng_state(),
                          cuda=torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []),
                 val_loss=val_loss, val_step=val_step, train_time_ms=train_time_ms)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    if hp.keep_checkpoints > 0:  # prune only after the new one is safely in place
        for old in sorted(path.parent.glob("state_step[0-9][0-9][0-9][0-9][0-9][0-9].pt"))[:-hp.keep_checkpoints]:
            old.unlink(missing_ok=True)


# -----------------------------------------------------------------------------
# Schedules


def get_lr(step: int, hp: Hyperparameters) -> float:
    """LR multiplier: 1.0, then linear cooldown to 0.1 over the last cooldown_frac of training (record)."""
    x = min(max(step / hp.num_iterations, 0.0), 1.0)
    w = min((1 - x) / hp.cooldown_frac, 1.0)
    return w * 1.0 + (1 - w) * 0.1


def get_muon_momentum(step: int, hp: Hyperparameters) -> float:
    """Muon momentum warms up linearly from 0.85 to 0.95 over the first 300 steps (record)."""
    frac = min(step / hp.muon_momentum_warmup, 1.0)
    return (1 - frac) * hp.muon_momentum_start + frac * hp.muon_momentum


def get_window_size_blocks(step: int, hp: Hyperparameters) -> int:
    """Sliding window in 128-token blocks, growing linearly from 1 block to window_max (record: 128 -> 1792)."""
    x = min(max(step / hp.num_iterations, 0.0), 1.0)
    return next_multiple_of_n(hp.window_max * x, n=BLOCK_SIZE) // BLOCK_SIZE


def apply_schedules(optimizers: list[torch.optim.Optimizer], step: int, hp: Hyperparameters) -> None:
    lr_mult = get_lr(step, hp)
    for opt in optimizers:
        for group in opt.param_groups:
            group["lr"] = group["initial_lr"] * lr_mult
        if isinstance(opt, Muon):
            for group in opt.param_groups:
                group["momentum"] = get_muon_momentum(step, hp)


# -----------------------------------------------------------------------------
# Training


def repo_path(pattern: str) -> str:
    """Relative data paths resolve against this file's directory, so the script runs from anywhere."""
    return pattern if Path(pattern).is_absolute() else str(REPO_DIR / pattern)


def open_log(hp: Hyperparameters, rt: Runtime) -> Path:
    """logs/<run_id>.txt, created exclusively by rank 0 (two runs never share one) and broadcast to the others."""
    if rt.master:
        hp.run_id = hp.run_id or time.strftime("%Y%m%d-%H%M%S") + "-" + uuid.uuid4().hex[:6]
        try:
            Path(hp.log_dir).mkdir(parents=True, exist_ok=True)
            with open(Path(hp.log_dir) / f"{hp.run_id}.txt", "x"):
                pass
        except FileExistsError:
            raise ConfigError(f"{Path(hp.log_dir) / hp.run_id}.txt already exists; pick another --run-id") from None
        except OSError as e:
            raise ConfigError(f"cannot write the log in {hp.log_dir}: {e.strerror}") from None
    if rt.distributed:
        ids = [hp.run_id]
        dist.broadcast_object_list(ids, src=0)
        hp.run_id = ids[0]
    return Path(hp.log_dir) / f"{hp.run_id}.txt"


def log_header(rt: Runtime, logfile: Path, hp: Hyperparameters, code: str) -> None:
    """This file's source, the versions and nvidia-smi first, as the record's logs begin."""
    smi = ""
    if shutil.which("nvidia-smi"):
        smi = subprocess.run(["nvidia-smi"], capture_output=True, text=True, check=False).stdout
    lines = [code, "=" * 100, f"Running Python {sys.version.split()[0]} on {platform.platform()}",
             f"Running PyTorch {torch.__version__} compiled for CUDA {torch.version.cuda}", smi,
             "config: " + json.dumps(dataclasses.asdict(hp)), "=" * 100]
    print0(rt, "\n".join(lines), logfile, console=False)


def train_step(forward: nn.Module, raw_model: GPT, optimizers: list, batch: tuple, step: int, hp: Hyperparameters,
               rt: Runtime, window: Tensor) -> Tensor:
    """Micro-batches, gradient averaging, schedules, Adam + Muon; returns this rank's mean loss.

    The record backpropagates each rank's summed token loss over 8 ranks; scaling each micro-batch's mean loss by
    train_seq_len / accumulation gives exactly that gradient for any world size, so Adam's tiny eps sees it too.
    """
    accum = hp.rank_equivalents // rt.world_size
    row = hp.row_len or hp.train_seq_len
    total = 0.0
    for j in range(accum):
        x = batch[0][j * hp.train_seq_len:(j + 1) * hp.train_seq_len].view(-1, row)
        y = batch[1][j * hp.train_seq_len:(j + 1) * hp.train_seq_len].view(-1, row)
        with rt.autocast():
            loss = forward(x, y, window)
        (loss * (hp.train_seq_len / accum)).backward()
        total += loss.detach()
    all_reduce_gradients(raw_model, rt.world_size)
    apply_schedules(optimizers, step, hp)
    for opt in optimizers:
        opt.step()
    raw_model.zero_grad(set_to_none=True)
    return total / accum


def make_train_loader(hp: Hyperparameters, rt: Runtime) -> Iterator:
    return distributed_data_generator(repo_path(hp.train_files), hp.tokens_per_step, rt.rank, rt.world_size,
                                      device=rt.device, row_len=hp.row_len,
                                      shuffle_seed=hp.seed if hp.shuffle_rows else None)


def warm_up(forward: nn.Module, raw_model: GPT, optimizers: list, hp: Hyperparameters, rt: Runtime,
            window: Tensor) -> int:
    """Run steps to compile kernels, then restore the initial weights and optimizer state (the record's warm-up)."""
    auto = 0 if not rt.compile else 10 if rt.device.type == "cuda" else 2  # CPU: no per-window kernels to compile
    steps = hp.warmup_steps if hp.warmup_steps >= 0 else auto
    if steps == 0:
        return 0
    initial = dict(model=copy.deepcopy(raw_model.state_dict()),
                   optimizers=[copy.deepcopy(opt.state_dict()) for opt in optimizers])
    loader = make_train_loader(hp, rt)
    for step in range(steps):
        window.fill_(get_window_size_blocks(step, hp))
        train_step(forward, raw_model, optimizers, next(loader), step, hp, rt, window)
    raw_model.load_state_dict(initial["model"])
    for opt, state in zip(optimizers, initial["optimizers"]):
        opt.load_state_dict(state)
    rt.synchronize()
    return steps


def train(hp: Hyperparameters, rt: Runtime) -> float:
    code = Path(__file__).read_text(encoding="utf-8")
    for pattern in (hp.train_files, hp.val_files):  # fail before anything is written
        try:
            list_shards(repo_path(pattern))
        except DataError as e:
            script = "fineweb.py" if "fineweb10B" in pattern else "shakespeare.py" if "shakespeare" in pattern else ""
            raise DataError(f"{e}; create them with `python data/{script}`" if script else str(e)) from None
    check_data(hp, rt.world_size)
    logfile = open_log(hp, rt)
    run_dir = Path(hp.log_dir) / hp.run_id
    log_header(rt, logfile, hp, code)
    torch.manual_seed(hp.seed)
    np.random.seed(hp.seed % 2**32)
    raw_model, forward = build_model(hp, rt)
    optimizers = setup_optimizers(raw_model, hp, rt.rank, rt.world_size, compile_ns=rt.compile)
    params = sum(p.numel() for p in raw_model.parameters())
    print0(rt, f"preset:{hp.preset} device:{rt.device} dtype:{rt.autocast_dtype or torch.float32} "
               f"compile:{'model' if rt.compile else 'loss-head' if rt.compile_head else 'off'} "
               f"world_size:{rt.world_size} accumulation:{hp.rank_equivalents // rt.world_size} params:{params:,} "
               f"tokens/step:{hp.tokens_per_step:,} log:{logfile}", logfile)
    print0(rt, f"dtype_choice: {rt.dtype_reason}", logfile)
    window = torch.zeros((), dtype=torch.int32, device=rt.device)  # a tensor, so compile does not recompile
    warmed = warm_up(forward, raw_model, optimizers, hp, rt, window)
    if warmed:
        print0(rt, f"warm-up: {warmed} steps run and undone before the clock starts", logfile)
    if rt.master:
        run_dir.mkdir(parents=True, exist_ok=True)
    metrics = open(run_dir / "metrics.jsonl", "a") if rt.master else None
    loader = make_train_loader(hp, rt)
    data_pos, val_loss, val_step = None, None, None
    training_time_ms, t0 = 0.0, time.perf_counter()

    def save(step: int, time_ms: float) -> None:
        if rt.master and hp.save_checkpoint:
            save_checkpoint(run_dir / f"state_step{step:06d}.pt", step=step, model=raw_model, optimizers=optimizers,
                            hp=hp, code={"train_gpt.py": code}, data_position=data_pos, val_loss=val_loss,
                            val_step=val_step, train_time_ms=time_ms)

    for step in range(hp.num_iterations + 1):
        last_step = step == hp.num_iterations
        window.fill_(get_window_size_blocks(step, hp))
        if last_step or (hp.val_loss_every and step % hp.val_loss_every == 0):
            rt.synchronize()
            training_time_ms += 1000 * (time.perf_counter() - t0)  # the clock stops for checkpoints and validation
            if step > 0:
                save(step, training_time_ms)  # before validating, so a failed evaluation loses nothing
            val_loss, val_step = evaluate(forward, hp, rt, window, repo_path(hp.val_files)), step
            print0(rt, f"step:{step}/{hp.num_iterations} val_loss:{val_loss:.4f} train_time:{training_time_ms:.0f}ms "
                       f"step_avg:{training_time_ms / max(step, 1):.2f}ms", logfile)
            if metrics:
                metrics.write(json.dumps(dict(step=step, val_loss=val_loss, train_time_ms=training_time_ms)) + "\n")
                metrics.flush()
            if last_step and step > 0:
                save(step, training_time_ms)  # the final checkpoint carries its own val loss
            rt.synchronize()
            t0 = time.perf_counter()
        elif hp.save_every and step % hp.save_every == 0 and step > 0:
            save(step, training_time_ms + 1000 * (time.perf_counter() - t0))
        if last_step:
            break
        batch = next(loader)
        data_pos = batch[2]
        train_loss = train_step(forward, raw_model, optimizers, batch, step, hp, rt, window)
        if rt.distributed:
            train_loss = train_loss.clone()
            dist.all_reduce(train_loss, op=dist.ReduceOp.AVG)
        train_loss = float(train_loss)
        elapsed = training_time_ms + 1000 * (time.perf_counter() - t0)
        tok_s = hp.tokens_per_step * (step + 1) / (elapsed / 1000)
        print0(rt, f"step:{step + 1}/{hp.num_iterations} train_loss:{train_loss:.4f} train_time:{elapsed:.0f}ms "
                   f"step_avg:{elapsed / (step + 1):.2f}ms tok/s:{tok_s:.0f}", logfile)
        if metrics:
            metrics.write(json.dumps(dict(step=step + 1, train_loss=train_loss, train_time_ms=elapsed,
                                          lr_mult=get_lr(step, hp))) + "\n")
    if metrics:
        metrics.close()
    if rt.device.type == "cuda":
        print0(rt, f"peak memory allocated: {torch.cuda.max_memory_allocated() // 2**20} MiB", logfile)
    return val_loss


def refuse_library_only(hp: Hyperparameters) -> None:
    """This script is the May-2025 record: its plain loss and optimizer, log.txt only. The loss modifiers, plugins,
    trackers and the 2026 record's optimizer switches of the shared library are pretraining.py's, which takes the
    same flags."""
    for f in dataclasses.fields(Hyperparameters):
        if f.name in LIBRARY_ONLY and getattr(hp, f.name) != f.default:
            raise ConfigError(f"--{_flag(f.name)} is not in train_gpt.py (the May-2025 record: its plain loss and "
                              f"optimizer, log.txt only); `python pretraining.py` takes the same flags and has it")


def main(argv: list[str] | None = None) -> None:
    rt = None
    try:
        hp = load_config(argv)
        if hp.resume:
            raise ConfigError("train_gpt.py always starts fresh; continue its checkpoints with "
                              f"`python pretraining.py --resume {hp.resume}`")
        refuse_library_only(hp)
        rt = init_runtime(hp)
        hp.validate(rt.world_size)
        train(hp, rt)
    except (ConfigError, DataError) as e:
        print(f"train_gpt.py: error: {e}", file=sys.stderr)
        sys.exit(2)
    finally:
        if rt is not None and rt.distributed and dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
