"""The library: the speedrun GPT, Muon + Adam, shard data, tokenizer and chat format, checkpoints, schedules.

Every script in this repository builds from this file; runs.py (the harness) holds how a script starts, stops,
resumes and fails, and inference.py how a trained checkpoint runs (decode formats, caches, generation), reaching
the model only through two seams (a projection's decode format, a cache layer passed to attention). Importing it
does no work. The model and optimizer follow the May-2025 modded-nanogpt record
(12 layers, 1770 steps, val loss 3.28 on FineWeb in about 3 minutes on 8xH100), generalised to any size, any device
and any world size. The library raises errors; it never exits, and keeps no run state.

Sections, in order:
    Errors          every error class and the exit code scripts give it
    Config          Hyperparameters, presets, validation, coercion
    Runtime         device, torchrun ranks, autocast, compile, allocator, seeding
    Files           resolve_path (how a relative path is found), atomic_write
    Model           the GPT: attention and its masks, blocks, soft-capped loss, build_model
    Loss modifiers  label smoothing, z-loss, entropy, custom registered terms, token weights
    Muon optimizer  Newton-Schulz, Muon, the Adam groups, optimizer_step (the one step every training path takes)
    Data            token shards, checks, distributed_data_generator, doc_aligned_generator, evaluate
    Tokenizer       GPT-2 BPE, chat template v1, conversation files
    Checkpoints     save, load, restore, infer a config, find
    Schedules       learning rate, momentum, attention window

    python pretraining.py                      # CPU: Shakespeare preset; CUDA + FineWeb: speedrun preset
    torchrun --nproc_per_node=8 pretraining.py --preset speedrun
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import glob
import hashlib
import itertools
import json
import math
import os
import platform
import re
import sys
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable, Generator, Iterator

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

REPO_DIR = Path(__file__).resolve().parent


# -----------------------------------------------------------------------------
# Errors: every error class a user can cause or meet, and the exit code scripts give it
#
#   ConfigError      exit 2  a flag, environment variable, .env line or preset value is invalid
#   DataError        exit 2  a shard, text or conversation file is missing or malformed (names the file/record)
#   TokenizerError   exit 2  the GPT-2 ranks file is missing or is not the verified one
#   CheckpointError  exit 2  a checkpoint or run directory is missing, unreadable or does not fit
#   TrainingError    exit 1  a run cannot go on (non-finite loss, failed write); its good checkpoints are kept
# Scripts turn these into one line on stderr through runs.exit_policy / runs.exit_with; the library only raises.


class ConfigError(ValueError):
    """A user-supplied setting is invalid; the message names the flag."""


class DataError(ValueError):
    """A data file is missing or malformed; the message names the file."""


class TokenizerError(RuntimeError):
    """The GPT-2 BPE ranks cannot be found or fail their checksum."""


class CheckpointError(RuntimeError):
    """A checkpoint is missing, unreadable or does not fit the model; the message names the file."""


class TrainingError(RuntimeError):
    """A run cannot go on (non-finite loss, a lost rank, a failed write): one line, exit 1, good checkpoints kept."""


USER_ERRORS = (ConfigError, DataError, CheckpointError, TokenizerError)  # bad input: one line and exit 2


def first_line(error: BaseException, limit: int = 200) -> str:
    """An error as one line of at most `limit` characters, for messages that must stay one line."""
    text = (str(error).strip().splitlines() or [type(error).__name__])[0]
    return text if len(text) <= limit else text[:limit] + "..."


# -----------------------------------------------------------------------------
# Config: Hyperparameters, presets, validation, coercion of text and JSON values


def layer_list(text: str, name: str, num_layers: int) -> list[int]:
    """The layers of a comma-separated list field ("" = none), each checked against num_layers."""
    out = []
    for part in text.split(","):
        if not part.strip():
            continue
        try:
            layer = int(part)
        except ValueError:
            raise ConfigError(f"--{_flag(name)}={text!r}: {part.strip()!r} is not a layer number") from None
        if not 0 <= layer < num_layers or layer in out:
            raise ConfigError(f"--{_flag(name)}={text!r}: layer {layer} is out of range (0..{num_layers - 1}) or "
                              f"repeated")
        out.append(layer)
    return sorted(out)


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
    warmup_steps: int = -1  # steps run then undone to compile kernels off the clock; -1 = auto (warm_up_steps)
    device: str = "auto"  # auto (cuda, mps, cpu) or a torch device string
    dtype: str = "auto"  # autocast dtype: auto (bf16 where it pays), bf16 or fp32
    compile: str = "auto"  # torch.compile: on (whole model), head (the loss only), off; auto = on for CUDA and
    #   for CPU pretraining, else head
    fp8_head: str = "auto"  # FP8 lm_head matmul: auto (GPUs with compute capability >= 8.9), on, off
    collective_timeout: int = 600  # seconds a rank waits for the others in a collective before the run stops
    # experiment trackers: log.txt and metrics.jsonl are always written
    trackers: str = ""  # comma-separated: tensorboard, wandb; "" = none
    tracker_dir: str = ""  # where tracker files go: "" = the run directory, else DIR/<run_id>/
    wandb_project: str = "modded-nanogpt"  # W&B project; WANDB_MODE=offline records locally with no network

    # ---- validation -------------------------------------------------------
    def validate(self, world_size: int = 1) -> "Hyperparameters":
        """Raise ConfigError naming the flag when a value or a combination is invalid."""
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
        if self.num_layers % 2 and self.skip_topology == "unet":
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
            if self.window_block <= 0 or row % self.window_block or BLOCK_SIZE % self.window_block:
                raise ConfigError(f"--window-block={self.window_block} must be a positive divisor of {BLOCK_SIZE}, so "
                                  f"that it divides the row length {row} (--{_flag(name)} / --row-len) and every "
                                  f"padded sequence")
        if self.shuffle_rows and not self.row_len:
            raise ConfigError("--shuffle-rows needs --row-len > 0 (rows are the unit that is shuffled)")
        if self.shuffle_rows and self.doc_aligned:
            raise ConfigError("--shuffle-rows with --doc-aligned is not implemented (aligned rows are built from the "
                              "documents in order); pass --shuffle-rows false")
        if self.rank_equivalents % world_size:
            raise ConfigError(f"--rank-equivalents={self.rank_equivalents} must be divisible by the world size "
                              f"{world_size} (each process accumulates rank_equivalents / world_size micro-batches)")
        if self.val_tokens % (world_size * self.val_seq_len):
            raise ConfigError(f"--val-tokens={self.val_tokens} must be a multiple of world_size * --val-seq-len = "
                              f"{world_size * self.val_seq_len}")
        if not 0 <= self.adamw_weight_decay < math.inf:
            raise ConfigError(f"--adamw-weight-decay={self.adamw_weight_decay} must be >= 0")
        self._validate_optimizer()
        for name, choices in [("optimizer", ("muon", "adamw")), ("dtype", ("auto", "bf16", "fp32")),
                              ("logit_cap", LOGIT_CAPS),
                              ("compile", ("auto", "on", "head", "off")),
                              ("fp8_head", ("auto", "on", "off"))]:
            if getattr(self, name) not in choices:
                raise ConfigError(f"--{_flag(name)}={getattr(self, name)!r} must be one of {', '.join(choices)}")
        self._validate_loss()
        self._validate_schedule()
        self._validate_architecture()
        if not self.wandb_project.strip():
            raise ConfigError("--wandb-project must not be empty")
        if self.run_id and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}", self.run_id):
            raise ConfigError(f"--run-id={self.run_id!r} may hold only letters, digits, '.', '_' and '-'")
        return self

    def _validate_optimizer(self) -> None:
        """The 2026 record's optimizer switches: known names, values in range, and combinations that exist."""
        for name, choices in [("muon_orthogonalizer", tuple(ORTHOGONALIZERS)), ("adam_update", ("torch", "record")),
                              ("adam_table", ("2025", "2026")), ("muon_lr_mults", ("shape", "2026"))]:
            if getattr(self, name) not in choices:
                raise ConfigError(f"--{_flag(name)}={getattr(self, name)!r} must be one of {', '.join(choices)}")
        for name in ("muon_weight_decay", "adam_weight_decay"):
            if not 0 <= getattr(self, name) < math.inf:
                raise ConfigError(f"--{_flag(name)}={getattr(self, name)} must be >= 0 and finite")
        if not 0 <= self.normuon_beta2 < 1:
            raise ConfigError(f"--normuon-beta2={self.normuon_beta2} must be in [0, 1)")
        if self.adam_every < 1:
            raise ConfigError(f"--adam-every={self.adam_every} must be >= 1")
        for name, off in (("adam_every", 1), ("adam_weight_decay", 0.0)):
            if getattr(self, name) != off and self.adam_update != "record":
                raise ConfigError(f"--{_flag(name)}={getattr(self, name)} needs --adam-update record (torch's Adam "
                                  f"has no such setting here)")
        if not 0 <= self.muon_momentum_cooldown <= self.num_iterations:
            raise ConfigError(f"--muon-momentum-cooldown={self.muon_momentum_cooldown} must be in [0, "
                              f"--num-iterations={self.num_iterations}]")
        if self.muon_qk_head_groups < 0 or (self.muon_qk_head_groups and self.num_heads % self.muon_qk_head_groups):
            raise ConfigError(f"--muon-qk-head-groups={self.muon_qk_head_groups} must be 0 or divide --num-heads="
                              f"{self.num_heads}")

    def _validate_schedule(self) -> None:
        if not 0 <= self.lr_floor <= 1:
            raise ConfigError(f"--lr-floor={self.lr_floor} must be in [0, 1] (a multiplier of the peak LR)")
        if self.stage_schedule and self.stage_schedule not in STAGE_SCHEDULES:
            raise ConfigError(f"--stage-schedule={self.stage_schedule!r} must be empty (none) or one of "
                              f"{', '.join(STAGE_SCHEDULES)}")
        if self.yarn and not self.stage_schedule:
            raise ConfigError("--yarn needs --stage-schedule (it rescales the rotary when the stages' window grows)")
        for name in ("mtp", "prefix_token"):
            if getattr(self, name) and not self.stage_schedule:
                raise ConfigError(f"--{_flag(name)} needs --stage-schedule (its weights are the stages')")
            if getattr(self, name) and loss_modifiers(self):
                raise ConfigError(f"--{_flag(name)} with loss modifiers is not implemented (the extra targets "
                                  f"would need their own token weights)")
        if self.tie_embed and not self.stage_schedule:
            raise ConfigError("--tie-embed needs --stage-schedule (the tied matrix splits at a stage's start)")
        if self.stage_schedule:
            scheduled = len(STAGE_SCHEDULES[self.stage_schedule]) - 1
            if any(end <= start for start, end in stage_boundaries(self)[:scheduled]):
                raise ConfigError(f"--stage-schedule={self.stage_schedule} has {scheduled} stages of at least one "
                                  f"step each: --num-iterations={self.num_iterations} is too short")

    def _validate_architecture(self) -> None:
        """The 2026 record's architecture switches: sizes, layer lists and the combinations that exist."""
        for name in ("bigram_rows", "bigram_dim", "bigram_sign_rows"):
            if getattr(self, name) < 0:
                raise ConfigError(f"--{_flag(name)}={getattr(self, name)} must be >= 0")
        if self.bigram_rows == 1:
            raise ConfigError("--bigram-rows=1 leaves no row besides the reserved one (the first position's); use 0 "
                              "(off) or at least 2")
        if self.bigram_dim > self.model_dim:
            raise ConfigError(f"--bigram-dim={self.bigram_dim} must be at most --model-dim={self.model_dim}")
        for name in ("bigram_dim", "bigram_sign_rows"):
            if getattr(self, name) and not self.bigram_rows:
                raise ConfigError(f"--{_flag(name)} needs --bigram-rows > 0 (the bigram hash embedding)")
        for name, choices in (("bigram_update", ("dense", "rows")), ("skip_topology", ("unet", "gated"))):
            if getattr(self, name) not in choices:
                raise ConfigError(f"--{_flag(name)}={getattr(self, name)!r} must be one of {', '.join(choices)}")
        if self.bigram_update == "rows" and self.adam_every > 1:
            raise ConfigError(f"--bigram-update rows steps every step: it does not take --adam-every="
                              f"{self.adam_every} (use --bigram-update dense)")
        lists = {name: layer_list(getattr(self, name), name, self.num_layers)
                 for name in ("value_embed_layers", "long_window_layers", "xsa_layers", "paired_head_layers")}
        for name in ("xsa_layers", "paired_head_layers"):
            if self.no_attn_layer in lists[name]:
                raise ConfigError(f"--{_flag(name)} names layer {self.no_attn_layer}, which has no attention "
                                  f"(--no-attn-layer)")
        both = sorted(set(lists["xsa_layers"]) & set(lists["paired_head_layers"]))
        if both:
            raise ConfigError(f"--xsa-layers and --paired-head-layers share layer {both[0]}: XSA on paired heads is "
                              f"not defined (the record skips it: a paired head's output mixes two heads' values)")
        if lists["paired_head_layers"] and self.num_heads % 2:
            raise ConfigError(f"--paired-head-layers needs an even --num-heads, not {self.num_heads}")
        if self.skip_topology == "gated":
            if not 0 <= self.gated_skip_from < self.no_attn_layer:
                raise ConfigError(f"--skip-topology gated adds layer --gated-skip-from={self.gated_skip_from}'s output "
                                  f"where --no-attn-layer={self.no_attn_layer} has no attention: it needs "
                                  f"0 <= --gated-skip-from < --no-attn-layer")
        if not -1 <= self.backout_layer < self.num_layers:
            raise ConfigError(f"--backout-layer={self.backout_layer} must be -1 (off) or a layer below "
                              f"--num-layers={self.num_layers}")
        if self.model_dim < GATE_INPUTS and (self.smear or self.attn_gate or self.value_embed_gates
                                             or self.skip_topology == "gated"):
            raise ConfigError(f"--model-dim={self.model_dim}: the gates read {GATE_INPUTS} channels")

    def _validate_loss(self) -> None:
        if not 0 <= self.label_smoothing < 1:
            raise ConfigError(f"--label-smoothing={self.label_smoothing} must be in [0, 1)")
        if not 0 <= self.z_loss < math.inf:
            raise ConfigError(f"--z-loss={self.z_loss} must be >= 0 and finite")
        if not math.isfinite(self.entropy_weight):
            raise ConfigError(f"--entropy-weight={self.entropy_weight} must be finite")
        if self.loss_normalization not in ("token", "sequence"):
            raise ConfigError(f"--loss-normalization={self.loss_normalization!r} must be one of token, sequence")
        parse_loss_terms(self.loss_terms)
        if self.head_chunk < 0:
            raise ConfigError(f"--head-chunk={self.head_chunk} must be >= 0 (positions per chunk; 0 = whole)")
        if self.head_chunk and loss_modifiers(self):
            raise ConfigError("--head-chunk with loss modifiers is not implemented (their terms need the whole "
                              "logits)")

    @property
    def tokens_per_step(self) -> int:
        """The global batch: fixed in tokens whatever the world size."""
        return self.rank_equivalents * self.train_seq_len

    @property
    def max_seq_len(self) -> int:
        """Longest row the model sees: the rotary table is built this long."""
        return self.row_len or max(self.train_seq_len, self.val_seq_len)

    # ---- JSON round trip --------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Hyperparameters":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            names = ", ".join(k if k.isprintable() else repr(k) for k in unknown)  # one line, whatever the keys
            raise ConfigError(f"unknown hyperparameter(s): {names}")
        return cls(**{k: _coerce(k, v) for k, v in d.items()})


# Named presets: only the fields that differ from the dataclass defaults (which are the speedrun record).
PRESETS: dict[str, dict[str, Any]] = {
    # May-2025 record: 12 layers, 6x128 heads, dim 768, 48k tokens x 8 ranks, 1770 steps, FineWeb.
    "speedrun": {},
    # CPU-sized: `python pretraining.py` on 2 cores in minutes. Chosen by equal-time runs on 2 cores against
    # shorter steps, a wider or deeper model (the 50k-vocab head dominates the step), the record's sequential data
    # stream, other Adam and Muon LRs, momentum warm-ups and cooldowns (docs/measurements.md, "How the preset was
    # chosen").
    "shakespeare": dict(
        train_files="data/shakespeare/shakespeare_train_*.bin", val_files="data/shakespeare/shakespeare_val_*.bin",
        val_tokens=32_768, train_seq_len=4096, val_seq_len=8192, row_len=256, rank_equivalents=2,
        shuffle_rows=True, num_layers=6, num_heads=4, head_dim=64, model_dim=256, no_attn_layer=-1,
        window_max=256, num_iterations=75, cooldown_frac=0.4, muon_momentum_warmup=100, val_loss_every=25,
        head_lr=0.11, embed_lr=0.3, scalar_lr=0.02,
    ),
}
# The 2026 record's recipe at CPU scale, built up one issue at a time (docs/optimizer.md, "Measurements"): the
# `shakespeare` preset plus the 2026 switches whose combination beat it by more than the seed spread at equal
# training time (NorMuon and row equilibration also did alone; the other three only together).
# What `python pretraining.py` runs without CUDA and FineWeb.
PRESETS["shakespeare2026"] = dict(
    PRESETS["shakespeare"],
    # the 2026 record's Muon: Polar Express (#38), NorMuon (#41), cautious decay at the record's 1.2 (#43), Q and K
    # orthogonalised per pair of heads (#80); and nanochat's MuonEq row equilibration (4e014d3)
    muon_orthogonalizer="polar_express", normuon=True, cautious_weight_decay=True, muon_weight_decay=1.2,
    muon_qk_head_groups=2, muon_row_equilibration=True,
)
# Record #89 (f411b3d3, 1285 steps to 3.28 on 8xH100) without its MUDD connections and gates (records #81, #85),
# its dynamically composable attention (#85) and its FP8/Triton kernels (MLP FP8, #84/#89; fused ReLU^2 and
# cross-entropy kernels, #59/#60/#79; FlashAttention 3 varlen, #29: FlexAttention's block masks here), with the
# earlier, scalar forms of the gates MUDD replaced (record #84: x0 and bigram lambdas, XSA alphas; #80: backout,
# skip gate, sparse attention gates on every layer). Composed from the three recipe issues: the optimizer (25),
# the schedule, head and loss (26) and the architecture (27). docs/architecture.md.
PRESETS["speedrun2026"] = dict(
    # data: 8 ranks x 16k tokens in stage 1 (record: 8 * 2048 * 8), BOS-aligned rows; the stages add micro-batches
    train_seq_len=16 * 1024, doc_aligned=True,
    # model (record #89): 11 layers, attention skipped on layer 6 (#35), and the 2026 parts
    num_layers=11, no_attn_layer=6, bigram_rows=50304 * 15 // 2, bigram_sign_rows=8192, smear=True,
    value_embed_layers="1,2,8,9,10", value_embed_gates=True, residual_lambdas=True, skip_topology="gated",
    gated_skip_from=3, backout_layer=7, long_window_layers="3,10", key_offset=True, xsa_layers="1,3,4,7,8,10",
    attn_gate=True, paired_head_layers="0,2,5,9",
    # schedule, head and loss (record #89): 1270 scheduled + 15 extension steps, cooldown 0.6 to an LR floor of 0.15
    num_iterations=1285, cooldown_frac=0.6, lr_floor=0.15, stage_schedule="2026", mtp=True, prefix_token=True,
    tie_embed=True, logit_cap="2026", yarn=True, val_loss_every=250,
    # optimizer (record #89's NorMuonAndAdam): NorMuon with Polar Express at LR 0.023, cautious decay 1.2, Q/K per
    # head pair; Adam with the record's arithmetic and table, decay 0.005, every other step; momentum cooldown 50
    muon_lr=0.023, muon_orthogonalizer="polar_express", normuon=True, cautious_weight_decay=True,
    muon_weight_decay=1.2, muon_qk_head_groups=2, muon_lr_mults="2026", muon_momentum_cooldown=50,
    adam_update="record", adam_table="2026", adam_weight_decay=0.005, adam_every=2,
)
# The corpus each preset trains on: what pretraining.py may build or suggest, and which prompts eval.py samples.
PRESET_CORPUS = {"speedrun": "fineweb", "shakespeare": "shakespeare", "shakespeare2026": "shakespeare",
                 "speedrun2026": "fineweb"}


def preset_data(hp: Hyperparameters) -> str | None:
    """The corpus (PRESET_CORPUS) of hp.preset while this config's train and val files are still that preset's,
    else None (the user's data). Decides whether pretraining.py may build the Shakespeare shards, which download
    it suggests, and which sample prompts eval.py uses."""
    own = {**{f: getattr(Hyperparameters, f) for f in ("train_files", "val_files")}, **PRESETS.get(hp.preset, {})}
    same = (hp.train_files, hp.val_files) == (own["train_files"], own["val_files"])
    return PRESET_CORPUS[hp.preset] if hp.preset in PRESETS and same else None


def _flag(name: str) -> str:
    return name.replace("_", "-")


def _parse_bool(text: str) -> bool:
    low = text.strip().lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"expected true/false, got {text!r}")


