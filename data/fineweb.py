"""The speedrun's data: FineWeb10B, pre-tokenised with GPT-2 into llm.c shards of 100M tokens each.

    python data/fineweb.py        # val + first 8 train shards (900M tokens, 1.8 GB) into data/fineweb10B/
    python data/fineweb.py 103    # all of it (10.3B tokens, about 21 GB)

Downloads from the Hugging Face dataset kjj0/fineweb10B-gpt2, as modded-nanogpt's data/cached_fineweb10B.py does.
Each file lands in data/fineweb10B/.partial/ (interrupted downloads resume there) and is moved into place only after
its header and size check out. Resumable and idempotent: valid shards already in place are skipped; a corrupt one is
downloaded again.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

REPO_DIR = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_DIR))

from model import DataError, read_shard_header  # noqa: E402
from runs import OneLineParser, progress_enabled  # noqa: E402

REPO_ID = "kjj0/fineweb10B-gpt2"  # as in github.com/KellerJordan/modded-nanogpt data/cached_fineweb10B.py
MAX_TRAIN_SHARDS = 103  # fineweb_train_000001.bin ... fineweb_train_000103.bin
OUT_DIR = REPO_DIR / "data" / "fineweb10B"


class FetchError(RuntimeError):
    pass


def shard_names(num_train_shards: int) -> list[str]:
    """The val shard, then the first num_train_shards train shards (train numbering starts at 1)."""
    if not 0 <= num_train_shards <= MAX_TRAIN_SHARDS:
        raise ValueError(f"num_train_shards={num_train_shards} must be in 0..{MAX_TRAIN_SHARDS}")
    return ["fineweb_val_000000.bin"] + [f"fineweb_train_{i:06d}.bin" for i in range(1, num_train_shards + 1)]


def needs_download(path: Path) -> bool:
    """True when path is missing or not a valid shard (then it says why on stdout)."""
    if not path.exists():
        return True
    try:
        read_shard_header(path)
        return False
    except DataError as e:
        print(f"{e}; downloading it again")
        return True


def root_cause(e: BaseException) -> str:
    """'Type: first line' of the innermost exception: the hub wraps e.g. a DNS failure in a long generic message."""
    for _ in range(10):  # bounded: a chain can in principle loop
        if not (e.__cause__ or e.__context__):
            break
        e = e.__cause__ or e.__context__
    return f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:200]}"


def download_shard(name: str, out_dir: Path) -> int:
    """Download one shard into out_dir/.partial, validate it, move it into place; return its token count."""
    try:
        from huggingface_hub import hf_hub_download
        from huggingface_hub.utils import disable_progress_bars
        from huggingface_hub.utils import logging as hf_logging
    except ImportError:
        raise FetchError("huggingface_hub is not installed: pip install huggingface_hub") from None

    hf_logging.set_verbosity_error()  # no per-retry warnings: a failure ends in our one line
    if not progress_enabled():  # the hub draws the shard's byte bar: the same rule as runs.progress (TQDM_DISABLE)
        disable_progress_bars()
    partial_dir = out_dir / ".partial"
    try:
        tmp = Path(hf_hub_download(repo_id=REPO_ID, filename=name, repo_type="dataset", local_dir=partial_dir))
    except Exception as e:  # noqa: BLE001 - any network, hub or disk failure means the same thing here
        raise FetchError(f"cannot download {name} from huggingface.co/datasets/{REPO_ID} ({root_cause(e)}); "
                         f"check the connection and rerun (finished shards are kept)") from None
    try:
        num_tokens = read_shard_header(tmp)
    except DataError as e:
        tmp.unlink(missing_ok=True)
        raise DataError(f"downloaded {name} is not a valid shard ({e}); rerun to fetch it again") from None
    os.replace(tmp, out_dir / name)
    return num_tokens


def fetch(num_train_shards: int, out_dir: Path = OUT_DIR) -> list[Path]:
    """Make out_dir hold the val shard and the first num_train_shards train shards, all valid."""
    names = shard_names(num_train_shards)
    out_dir.mkdir(parents=True, exist_ok=True)
    todo = [name for name in names if needs_download(out_dir / name)]
    print(f"{out_dir}: {len(names) - len(todo)} of {len(names)} shards present, downloading {len(todo)}")
    for i, name in enumerate(todo, 1):
        num_tokens = download_shard(name, out_dir)
        print(f"[{i}/{len(todo)}] {out_dir / name}: {num_tokens:,} tokens")
    shutil.rmtree(out_dir / ".partial", ignore_errors=True)
    return [out_dir / name for name in names]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = OneLineParser(prog="data/fineweb.py", description=__doc__.split("\n")[0])
    parser.add_argument("num_train_shards", type=int, nargs="?", default=8,
                        help=f"train shards of 100M tokens to fetch, 0..{MAX_TRAIN_SHARDS} (default 8); "
                             f"the val shard is always fetched")
    parser.add_argument("--out-dir", type=Path, default=OUT_DIR, help=f"where shards go (default {OUT_DIR})")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    try:
        fetch(args.num_train_shards, args.out_dir)
    except (FetchError, ValueError, OSError) as e:  # ValueError: DataError, or a bad N from shard_names
        print(f"data/fineweb.py: error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