def _coerce(name: str, value: Any) -> Any:
    """Convert a string (CLI, env) or JSON value to the field's annotated type, naming the field on failure."""
    kind = {f.name: f.type for f in dataclasses.fields(Hyperparameters)}[name]
    try:
        if kind in ("bool", bool):
            return value if isinstance(value, bool) else _parse_bool(str(value))
        if kind in ("int", int):
            if isinstance(value, float) or isinstance(value, bool):
                raise ValueError(f"expected an integer, got {value!r}")
            return int(str(value).strip())  # Python's own rules: 1_000 yes, 1__0 no
        if kind in ("float", float):
            if isinstance(value, bool):
                raise ValueError(f"expected a number, got {value!r}")
            return float(value)
        if not isinstance(value, str):
            raise ValueError(f"expected text, got {value!r}")
        return value
    except (TypeError, ValueError) as e:
        raise ConfigError(f"--{_flag(name)}: invalid value {value!r} ({e})") from None


# -----------------------------------------------------------------------------
# Runtime: device, torchrun ranks, autocast, compile, allocator, seeding


@dataclass
class Runtime:
    device: torch.device
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    autocast_dtype: torch.dtype | None = None  # None = fp32
    dtype_reason: str = ""  # why this dtype (choose_autocast), for the run header
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
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
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


@dataclass(frozen=True)
class DtypeChoice:
    dtype: torch.dtype | None  # autocast dtype; None = fp32
    reason: str  # why, for the run header


def cpu_model_name() -> str:
    """The CPU's model name and its bf16 instruction sets, from /proc/cpuinfo."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.machine()
    name = re.search(r"^model name\s*:\s*(.*)$", info, re.MULTILINE)
    return " ".join([name.group(1).strip() if name else platform.machine(),
                     *sorted(set(re.findall(r"\b(avx512_bf16|amx_bf16)\b", info)))])


def bf16_speedup(model_dim: int, vocab: int, rows: int = 128, repeats: int = 2) -> float:
    """fp32 seconds over bf16 seconds of the products that dominate a CPU training step of this shape: the lm_head's
    forward (rows, dim) x (dim, vocab) and input gradient (rows, vocab) x (vocab, dim), and an MLP product; the best
    of `repeats` after one untimed call, well under a second on 2 cores. CPUs with the same instruction sets differ
    here: an AVX-512 BF16 CPU without AMX ran bf16 slower than fp32 (docs/measurements.md, "CPU autocast")."""
    g = torch.Generator().manual_seed(0)
    shapes = ((rows, model_dim), (vocab, model_dim), (rows, vocab), (4 * model_dim, model_dim))
    tensors = [torch.randn(*shape, generator=g) for shape in shapes]

    def seconds(dtype: torch.dtype) -> float:
        x, w, dy, w_mlp = (t.to(dtype) for t in tensors)
        times = []
        for _ in range(repeats + 1):
            start = time.perf_counter()
            F.linear(x, w), dy @ w, F.linear(x, w_mlp)
            times.append(time.perf_counter() - start)
        return min(times[1:])

    return seconds(torch.float32) / seconds(torch.bfloat16)


def cpu_dtype_choice(model_dim: int, vocab: int) -> DtypeChoice:
    """--dtype auto on a CPU: fp32 without bf16 instructions; otherwise bf16 where a probe of this model's products
    (bf16_speedup) finds it at least BF16_MIN_SPEEDUP times as fast as fp32. The probe's answer is kept per machine,
    torch version and shape under $XDG_CACHE_HOME (~/.cache)/modded-nanogpt/, the first process to write it winning
    (write_once), so every run on a machine, a resumed one included, makes the same choice."""
    machine = cpu_model_name()
    if not re.search(r"\b(avx512_bf16|amx_bf16)\b", machine):
        return DtypeChoice(None, "auto: fp32, this CPU has no bf16 instructions (avx512_bf16, amx_bf16)")
    key = f"{machine} | torch {torch.__version__} | dim {model_dim} vocab {vocab}"
    root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "modded-nanogpt"
    path = root / f"cpu_dtype_{hashlib.sha256(key.encode()).hexdigest()[:16]}.json"
    try:
        speedup = float(json.loads(path.read_text())["speedup"])
    except (OSError, ValueError, KeyError, TypeError):
        speedup = round(bf16_speedup(model_dim, vocab), 2)
        try:  # another process's answer where it was written first
            speedup = float(json.loads(write_once(path, json.dumps(dict(key=key, speedup=speedup))))["speedup"])
        except (OSError, ValueError, KeyError, TypeError):
            pass  # a damaged cache file: this run's own probe decides
    dtype = torch.bfloat16 if speedup >= BF16_MIN_SPEEDUP else None
    return DtypeChoice(dtype, f"auto: {'bf16' if dtype else 'fp32'}, bf16 products ran {speedup:.2f}x fp32's speed in "
                              f"a probe of this model's shapes on this CPU ({path})")


def choose_autocast(choice: str, device: torch.device, model_dim: int = 768, vocab: int = 50304) -> DtypeChoice:
    """The autocast dtype of --dtype and why: bf16 or fp32 as given; auto: bf16 on CUDA GPUs that support it, the
    probe's choice on a CPU (cpu_dtype_choice), fp32 elsewhere."""
    if choice != "auto":
        return DtypeChoice(torch.bfloat16 if choice == "bf16" else None, f"--dtype {choice}")
    if device.type == "cuda":
        ok = torch.cuda.is_bf16_supported()
        return DtypeChoice(torch.bfloat16 if ok else None, f"auto: {'bf16' if ok else 'fp32, no bf16'} on this GPU")
    if device.type == "cpu":
        return cpu_dtype_choice(model_dim, vocab)
    return DtypeChoice(None, f"auto: fp32 on {device.type}")


def keep_freed_memory() -> bool:
    """Ask glibc's malloc to keep freed memory for reuse instead of returning it to the kernel.

    By default every block above 32 MB (logits, activations, their gradients) is mmap'ed and unmapped again when
    freed, so each training step page-faults gigabytes of fresh, zeroed pages, a large part of a CPU step
    (docs/measurements.md, "Allocator: freed memory kept"). PyTorch's
    CPU tuning guide gives the same advice (jemalloc or tcmalloc); mallopt does it without a preloaded library.
    False (and no change) where the C library is not glibc."""
    if not sys.platform.startswith("linux"):
        return False
    import ctypes

    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):  # musl and other C libraries
        return False
    m_trim_threshold, m_mmap_max = -1, -4  # <malloc.h>
    # no mmap'ed blocks: large ones come from the heap and are reused; trim the heap only past 2 GB free at its top
    return bool(mallopt(m_mmap_max, 0)) and bool(mallopt(m_trim_threshold, 2**31 - 1))


def init_runtime(hp: Hyperparameters, whole_model_on_cpu: bool = False) -> Runtime:
    """Read torchrun's RANK / WORLD_SIZE / LOCAL_RANK; plain python is one process with no process group.
    whole_model_on_cpu: --compile=auto compiles the whole model on CPU too (training: runs of fixed shapes, where it
    pays: docs/measurements.md, "Whole-model compile"); otherwise (benchmarks, short jobs) CPU compiles only the
    loss head, which repays its compile in seconds."""
    rank, world_size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = detect_device(hp.device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if device.type == "cpu":
        keep_freed_memory()
        # compiled CPU kernels otherwise scatter-add (embedding gradients) with atomic adds whose order varies run
        # to run, so two identical compiled runs drifted apart; the flag's cost was within noise
        # (docs/measurements.md, "Determinism")
        torch.use_deterministic_algorithms(True, warn_only=True)
    if world_size > 1 and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        # a bounded wait: a rank that dies or hangs stops the others with an error instead of a silent hang
        dist.init_process_group(backend=backend, device_id=device if backend == "nccl" else None,
                                timeout=timedelta(seconds=hp.collective_timeout))
    whole = device.type == "cuda" or (whole_model_on_cpu and device.type == "cpu")
    dtype = shared_choice(lambda: choose_autocast(hp.dtype, device, hp.model_dim,
                                                  next_multiple_of_n(hp.vocab_size, n=128)),
                         world_size > 1 and device.type == "cpu" and hp.dtype == "auto")
    return Runtime(device=device, rank=rank, local_rank=local_rank, world_size=world_size,
                   autocast_dtype=dtype.dtype, dtype_reason=dtype.reason,
                   compile=hp.compile == "on" or (hp.compile == "auto" and whole),
                   compile_head=hp.compile == "head" or (hp.compile == "auto" and not whole))


def shared_choice(choose: Callable[[], DtypeChoice], distributed: bool) -> DtypeChoice:
    """Rank 0's choice on every rank: a CPU probe on each rank (or node) could choose otherwise; one broadcast."""
    if not distributed:
        return choose()
    box = [None]
    if dist.get_rank() == 0:
        choice = choose()
        box = [(choice.dtype is not None, choice.reason)]
    dist.broadcast_object_list(box, src=0)
    bf16, reason = box[0]
    return DtypeChoice(torch.bfloat16 if bf16 else None, reason)


def compile_with_fallback(fn: Any, name: str, dynamic: bool | None = False) -> Any:
    """torch.compile(fn), but run fn eagerly (with one warning) if compiling fails, e.g. no C++ compiler. fn may be
    a function or a module. An error that eager raises too is the caller's, not the compiler's: it propagates and
    the compiled version stays. dynamic=False: one kernel per shape (Newton-Schulz: a few); None: torch's
    automatic dynamic shapes (a size that changes is recompiled once as a symbol)."""
    import warnings

    state = {"fn": torch.compile(fn, dynamic=dynamic)}

    def call(*args: Any, **kwargs: Any) -> Any:
        try:
            return state["fn"](*args, **kwargs)
        except Exception as e:  # noqa: BLE001 - any compiler failure; eager gives the same numbers, slower
            if state["fn"] is fn:
                raise
            out = fn(*args, **kwargs)  # forward and Newton-Schulz are pure: running them again is safe
            warnings.warn(f"torch.compile of {name} failed ({type(e).__name__}: {first_line(e)}); "
                          "running it eagerly")
            state["fn"] = fn
            return out

    return call


class CompiledModule(nn.Module):
    """A module called through compile_with_fallback; train() / eval() reach the wrapped module, whose mode the
    compiled graphs are guarded on."""

    def __init__(self, module: nn.Module, name: str):
        super().__init__()
        self.module = module
        self.call = compile_with_fallback(module, name)

    def forward(self, *args: Any) -> Any:
        return self.call(*args)


def shutdown_runtime(rt: Runtime, barrier: bool = False) -> None:
    """Leave the process group. barrier (a run's normal end): first wait for every rank, so that none exits while
    another still works (rank 0 writing the final checkpoint) and torchrun's agents on every node see their ranks
    end together; a rank that died meanwhile makes it raise, as any collective does."""
    if rt.distributed and dist.is_initialized():
        try:
            if barrier:
                dist.barrier()
        finally:
            dist.destroy_process_group()


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)


# -----------------------------------------------------------------------------
# Files: how a relative path is found; atomic writes (a reader or a crash sees the old file or the complete new one)


def resolve_path(name: str | Path) -> Path:
    """The one rule for every flag that names an input file or a glob of files (data, checkpoints, conversations,
    texts): a relative path is looked up from the working directory first, then from the repository, so that the
    documented defaults work from any directory; when neither holds anything it is returned as given, and the
    error that follows names what the user typed."""
    path = Path(name)
    if path.is_absolute() or path.exists() or glob.glob(str(path)):
        return path
    in_repo = REPO_DIR / path
    return in_repo if in_repo.exists() or glob.glob(str(in_repo)) else path


@contextlib.contextmanager
def atomic_write(path: str | Path, mode: str = "wb") -> Iterator[Any]:
    """Write to a hidden temporary file beside `path`, fsync, then rename over `path`: a reader (or a crash, or
    kill -9, or a full disk) sees the old file or the complete new one, never a partial one."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, mode, encoding=None if "b" in mode else "utf-8") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)  # the rename itself survives a power cut
    finally:
        tmp.unlink(missing_ok=True)


def write_once(path: Path, text: str) -> str:
    """Create `path` holding `text` unless it exists; returns what the file holds then (the text of whichever
    process created it first), or `text` where nothing can be written. Written whole to a temporary file and linked
    into place, so a reader never sees half of it."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(text)
        os.link(tmp, path)
    except FileExistsError:
        return path.read_text()
    except OSError:
        pass
    finally:
        tmp.unlink(missing_ok=True)
    return text


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # e.g. Windows, which cannot open directories
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# -----------------------------------------------------------------------------
# Model: the speedrun GPT (attention masks, value embeddings, U-net skips, soft-capped loss)

BLOCK_SIZE = 128  # attention block size of FlexAttention block masks; window sizes count these blocks
#   (--window-block changes the window unit on CPU; FlexAttention's kernels tile in 128-token blocks)
ATTN_SCALE = 0.12  # fixed logit scale instead of 1/sqrt(head_dim) (2025 record); --yarn multiplies it
EOT_ID = 50256  # <|endoftext|>: starts every document, so attention never crosses it


def next_multiple_of_n(v: float | int, *, n: int) -> int:
    return n * max(1, math.ceil(v / n))


def norm(x: Tensor) -> Tensor:
    return F.rms_norm(x, (x.size(-1),))


def _register_fp8_ops() -> None:
    """Define the FP8 matmul custom op on first use (CUDA only), not at import; train_gpt.py defines the same op."""
    if hasattr(torch.ops.moddedgpt, "fp8_mm"):
        return

    @torch.library.custom_op("moddedgpt::fp8_mm", mutates_args=())
    def fp8_mm(x: Tensor, w: Tensor, x_s: float, w_s: float, grad_s: float) -> tuple[Tensor, Tensor, Tensor]:
        x_f8 = x.div(x_s).to(torch.float8_e4m3fn)
        w_f8 = w.div(w_s).to(torch.float8_e4m3fn)
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
    """Bias-free linear whose weight stays fp32 (autocast casts it); optional FP8 matmul for lm_head in training.
    decode: a decode format attached from outside (inference.py: the weight rounded to bf16 or int8, one-row
    kernels), called with the weight instead of the plain product; None in training."""

    def __init__(self, in_features: int, out_features: int, x_s: float = 1.0, w_s: float = 1.0,
                 grad_s: float = 1.0):
        super().__init__(in_features, out_features, bias=False)
        self.use_fp8 = False  # switched on by GPT.enable_fp8_head on supporting GPUs
        self.x_s, self.w_s, self.grad_s = x_s, w_s, grad_s
        self.decode: Callable[[Tensor, Tensor], Tensor] | None = None  # inference.set_inference_weights

    def reset_parameters(self) -> None:
        std = 0.5 * self.in_features**-0.5  # 0.5 beats the default 1/sqrt(3) (record)
        bound = 3**0.5 * std
        with torch.no_grad():
            self.weight.uniform_(-bound, bound)

    def forward(self, x: Tensor) -> Tensor:
        if self.use_fp8 and self.training:
            flat = x.flatten(0, -2).contiguous()
            out = torch.ops.moddedgpt.fp8_mm(flat, self.weight, self.x_s, self.w_s, self.grad_s)[0]
            return out.reshape(*x.shape[:-1], -1)
        return linear(x, self.weight, self.decode)


def linear(x: Tensor, weight: Tensor, decode: Callable[[Tensor, Tensor], Tensor] | None = None) -> Tensor:
    """x @ weight.T in x's dtype, or what the decode format attached to the layer computes instead."""
    return F.linear(x, weight.type_as(x)) if decode is None else decode(x, weight)


def rotary_freqs(head_dim: int, device: torch.device | str = "cpu") -> Tensor:
    """(head_dim/2,) angular frequencies of half-truncated RoPE: half the pairs rotate with base 1024 frequencies,
    the other half not at all (record)."""
    freqs = (1 / 1024) ** torch.linspace(0, 1, steps=head_dim // 4, dtype=torch.float32, device=device)
    return torch.cat([freqs, freqs.new_zeros(head_dim // 4)])


class Rotary(nn.Module):
    """RoPE tables (cos, sin) for rotary_freqs, or for the frequencies YaRN rescaled (set_freqs)."""

    def __init__(self, head_dim: int, max_seq_len: int):
        super().__init__()
        self.head_dim = head_dim
        self.freqs: Tensor | None = None  # None = rotary_freqs, computed on the table's device; else YaRN's (CPU)
        cos, sin = self._table(max_seq_len, torch.device("cpu"))
        self.cos = nn.Buffer(cos, persistent=False)
        self.sin = nn.Buffer(sin, persistent=False)

    def _table(self, length: int, device: torch.device) -> tuple[Tensor, Tensor]:
        freqs = rotary_freqs(self.head_dim, device) if self.freqs is None else self.freqs.to(device)
        theta = torch.outer(torch.arange(length, dtype=torch.float32, device=device), freqs)  # (T, D/2)
        return theta.cos(), theta.sin()

    def set_freqs(self, freqs: Tensor | None) -> None:
        """Rebuild the tables for these frequencies (None: the base ones) in place, at their length and device, so
        a compiled model keeps reading the same buffers."""
        self.freqs = freqs
        cos, sin = self._table(self.cos.size(0), self.cos.device)
        self.cos.copy_(cos)
        self.sin.copy_(sin)

    def ensure_length(self, length: int) -> None:
        """Grow the table for generation past the training length. RoPE is relative and attention is windowed,
        so positions beyond the rows seen in training only add offsets the model has seen; existing entries of
        the table are recomputed bit for bit."""
        if length > self.cos.size(0):
            self.cos, self.sin = self._table(next_multiple_of_n(length, n=BLOCK_SIZE), self.cos.device)

    def _check_length(self, end: int) -> None:
        if end > self.cos.size(0):
            if torch.compiler.is_compiling():
                raise ValueError(f"sequence of {end} tokens exceeds the rotary table ({self.cos.size(0)}); call "
                                 f"GPT.ensure_positions before compiling")
            self.ensure_length(end)

    def forward(self, x_BTHD: Tensor, offset: int | Tensor = 0) -> Tensor:
        """offset: the first token's position; a (1,) tensor for one token at a time (a decoding step), so that a
        compiled step does not specialise on the position. Eagerly, a longer sequence than the table grows it;
        compiled code gets a table long enough from ensure_positions (the scripts call it before compiling)."""
        T = x_BTHD.size(-3)
        if isinstance(offset, Tensor):
            cos, sin = self.cos[offset][None, :, None, :], self.sin[offset][None, :, None, :]
        else:
            self._check_length(offset + T)
            cos = self.cos[None, offset:offset + T, None, :]
            sin = self.sin[None, offset:offset + T, None, :]
        return rotate(x_BTHD, cos, sin)

    def paired(self, x_BTHD: Tensor, offset: int | Tensor = 0) -> Tensor:
        """The rotation of a paired-head layer (record #58): head h of token t at position 2t + h % 2 of the
        interleaved sequence. Record quirk, reproduced: the record rotates in its (H/2, 2D) view of the heads, so
        adjacent heads 2j, 2j+1 take positions 2t, 2t+1, while pair_heads places heads h < H/2 at 2t and the others
        at 2t+1: heads 1 and 4 of 6 are rotated for the other slot of their token."""
        B, T, H, _ = x_BTHD.shape
        t = torch.arange(T, device=x_BTHD.device) + offset
        if not isinstance(offset, Tensor):
            self._check_length(2 * (offset + T))
        pos_TH = 2 * t[:, None] + torch.arange(H, device=x_BTHD.device)[None] % 2
        return rotate(x_BTHD, self.cos[pos_TH][None], self.sin[pos_TH][None])

    def still_dims(self) -> Tensor:
        """(head_dim,) True where the rotary leaves a channel unrotated (half-truncated RoPE's zero frequencies)."""
        still = rotary_freqs(self.head_dim, self.cos.device) == 0
        return torch.cat([still, still])


def rotate(x_BTHD: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """RoPE on channel pairs (i, i + D/2) with tables broadcastable to (B, T, H, D/2)."""
    x1, x2 = x_BTHD.float().chunk(2, dim=-1)
    y1 = x1 * cos + x2 * sin
    y2 = x2 * cos - x1 * sin
    return torch.cat((y1, y2), dim=-1).type_as(x_BTHD)


AttnMask = Any  # a FlexAttention BlockMask on CUDA, a boolean (B, 1, T, T) tensor elsewhere


def attention(q_BHTD: Tensor, k_BHTD: Tensor, v_BHTD: Tensor, mask: AttnMask, scale: float) -> Tensor:
    """The single attention entry point: FlexAttention for block masks, SDPA for boolean masks."""
    if isinstance(mask, Tensor):
        return F.scaled_dot_product_attention(q_BHTD, k_BHTD, v_BHTD, attn_mask=mask, scale=scale)
    from torch.nn.attention.flex_attention import flex_attention

    return flex_attention(q_BHTD, k_BHTD, v_BHTD, block_mask=mask, scale=scale)


# The 2026 record's architecture parts (issue 27, docs/architecture.md): each one off unless its field is set.
GATE_INPUTS = 12  # record #28 (PR 117): the sparse gates (attention output, smear, skip) read 12 input channels
VE_GATE_INPUTS = 6  # record #70 (PR 218): a value-embedding gate reads 6 channels of x and 6 of the embedding
BIGRAM_MULTS = (36313, 27191)  # record #62 (PR 201), get_bigram_hash: multipliers of the token and the one before
BIGRAM_LAMBDA_INIT = 0.05  # record #62 (bigram_lambdas): each layer's share of the bigram embedding at init
BIGRAM_SIGN_SEED = 299  # seed of the sign trick's +-1 table (ours; the record draws it from its run's RNG)
RESID_LAMBDA_INIT = 1.1**0.5  # record #73 on (resid_lambdas): sqrt(1.1) per sublayer, 1.1 per layer
SKIP_LAMBDA_INIT = -1.5  # record #55 (skip_lambda): sigmoid(-1.5) ~ 0.18 of the gated skip at init
BACKOUT_INIT = 0.5  # record #40 (PR 140): backout_lambda
VE_INIT_STD = 0.01  # record #65 (@photomz): gated value embeddings drawn N(0, 0.01^2)
SA_LAMBDAS_INIT = (0.5, 1.0)  # record #47 (sa_lambdas): scales of the attention's values and of its output


@dataclass(frozen=True)
class Architecture:
    """The 2026 record's architecture switches as the GPT reads them (Hyperparameters has their documentation);
    the default is the 2025 record's GPT, built and computed exactly as before these switches existed."""

    bigram_rows: int = 0
    bigram_dim: int = 0  # 0 = model_dim
    bigram_sign_rows: int = 0
    smear: bool = False
    value_embed_layers: tuple[int, ...] | None = None  # None = value_embed_layout's 2025 sharing
    value_embed_gates: bool = False
    residual_lambdas: bool = False
    gated_skip: tuple[int, int] | None = None  # (source layer, layer it is added to); None = U-net skips
    backout_layer: int = -1
    long_window_layers: tuple[int, ...] | None = None  # None = long_window_layers' 2025 rule
    key_offset: bool = False
    xsa_layers: tuple[int, ...] = ()
    attn_gate: bool = False
    paired_head_layers: tuple[int, ...] = ()

    @classmethod
    def from_hparams(cls, hp: "Hyperparameters") -> "Architecture":
        def layers(name: str) -> tuple[int, ...]:
            return tuple(layer_list(getattr(hp, name), name, hp.num_layers))

        return cls(bigram_rows=hp.bigram_rows, bigram_dim=hp.bigram_dim, bigram_sign_rows=hp.bigram_sign_rows,
                   smear=hp.smear, value_embed_layers=layers("value_embed_layers") or None,
                   value_embed_gates=hp.value_embed_gates, residual_lambdas=hp.residual_lambdas,
                   gated_skip=(hp.gated_skip_from, hp.no_attn_layer) if hp.skip_topology == "gated" else None,
                   backout_layer=hp.backout_layer, long_window_layers=layers("long_window_layers") or None,
                   key_offset=hp.key_offset, xsa_layers=layers("xsa_layers"), attn_gate=hp.attn_gate,
                   paired_head_layers=layers("paired_head_layers"))

    def value_embeds(self, num_layers: int) -> list[int | None]:
        """Which value-embedding table each layer reads (None: none)."""
        if self.value_embed_layers is None:
            return value_embed_layout(num_layers)
        own = {layer: j for j, layer in enumerate(self.value_embed_layers)}
        return [own.get(i) for i in range(num_layers)]

    def long_windows(self, num_layers: int) -> list[bool]:
        if self.long_window_layers is None:
            return long_window_layers(num_layers)
        return [i in self.long_window_layers for i in range(num_layers)]


def bigram_hash(tokens_BT: Tensor, rows: int, start: int = 0, before_B: Tensor | None = None) -> Tensor:
    """(B, T) rows of the bigram table (record #62, PR 201; get_bigram_hash at f411b3d3): in int32 arithmetic,
    which wraps, (36313 * token xor 27191 * previous token) mod (rows - 1), a row being the record's sequence.

    Record quirks reproduced: position 0 gets the reserved row rows - 1, and that reserved value, not the first
    token, is position 1's previous token (the record overwrites position 0 before it reads it; 27191 * (rows - 1)
    wraps for the record's 377,280 rows); documents are not separated (a document's first token hashes with the
    previous document's last). start: the position of column 0 (a KV cache's continuation), before_B the token at
    start - 1 (read from start 2 on)."""
    mod = rows - 1
    x = tokens_BT.to(torch.int32)
    first = x.new_full((x.size(0), 1), mod) if start < 2 else before_B.to(torch.int32)[:, None]
    prev = torch.cat([first, x[:, :-1]], dim=1)
    if start == 0 and x.size(1) > 1:
        prev[:, 1] = mod
    out = torch.bitwise_xor(BIGRAM_MULTS[0] * x, BIGRAM_MULTS[1] * prev) % mod
    if start == 0:
        out[:, 0] = mod
    return out.long()


class BigramEmbedding(nn.Module):
    """The bigram hash embedding (record #62, PR 201): a zero-initialised (rows, dim) table read at bigram_hash's
    rows; with sign_rows, the sign trick (record #83, PR 299): each position's row times a fixed random +-1 vector,
    row (previous xor token) % sign_rows of a seeded table (row 0 at a sequence's first position, as the record),
    so that bigrams sharing a row pull it in different directions."""

    def __init__(self, rows: int, dim: int, sign_rows: int):
        super().__init__()
        self.embed = nn.Embedding(rows, dim)
        nn.init.zeros_(self.embed.weight)
        self.sign_rows = sign_rows
        if sign_rows:
            gen = torch.Generator().manual_seed(BIGRAM_SIGN_SEED)
            self.signs = nn.Buffer(torch.randn(sign_rows, dim, generator=gen).sign())  # saved with the model

    def forward(self, tokens_BT: Tensor, start: int = 0, before_B: Tensor | None = None) -> Tensor:
        """(B, T, dim); start and before_B as bigram_hash's."""
        out = self.embed(bigram_hash(tokens_BT, self.embed.num_embeddings, start, before_B))
        if self.sign_rows:
            prev = torch.cat([tokens_BT[:, :1] if start == 0 else before_B[:, None], tokens_BT[:, :-1]], dim=1)
            row = torch.bitwise_xor(prev, tokens_BT) % self.sign_rows
            if start == 0:
                row[:, 0] = 0
            out = out * self.signs[row].type_as(out)
        return out


def add_to_channels(x: Tensor, y: Tensor) -> Tensor:
    """x with y (narrower or as wide) added to its first channels: the bigram embedding may be narrower."""
    if y.size(-1) == x.size(-1):
        return x + y
    return torch.cat([x[..., :y.size(-1)] + y, x[..., y.size(-1):]], dim=-1)


class SmearGate(nn.Module):
    """Smear (record #34, PR 130): x_t + scale * sigmoid(W x_t[:12]) * x_(t-1) on the token embeddings, where a
    sequence's first token keeps its own; scale starts at 0, so the layer starts as the identity. As in the record,
    a document's first token smears in the previous document's last."""

    def __init__(self):
        super().__init__()
        self.gate = nn.Linear(GATE_INPUTS, 1, bias=False)
        nn.init.zeros_(self.gate.weight)
        self.scale = nn.Parameter(torch.zeros(1))

    def forward(self, x_BTD: Tensor, before_BD: Tensor | None = None) -> Tensor:
        """before_BD: the embedding of the token before x's first (a KV cache's continuation); None at a start."""
        gate = self.scale * torch.sigmoid(F.linear(x_BTD[..., :GATE_INPUTS], self.gate.weight.type_as(x_BTD)))
        if before_BD is None:
            return torch.cat([x_BTD[:, :1], x_BTD[:, 1:] + gate[:, 1:] * x_BTD[:, :-1]], dim=1)
        return x_BTD + gate * torch.cat([before_BD[:, None], x_BTD[:, :-1]], dim=1)


class GatedSkip(nn.Module):
    """The record's skip topology (records #45, #55): one layer's output added where the no-attention layer's
    attention would be, times sigmoid(scale) * 2 * sigmoid(W x0[:12]) (scale -1.5 and W 0 at init: 0.18)."""

    def __init__(self):
        super().__init__()
        self.gate = nn.Linear(GATE_INPUTS, 1, bias=False)
        nn.init.zeros_(self.gate.weight)
        self.scale = nn.Parameter(torch.tensor([SKIP_LAMBDA_INIT]))

    def forward(self, x0: Tensor) -> Tensor:
        """(B, T, 1) the gate, from the normed embedding x0."""
        w = self.gate.weight.type_as(x0)
        return torch.sigmoid(self.scale) * 2 * torch.sigmoid(F.linear(x0[..., :GATE_INPUTS], w))


def shift_still_keys(k_BTHD: Tensor, still_D: Tensor, before_B1HD: Tensor | None = None) -> Tensor:
    """Partial key offset (record #49): the keys' unrotated channels taken from the position before, so a query
    matching them finds the token after a match (an induction head in one layer). A sequence's first position
    keeps its own (the record's k[:, 1:] = k[:, :-1]); before_B1HD: the previous position's key (a continuation).
    As in the record, a document's first key takes the previous document's last (its query never sees it)."""
    prev = torch.cat([k_BTHD[:, :1] if before_B1HD is None else before_B1HD, k_BTHD[:, :-1]], dim=1)
    return torch.where(still_D, prev, k_BTHD)


def xsa(y_BTHD: Tensor, v_BTHD: Tensor, alpha_H: Tensor) -> Tensor:
    """Learnable XSA (record #82, PR 264; arXiv:2603.09078): each head's output minus tanh(alpha) of its component
    along that head's own value vector at the same position; alpha starts at 0 (off)."""
    dot = (y_BTHD * v_BTHD).sum(-1, keepdim=True)
    denom = v_BTHD.square().sum(-1, keepdim=True).clamp_min(1e-8)
    return y_BTHD - torch.tanh(alpha_H).type_as(y_BTHD)[:, None] * (dot / denom) * v_BTHD


def pair_heads(x_BTHD: Tensor) -> Tensor:
    """Paired-head attention's sequence (record #58): (B, T, H, D) -> (B, 2T, H/2, D) with position 2t holding
    heads 0..H/2-1 of token t and position 2t+1 heads H/2..H-1, so head g and head g + H/2 share a softmax. The
    record's comment says adjacent heads pair; its reshape pairs these (its code defines the record)."""
    B, T, H, D = x_BTHD.shape
    return x_BTHD.reshape(B, 2 * T, H // 2, D)


def paired_docs(docs_BT: Tensor) -> Tensor:
    """Document ids of the interleaved sequence of pair_heads."""
    return docs_BT.repeat_interleave(2, dim=1)


@dataclass(frozen=True)
class LayerArch:
    """What one attention layer adds to the 2025 record's (Architecture, per layer); the default adds nothing."""

    ve_gate: bool = False  # a value-embedding gate (the layer reads a value embedding and value_embed_gates is on)
    sa_lambdas: bool = False  # the record's attention lambdas (v and output scales) instead of the v/ve mix
    key_offset: bool = False
    xsa: bool = False
    gate: bool = False
    paired: bool = False


class CausalSelfAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int, head_dim: int, rotary: "Rotary", arch: LayerArch = LayerArch()):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, head_dim
        hdim = num_heads * head_dim
        bound = 3**0.5 * 0.5 * dim**-0.5  # same init scale as CastedLinear (record)
        self.qkv_w = nn.Parameter(torch.empty(3, hdim, dim).uniform_(-bound, bound))  # merged QKV
        # 2025: the mix of v and the value embedding; record (#47): the scales of v and of the output
        self.lambdas = nn.Parameter(torch.tensor(SA_LAMBDAS_INIT if arch.sa_lambdas else [0.5, 0.5]))
        self.rotary = rotary  # one table shared by all layers (non-persistent, so not in the state_dict)
        self.c_proj = CastedLinear(hdim, dim)
        self.c_proj.weight.detach().zero_()  # zero-init output projection (record)
        self.attn_scale = ATTN_SCALE  # GPT.set_yarn rescales it with the rotary table
        self.qkv_decode: Callable[[Tensor, Tensor], Tensor] | None = None  # as CastedLinear.decode
        self.arch = arch
        if arch.ve_gate:  # record #70: 2 * sigmoid(W [x[:6], ve[:6]]) per head, 1 at init
            self.ve_gate = nn.Parameter(torch.zeros(num_heads, 2 * VE_GATE_INPUTS))
        if arch.xsa:
            self.xsa_alpha = nn.Parameter(torch.zeros(num_heads))
        if arch.gate:  # record #28: sigmoid(W x[:12]) per head, 0.5 at init
            self.gate = nn.Parameter(torch.zeros(num_heads, GATE_INPUTS))

    def forward(self, x: Tensor, ve: Tensor | None, mask: AttnMask, kv: Any = None) -> Tensor:
        """kv: a cache layer (inference.py) that stores this chunk's keys and values and attends over its window
        (and, with a key offset, hands over the previous chunk's last key)."""
        B, T = x.size(0), x.size(1)
        arch = self.arch
        qkv = linear(x, self.qkv_w.flatten(end_dim=1), self.qkv_decode)
        q, k, v = qkv.view(B, T, 3 * self.num_heads, self.head_dim).chunk(3, dim=-2)  # (B, T, H, D) each
        q, k = norm(q), norm(k)  # QK-norm
        offset = 0 if kv is None else kv.offset
        if arch.paired:
            q, k = self.rotary.paired(q, offset), self.rotary.paired(k, offset)
        else:
            q, k = self.rotary(q, offset), self.rotary(k, offset)
        if arch.key_offset:
            k = shift_still_keys(k, self.rotary.still_dims(), None if kv is None else kv.swap_last_key(k))
        if arch.sa_lambdas:
            v = self.lambdas[0] * v
            if ve is not None:
                if arch.ve_gate:  # reads the first channels of x and of the (B, T, H*D) embedding
                    gate_in = torch.cat([x[..., :VE_GATE_INPUTS], ve[..., :VE_GATE_INPUTS].type_as(x)], dim=-1)
                    gate = 2 * torch.sigmoid(F.linear(gate_in, self.ve_gate.type_as(x)))[..., None]  # (B, T, H, 1)
                    v = v + gate * ve.view_as(v)
                else:
                    v = v + ve.view_as(v)
        else:
            v = self.lambdas[0] * v + (self.lambdas[1] * ve.view_as(v) if ve is not None else 0)
        v_BTHD = v
        if arch.paired:
            q, k, v = pair_heads(q), pair_heads(k), pair_heads(v)  # (B, 2T, H/2, D)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2).type_as(q)  # (B, H, T, D)
        if kv is None:
            y = attention(q, k, v, mask, self.attn_scale)
        else:
            y = kv.attend(q, k, v, mask, self.attn_scale)
        y = y.transpose(1, 2)
        if arch.paired or arch.xsa or arch.gate:
            y = y.reshape(B, T, self.num_heads, self.head_dim)  # a paired layer's (B, 2T, H/2, D) back to heads
            if arch.xsa:
                y = xsa(y, v_BTHD.type_as(y), self.xsa_alpha)
            if arch.gate:
                y = y * torch.sigmoid(F.linear(x[..., :GATE_INPUTS], self.gate.type_as(x)))[..., None].type_as(y)
        y = y.contiguous().view(B, T, self.num_heads * self.head_dim)  # (B, T, H*D)
        if arch.sa_lambdas:
            y = self.lambdas[1] * y  # the record multiplies the output weight instead (#47): the same product
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
    def __init__(self, dim: int, num_heads: int, head_dim: int, rotary: Rotary, has_attn: bool,
                 arch: LayerArch = LayerArch(), residual_lambdas: bool = False, bigram: bool = False):
        super().__init__()
        self.attn = CausalSelfAttention(dim, num_heads, head_dim, rotary, arch) if has_attn else None
        self.mlp = MLP(dim)
        self.residual_lambdas = residual_lambdas
        if residual_lambdas:  # records #73-#77: per sublayer (attention, MLP)
            self.resid_lambdas = nn.Parameter(torch.full((2,), RESID_LAMBDA_INIT))  # scale of the stream
            self.post_lambdas = nn.Parameter(torch.ones(2))  # scale of the sublayer's output
            if has_attn:
                self.x0_lambda = nn.Parameter(torch.zeros(1))  # share of x0 added after attention
        else:
            self.lambdas = nn.Parameter(torch.tensor([1.0, 0.0]))  # mix of the residual x and the embedding x0
        if bigram:
            self.bigram_lambda = nn.Parameter(torch.tensor([BIGRAM_LAMBDA_INIT]))

    def forward(self, x: Tensor, ve: Tensor | None, x0: Tensor, mask: AttnMask, kv: Any = None,
                attn_in: Tensor | None = None, skip: Tensor | None = None, bigram: Tensor | None = None) -> Tensor:
        """attn_in: what the attention reads instead of the stream (record #77); skip: the gated skip, added where a
        no-attention layer's attention would be; bigram: the bigram embedding, added after the attention times this
        layer's share (layer 0's share is added before layer 0 by the GPT)."""
        if not self.residual_lambdas:
            x = self.lambdas[0] * x + self.lambdas[1] * x0
        if self.attn is not None:
            y = self.attn(norm(x if attn_in is None else attn_in), ve, mask, kv)
            if self.residual_lambdas:
                x = self.resid_lambdas[0] * x + self.post_lambdas[0] * y + self.x0_lambda * x0
            else:
                x = x + y
            if bigram is not None:
                x = add_to_channels(x, self.bigram_lambda * bigram)
        elif skip is not None:
            x = x + skip  # as the record: no lambdas on the no-attention layer's skip
        if self.residual_lambdas:
            return self.resid_lambdas[1] * x + self.post_lambdas[1] * self.mlp(norm(x))
        return x + self.mlp(norm(x))


def value_embed_layout(num_layers: int) -> list[int | None]:
    """Which value embedding each layer uses: 012...012 for deep models; k = L/2 < 3 shares for shallow ones."""
    k = min(3, num_layers // 2)
    return list(range(k)) + [None] * (num_layers - 2 * k) + list(range(k))


def long_window_layers(num_layers: int) -> list[bool]:
    """Long (vs half) windows on layers 0, 4, ... of the first half, mirrored in the second (record: 0,4,7,11)."""
    half = num_layers // 2
    return [(i if i < half else num_layers - 1 - i) % 4 == 0 for i in range(num_layers)]


def short_window(window_blocks: Tensor | int, most: int | None = None) -> Tensor | int:
    """The window of the short-window layers: half the long one (record), at most `most` blocks (with --yarn, the
    last stage's short window: record #89 keeps it when the final validation lengthens the long one)."""
    half = window_blocks // 2
    if most is None:
        return half
    return torch.clamp(half, max=most) if isinstance(half, Tensor) else min(half, most)


def block_keep_mask(docs_BT: Tensor, window_blocks: Tensor | int, block: int = BLOCK_SIZE) -> tuple[Tensor, Tensor]:
    """Block-level (B, NB, NB) masks of the record's sliding-window document block mask.

    Returns (keep_full, keep_partial): full blocks need no token mask; partial blocks do. As in the record,
    a query block keeps its window_blocks - 1 most recent full blocks and max(window_blocks - num_full, 1)
    most recent partial blocks (the diagonal block is always the most recent partial one). block: tokens per block.
    """
    B, T = docs_BT.shape
    NB = T // block
    blk = torch.arange(NB, device=docs_BT.device)
    causal_any = blk[:, None] >= blk[None, :]
    causal_all = blk[:, None] > blk[None, :]
    low = docs_BT.view(B, NB, block)[:, :, 0]
    high = docs_BT.view(B, NB, block)[:, :, -1]
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


def dense_attention_mask(docs_BT: Tensor, window_blocks: Tensor | int, block: int = BLOCK_SIZE) -> Tensor:
    """Boolean (B, 1, T, T) mask equal to the record's FlexAttention block mask, for SDPA on CPU/MPS."""
    T = docs_BT.size(1)
    keep_full, keep_partial = block_keep_mask(docs_BT, window_blocks, block)
    keep = (keep_full | keep_partial).repeat_interleave(block, 1).repeat_interleave(block, 2)
    causal = torch.ones(T, T, dtype=torch.bool, device=docs_BT.device).tril()
    same_doc = docs_BT[:, :, None] == docs_BT[:, None, :]
    return (keep & causal & same_doc)[:, None]


def flex_block_mask(docs_BT: Tensor, window_blocks: Tensor | int, block: int = BLOCK_SIZE) -> Any:
    """The same mask as a FlexAttention BlockMask (used on CUDA; build_model allows only block = BLOCK_SIZE)."""
    from torch.nn.attention.flex_attention import BlockMask

    keep_full, keep_partial = block_keep_mask(docs_BT, window_blocks, block)
    keep_BNN = keep_full | keep_partial  # the window again, for eager flex_attention, which reads only mask_mod

    def ordered(dense: Tensor) -> tuple[Tensor, Tensor]:
        num = dense.sum(-1, dtype=torch.int32)[:, None].contiguous()  # (B, 1, NB)
        idx = dense.to(torch.int8).argsort(dim=-1, descending=True, stable=True).to(torch.int32)
        return num, idx[:, None].contiguous()  # (B, 1, NB, NB)

    def document_causal(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        in_window = keep_BNN[b, q_idx // block, kv_idx // block]
        return in_window & (q_idx >= kv_idx) & (docs_BT[b, q_idx] == docs_BT[b, kv_idx])

    partial_num, partial_idx = ordered(keep_partial)
    full_num, full_idx = ordered(keep_full)
    return BlockMask.from_kv_blocks(partial_num, partial_idx, full_num, full_idx, BLOCK_SIZE=block,
                                    mask_mod=document_causal)


LOGIT_CAPS = ("2025", "2026")  # --logit-cap: the soft cap of the lm_head's logits, by record


def softcap(logits: Tensor, model_dim: int, form: str = "2025") -> Tensor:
    """The lm_head's logits z, bounded. 2025 (the May-2025 record): 30 * sigmoid(z / (7.5 * sqrt(model_dim))), in
    (0, 30), a tanh soft cap of 15 shifted by +15. 2026 (record #54, PR 181; unchanged to f411b3d3):
    23 * sigmoid((z + 5) / 7.5), in (0, 23): a lower ceiling, asymmetric about z = 0 (the +5 shift), and no
    division by sqrt(model_dim), so the same logits need a head sqrt(model_dim) times smaller (the 2026 record's
    head LR, 0.008, is the 2025 record's 0.22 over sqrt(768), 27.7)."""
    if form == "2026":
        return 23 * torch.sigmoid((logits + 5) / 7.5)
    return 30 * torch.sigmoid(logits / (7.5 * model_dim**0.5))


def softcap_cross_entropy(x_normed: Tensor, head_weight: Tensor, targets: Tensor, form: str = "2025",
                          mtp_weights: Tensor | None = None, prefix_targets: Tensor | None = None,
                          prefix_weight: Tensor | None = None) -> Tensor | tuple[Tensor, Tensor]:
    """Mean cross-entropy of the soft-capped lm_head logits. Pure, so it can be compiled on its own: on CPU
    the 50k-wide elementwise work (sigmoid, log-softmax and their backward) dominates a small model's step.
    With mtp_weights: multi_token_cross_entropy's (loss, next-token cross-entropy) instead."""
    logits = F.linear(x_normed, head_weight.type_as(x_normed)).float()
    logits = softcap(logits, x_normed.size(-1), form)
    if mtp_weights is not None:
        return multi_token_cross_entropy(logits, targets, mtp_weights, prefix_targets, prefix_weight)
    return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1).long())


MTP_TARGETS = 3  # record #53 (PR 178): a position predicts the next token and the two after it (STAGES_2026)


def multi_token_cross_entropy(logits: Tensor, targets: Tensor, weights: Tensor, prefix_targets: Tensor | None = None,
                              prefix_weight: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Multi-token prediction on the same head (record #53, PR 178; the record's FusedSoftcappedCrossEntropy, #60 and
    later, computes the same): position t
    of a row is scored on targets[t + k] (the token k + 1 ahead) with weight weights[k], for every k with t + k
    inside the row, from the one log-sum-exp of its logits:

        loss = sum over positions t and targets k of weights[k] * (logsumexp(logits[t]) - logits[t, targets[t + k]])
               / (number of positions)

    so with weights (1, 0, 0) it is the mean next-token cross-entropy. As in the record, the targets are the token
    stream: a target past an <|endoftext|> belongs to the next document and counts like any other (the record's
    kernel does not mask it), and a target < 0 (ignored) adds nothing. With prefix_targets (B, T) (record #88,
    PR 337: prefix_token_table of each next token), each position is also scored on its prefix target with weight
    prefix_weight (a 1-element tensor), the same way. logits (B, T, V), targets (B, T); returns (loss, the plain
    next-token cross-entropy, detached, for the log)."""
    targets = (targets.view(-1, targets.size(-1)) if targets.ndim > 1 else targets.view(1, -1)).long()
    logits = logits.view(*targets.shape, logits.size(-1))
    B, T = targets.shape
    lse = torch.logsumexp(logits, dim=-1)  # (B, T): once, whatever the number of targets
    total, next_token = logits.new_zeros(()), None
    for k in range(weights.size(0)):
        ahead = targets[:, k:]  # (B, T - k): position t's target k
        nll = lse[:, :T - k] - logits[:, :T - k].gather(-1, ahead.clamp(min=0)[..., None])[..., 0]
        nll = torch.where(ahead >= 0, nll, 0.0)
        total = total + weights[k] * nll.sum()
        if k == 0:
            next_token = nll.sum().detach() / (ahead >= 0).sum().clamp(min=1)
    if prefix_targets is not None:
        prefix = prefix_targets.reshape(B, T).long()
        nll = lse - logits.gather(-1, prefix.clamp(min=0)[..., None])[..., 0]
        total = total + prefix_weight.reshape(()) * torch.where(prefix >= 0, nll, 0.0).sum()
    return total / (B * T), next_token


SOFTCAP_FORMS = {"2025": None, "2026": (23.0, 7.5, 5.0)}  # softcap as c * sigmoid((z + b) / a): (c, a, b); 2025's
#   a is 7.5 * sqrt(model_dim), so it is filled in by softcap_constants


def softcap_constants(model_dim: int, form: str) -> tuple[float, float, float]:
    """softcap(z) = c * sigmoid((z + b) / a): (c, a, b) of each form (softcap's docstring has their sources)."""
    return SOFTCAP_FORMS[form] or (30.0, 7.5 * model_dim**0.5, 0.0)


def head_targets(targets: Tensor, mtp_weights: Tensor | None = None, prefix_targets: Tensor | None = None,
                 prefix_weight: Tensor | None = None) -> tuple[Tensor, Tensor, bool]:
    """The loss's targets as one (positions, J) matrix of ids (< 0: none) and their (J,) weights, for
    chunked_head_loss. Plain next-token loss: J = 1, weight 1, the mean over the targets that count. With
    mtp_weights (multi_token_cross_entropy's): column k is the token k + 1 ahead in the same row (none past the
    row's end), then the prefix targets' column; the mean over all positions. Returns (targets, weights, mean over
    positions)."""
    rows = (targets.view(-1, targets.size(-1)) if targets.ndim > 1 else targets.view(1, -1)).long()
    if mtp_weights is None:
        return rows.reshape(-1, 1), torch.ones(1, device=targets.device), False
    B, T = rows.shape
    columns = []
    for k in range(mtp_weights.size(0)):
        ahead = rows.new_full((B, T), -1)
        ahead[:, :T - k] = rows[:, k:]
        columns.append(ahead)
    weights = [mtp_weights.float()]
    if prefix_targets is not None:
        columns.append(prefix_targets.reshape(B, T).long())
        weights.append(prefix_weight.reshape(1).float())
    return torch.stack(columns, dim=-1).reshape(B * T, -1), torch.cat(weights), True


def head_chunk_loss(x: Tensor, weight: Tensor, targets: Tensor, target_weights: Tensor, scale: Tensor, form: str,
                    grads: bool) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
    """One chunk of chunked_head_loss: positions x (n, d), the head weight (V, d) in x's dtype, targets (n, J).
    Returns (scale * sum of the weighted nll, sum of the next-token nll (column 0), and with grads the gradients of
    the first with respect to x and weight, the latter in fp32). The gradient is written out, so no autograd graph
    of the (n, V) logits is kept: with s = softcap(z) = c * sigmoid((z + b) / a) and m_i = the summed weight of
    row i's targets that count, d(loss)/ds_i = scale * (m_i * softmax(s_i) - sum_j w_j * onehot(t_ij)) and
    ds/dz = s * (1 - s / c) / a."""
    c, a, b = softcap_constants(x.size(-1), form)
    z = F.linear(x, weight).float()
    s = c * torch.sigmoid((z + b) / a)
    lse = torch.logsumexp(s, dim=-1)
    counts = targets >= 0
    safe = targets.clamp(min=0)
    nll = torch.where(counts, lse[:, None] - s.gather(1, safe), 0.0)  # (n, J)
    loss = scale * (nll * target_weights).sum()
    if not grads:
        return loss, nll[:, 0].sum(), None, None
    taken = counts * target_weights  # (n, J): each target's weight where it counts
    g = torch.softmax(s, dim=-1) * taken.sum(dim=1, keepdim=True)
    g = g.scatter_add(1, safe, -taken)
    g = (g * scale) * (s * (1 - s / c) / a)
    g = g.to(x.dtype)
    return loss, nll[:, 0].sum(), g @ weight, (g.t() @ x).float()


class ChunkedHeadLoss(torch.autograd.Function):
    """The soft-capped head's loss and its gradient over `chunk` positions at a time, computed in the forward pass
    (the idea of fused linear cross-entropy kernels such as Liger-Kernel's), so the peak memory is a few (chunk, V)
    buffers instead of the whole (positions, V) graph. The backward only scales the stored gradients."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Tensor, targets: Tensor, target_weights: Tensor, scale: Tensor,
                form: str, chunk: int, chunk_fn: Callable, grads: bool) -> tuple[Tensor, Tensor]:
        loss, next_nll = x.new_zeros((), dtype=torch.float32), x.new_zeros((), dtype=torch.float32)
        dx, dw = (torch.empty_like(x), torch.zeros_like(weight, dtype=torch.float32)) if grads else (None, None)
        w = weight.type_as(x)
        for start in range(0, x.size(0), chunk):
            part = slice(start, start + chunk)
            l, n, gx, gw = chunk_fn(x[part], w, targets[part], target_weights, scale, form, grads)
            loss, next_nll = loss + l, next_nll + n
            if grads:
                dx[part] = gx
                dw += gw
        if grads:
            ctx.save_for_backward(dx, dw.to(weight.dtype))
        return loss, next_nll

    @staticmethod
    def backward(ctx: Any, grad_loss: Tensor, _: Tensor) -> tuple[Tensor | None, ...]:
        dx, dw = ctx.saved_tensors
        return grad_loss * dx, grad_loss * dw, None, None, None, None, None, None, None


@torch.compiler.disable  # the compiled model breaks its graph here; the chunk function is compiled on its own
def chunked_head_loss(x_normed: Tensor, head_weight: Tensor, targets: Tensor, form: str, chunk: int,
                      chunk_fn: Callable = head_chunk_loss, mtp_weights: Tensor | None = None,
                      prefix_targets: Tensor | None = None,
                      prefix_weight: Tensor | None = None) -> Tensor | tuple[Tensor, Tensor]:
    """softcap_cross_entropy (and its multi-token form) computed over `chunk` positions at a time (--head-chunk):
    the same loss to rounding (sums of chunk sums instead of one sum), with a peak memory that no longer grows with
    the positions of a micro-batch. Returns what softcap_cross_entropy returns."""
    x = x_normed.reshape(-1, x_normed.size(-1))
    columns, weights, per_position = head_targets(targets, mtp_weights, prefix_targets, prefix_weight)
    counted = (columns[:, 0] >= 0).sum()
    scale = 1 / (torch.tensor(float(x.size(0)), device=x.device) if per_position else counted.clamp(min=1).float())
    grads = torch.is_grad_enabled() and (x.requires_grad or head_weight.requires_grad)
    loss, next_nll = ChunkedHeadLoss.apply(x, head_weight, columns, weights, scale, form, chunk, chunk_fn, grads)
    if mtp_weights is None:
        return loss
    return loss, next_nll.detach() / counted.clamp(min=1)


def prefix_token_table(tokenizer: "Tokenizer", size: int, tokens: int = EOT_ID) -> Tensor:
    """(size,) int64: for every id, the id of the longest proper prefix of its bytes that is itself a GPT-2 token, or
    -1 where there is none (the 256 single bytes, <|endoftext|>, chat tokens, padding rows). The prefix-token target
    of record #88 (PR 337), from the BPE ranks get_tokenizer verifies: never from text. tokens: how many ids are
    BPE tokens (GPT-2: the 50256 below <|endoftext|>)."""
    ids = {tokenizer.token_bytes(i): i for i in range(min(size, tokens))}
    table = [-1] * size
    for piece, i in ids.items():
        for cut in range(len(piece) - 1, 0, -1):  # longest first
            if piece[:cut] in ids:
                table[i] = ids[piece[:cut]]
                break
    return torch.tensor(table, dtype=torch.int64)


TIED_INIT_STD = 0.005  # record #89 (f411b3d3): its lm_head's init, which the tied embedding copies


class GPT(nn.Module):
    """The record's GPT for any size. Parameter names equal the record script's so its state_dicts load."""

    def __init__(self, vocab_size: int, num_layers: int, num_heads: int, head_dim: int, model_dim: int,
                 max_seq_len: int, no_attn_layer: int = 7, arch: Architecture = Architecture()):
        super().__init__()
        padded_vocab = next_multiple_of_n(vocab_size, n=128)  # 50257 -> 50304: free rows for chat tokens
        self.num_layers, self.model_dim, self.arch = num_layers, model_dim, arch
        self.embed = nn.Embedding(padded_vocab, model_dim)
        layout = arch.value_embeds(num_layers)
        num_ve = max((i for i in layout if i is not None), default=-1) + 1
        self.value_embeds = nn.ModuleList([nn.Embedding(padded_vocab, model_dim) for _ in range(num_ve)])
        if arch.value_embed_gates:
            for ve in self.value_embeds:
                nn.init.normal_(ve.weight, std=VE_INIT_STD)
        paired = arch.paired_head_layers
        rotary = Rotary(head_dim, max_seq_len * (2 if paired else 1))  # paired layers rotate at 2t and 2t + 1
        longs = arch.long_windows(num_layers)
        layers = [LayerArch(ve_gate=arch.value_embed_gates and layout[i] is not None,
                            sa_lambdas=arch.value_embed_gates, key_offset=arch.key_offset and longs[i] and i not in
                            paired, xsa=i in arch.xsa_layers, gate=arch.attn_gate, paired=i in paired)
                  for i in range(num_layers)]
        self.blocks = nn.ModuleList([Block(model_dim, num_heads, head_dim, rotary, i != no_attn_layer, layers[i],
                                           arch.residual_lambdas, arch.bigram_rows > 0 and (i == 0 or i !=
                                                                                             no_attn_layer))
                                     for i in range(num_layers)])
        # FP8 scales: inputs are RMS-normed (|x| <= sqrt(dim)), 448 is the e4m3 max (record)
        self.lm_head = CastedLinear(model_dim, padded_vocab, x_s=model_dim**0.5 / 448, w_s=24 / 448,
                                    grad_s=1 / 448)
        self.lm_head.weight.detach().zero_()
        if arch.gated_skip is None:
            self.skip_weights = nn.Parameter(torch.ones(num_layers // 2))  # U-net skips (record)
        self.skip = GatedSkip() if arch.gated_skip is not None else None
        self.smear = SmearGate() if arch.smear else None
        self.bigram = (BigramEmbedding(arch.bigram_rows, arch.bigram_dim or model_dim, arch.bigram_sign_rows)
                       if arch.bigram_rows else None)
        if arch.backout_layer >= 0:
            self.backout_lambda = nn.Parameter(torch.tensor([BACKOUT_INIT]))
        self.use_flex = False  # FlexAttention block masks (CUDA); SDPA with a dense mask otherwise
        self.loss_fn = softcap_cross_entropy  # build_model may swap in a compiled copy
        self.modified_loss_fn = softcap_modified_loss  # the same, with loss modifiers or token weights
        self.loss_modifiers: tuple[LossModifier, ...] = ()  # training only; evaluation stays plain cross-entropy
        self.loss_classes = vocab_size  # rows a target can be: label smoothing spreads its mass over these
        self.logit_cap = "2025"  # softcap's form (--logit-cap): every path to the logits and the loss reads it
        self.mtp_weights: Tensor | None = None  # (MTP_TARGETS,) multi-token weights in training (--mtp); the
        #   training loop fills it each step from the stage schedule; None = next-token loss only
        self.prefix_table: Tensor | None = None  # prefix_token_table, with --prefix-token (training only)
        self.prefix_weight: Tensor | None = None  # (1,) its weight, filled each step from the stage schedule
        self.head_chunk = 0  # --head-chunk: positions per chunk of chunked_head_loss; 0 = the whole head at once
        self.head_chunk_fn: Callable = head_chunk_loss  # build_model may swap in a compiled copy
        self.window_block = BLOCK_SIZE  # tokens per window block (--window-block): the masks' unit
        self.short_window_max: int | None = None  # cap of the short windows (short_window), with --yarn
        self.yarn_windows: tuple[int, ...] = ()  # the long windows (tokens) YaRN rescaled for (set_yarn); () = none

    @classmethod
    def from_hparams(cls, hp: Hyperparameters) -> "GPT":
        model = cls(hp.vocab_size, hp.num_layers, hp.num_heads, hp.head_dim, hp.model_dim, hp.max_seq_len,
                    hp.no_attn_layer, Architecture.from_hparams(hp))
        model.logit_cap = hp.logit_cap
        model.head_chunk = hp.head_chunk
        model.window_block = hp.window_block
        if hp.yarn:  # the state training ends in, for evaluation and generation; training sets each step's
            model.short_window_max = STAGE_SCHEDULES[hp.stage_schedule][-1].windows[0]
            model.set_yarn(*yarn_state_at(hp.num_iterations, hp))
        if hp.tie_embed:
            model.init_tied_embedding()
        return model

    def set_yarn(self, windows: tuple[int, ...], freqs: Tensor | None, attn_scale: float) -> None:
        """The rotary table (shared by every layer) and attention scale for a window history (yarn_state_at)."""
        attns = [block.attn for block in self.blocks if block.attn is not None]
        for attn in attns:
            attn.attn_scale = attn_scale
        attns[0].rotary.set_freqs(freqs)
        self.yarn_windows = windows

    def init_tied_embedding(self) -> None:
        """Start the embedding and lm_head as one matrix, drawn as the record draws its lm_head (the embedding a copy
        of it): the 2025 record's zero head would feed every token the same zero embedding."""
        with torch.no_grad():
            nn.init.normal_(self.lm_head.weight, mean=0.0, std=TIED_INIT_STD)
            self.embed.weight.copy_(self.lm_head.weight)

    def enable_fp8_head(self, on: bool) -> None:
        if on:
            _register_fp8_ops()
        self.lm_head.use_fp8 = on

    def attention_masks(self, input_BT: Tensor, window_blocks: Tensor | int) -> tuple[AttnMask, ...]:
        """(long, short) masks; with paired-head layers also (long, short) over pair_heads' interleaved sequence,
        where the same window in blocks covers half as many tokens (as the record's)."""
        docs = (input_BT == EOT_ID).cumsum(dim=1)  # document id of every token
        build = flex_block_mask if self.use_flex else dense_attention_mask
        short = short_window(window_blocks, self.short_window_max)
        masks = build(docs, window_blocks, self.window_block), build(docs, short, self.window_block)
        if self.arch.paired_head_layers:
            docs2 = paired_docs(docs)
            masks += build(docs2, window_blocks, self.window_block), build(docs2, short, self.window_block)
        return masks

    def hidden_states(self, input_BT: Tensor, long_mask: AttnMask, short_mask: AttnMask,
                      paired_long: AttnMask = None, paired_short: AttnMask = None, cache: Any = None) -> Tensor:
        """The normed final residual stream (B, T, model_dim); with a cache (inference.py), of T new tokens after
        the cached ones: cache.layer(i) is what layer i's attention stores into and attends over, cache.pos the
        position of the first new token and cache.tokens[:, pos - 1] the token before it (smear, bigram)."""
        arch = self.arch
        longs = arch.long_windows(self.num_layers)
        masks = [long_mask if is_long else short_mask for is_long in longs]
        for i in arch.paired_head_layers:
            masks[i] = paired_long if longs[i] else paired_short
        value_embeds = [ve(input_BT) for ve in self.value_embeds]
        ves = [value_embeds[i] if i is not None else None for i in arch.value_embeds(self.num_layers)]
        start = 0 if cache is None else cache.pos
        before = None  # (B,) the token before input_BT's first, for the parts that read it
        if start and (self.smear is not None or self.bigram is not None):
            before = cache.tokens[:, start - 1]
        x = self.embed(input_BT)  # (B, T, model_dim)
        if self.smear is not None:
            x = self.smear(x, None if before is None else self.embed(before))
        x = x0 = norm(x)
        bigram = None
        if self.bigram is not None:
            bigram = self.bigram(input_BT, start, before)  # (B, T, bigram_dim)
            x = add_to_channels(x, self.blocks[0].bigram_lambda * bigram)  # record: before layer 0
        skip_gate = None if self.skip is None else self.skip(x0)
        skips, saved, n, back = [], {}, self.num_layers // 2, arch.backout_layer
        for i, block in enumerate(self.blocks):
            if self.skip is None and i >= n:
                x = x + self.skip_weights[i - n] * skips.pop()
            skip = skip_gate * saved[arch.gated_skip[0]] if skip_gate is not None and i == arch.gated_skip[1] else None
            x = block(x, ves[i], x0, masks[i], None if cache is None else cache.layer(i),
                      attn_in=saved[back] if 0 <= back < i else None, skip=skip, bigram=bigram if i else None)
            if self.skip is None and i < n:
                skips.append(x)
            if i == back or (skip_gate is not None and i == arch.gated_skip[0]):
                saved[i] = x
        if back >= 0:
            x = x - self.backout_lambda * saved[back]  # record #40: back out the early layers' contribution
        return norm(x)

    def ensure_positions(self, length: int) -> None:
        """Let the rotary table cover `length` positions (evaluation and generation may exceed training rows)."""
        for block in self.blocks:  # one table shared by every layer
            if block.attn is not None:
                block.attn.rotary.ensure_length(length * (2 if self.arch.paired_head_layers else 1))
                return

    def logits(self, x: Tensor) -> Tensor:
        """Soft-capped fp32 logits over the padded vocabulary."""
        return softcap(self.lm_head(x).float(), self.model_dim, self.logit_cap)

    def forward(self, input_seq: Tensor, target_seq: Tensor | None = None,
                sliding_window_num_blocks: Tensor | int = 1 << 30, token_weights: Tensor | None = None,
                parts: bool = False) -> Any:
        """(B, T) or the record's 1-D (T,) tokens. Without targets: logits (B, T, V). With targets: mean
        cross-entropy, or in training with loss modifiers or token_weights (B, T) the modified loss; parts=True
        returns (loss, {"ce": ..., modifier terms and metrics}) instead, empty when nothing modifies the loss."""
        input_BT = input_seq[None] if input_seq.ndim == 1 else input_seq
        x = self.hidden_states(input_BT, *self.attention_masks(input_BT, sliding_window_num_blocks))
        if target_seq is None:
            return self.logits(x)
        if self.training and (self.loss_modifiers or token_weights is not None):
            if self.lm_head.use_fp8:
                out = modified_cross_entropy(self.logits(x), target_seq, self.loss_modifiers, self.loss_classes,
                                             token_weights)
            else:
                out = self.modified_loss_fn(x, self.lm_head.weight, target_seq, token_weights,
                                            self.loss_modifiers, self.loss_classes, self.logit_cap)
            return out if parts else out[0]
        if self.training and self.mtp_weights is not None:
            prefix = None
            if self.prefix_table is not None:  # the prefix of each next token; -1 (none) where a target is ignored
                prefix = torch.where(target_seq >= 0, self.prefix_table[target_seq.clamp(min=0)], -1)
            if self.lm_head.use_fp8:
                loss, ce = multi_token_cross_entropy(self.logits(x), target_seq, self.mtp_weights, prefix,
                                                     self.prefix_weight)
            elif self.head_chunk:
                loss, ce = chunked_head_loss(x, self.lm_head.weight, target_seq, self.logit_cap, self.head_chunk,
                                             self.head_chunk_fn, self.mtp_weights, prefix, self.prefix_weight)
            else:
                loss, ce = self.loss_fn(x, self.lm_head.weight, target_seq, self.logit_cap, self.mtp_weights,
                                        prefix, self.prefix_weight)
            return (loss, {"ce": ce}) if parts else loss
        if self.lm_head.use_fp8 and self.training:
            logits = self.logits(x)
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)), target_seq.reshape(-1).long())
        elif self.head_chunk:
            loss = chunked_head_loss(x, self.lm_head.weight, target_seq, self.logit_cap, self.head_chunk,
                                     self.head_chunk_fn)
        else:
            loss = self.loss_fn(x, self.lm_head.weight, target_seq, self.logit_cap)
        return (loss, {}) if parts else loss


def strip_compile_prefixes(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """Remove torch.compile's `_orig_mod.` and DDP's `module.` prefixes."""
    out = {}
    for key, value in state_dict.items():
        while key.startswith(("_orig_mod.", "module.")):
            key = key.split(".", 1)[1]
        out[key] = value
    return out


def param_counts(model: nn.Module) -> dict[str, int]:
    total = sum(p.numel() for p in model.parameters())
    embed = sum(p.numel() for n, p in model.named_parameters() if "embed" in n)
    return {"total": total, "embedding": embed, "non_embedding": total - embed}


def build_model(hp: Hyperparameters, rt: Runtime, chat: bool = False) -> tuple[GPT, nn.Module]:
    """The raw model (for checkpoints and optimizers) and the module to call (compiled where asked). chat: a
    fine-tune, whose targets include the chat tokens (label smoothing covers them too)."""
    if rt.device.type == "cuda" and hp.window_block != BLOCK_SIZE:
        raise ConfigError(f"--window-block={hp.window_block} runs only off CUDA: FlexAttention's kernels tile block "
                          f"masks in {BLOCK_SIZE}-token blocks (use --window-block {BLOCK_SIZE} or --device cpu)")
    model = GPT.from_hparams(hp).to(rt.device)
    model.loss_modifiers = loss_modifiers(hp)
    model.loss_classes = hp.vocab_size + (len(CHAT_SPECIAL_TOKENS) if chat else 0)
    if rt.device.type == "cuda":
        for m in model.modules():
            if isinstance(m, nn.Embedding):
                m.bfloat16()  # embeddings in bf16 on GPU (record); fp32 elsewhere for accuracy
        model.use_flex = True
    fp8 = hp.fp8_head == "on" or (hp.fp8_head == "auto" and fp8_supported(rt.device) and not hp.head_chunk)
    if hp.fp8_head == "on" and not fp8_supported(rt.device):
        raise ConfigError(f"--fp8-head=on needs a GPU with compute capability >= 8.9, not {rt.device}")
    if hp.fp8_head == "on" and hp.head_chunk:
        raise ConfigError("--head-chunk computes the head in the autocast dtype: it needs --fp8-head off or auto")
    model.enable_fp8_head(fp8)
    if rt.distributed:
        for p in model.parameters():
            dist.broadcast(p.detach(), 0)
    if rt.compile_head and not rt.compile:
        model.loss_fn = compile_with_fallback(softcap_cross_entropy, "the loss head")
        model.modified_loss_fn = compile_with_fallback(softcap_modified_loss, "the loss head")
    if hp.head_chunk and (rt.compile or rt.compile_head):
        model.head_chunk_fn = compile_with_fallback(head_chunk_loss, "the loss head's chunks")
    forward = CompiledModule(model, "the model") if rt.compile else model
    return model, forward


# -----------------------------------------------------------------------------
# Loss modifiers: label smoothing, z-loss, entropy and registered custom terms, added to the cross-entropy
#
# A modifier is a name, a weight and a function of the per-token quantities the soft-capped cross-entropy already
# computes (TokenStats); it returns one added loss per token and named per-token metrics. modified_cross_entropy
# averages every term with the same token weights (per token, or per conversation in fine-tuning) and adds
# weight * term to the cross-entropy, so terms compose by summing and none replaces another. Nothing builds a
# one-hot target; everything stays a tensor until the training script syncs once per logged step.

IGNORE_INDEX = -100  # F.cross_entropy's ignore_index: fine-tuning marks the tokens it does not train with it


@dataclass(frozen=True)
class TokenStats:
    """What the cross-entropy of N target tokens computes anyway, handed to every modifier."""
    logits: Tensor  # (N, V) soft-capped fp32 logits over the padded vocabulary
    lse: Tensor  # (N,) log-partition logsumexp(logits)
    nll: Tensor  # (N,) cross-entropy of each target; 0 where not trained
    targets: Tensor  # (N,) target ids; IGNORE_INDEX where not trained
    classes: int  # rows 0..classes-1 are real targets; the rest are padding no target ever takes


ModifierFn = Callable[[TokenStats], tuple[Tensor, dict[str, Tensor]]]


@dataclass(frozen=True)
class LossModifier:
    name: str
    weight: float
    fn: ModifierFn  # (N,) added loss per token, {metric: (N,) per token}


LOSS_MODIFIERS: dict[str, ModifierFn] = {}  # what --loss-terms name=weight can switch on


def register_loss_modifier(name: str) -> Callable[[ModifierFn], ModifierFn]:
    """Decorator: make fn available as --loss-terms NAME=WEIGHT (import its module with --plugins)."""
    def register(fn: ModifierFn) -> ModifierFn:
        if not re.fullmatch(r"[a-z][a-z0-9_]*", name):
            raise ValueError(f"loss modifier name {name!r} must be lower-case letters, digits and '_'")
        LOSS_MODIFIERS[name] = fn
        return fn
    return register


def label_smoothing_term(t: TokenStats) -> tuple[Tensor, dict[str, Tensor]]:
    """Smoothed minus plain cross-entropy per unit of smoothing: eps * (this) turns the target into
    (1 - eps) * one-hot + eps * uniform over the real classes, without building either."""
    real_sum = t.logits.sum(dim=-1) - t.logits[:, t.classes:].sum(dim=-1)  # a full-width sum fuses; a slice copies
    return t.lse - real_sum / t.classes - t.nll, {}


def z_loss_term(t: TokenStats) -> tuple[Tensor, dict[str, Tensor]]:
    """logsumexp(logits)^2: pulls the softmax normaliser towards 1 (PaLM, Chowdhery et al. 2022, sec. 5)."""
    return t.lse.square(), {"lse": t.lse}


def entropy_term(t: TokenStats) -> tuple[Tensor, dict[str, Tensor]]:
    """Entropy of the predicted distribution in nats: lse - sum(p * logits). A negative weight is the confidence
    penalty of Pereyra et al. 2017 (arXiv:1701.06548); a positive one is entropy minimisation."""
    probs = torch.softmax(t.logits, dim=-1)
    return t.lse - (probs * t.logits).sum(dim=-1), {}


# name -> (the Hyperparameters field holding its weight, its function)
BUILTIN_MODIFIERS = {"label_smoothing": ("label_smoothing", label_smoothing_term), "z_loss": ("z_loss", z_loss_term),
                     "entropy": ("entropy_weight", entropy_term)}


def parse_loss_terms(text: str) -> list[tuple[str, float]]:
    """--loss-terms "name=weight,..." -> [(name, weight)]; ConfigError naming the item that is wrong."""
    terms = []
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        name, sep, value = item.partition("=")
        name = name.strip()
        try:
            weight = float(value) if sep else math.nan
        except ValueError:
            weight = math.nan
        if not math.isfinite(weight):
            raise ConfigError(f"--loss-terms item {item!r} must be NAME=WEIGHT with a finite number")
        if name in BUILTIN_MODIFIERS:
            raise ConfigError(f"--loss-terms: {name!r} has its own flag, --{_flag(BUILTIN_MODIFIERS[name][0])}")
        if name in dict(terms):
            raise ConfigError(f"--loss-terms: {name!r} is given twice (its metrics are logged under its name)")
        terms.append((name, weight))
    return terms


def registered_modifier(name: str) -> ModifierFn:
    if name not in LOSS_MODIFIERS:
        known = ", ".join(sorted(LOSS_MODIFIERS)) or "none"
        raise ConfigError(f"--loss-terms: no loss modifier {name!r} is registered (registered: {known}; a module "
                          f"given to --plugins registers one)")
    return LOSS_MODIFIERS[name]


def loss_modifiers(hp: Hyperparameters) -> tuple[LossModifier, ...]:
    """The run's modifiers in a fixed order: the built-in ones switched on, then --loss-terms as given."""
    chosen = [LossModifier(name, getattr(hp, field), fn) for name, (field, fn) in BUILTIN_MODIFIERS.items()
              if getattr(hp, field)]
    chosen += [LossModifier(name, weight, registered_modifier(name))
               for name, weight in parse_loss_terms(hp.loss_terms)]
    return tuple(chosen)


def modified_cross_entropy(logits: Tensor, targets: Tensor, modifiers: tuple[LossModifier, ...], classes: int,
                           token_weights: Tensor | None = None) -> tuple[Tensor, dict[str, Tensor]]:
    """Cross-entropy plus sum(weight * term), every part averaged with the same token weights (default: the mean
    over trained tokens; fine-tuning passes per-conversation weights that sum to its share of the step)."""
    logits = logits.view(-1, logits.size(-1))
    targets = targets.reshape(-1).long()
    trained = targets != IGNORE_INDEX
    lse = torch.logsumexp(logits, dim=-1)
    # nll from lse and the target's logit: no log-softmax over the vocabulary is built next to lse's pass
    nll = torch.where(trained, lse - logits.gather(1, targets.clamp(min=0)[:, None])[:, 0], 0.0)
    if token_weights is None:
        weights = trained.float() / trained.sum().clamp(min=1)
    else:
        weights = token_weights.reshape(-1).float() * trained
    stats = TokenStats(logits, lse, nll, targets, classes)

    def average(per_token: Tensor) -> Tensor:
        return (torch.where(trained, per_token, 0.0) * weights).sum()

    loss = average(nll)
    metrics = {"ce": loss}
    for modifier in modifiers:
        term, extra = modifier.fn(stats)
        metrics[modifier.name] = modifier.weight * average(term)
        loss = loss + metrics[modifier.name]
        metrics.update({f"{modifier.name}_{key}": average(value) for key, value in extra.items()})
    return loss, {key: value.detach() for key, value in metrics.items()}


def softcap_modified_loss(x_normed: Tensor, head_weight: Tensor, targets: Tensor, token_weights: Tensor | None,
                          modifiers: tuple[LossModifier, ...], classes: int,
                          form: str = "2025") -> tuple[Tensor, dict[str, Tensor]]:
    """softcap_cross_entropy with loss modifiers and token weights; pure, so the head compiles with them."""
    logits = softcap(F.linear(x_normed, head_weight.type_as(x_normed)).float(), x_normed.size(-1), form)
    return modified_cross_entropy(logits, targets, modifiers, classes, token_weights)


def reduce_metrics(parts: dict[str, Tensor], world_size: int, op: str = "avg") -> dict[str, float]:
    """Step metrics as floats: one stacked all_reduce and one device sync for all of them, not one per metric."""
    if not parts:
        return {}
    dtype = next(iter(parts.values())).dtype  # the first one's (the loss): the sum stays as exact as before
    stacked = torch.stack([value.to(dtype) for value in parts.values()])
    if world_size > 1:
        dist.all_reduce(stacked, op=dist.ReduceOp.AVG if op == "avg" else dist.ReduceOp.SUM)
    return dict(zip(parts, stacked.tolist()))


# -----------------------------------------------------------------------------
# Muon optimizer: Newton-Schulz orthogonalisation, Muon + Adam groups, gradient averaging


def zeropower_via_newtonschulz5(G: Tensor, steps: int = 5) -> Tensor:
    """Approximately orthogonalise G (batched over leading dims) with a quintic Newton-Schulz iteration in bf16.

    The coefficients (3.4445, -4.7750, 2.0315) maximise the slope at zero rather than converge to UV^T, so the
    singular values land near Uniform(0.5, 1.5), which trains as well as exact orthogonalisation
    (https://kellerjordan.github.io/posts/muon/). Pure: compile it at the call site.
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


# Polar Express (record #38, PR 134; Amsel, Persson, Musco, Gower 2025, arXiv:2505.16932): per-iteration quintic
# coefficients, computed for 5 iterations, safety factor 2e-2 and cushion 2, as the record's code lists them
POLAR_EXPRESS_COEFFS = (
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
)
POLAR_EXPRESS_SAFETY = 2e-2  # the record divides by the Frobenius norm times 1 + this (record #38)


def zeropower_via_polar_express(G: Tensor, steps: int = 5) -> Tensor:
    """Orthogonalise G (batched over leading dims) with Polar Express in bf16: the same quintic iteration as
    Newton-Schulz, X <- aX + (bA + cA^2)X with A = XX^T, but with coefficients chosen per iteration (minimax-optimal
    for the singular-value interval each iteration leaves), so 5 iterations bring every singular value much closer to
    1 than the fixed coefficients do. The input is scaled to spectral norm below 1 by its Frobenius norm with the
    record's safety factor. Pure: compile it at the call site."""
    X = G.bfloat16()
    transposed = G.size(-2) > G.size(-1)
    if transposed:
        X = X.mT
    X = X / (X.norm(dim=(-2, -1), keepdim=True) * (1 + POLAR_EXPRESS_SAFETY) + 1e-6)  # record #38's eps
    for a, b, c in POLAR_EXPRESS_COEFFS[:steps]:
        A = X @ X.mT
        B = b * A + c * A @ A
        X = a * X + B @ X
    if transposed:
        X = X.mT
    return X.type_as(G)


ORTHOGONALIZERS = {"newton_schulz": zeropower_via_newtonschulz5, "polar_express": zeropower_via_polar_express}


def normuon_scale(v: Tensor, second_moment: Tensor, beta2: float) -> Tensor:
    """NorMuon (record #41, PR 144; Li et al. 2025, arXiv:2510.05491): an orthogonalised update v (batched over
    leading dims) divided per neuron by the root of an EMA of that neuron's mean squared update, then scaled back to
    v's Frobenius norm. A neuron is a row of a tall or square matrix and a column of a wide one (the record reduces
    over the last dim when rows >= cols, else over rows: #48), so the state is (.., rows, 1) or (.., 1, cols);
    second_moment is updated in place: m <- beta2 m + (1 - beta2) mean(v^2)."""
    dim = -1 if v.size(-2) >= v.size(-1) else -2
    n = v.size(dim)
    v_mean = v.float().square().mean(dim=dim, keepdim=True)
    v_norm = (v_mean.sum(dim=(-2, -1), keepdim=True) * n).sqrt()  # ||v||_F
    second_moment.lerp_(v_mean, 1 - beta2)
    scale = second_moment.clamp_min(1e-10).rsqrt()
    scaled_norm = (v_mean * n * scale.square()).sum(dim=(-2, -1), keepdim=True).sqrt()  # ||v * scale||_F
    return v * (scale * (v_norm / scaled_norm.clamp_min(1e-10))).type_as(v)


def equilibrate_rows(X: Tensor) -> Tensor:
    """MuonEq (nanochat 4e014d3, 2026-07; arXiv:2603.28254): each row of a matrix (batched over leading dims) scaled
    to the matrix's mean row norm, so the spectrum that enters orthogonalisation is better conditioned."""
    target = X.float().norm(dim=(-2, -1), keepdim=True) / X.size(-2) ** 0.5
    return X * (target / X.float().norm(dim=-1, keepdim=True).clamp_min(1e-6)).to(X.dtype)


def snap_norm(v: Tensor) -> Tensor:
    """Muon+ (nanochat 4e014d3, 2026-07; arXiv:2602.21545): an orthogonalised update scaled to the Frobenius norm of
    an exactly semi-orthogonal matrix of its shape, sqrt(min(rows, cols)), correcting an iteration's under- or
    overshoot."""
    target = min(v.size(-2), v.size(-1)) ** 0.5
    return v * (target / v.float().norm(dim=(-2, -1), keepdim=True).clamp_min(1e-6)).to(v.dtype)


def cautious_mask(update: Tensor, p: Tensor, strict: bool) -> Tensor:
    """Where decay applies under cautious weight decay (record #43, PR 154; Adam: #50): where the update, which is
    subtracted from the weight, has the weight's sign, so decay moves the weight the way the update already does.
    The record's Muon decays where update * weight >= 0, its Adam only where > 0 (strict)."""
    return update * p > 0 if strict else update * p >= 0


class Muon(torch.optim.Optimizer):
    """MomentUm Orthogonalized by Newton-Schulz, for the hidden matrices; the 2026 record's variants as switches.

    Gradients are averaged across ranks before step(). Every rank keeps the momentum of every matrix (a cheap
    elementwise update), so any rank's state_dict is the full state and a run resumes on any world size. The
    expensive orthogonalisation is split: rank r updates matrices r, r+W, ... and all-gathers the results, with
    NorMuon's per-neuron state. At world size 1 no collective is called.

    orthogonalizer: a name in ORTHOGONALIZERS. normuon_beta2 > 0: NorMuon (normuon_scale). cautious: the record's
    cautious weight decay: where cautious_mask holds, w <- w - wd * lr * lr_eff * w, with lr the scheduled LR and
    lr_eff = lr * the matrix's multiplier, so the decay falls with the square of the LR schedule; otherwise decay is
    decoupled, w <- (1 - lr * wd) w, as before. lr_mults: each matrix's LR multiplier (default: the shape rule
    max(1, rows / cols)^0.5). qk_heads: for merged QKV weights (3, H * D, dim), the number of heads and heads per
    group, so that Q and K are orthogonalised per group of heads and V whole (record #80). row_equilibration and
    norm_snap: nanochat's equilibrate_rows before and snap_norm after orthogonalising. These are attributes,
    not param_groups entries, so checkpoints written before them load.
    """

    def __init__(self, params: list[Tensor], lr: float = 0.05, momentum: float = 0.95, weight_decay: float = 0.0,
                 rank: int = 0, world_size: int = 1, ns_steps: int = 5, compile_ns: bool = False,
                 orthogonalizer: str = "newton_schulz", normuon_beta2: float = 0.0, cautious: bool = False,
                 lr_mults: dict[Tensor, float] | None = None, qk_heads: dict[Tensor, tuple[int, int]] | None = None,
                 row_equilibration: bool = False, norm_snap: bool = False):
        self.rank, self.world_size, self.ns_steps = rank, world_size, ns_steps
        self.row_equilibration, self.norm_snap = row_equilibration, norm_snap
        fn = ORTHOGONALIZERS[orthogonalizer]
        self.orthogonalise = compile_with_fallback(fn, orthogonalizer.replace("_", "-")) if compile_ns else fn
        self.normuon_beta2, self.cautious = normuon_beta2, cautious
        self.lr_mults = {id(p): m for p, m in (lr_mults or {}).items()}
        self.qk_heads = {id(p): hg for p, hg in (qk_heads or {}).items()}
        by_shape: dict[tuple[int, ...], list[Tensor]] = {}
        for p in params:  # one group per shape, in first-appearance order (deterministic)
            by_shape.setdefault(tuple(p.shape), []).append(p)
        groups = [dict(params=ps) for ps in by_shape.values()]
        super().__init__(groups, dict(lr=lr, momentum=momentum, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self) -> None:  # type: ignore[override]
        pending: list[tuple[Any, Tensor, list[Tensor]]] = []
        for group in self.param_groups:
            params: list[Tensor] = group["params"]
            for p in params:
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p)
                    if self.normuon_beta2:
                        state["second_moment"] = torch.zeros(self._moment_numel(p), device=p.device)
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
                p.copy_(buffer[i, :p.numel()].view_as(p))
                if self.normuon_beta2:
                    self.state[p]["second_moment"].copy_(buffer[i, p.numel():])

    def blocks(self, p: Tensor, t: Tensor) -> list[Tensor]:
        """The matrices of t (shaped like parameter p) that are orthogonalised apart, as views of t: t itself (its
        leading dims a batch), or, for a merged QKV weight with head groups, Q and K as groups of adjacent heads
        (2 * H / g, g * D, dim) and V whole (1, H * D, dim): record #80."""
        if id(p) not in self.qk_heads:
            return [t]
        num_heads, per_group = self.qk_heads[id(p)]
        return [t[:2].reshape(2 * num_heads // per_group, t.size(1) * per_group // num_heads, t.size(2)), t[2:]]

    def _moment_shapes(self, p: Tensor) -> list[tuple[int, ...]]:
        """NorMuon's state per block: one value per neuron (normuon_scale)."""
        shapes = []
        for b in self.blocks(p, p.detach()):
            rows, cols = b.shape[-2:]
            shapes.append((*b.shape[:-2], rows, 1) if rows >= cols else (*b.shape[:-2], 1, cols))
        return shapes

    def _moment_numel(self, p: Tensor) -> int:
        return sum(math.prod(s) for s in self._moment_shapes(p))

    def _update(self, p: Tensor, group: dict[str, Any]) -> None:
        state = self.state[p]
        g = p.grad.lerp(state["momentum_buffer"], group["momentum"])  # Nesterov
        blocks = [equilibrate_rows(b) if self.row_equilibration else b for b in self.blocks(p, g)]
        updates = [self.orthogonalise(b, self.ns_steps) for b in blocks]
        updates = [snap_norm(u) for u in updates] if self.norm_snap else updates
        if self.normuon_beta2:
            moments = state["second_moment"].split([math.prod(s) for s in self._moment_shapes(p)])
            updates = [normuon_scale(u, m.view(s), self.normuon_beta2)
                       for u, m, s in zip(updates, moments, self._moment_shapes(p))]
        v = updates[0] if len(updates) == 1 else torch.cat([u.reshape(-1) for u in updates]).view_as(p)
        lr = group["lr"]
        lr_eff = lr * self.lr_mults.get(id(p), max(1, p.size(-2) / p.size(-1)) ** 0.5)
        if self.cautious:
            decay = cautious_mask(v, p, strict=False) * p * (group["weight_decay"] * lr * lr_eff)
            p.sub_(decay + v * lr_eff)  # record #43: both terms from the weight before the step
            return
        if group["weight_decay"]:
            p.mul_(1 - lr * group["weight_decay"])
        p.add_(v, alpha=-lr_eff)

    def _gather(self, chunk: list[Tensor]) -> tuple[Any, Tensor, list[Tensor]]:
        ref = chunk[0]
        extra = self._moment_numel(ref) if self.normuon_beta2 else 0
        if self.rank < len(chunk):
            mine = chunk[self.rank].detach().reshape(-1)
            if extra:
                mine = torch.cat([mine, self.state[chunk[self.rank]]["second_moment"]])
        else:
            mine = torch.zeros(ref.numel() + extra, dtype=ref.dtype, device=ref.device)
        buffer = torch.empty(self.world_size * mine.numel(), dtype=ref.dtype, device=ref.device)
        gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor  # renamed in torch 2.13
        work = gather(buffer, mine.contiguous(), async_op=True)
        return work, buffer.view(self.world_size, -1), chunk


class RecordAdam(torch.optim.Optimizer):
    """The 2026 record's Adam (its NorMuonAndAdam at f411b3d3), for the embeddings, lm_head and scalars.

    Against torch.optim.Adam: bias correction folded into the step size, lr * sqrt(1 - beta2^t) / (1 - beta1^t), and
    epsilon added to the uncorrected root, m / (sqrt(v) + eps) (torch adds it to the corrected one); a weight decay
    tied to the square of the scheduled LR, w <- w - lr^2 * wd * w (record #50: eff_wd = lr * lr * wd * wd_mul with
    lr the group's scheduled LR), applied where cautious_mask(update, w, strict=True) holds when cautious, else
    everywhere; and, with every > 1, one update every `every` steps from the sum of their gradients (record #39:
    every 2, on odd steps), the running sum kept in the optimizer state so a resume is exact.
    """

    def __init__(self, groups: list[dict[str, Any]], betas: tuple[float, float], eps: float, every: int = 1,
                 cautious: bool = False):
        super().__init__(groups, dict(betas=betas, eps=eps, weight_decay=0.0))
        self.every, self.cautious = every, cautious

    @torch.no_grad()
    def step(self) -> None:  # type: ignore[override]
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state.update(calls=0, step=0, exp_avg=torch.zeros_like(p), exp_avg_sq=torch.zeros_like(p))
                    if self.every > 1:
                        state["grad_sum"] = torch.zeros_like(p)
                state["calls"] += 1
                g = p.grad
                if self.every > 1:
                    g = state["grad_sum"].add_(g)
                    if state["calls"] % self.every:
                        continue
                self._update(p, g, state, group, beta1, beta2)
                if self.every > 1:
                    g.zero_()

    def _update(self, p: Tensor, g: Tensor, state: dict[str, Any], group: dict[str, Any], beta1: float,
                beta2: float) -> None:
        state["step"] += 1
        t, lr = state["step"], group["lr"]
        state["exp_avg"].mul_(beta1).add_(g, alpha=1 - beta1)
        state["exp_avg_sq"].mul_(beta2).addcmul_(g, g, value=1 - beta2)
        step_size = lr * (1 - beta2**t) ** 0.5 / (1 - beta1**t)
        update = state["exp_avg"].div(state["exp_avg_sq"].sqrt().add_(group["eps"])).mul_(step_size)
        if group["weight_decay"] and self.cautious:
            update.addcmul_(p, cautious_mask(update, p, strict=True), value=lr * lr * group["weight_decay"])
        elif group["weight_decay"]:
            update.add_(p, alpha=lr * lr * group["weight_decay"])
        p.sub_(update)


class RowAdam(torch.optim.Optimizer):
    """Adam on the rows of a table that have a gradient this step (--bigram-update rows): lazy Adam, as
    torch.optim.SparseAdam computes it, on the dense gradient nn.Embedding gives, with RecordAdam's arithmetic
    (bias correction folded into the step size, eps on the uncorrected root, LR-squared weight decay of the rows).
    Rows no token of the step hashed to keep their weights and moments, where the record's dense Adam still moves
    them along their decaying momentum; in exchange the update reads and writes only the touched rows (one pass
    over the gradient finds them), so its cost follows the batch, not the table."""

    def __init__(self, groups: list[dict[str, Any]], betas: tuple[float, float], eps: float):
        super().__init__(groups, dict(betas=betas, eps=eps, weight_decay=0.0))

    @torch.no_grad()
    def step(self) -> None:  # type: ignore[override]
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state.update(step=0, exp_avg=torch.zeros_like(p), exp_avg_sq=torch.zeros_like(p))
                state["step"] += 1
                t, lr = state["step"], group["lr"]
                rows = p.grad.ne(0).any(dim=1).nonzero()[:, 0]  # (R,)
                g = p.grad[rows]
                m = state["exp_avg"][rows].mul_(beta1).add_(g, alpha=1 - beta1)
                v = state["exp_avg_sq"][rows].mul_(beta2).addcmul_(g, g, value=1 - beta2)
                state["exp_avg"][rows], state["exp_avg_sq"][rows] = m, v
                update = m.div(v.sqrt().add_(group["eps"])).mul_(lr * (1 - beta2**t) ** 0.5 / (1 - beta1**t))
                if group["weight_decay"]:
                    update.add_(p[rows], alpha=lr * lr * group["weight_decay"])
                p.index_add_(0, rows, update, alpha=-1)


# The 2026 record's Adam table (its TrainingManager at f411b3d3), generalised to this model's groups: betas, the
# record's LR for these parameters (base 0.008 times its lr_mul) over the 2025 record's (head 0.22, embeddings 0.6,
# scalars 0.04), applied to --head-lr, --embed-lr and --scalar-lr, and the weight-decay multiplier of
# --adam-weight-decay. The scalars' betas are record #52's (PR 177), the embeddings' record #57's.
ADAM_TABLE_2026 = {
    "head": dict(betas=(0.5, 0.95), lr_scale=0.008 / 0.22, wd_mul=150.0),
    "embed": dict(betas=(0.5, 0.95), lr_scale=0.008 / 0.6, wd_mul=150.0),
    "value_embeds": dict(betas=(0.75, 0.95), lr_scale=0.008 * 75 / 0.6, wd_mul=5.0),
    "scalars": dict(betas=(0.9, 0.99), lr_scale=0.008 * 5 / 0.04, wd_mul=0.0),
    # the 2026 architecture's parameters (record #84's table, 2c702746^..d0f2bc46^; --scalar-lr's scale)
    "bigram": dict(betas=(0.75, 0.95), lr_scale=0.008 * 75 / 0.6, wd_mul=5.0),  # of --embed-lr
    "smear_gate": dict(betas=(0.9, 0.99), lr_scale=0.008 * 0.01 / 0.04, wd_mul=0.0),  # record #52: a low LR
    "skip_gate": dict(betas=(0.9, 0.99), lr_scale=0.008 * 0.05 / 0.04, wd_mul=0.0),
    "gates": dict(betas=(0.9, 0.99), lr_scale=0.008 / 0.04, wd_mul=1.0),  # attention and value-embedding gates
    "lambdas": dict(betas=(0.9, 0.95), lr_scale=0.008 / 0.04, wd_mul=0.0),  # post, x0, bigram lambdas; XSA alphas
    "resid_lambdas": dict(betas=(0.9, 0.95), lr_scale=0.008 * 5 / 0.04, wd_mul=0.0),
}


def muon_params(model: GPT) -> list[Tensor]:
    """The hidden matrices Muon trains: the blocks' projections (not their gates, which Adam trains: record #56)."""
    return [p for n, p in model.blocks.named_parameters() if p.ndim >= 2 and "gate" not in n]


def adam_groups(model: GPT, hp: Hyperparameters) -> list[dict[str, Any]]:
    """The Adam groups: lm_head, the embeddings and the scalars at the 2025 record's LRs; with --adam-table 2026 the
    value embeddings apart, each with the 2026 record's betas, LR scale and weight-decay multiplier. The 2026
    architecture's gates are scalars in the 2025 table; in the 2026 table each part has its own row."""
    head = [model.lm_head.weight]
    muon = {id(p) for p in muon_params(model)}
    scalars = [p for n, p in model.named_parameters() if id(p) not in muon and p is not model.lm_head.weight
               and "embed" not in n]
    if hp.adam_table == "2025":
        embeds = [p for n, p in model.named_parameters() if "embed" in n]
        return [dict(params=head, lr=hp.head_lr), dict(params=embeds, lr=hp.embed_lr),
                dict(params=scalars, lr=hp.scalar_lr)]
    parts = {name: [] for name in ADAM_TABLE_2026 if name not in ("head", "embed", "value_embeds", "bigram")}
    for n, p in model.named_parameters():
        if id(p) in {id(q) for q in scalars}:
            parts[adam_row_2026(n)].append(p)
    named = dict(head=(head, hp.head_lr), embed=([model.embed.weight], hp.embed_lr),
                 value_embeds=([ve.weight for ve in model.value_embeds], hp.embed_lr),
                 bigram=([] if model.bigram is None else [model.bigram.embed.weight], hp.embed_lr),
                 **{name: (params, hp.scalar_lr) for name, params in parts.items()})
    out = []
    for name, (params, lr) in named.items():
        row = ADAM_TABLE_2026[name]
        out.append(dict(params=params, lr=lr * row["lr_scale"], betas=row["betas"],
                        weight_decay=hp.adam_weight_decay * row["wd_mul"]))
    return [g for g in out if g["params"]]


def adam_row_2026(name: str) -> str:
    """The ADAM_TABLE_2026 row of a parameter outside the head, the embeddings and Muon, by its name."""
    leaf = name.rsplit(".", 1)[-1]
    if name.startswith(("smear.gate", "skip.gate")):
        return name.split(".")[0] + "_gate"
    if leaf in ("gate", "ve_gate"):
        return "gates"
    if leaf in ("post_lambdas", "x0_lambda", "bigram_lambda", "xsa_alpha"):
        return "lambdas"
    if leaf == "resid_lambdas":
        return "resid_lambdas"
    return "scalars"


def muon_lr_mults(model: GPT, hp: Hyperparameters) -> dict[Tensor, float]:
    """Per-matrix Muon LR multipliers where they differ from the shape rule max(1, rows / cols)^0.5: with
    --muon-lr-mults 2026, the record's, which stores both MLP matrices tall (hidden x dim; PR 168): the shape rule
    on the larger over the smaller side for both, 2 at 4x width, and twice that for the output projection."""
    if hp.muon_lr_mults == "shape":
        return {}
    mults = {}
    for block in model.blocks:
        ratio = max(block.mlp.c_fc.weight.shape) / min(block.mlp.c_fc.weight.shape)
        mults[block.mlp.c_fc.weight] = ratio**0.5
        mults[block.mlp.c_proj.weight] = 2 * ratio**0.5  # record PR 168: c_proj's lr_mul 2
    return mults


def setup_optimizers(model: GPT, hp: Hyperparameters, rank: int = 0, world_size: int = 1,
                     compile_ns: bool = False) -> list[torch.optim.Optimizer]:
    """Adam for lm_head, embeddings and scalars, Muon for the hidden matrices (record learning rates), each with the
    2026 record's variants where the config switches them on. With --optimizer adamw the hidden matrices get
    GPT-2-style AdamW instead of Muon and nothing else changes: the ablation that measures what Muon buys."""
    hidden = muon_params(model)
    # record: head 0.22, embeddings 0.6, scalars 0.04 with betas (0.8, 0.95); the tiny eps is
    # @YouJiacheng's fix for the world-size dependence of the update size
    groups = adam_groups(model, hp)
    row_groups = []
    if hp.bigram_update == "rows" and model.bigram is not None:  # the bigram table gets its own RowAdam
        table = model.bigram.embed.weight
        row_groups = [dict(g, params=[table]) for g in groups if any(p is table for p in g["params"])]
        for g in groups:
            g["params"] = [p for p in g["params"] if p is not table]
        groups = [g for g in groups if g["params"]]
    fused = next(model.parameters()).device.type == "cuda"
    if hp.adam_update == "record":
        adam: torch.optim.Optimizer = RecordAdam(groups, (hp.adam_beta1, hp.adam_beta2), hp.adam_eps,
                                                 every=hp.adam_every, cautious=hp.cautious_weight_decay)
    else:
        adam = torch.optim.Adam(groups, betas=(hp.adam_beta1, hp.adam_beta2), eps=hp.adam_eps, fused=fused)
    if hp.optimizer == "adamw":
        # GPT-2 / nanoGPT settings: betas (0.9, 0.95), eps 1e-8, decoupled weight decay on the matrices
        hidden_opt = torch.optim.AdamW(hidden, lr=hp.adamw_lr, betas=(0.9, 0.95), eps=1e-8,
                                       weight_decay=hp.adamw_weight_decay, fused=fused)
    else:
        qk = {b.attn.qkv_w: (b.attn.num_heads, hp.muon_qk_head_groups) for b in model.blocks
              if b.attn is not None and hp.muon_qk_head_groups}
        hidden_opt = Muon(hidden, lr=hp.muon_lr, momentum=hp.muon_momentum, weight_decay=hp.muon_weight_decay,
                          rank=rank, world_size=world_size, compile_ns=compile_ns,
                          orthogonalizer=hp.muon_orthogonalizer, normuon_beta2=hp.normuon_beta2 if hp.normuon else 0.0,
                          cautious=hp.cautious_weight_decay, lr_mults=muon_lr_mults(model, hp), qk_heads=qk,
                          row_equilibration=hp.muon_row_equilibration, norm_snap=hp.muon_norm_snap)
    optimizers: list[torch.optim.Optimizer] = [adam, hidden_opt]
    if row_groups:  # before Muon, which stays last
        optimizers.insert(1, RowAdam(row_groups, (hp.adam_beta1, hp.adam_beta2), hp.adam_eps))
    for opt in optimizers:
        for group in opt.param_groups:
            group["initial_lr"] = group["lr"]
    return optimizers


def optimizer_state_bytes(optimizers: list[torch.optim.Optimizer]) -> int:
    """Bytes the optimizers' state holds once the first step has made it: two moments per Adam (and AdamW)
    parameter, one momentum per Muon parameter (what a checkpoint's size estimate counts before step 1)."""
    size = 0
    for opt in optimizers:
        per_param = 2 if isinstance(opt, torch.optim.Adam) else 1
        per_param = 2 + (opt.every > 1) if isinstance(opt, RecordAdam) else per_param  # with the gradient sum
        size += per_param * sum(p.numel() * p.element_size() for g in opt.param_groups for p in g["params"])
    return size


def optimizer_step(model: nn.Module, optimizers: list[torch.optim.Optimizer], step: int, hp: Hyperparameters,
                   world_size: int = 1) -> None:
    """The update that follows a step's backward passes, the same in every training path (pretraining,
    fine-tuning, the benchmark, the CUDA tests): gradients averaged over ranks, the schedules of `step` set,
    every optimizer stepped, the gradients dropped."""
    all_reduce_gradients(model, world_size)
    apply_schedules(optimizers, step, hp)
    tied = embed_tied_at(step, hp)
    if tied:
        fold_tied_gradient(model)
    for opt in optimizers:
        opt.step()
    if tied:
        sync_tied_embedding(model, optimizers, untie=step == split_step(hp))
    model.zero_grad(set_to_none=True)


def fold_tied_gradient(model: GPT) -> None:
    """While tied, the one matrix's gradient is the head's plus the embedding's, and only lm_head's optimizer slot
    steps it, with lm_head's LR, betas and decay (record #89 sums embed.grad into lm_head.grad and skips embed)."""
    head, embed = model.lm_head.weight, model.embed.weight
    if embed.grad is not None:
        head.grad.add_(embed.grad)
        embed.grad = None  # so the embedding's own Adam slot neither steps nor makes state


def sync_tied_embedding(model: GPT, optimizers: list[torch.optim.Optimizer], untie: bool) -> None:
    """After a tied step the embedding is a copy of the updated head, so every reader of either weight (the
    forward pass, checkpoints, eval.py, export) sees the one matrix. At the split (untie) the embedding's optimizer
    state becomes a copy of the head's, as the record's copy_lm_state_to_embed does for Adam's moments and step
    count; here every entry is copied (RecordAdam's call count and gradient sum too), so the two continue from
    the tied value on the same cadence, each with its own group's LR, betas and decay from then on."""
    head, embed = model.lm_head.weight, model.embed.weight
    with torch.no_grad():
        embed.copy_(head)
    if not untie:
        return
    for opt in optimizers:
        state = opt.state.get(head)
        if state:
            opt.state[embed] = {k: v.detach().clone().to(embed.dtype if v.shape == embed.shape else v.dtype)
                                if isinstance(v, Tensor) else v for k, v in state.items()}


def all_reduce_gradients(model: nn.Module, world_size: int) -> None:
    """Average gradients over ranks (no-op on one process)."""
    if world_size == 1:
        return
    works = [dist.all_reduce(p.grad, op=dist.ReduceOp.AVG, async_op=True)
             for p in model.parameters() if p.grad is not None]
    for work in works:
        work.wait()


# -----------------------------------------------------------------------------
# Data: token shards, checks, the distributed data generators (token stream, document-aligned), validation loss

SHARD_MAGIC = 20240520  # llm.c / modded-nanogpt shard header
SHARD_VERSION = 1
HEADER_INTS = 256  # header is 256 int32; tokens follow as uint16


def write_data_shard(path: str | Path, tokens: np.ndarray | list[int]) -> None:
    """Write tokens as a shard (header + uint16), atomically."""
    arr = np.asarray(tokens)
    if arr.size == 0 or arr.size >= 2**31:
        raise DataError(f"{path}: a shard holds 1 to 2**31-1 tokens, not {arr.size}")
    if arr.min() < 0 or arr.max() >= 2**16:
        raise DataError(f"{path}: token ids must fit in uint16 (0..65535)")
    header = np.zeros(HEADER_INTS, dtype=np.int32)
    header[:3] = (SHARD_MAGIC, SHARD_VERSION, arr.size)
    with atomic_write(path) as f:
        f.write(header.tobytes())
        f.write(arr.astype(np.uint16).tobytes())


def read_shard_header(path: str | Path) -> int:
    """Validate a shard's header and size; return its token count."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            raw = f.read(HEADER_INTS * 4)
    except OSError as e:
        raise DataError(f"{path}: cannot read shard ({e.strerror})") from None
    if len(raw) < HEADER_INTS * 4:
        raise DataError(f"{path}: truncated shard header ({size} bytes, need {HEADER_INTS * 4})")
    header = np.frombuffer(raw, dtype=np.int32)
    if header[0] != SHARD_MAGIC:
        raise DataError(f"{path}: wrong magic number {header[0]} (expected {SHARD_MAGIC}); not a token shard")
    if header[1] != SHARD_VERSION:
        raise DataError(f"{path}: unsupported shard version {header[1]} (expected {SHARD_VERSION})")
    num_tokens = int(header[2])
    expected = HEADER_INTS * 4 + 2 * num_tokens
    if size != expected:
        raise DataError(f"{path}: truncated shard: header claims {num_tokens} tokens ({expected} bytes), "
                        f"file has {size} bytes")
    if num_tokens == 0:
        raise DataError(f"{path}: empty shard (0 tokens)")
    return num_tokens


def _load_data_shard(path: str | Path) -> Tensor:
    """Memory-map a shard's tokens as a uint16 tensor (zero-copy; pages are read on first touch)."""
    num_tokens = read_shard_header(path)
    arr = np.memmap(path, dtype=np.uint16, mode="c", offset=HEADER_INTS * 4, shape=(num_tokens,))
    return torch.from_numpy(arr)


def list_shards(pattern: str) -> list[Path]:
    files = [Path(f) for f in sorted(glob.glob(pattern))]
    if not files:
        raise DataError(f"no files match {pattern!r}")
    return files


def check_token_ids(path: Path, tokens: Tensor, vocab_size: int) -> None:
    """uint16 shards can hold ids up to 65535; an id past the embedding table would crash the forward pass."""
    top = int(tokens.numpy().max())
    if top >= vocab_size:
        raise DataError(f"{path}: token id {top} is outside the vocabulary (--vocab-size={vocab_size}); the shard "
                        f"was written with another tokenizer or is corrupt")


def usable_batches(files: list[Path], batch_size: int) -> int:
    """How many batches the in-order, non-cycling generator yields from these shards (headers only)."""
    return sum((n - batch_size - 2) // batch_size + 1 for n in map(read_shard_header, files) if n > batch_size + 1)


def check_data(hp: Hyperparameters, world_size: int, train_files: str, val_files: str) -> None:
    """Before anything is written: every shard's header and size, a validation split that covers --val-tokens, and
    the token ids of the validation shards and the first training shard (later ones are checked as they load)."""
    train, val = list_shards(train_files), list_shards(val_files)
    for path in train:
        if read_shard_header(path) <= hp.tokens_per_step + 1:
            raise DataError(f"{path}: {read_shard_header(path)} tokens; one batch needs more than "
                            f"{hp.tokens_per_step + 1}: lower the sequence length or merge shards")
    val_batch = world_size * hp.val_seq_len
    if usable_batches(val, val_batch) < hp.val_tokens // val_batch:
        raise DataError(f"validation files {val_files!r} hold fewer than --val-tokens={hp.val_tokens} tokens; "
                        f"lower --val-tokens")
    for path in [train[0], *val]:
        check_token_ids(path, _load_data_shard(path), hp.vocab_size)
    if hp.doc_aligned:
        document_starts(train[0], _load_data_shard(train[0]))  # later shards are checked as they load


def start_position(start: dict[str, int] | None, fresh: dict[str, int], files: list[Path],
                   pattern: str) -> dict[str, int]:
    """A loader's position: a copy of the saved `start`, or `fresh` (a new run). A saved one must be this loader's
    kind (its keys, pos for the stream, doc for --doc-aligned) and name one of the shards `pattern` matches."""
    pos = dict(fresh) if start is None else dict(start)
    if "doc" in fresh and "doc" not in pos:
        raise DataError(f"saved data position {pos} is not a --doc-aligned one; resume with the run's own "
                        f"--doc-aligned setting")
    if "pos" in fresh and "pos" not in pos:
        raise DataError(f"saved data position {pos} is a --doc-aligned one; resume with the run's own --doc-aligned "
                        f"setting")
    if not 0 <= pos["shard"] < len(files):
        raise DataError(f"saved data position is in shard {pos['shard']}, but {pattern!r} matches only "
                        f"{len(files)} file(s)")
    return pos


def distributed_data_generator(pattern: str, batch_size: int, rank: int, world_size: int, *,
                               device: torch.device | str = "cpu", start: dict[str, int] | None = None,
                               cycle: bool = True, row_len: int = 0, shuffle_seed: int | None = None,
                               vocab_size: int | None = None) -> Iterator[tuple[Tensor, Tensor, dict[str, int]]]:
    """Yield (inputs, targets, position) with rank's slice of each global batch of batch_size tokens.

    Deterministic; rank r takes tokens [pos + r*local, pos + (r+1)*local + 1) as in the record. With cycle the
    shards repeat (epochs) for small corpora; position is where the next batch starts, so passing it back as
    `start` resumes exactly. With shuffle_seed, each shard is cut into rows of row_len (+1 target) tokens that
    are visited in a seeded random order, new every epoch: batches of a small corpus of long works (Shakespeare)
    then mix many works instead of walking through one play at a time. With vocab_size, each shard's token ids
    are checked when it loads.
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
        if vocab_size is not None:
            check_token_ids(files[i], tokens, vocab_size)
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

    pos = start_position(start, dict(shard=0, pos=0, epoch=0), files, pattern)
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


def document_starts(path: Path, tokens: Tensor) -> np.ndarray:
    """The offsets of a shard's <|endoftext|> tokens: where its documents start (record #89's Shard.bos_idx)."""
    starts = np.flatnonzero(tokens.numpy() == EOT_ID)
    if not len(starts):
        raise DataError(f"{path}: no <|endoftext|> (id {EOT_ID}) in the shard, so no document starts for "
                        f"--doc-aligned rows; write documents as <|endoftext|> + text, or pass --doc-aligned false")
    return starts


def aligned_rows(starts: np.ndarray, size: int, doc: int, rows: int, row_tokens: int, max_len: int
                 ) -> tuple[list[list[tuple[int, int]]], int] | None:
    """The pieces [start, end) of `rows` successive rows of row_tokens tokens each, from document `doc` of a shard of
    `size` tokens on, and the next document; None when the shard runs out of documents first.

    As record #89's Shard.next_batch fills a rank's micro-batch: each piece starts at a document start and ends at
    the earliest of the next document's start, start + max_len (0 = no such cut) and the end of the row; the rest of
    a cut document is dropped, and the next piece starts at the next document."""
    pieces = []
    for _ in range(rows):
        row: list[tuple[int, int]] = []
        filled = 0
        while filled < row_tokens:
            if doc >= len(starts):
                return None
            start = int(starts[doc])
            doc += 1
            end = min(int(starts[doc]) if doc < len(starts) else size, start + row_tokens - filled)
            if max_len:
                end = min(end, start + max_len)
            row.append((start, end))
            filled += end - start
        pieces.append(row)
    return pieces, doc


AlignedBatches = Generator[tuple[Tensor, Tensor, dict[str, int]], int, None]


def doc_aligned_generator(pattern: str, batch_size: int, rank: int, world_size: int, *, row_len: int,
                          device: torch.device | str = "cpu", start: dict[str, int] | None = None,
                          vocab_size: int | None = None) -> AlignedBatches:
    """--doc-aligned batches: `loader.send(max_len)` returns (inputs, targets, position) of rank's share of the next
    global batch of batch_size tokens, in rows of row_len tokens that each start at a document start (record #89's
    BOS-aligned loader, with its rows made of documents cut at max_len tokens, 0 = only by the row's end).

    Every rank builds the whole global batch's rows (aligned_rows on the document index, no tokens read) and takes
    rows [rank * n, (rank + 1) * n), so 2 processes see together what 1 sees. Each row is row_len + 1 tokens: its
    first row_len are inputs, its last row_len targets (across piece boundaries, as in the record). A batch that the
    shard's documents cannot fill is built from the next shard's first document, the shards repeating (epochs) as
    distributed_data_generator's do. The position (shard, doc, epoch) names the next batch's first document and
    max_len is the caller's per batch, so passing a position back as `start` resumes exactly in any stage.
    """
    batches = _doc_aligned_batches(list_shards(pattern), pattern, batch_size, rank, world_size, row_len, device,
                                   start, vocab_size)
    next(batches)  # runs the checks and loads the first shard now, so bad input fails before training starts
    return batches


def _doc_aligned_batches(files: list[Path], pattern: str, batch_size: int, rank: int, world_size: int, row_len: int,
                         device: torch.device | str, start: dict[str, int] | None, vocab_size: int | None
                         ) -> AlignedBatches:
    if batch_size % (row_len * world_size):
        raise DataError(f"document-aligned rows need a batch of {batch_size} tokens divisible by row_len * world "
                        f"size = {row_len * world_size}")
    rows, local_rows = batch_size // row_len, batch_size // (row_len * world_size)
    pos = start_position(start, dict(shard=0, doc=0, epoch=0), files, pattern)

    def load(i: int) -> tuple[Tensor, np.ndarray]:
        tokens = _load_data_shard(files[i])
        if vocab_size is not None:
            check_token_ids(files[i], tokens, vocab_size)
        return tokens, document_starts(files[i], tokens)

    tokens, starts = load(pos["shard"])
    max_len = yield  # primed by doc_aligned_generator: every batch comes from a send(max_len)
    while True:
        found = aligned_rows(starts, len(tokens), pos["doc"], rows, row_len + 1, max_len)
        if found is None:
            if pos["doc"] == 0:
                raise DataError(f"{files[pos['shard']]}: its documents, cut at {max_len or row_len + 1} tokens, do "
                                f"not fill one batch of {rows} rows of {row_len + 1}; merge shards or lower the "
                                f"sequence length")
            pos["shard"], pos["doc"] = pos["shard"] + 1, 0
            if pos["shard"] == len(files):
                pos["shard"], pos["epoch"] = 0, pos["epoch"] + 1
            tokens, starts = load(pos["shard"])
            continue
        pieces, pos["doc"] = found
        mine = [torch.cat([tokens[a:b] for a, b in row]) for row in pieces[rank * local_rows:(rank + 1) * local_rows]]
        batch = torch.stack(mine).to(torch.int64)  # (this rank's rows, row_len + 1)
        inputs, targets = batch[:, :-1].reshape(-1), batch[:, 1:].reshape(-1)
        max_len = yield (inputs.to(device=device, dtype=torch.int32, non_blocking=True),
                         targets.to(device=device, non_blocking=True), dict(pos))


@torch.no_grad()
def evaluate(forward: Any, hp: Hyperparameters, rt: Runtime, window: Tensor | int,
             val_files: str | None = None) -> float:
    """Mean validation loss over exactly hp.val_tokens tokens, averaged over ranks (the record's protocol)."""
    val_batch = rt.world_size * hp.val_seq_len
    steps = hp.val_tokens // val_batch
    row = hp.row_len or hp.val_seq_len
    loader = distributed_data_generator(val_files or hp.val_files, val_batch, rt.rank, rt.world_size,
                                        device=rt.device, cycle=False, vocab_size=hp.vocab_size)
    total = torch.zeros((), device=rt.device)
    was_training = forward.training
    forward.eval()
    for i in range(steps):
        batch = next(loader, None)
        if batch is None:
            raise DataError(f"validation files {val_files or hp.val_files!r} hold fewer than --val-tokens="
                            f"{hp.val_tokens} tokens (ran out after {i * val_batch}); lower --val-tokens")
        with rt.autocast():
            total += forward(batch[0].view(-1, row), batch[1].view(-1, row), window).float()
    forward.train(was_training)
    total /= steps
    if rt.distributed:
        dist.all_reduce(total, op=dist.ReduceOp.AVG)
    return float(total)


# -----------------------------------------------------------------------------
# Tokenizer and chat format: GPT-2 BPE, chat template v1, conversation files

GPT2_RANKS_SHA256 = "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"  # tiktoken r50k_base
GPT2_RANKS_FILE = REPO_DIR / "data" / "gpt2.tiktoken"  # fetched and verified by data/shakespeare.py
# Chat special tokens live in free rows of the padded vocabulary (50257..50303); user text never encodes to them.
CHAT_SPECIAL_TOKENS = {"<|system|>": 50257, "<|user|>": 50258, "<|assistant|>": 50259, "<|end|>": 50260}


class Tokenizer:
    """GPT-2 BPE via tiktoken. encode() treats every string as plain text: special-token spellings stay text."""

    def __init__(self, encoding: Any):
        self.enc = encoding
        self.eot_id = EOT_ID
        self.special_ids = dict(CHAT_SPECIAL_TOKENS, **{"<|endoftext|>": EOT_ID})
        self.name = "gpt2"

    def encode(self, text: str) -> list[int]:
        return self.enc.encode_ordinary(text)

    def encode_document(self, text: str) -> list[int]:
        """A document as the model is trained on it: <|endoftext|> then the text."""
        return [EOT_ID] + self.enc.encode_ordinary(text)

    def decode(self, ids: list[int]) -> str:
        return self.enc.decode(ids)

    def token_bytes(self, token_id: int) -> bytes:
        return self.enc.decode_single_token_bytes(token_id)

    def byte_lengths(self, size: int) -> Tensor:
        """UTF-8 bytes of every id below size; 0 for special tokens, so bits per byte counts text bytes only."""
        special = set(self.special_ids.values())
        return torch.tensor([0 if i in special or i >= self.enc.n_vocab else len(self.token_bytes(i))
                             for i in range(size)], dtype=torch.int64)


CHAT_TEMPLATE_VERSION = 1  # bump when render_conversation changes; fine-tuned checkpoints record the version
CHAT_ROLES = ("system", "user", "assistant")
GPT2_MAX_TOKEN_BYTES = 128  # the longest GPT-2 token, in UTF-8 bytes (measured over all 50,257 ids)
CHAT_VOCAB_LIMIT = 50261  # ids a chat model may sample: GPT-2's 50257 and the four chat tokens


def render_conversation(tokenizer: "Tokenizer", messages: list[dict[str, str]], *,
                        add_generation_prompt: bool = False) -> tuple[list[int], list[int]]:
    """Chat template v1 (finetune.py trains on it, chat.py prompts with it): <|endoftext|>, then per message
    <|role|> content <|end|>; add_generation_prompt appends <|assistant|> for the reply to come.

    Returns (ids, mask): mask[i] = 1 where ids[i] is a training target, i.e. the content of assistant messages
    and their <|end|> (so the model learns to stop); system and user text and every role token are 0.
    Content is encoded as plain text: a message spelling "<|assistant|>" cannot forge a special token.
    """
    ids, mask = [EOT_ID], [0]
    for message in messages:
        if message.get("role") not in CHAT_ROLES or not isinstance(message.get("content"), str):
            raise ValueError(f"a message needs a role in {CHAT_ROLES} and string content, got {message!r:.80}")
        content = tokenizer.encode(message["content"])
        trained = int(message["role"] == "assistant")
        ids += [CHAT_SPECIAL_TOKENS[f"<|{message['role']}|>"], *content, CHAT_SPECIAL_TOKENS["<|end|>"]]
        mask += [0] + [trained] * (len(content) + 1)
    if add_generation_prompt:
        ids.append(CHAT_SPECIAL_TOKENS["<|assistant|>"])
        mask.append(0)
    return ids, mask


def conversation_error(record: Any) -> str | None:
    """Why a {"messages": [...]} record cannot be trained on, naming the field; None when it is valid."""
    if not isinstance(record, dict):
        return f"must be an object with 'messages', not {type(record).__name__}"
    messages = record.get("messages")
    if not isinstance(messages, list) or not messages:
        return "'messages' must be a non-empty list"
    for j, m in enumerate(messages, 1):
        if not isinstance(m, dict):
            return f"message {j} must be an object with 'role' and 'content'"
        if "role" not in m:
            return f"message {j}: missing 'role'"
        if m["role"] not in CHAT_ROLES:
            return f"message {j}: unknown role {m['role']!r:.40} (expected system, user or assistant)"
        if m["role"] == "system" and j != 1:
            return f"message {j}: a system message may only come first"
        if "content" not in m:
            return f"message {j}: missing 'content'"
        if not isinstance(m["content"], str):
            return f"message {j}: 'content' must be a string, not {type(m['content']).__name__}"
        if not m["content"].strip():
            return f"message {j}: empty 'content'"
    if not any(m["role"] == "assistant" for m in messages):
        return "no assistant message (nothing to train on)"
    return None


def load_conversations(path: str | Path, skip_invalid: bool = False) -> tuple[list[dict[str, Any]], list[str]]:
    """Records from {"conversations": [{"messages": [...]}, ...]} JSON or JSONL with one {"messages": [...]} per
    line, all validated before anything else happens. Raises DataError naming the file, record and field for the
    first bad record, or with skip_invalid returns (valid records, one message per skipped record)."""
    path = Path(path)
    try:
        text = path.read_bytes().decode("utf-8-sig")  # a byte-order mark, as some editors write, is fine
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror})") from None
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text (byte {e.start})") from None
    if not text.strip():
        raise DataError(f"{path}: the file is empty (expected conversations as JSON or JSONL)")
    numbered: list[tuple[str, Any]] = []
    line_no = 0
    try:
        if path.suffix == ".jsonl":
            for line_no, line in enumerate(text.split("\n"), 1):  # not splitlines: U+2028 may sit inside a string
                if line.strip():
                    numbered.append((f"line {line_no}", json.loads(line)))
        else:
            data = json.loads(text)
            if not isinstance(data, dict) or not isinstance(data.get("conversations"), list):
                raise DataError(f"{path}: expected an object with a 'conversations' list (or a .jsonl file with one "
                                f"{{\"messages\": [...]}} object per line)")
            numbered = [(f"record {i}", r) for i, r in enumerate(data["conversations"], 1)]
    except json.JSONDecodeError as e:
        where = f"line {line_no}: " if path.suffix == ".jsonl" else f"line {e.lineno} column {e.colno}: "
        raise DataError(f"{path}: not valid JSON ({where}{e.msg})") from None
    except RecursionError:
        raise DataError(f"{path}: JSON nested too deeply") from None
    except DataError:
        raise
    except ValueError as e:  # e.g. an integer literal longer than Python's 4300-digit limit
        raise DataError(f"{path}: not valid JSON ({first_line(e)})") from None
    valid, skipped = [], []
    for where, record in numbered:
        problem = conversation_error(record)
        if problem is None:
            valid.append(record)
        elif skip_invalid:
            skipped.append(f"{where}: {problem}")
        else:
            raise DataError(f"{path}: {where}: {problem} (fix it, or pass --skip-invalid to skip such records)")
    if not valid:
        raise DataError(f"{path}: no valid conversations")
    return valid, skipped


def get_tokenizer(ranks_file: str | Path | None = None) -> Tokenizer:
    """The local ranks file first (offline), then tiktoken's own download; a clear error if neither works."""
    import base64
    import hashlib

    import tiktoken

    path = Path(ranks_file or os.environ.get("NANOGPT_RANKS_FILE", GPT2_RANKS_FILE))
    specials = dict(CHAT_SPECIAL_TOKENS, **{"<|endoftext|>": EOT_ID})
    if path.is_file():
        # hash and parse here rather than via tiktoken's loader, whose check is skipped when its cache is off
        data = path.read_bytes()
        if hashlib.sha256(data).hexdigest() != GPT2_RANKS_SHA256:
            raise TokenizerError(f"{path}: sha256 differs from GPT-2's r50k_base ranks; delete it and run "
                                 f"`python data/shakespeare.py` to fetch a verified copy")
        ranks = {base64.b64decode(tok): int(rank) for tok, rank in (line.split() for line in data.splitlines() if line)}
        from tiktoken_ext.openai_public import r50k_pat_str

        return Tokenizer(tiktoken.Encoding(name="gpt2", pat_str=r50k_pat_str, mergeable_ranks=ranks,
                                           special_tokens=specials))
    try:
        base = tiktoken.get_encoding("gpt2")
    except Exception:  # noqa: BLE001 - any network or cache failure means the same thing here
        raise TokenizerError(f"GPT-2 BPE ranks not found at {path} and tiktoken could not download them; run "
                             f"`python data/shakespeare.py` (fetches them from the openai-whisper package)") from None
    return Tokenizer(tiktoken.Encoding(name="gpt2", pat_str=base._pat_str, mergeable_ranks=base._mergeable_ranks,
                                       special_tokens=specials))


# -----------------------------------------------------------------------------
# Checkpoints: save, load, restore, infer a config, find by run, step and kind

CHECKPOINT_FORMAT = 1
CHECKPOINT_RE = re.compile(r"state_step(\d{6})\.pt$")


def save_checkpoint(path: str | Path, *, step: int, model: nn.Module, optimizers: list[torch.optim.Optimizer],
                    hp: Hyperparameters, code: dict[str, str], data_position: dict[str, int] | None = None,
                    val_loss: float | None = None, extra: dict[str, Any] | None = None) -> Path:
    """Write a checkpoint (format 1): tensors and plain types only, via a temporary file and rename. The weights
    come from the raw module (compile/DDP prefixes stripped); extra entries (val_step, kind, ...) go at the top
    level. An OSError from the write propagates, and the file at `path` is then the old one or absent."""
    path = Path(path)
    state = dict(
        format=CHECKPOINT_FORMAT, step=step, code=code,
        model=strip_compile_prefixes(model.state_dict()),
        optimizers=[opt.state_dict() for opt in optimizers],
        hyperparameters=hp.to_dict(), tokenizer="gpt2", data_position=data_position or {},
        rng=dict(torch=torch.get_rng_state(),
                 cuda=torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []),
        val_loss=val_loss, **(extra or {}),
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path) as f:
        torch.save(state, f)
    return path


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load with weights_only=True; any failure becomes one CheckpointError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    with open(path, "rb") as f:
        magic = f.read(2)
    if magic != b"PK" and magic[:1] != b"\x80":  # torch.save writes a zip archive (legacy: a pickle)
        raise CheckpointError(f"{path}: not a loadable checkpoint: not a file written by torch.save")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # noqa: BLE001 - truncated zips, pickles, wrong files all end here
        text = str(e).strip()
        reason = f"{type(e).__name__}: {text.splitlines()[0]}" if text else type(e).__name__
        reason += " (corrupt, truncated or not written by torch.save)"
        if "weights_only" in text or "Unsupported global" in text:
            reason = "it holds objects other than tensors and plain types (refused: loading it could run code)"
        raise CheckpointError(f"{path}: not a loadable checkpoint: {reason}") from None
    if not isinstance(ckpt, dict) or "model" not in ckpt:
        raise CheckpointError(f"{path}: not a checkpoint (no 'model' entry)")
    return ckpt


def saved_config(record: dict | None, source: str | Path) -> Hyperparameters:
    """The config stored in a checkpoint or run.json, else a CheckpointError naming the file."""
    if not isinstance(record, dict) or not isinstance(record.get("hyperparameters"), dict):
        raise CheckpointError(f"{source}: holds no readable config (not a checkpoint or run.json of this code)")
    try:
        return Hyperparameters.from_dict(record["hyperparameters"])
    except (ConfigError, TypeError, ValueError) as e:
        raise CheckpointError(f"{source}: {e} (written by another version of this code?)") from None


def infer_hparams(state_dict: dict[str, Tensor]) -> Hyperparameters:
    """Architecture of a checkpoint without config (e.g. the record script's), from its tensor shapes."""
    sd = strip_compile_prefixes(state_dict)
    try:
        num_layers = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
        model_dim = sd["embed.weight"].shape[1]
        hdim = next(v.shape[1] for k, v in sd.items() if k.endswith("attn.qkv_w"))
    except (KeyError, ValueError, StopIteration, IndexError):
        raise CheckpointError("state_dict does not have the GPT layout (embed, blocks.N.attn.qkv_w, ...)") from None
    no_attn = [i for i in range(num_layers) if f"blocks.{i}.attn.qkv_w" not in sd]
    head_dim = 128  # the record's head width; not recoverable from shapes alone
    return Hyperparameters(num_layers=num_layers, model_dim=model_dim, head_dim=head_dim,
                           num_heads=max(1, hdim // head_dim), no_attn_layer=no_attn[0] if no_attn else -1,
                           vocab_size=50257, preset="inferred")


def _pad_vocab_rows(sd: dict[str, Tensor], rows: int) -> dict[str, Tensor]:
    """Record checkpoints have 50257-row embeddings; pad them with zero rows to the padded vocab."""
    out = {}
    for k, v in sd.items():
        if (k == "embed.weight" or k.startswith("value_embeds.")) and v.shape[0] < rows:
            v = torch.cat([v, v.new_zeros(rows - v.shape[0], v.shape[1])])
        out[k] = v
    return out


def load_state_into(model: GPT, state_dict: dict[str, Tensor], source: str) -> None:
    """strict load with a one-line message for the first mismatching tensor."""
    sd = _pad_vocab_rows(strip_compile_prefixes(state_dict), model.embed.weight.shape[0])
    own = model.state_dict()
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    if missing or unexpected:
        raise CheckpointError(f"{source}: parameters do not match the model config "
                              f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    for k, v in sd.items():
        if v.shape != own[k].shape:
            raise CheckpointError(f"{source}: {k} has shape {tuple(v.shape)} in the checkpoint but "
                                  f"{tuple(own[k].shape)} in the model config")
    model.load_state_dict({k: v.to(own[k].dtype) for k, v in sd.items()}, strict=True)


def load_model(path: str | Path, device: torch.device | str = "cpu") -> tuple[GPT, Hyperparameters, dict]:
    """Model, config and raw checkpoint from our checkpoints or from the record script's (config inferred)."""
    ckpt = load_checkpoint(path)
    if "hyperparameters" in ckpt:
        hp = saved_config(ckpt, path)
    else:
        hp = infer_hparams(ckpt["model"])
    model = GPT.from_hparams(hp)
    load_state_into(model, ckpt["model"], str(path))
    return model.to(device), hp, ckpt


def restore(ckpt: dict, hp: Hyperparameters, raw_model: nn.Module,
            optimizers: list[torch.optim.Optimizer]) -> tuple[int, dict | None, float | None]:
    """Weights, full optimizer state and RNG from a checkpoint; returns (step, data position, last val loss)."""
    load_state_into(raw_model, ckpt["model"], hp.resume)
    saved = ckpt["optimizers"]
    if len(saved) != len(optimizers) or any(len(s["param_groups"]) != len(o.param_groups)
                                            for s, o in zip(saved, optimizers)):
        raise CheckpointError(f"{hp.resume}: its optimizer state does not fit --optimizer={hp.optimizer} (a run "
                              f"continues with the optimizer it started with)")
    for opt, state in zip(optimizers, saved):
        opt.load_state_dict(state)
    torch.set_rng_state(ckpt["rng"]["torch"])
    return ckpt["step"], ckpt["data_position"] or None, ckpt.get("val_loss")


def checkpoint_path(log_dir: str | Path, run_id: str, step: int) -> Path:
    return Path(log_dir) / run_id / f"state_step{step:06d}.pt"


def prune_checkpoints(run_dir: Path, keep: int) -> list[Path]:
    """Delete all but the `keep` highest-step checkpoints of one run (0 keeps all); returns what was deleted."""
    if keep <= 0:
        return []
    stale = run_checkpoints(run_dir)[:-keep]
    for p in stale:
        p.unlink(missing_ok=True)
    return stale


def checkpoint_kind(path: str | Path) -> str:
    """'chat' for fine-tuned checkpoints (finetune.py marks them), else 'base'. Reads only the pickle, not the
    tensors (mmap), so scanning a log directory of large checkpoints is cheap; unreadable files are 'none'."""
    try:
        meta = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # noqa: BLE001 - a partial or foreign file is simply not a candidate
        return "none"
    return "chat" if isinstance(meta, dict) and meta.get("kind") == "chat" else "base"


def run_checkpoints(run_dir: Path) -> list[Path]:
    """A run's complete checkpoints, lowest step first (interrupted writes are hidden .tmp files, never listed)."""
    found = [p for p in Path(run_dir).glob("state_step*.pt") if CHECKPOINT_RE.fullmatch(p.name)]
    return sorted(found, key=lambda p: int(CHECKPOINT_RE.fullmatch(p.name).group(1)))


def newest_checkpoint(run_dir: Path) -> Path | None:
    found = run_checkpoints(run_dir)
    return found[-1] if found else None


def find_latest_checkpoint(log_dir: str | Path = "logs", run_id: str | None = None,
                           kind: str | None = None) -> Path | None:
    """The newest complete checkpoint under log_dir (or of one run), optionally only of one kind ('chat' or
    'base'); None if none. Newest: the run most recently written to (the latest modification time of its
    checkpoints), and within that run the highest step, so a copy that does not keep timestamps cannot make an
    earlier step of a run win over a later one."""
    runs = [d for d in Path(log_dir).glob(run_id or "*") if d.is_dir()]
    by_run = [(max(p.stat().st_mtime for p in found), d.name, found) for d in runs if (found := run_checkpoints(d))]
    for _, _, found in sorted(by_run, key=lambda r: r[:2], reverse=True):
        match = next((p for p in reversed(found) if kind is None or checkpoint_kind(p) == kind), None)
        if match is not None:
            return match
    return None


def resolve_checkpoint(spec: str, log_dir: str | Path = "logs") -> Path:
    """'latest' (find_latest_checkpoint) or a path (resolve_path); raises CheckpointError when nothing is found."""
    if spec == "latest":
        latest = find_latest_checkpoint(log_dir)
        if latest is None:
            raise CheckpointError(f"no checkpoint found under {log_dir}/ (run pretraining.py first)")
        return latest
    path = resolve_path(spec)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    return path


# -----------------------------------------------------------------------------
# Schedules: learning rate, Muon momentum, attention window (pure functions of the step)


# -----------------------------------------------------------------------------
# The 2026 record's stage schedule (issue 26): batch, windows, document cut, LR and multi-token weights by step


@dataclass(frozen=True)
class Stage:
    """One stage of a stage schedule, relative to the preset it runs on."""
    duration: float  # share of the scheduled steps; 0 for the extension stage (it runs the extension steps)
    batch_mult: int  # the step's batch as a multiple of the preset's tokens per step (more micro-batches)
    lr_mult: float  # LR multiplier before the cooldown (the record raises it with the batch)
    windows: tuple[int, int]  # (short, long) attention windows in blocks
    max_doc_blocks: int  # --doc-aligned: the longest piece of a document in a row, in window blocks
    mtp_start: tuple[float, ...]  # multi-token prediction weights at the stage's start: next token, the one
    mtp_end: tuple[float, ...]  #   after, ...; linear from start to end over the stage
    prefix_start: float = 0.0  # weight of the prefix-token target (record #88, PR 337) at the stage's start and end
    prefix_end: float = 0.0


# Record #89 (f411b3d3, TRAINING_STAGES): three equal stages, then an extension at the final batch and a longer window.
# Its batches are 8, 16 and 24 x 2048 x 8 tokens: multiples 1, 2, 3 of the first stage's. Its short windows are half
# its long ones (rounded down), which is how short_window derives them here. Its train_max_seq_len, 896 tokens in
# stage 1 and 2048 after, is 7 and 16 of its 128-token blocks: counted in window blocks here like the windows, so a
# smaller --window-block scales the documents' cut with the windows and keeps the record's ratio between them.
STAGES_2026 = (
    Stage(1 / 3, 1, 1.0, (1, 3), 7, (1.0, 0.5, 0.25), (1.0, 0.5, 0.0), 0.25, 0.25),  # 3 targets, the 3rd fading (#53)
    Stage(1 / 3, 2, 1.52, (3, 7), 16, (1.0, 0.5), (1.0, 0.0), 0.25, 0.0),  # 1.52 = (16/8)^0.6 (batches: #46, PR 163)
    Stage(1 / 3, 3, 1.73, (5, 11), 16, (1.0,), (1.0,)),  # 1.73 = (24/8)^0.5
    Stage(0.0, 3, 1.0, (6, 13), 16, (1.0,), (1.0,)),  # extension: the record's lr_mult 1.0 is never read (LR at floor)
)
STAGE_SCHEDULES = {"2026": STAGES_2026}
EXTENSION_SHARE = 15 / 1285  # record #89: 1270 scheduled steps, then 15 extension steps


def mtp_weights_at(step: int, hp: Hyperparameters) -> list[float]:
    """The step's multi-token weights, padded with zeros to MTP_TARGETS (a fixed shape: no recompiles)."""
    weights = list(stage_at(step, hp).mtp_weights)
    return weights + [0.0] * (MTP_TARGETS - len(weights))


@dataclass(frozen=True)
class StagePoint:
    """Where a step is in the stage schedule: what train_step and the model use for it."""
    stage: int  # index into the schedule's stages; the last one is the extension
    batch_mult: int
    lr_mult: float  # after the cooldown toward hp.lr_floor
    windows: tuple[int, int]  # (short, long) in blocks
    mtp_weights: tuple[float, ...]
    prefix_weight: float


def schedule_lengths(hp: Hyperparameters) -> tuple[int, int]:
    """(scheduled, extension) steps of a staged run: num_iterations split as the record splits its 1285 steps."""
    extension = round(hp.num_iterations * EXTENSION_SHARE)
    return hp.num_iterations - extension, extension


def stage_boundaries(hp: Hyperparameters) -> list[tuple[int, int]]:
    """[start, end) steps of each stage: the record's rounding of the cumulative shares of the scheduled steps,
    then the extension up to num_iterations."""
    stages = STAGE_SCHEDULES[hp.stage_schedule]
    scheduled, _ = schedule_lengths(hp)
    ends = [0, *[round(share * scheduled) for share in itertools.accumulate(s.duration for s in stages[:-1])],
            hp.num_iterations]
    return list(zip(ends[:-1], ends[1:]))


def stage_at(step: int, hp: Hyperparameters) -> StagePoint:
    """The stage schedule at a step (pure: the same step always gives the same point, so a resume mid-stage is
    exact). The LR follows the record's TrainingSchedule.get_lr: the stage's multiplier until the cooldown starts
    at (1 - cooldown_frac) of the scheduled steps, then linear to lr_floor at the last scheduled step, and the
    floor through the extension (record #89: cooldown_frac 0.60, floor 0.15)."""
    stages = STAGE_SCHEDULES[hp.stage_schedule]
    bounds = stage_boundaries(hp)
    index, frac = len(stages) - 1, 1.0
    for i, (start, end) in enumerate(bounds):
        if step < end:
            index, frac = i, (step - start) / (end - start)
            break
    stage = stages[index]
    scheduled, _ = schedule_lengths(hp)
    lr = stage.lr_mult
    cooldown_start = int(scheduled * (1 - hp.cooldown_frac))
    if step >= cooldown_start:
        t = min(1.0, (step - cooldown_start) / max(scheduled - cooldown_start, 1))
        lr = lr * (1 - t) + hp.lr_floor * t
    mtp = tuple(a + (b - a) * frac for a, b in zip(stage.mtp_start, stage.mtp_end))
    prefix = stage.prefix_start + (stage.prefix_end - stage.prefix_start) * frac
    return StagePoint(index, stage.batch_mult, lr, stage.windows, mtp, prefix)


SPLIT_STAGE = 2  # record #89 (TrainingSchedule's split_embed_stage): the tied matrix splits at the third stage


def split_step(hp: Hyperparameters) -> int:
    """The step whose update is the last tied one (--tie-embed): the split stage's first step, made odd as record #89
    makes it (boundaries[2][0] | 1), so that with Adam stepped on odd steps (--adam-every 2, record #39) the
    split falls on an Adam update."""
    return stage_boundaries(hp)[SPLIT_STAGE][0] | 1


def embed_tied_at(step: int, hp: Hyperparameters) -> bool:
    """Whether the update of `step` treats the embedding and lm_head as one matrix (steps 0 .. split_step)."""
    return hp.tie_embed and step <= split_step(hp)


def max_doc_len(step: int, hp: Hyperparameters) -> int:
    """--doc-aligned: the longest piece of a document in the step's rows, in tokens: the stage's max_doc_blocks
    window blocks (record #89's train_max_seq_len); 0 (cut only by the row's end) without a stage schedule. A pure
    function of the step, passed to the loader with every batch, so a resume in any stage cuts as the run did."""
    if not hp.stage_schedule:
        return 0
    return STAGE_SCHEDULES[hp.stage_schedule][stage_at(step, hp).stage].max_doc_blocks * hp.window_block


def batch_mult(step: int, hp: Hyperparameters) -> int:
    """The step's batch as a multiple of hp.tokens_per_step: 1, or the stage's."""
    return stage_at(step, hp).batch_mult if hp.stage_schedule else 1


def tokens_through(step: int, hp: Hyperparameters) -> int:
    """Tokens trained on by the end of `step` steps (steps 0 .. step-1), whatever their batches: each stage's steps
    before `step` times its batch (the step lines call this every step, so it walks the stages, not the steps)."""
    if not hp.stage_schedule:
        return step * hp.tokens_per_step
    stages = STAGE_SCHEDULES[hp.stage_schedule]
    batches = sum(max(0, min(step, end) - start) * stage.batch_mult
                  for stage, (start, end) in zip(stages, stage_boundaries(hp)))
    return batches * hp.tokens_per_step


def get_lr(step: int, hp: Hyperparameters) -> float:
    """LR multiplier: 1.0, then linear cooldown to lr_floor (record: 0.1) over the last cooldown_frac of training;
    with a stage schedule, stage_at's."""
    if hp.stage_schedule:
        return stage_at(step, hp).lr_mult
    x = min(max(step / hp.num_iterations, 0.0), 1.0)
    w = min((1 - x) / hp.cooldown_frac, 1.0)
    return w * 1.0 + (1 - w) * hp.lr_floor


def get_muon_momentum(step: int, hp: Hyperparameters) -> float:
    """Muon momentum warms up linearly from 0.85 to 0.95 over the first 300 steps (record), and with
    --muon-momentum-cooldown N falls linearly back to the start value over the last N steps (the 2026 record's
    get_muon_momentum, since edb34103: 50 steps). As there, the warm-up wins where the two overlap."""
    cooldown_start = hp.num_iterations - hp.muon_momentum_cooldown
    if step >= hp.muon_momentum_warmup and hp.muon_momentum_cooldown and step > cooldown_start:
        frac = (step - cooldown_start) / hp.muon_momentum_cooldown
        return hp.muon_momentum - frac * (hp.muon_momentum - hp.muon_momentum_start)
    frac = min(step / hp.muon_momentum_warmup, 1.0)
    return (1 - frac) * hp.muon_momentum_start + frac * hp.muon_momentum


def get_window_size_blocks(step: int, hp: Hyperparameters) -> int:
    """Sliding window in blocks of window_block tokens, growing linearly from 1 block to window_max (record: 128 ->
    1792 tokens); with a stage schedule, the stage's long window (its short one is half of it, as short_window makes
    it), and with --yarn from the last step on (the final validation) YARN_FINAL_WINDOW."""
    if hp.stage_schedule:
        if hp.yarn and step >= hp.num_iterations:
            return YARN_FINAL_WINDOW
        return stage_at(min(step, hp.num_iterations - 1), hp).windows[1]
    x = min(max(step / hp.num_iterations, 0.0), 1.0)
    return next_multiple_of_n(hp.window_max * x, n=hp.window_block) // hp.window_block


# YaRN (record #31, PR 122; the same in record #89's Yarn.apply): a frequency that turns less than YARN_ALPHA times
# over the old window is interpolated fully (divided by new/old), one that turns more than YARN_BETA times is kept,
# linear between; the attention scale is multiplied by YARN_SCALE_SLOPE * ln(new/old) + 1.
YARN_ALPHA, YARN_BETA = 1.0, 32.0
YARN_SCALE_SLOPE = 0.2
YARN_FINAL_WINDOW = 20  # record #89's ws_post_yarn_ext: the final validation's long window, in blocks (the long
#   windows extended for validation since #33, PR 127, and #35, PR 131); with no YaRN step to it, as there


def yarn_rescale(freqs: Tensor, old_window: int, new_window: int) -> tuple[Tensor, float]:
    """YaRN (Peng et al. 2023, arXiv:2309.00071, as record #31 / #89's Yarn.apply does it) for a window that grows
    from old_window to new_window tokens: (the rescaled angular frequencies, the factor of the attention scale).
    Low frequencies (few turns over the old window) are interpolated to the new window; high ones stay."""
    rotations = old_window * freqs / (2 * math.pi)  # turns of each frequency over the old window
    ratio = old_window / new_window
    ramp = torch.clamp((rotations - YARN_ALPHA) / (YARN_BETA - YARN_ALPHA), 0, 1)
    return freqs * (ratio + ramp * (1 - ratio)), YARN_SCALE_SLOPE * math.log(new_window / old_window) + 1


def yarn_state_at(step: int, hp: Hyperparameters) -> tuple[tuple[int, ...], Tensor | None, float]:
    """(the long windows in tokens the run has trained with up to `step`, the rotary frequencies and the attention
    scale for them): each growth of the stage schedule's long window applies yarn_rescale once, in order, from the
    base frequencies. Pure, so a resume rebuilds the tables exactly; steps past the run are its last step's."""
    at = min(step, hp.num_iterations - 1)
    stages, bounds = STAGE_SCHEDULES[hp.stage_schedule], stage_boundaries(hp)
    windows: list[int] = []
    for stage, (start, _) in zip(stages, bounds):
        tokens = stage.windows[1] * hp.window_block
        if start <= at and (not windows or tokens != windows[-1]):
            windows.append(tokens)
    if len(windows) < 2:
        return tuple(windows), None, ATTN_SCALE
    freqs, scale = rotary_freqs(hp.head_dim), ATTN_SCALE
    for old, new in zip(windows[:-1], windows[1:]):
        freqs, factor = yarn_rescale(freqs, old, new)
        scale *= factor
    return tuple(windows), freqs, scale


def final_window_blocks(hp: Hyperparameters) -> int:
    """The sliding window the model ends training with, in blocks: the one to use for evaluation and generation."""
    return get_window_size_blocks(hp.num_iterations, hp)


def apply_schedules(optimizers: list[torch.optim.Optimizer], step: int, hp: Hyperparameters) -> None:
    lr_mult = get_lr(step, hp)
    for opt in optimizers:
        for group in opt.param_groups:
            group["lr"] = group["initial_lr"] * lr_mult
        if isinstance(opt, Muon):
            for group in opt.param_groups:
                group["momentum"] = get_muon_momentum(step, hp)
