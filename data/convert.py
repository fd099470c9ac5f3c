"""Your own corpus as shards: every .txt (one document per file) and .jsonl (one per line) found under a folder.

    python data/convert.py my_corpus/ data/mine/mine      # data/mine/mine_{train,val}_000000.bin, ...
    python pretraining.py --train-files 'data/mine/mine_train_*.bin' --val-files 'data/mine/mine_val_*.bin'

A document is <|endoftext|> + its GPT-2 tokens (special-token spellings in the text stay text), read in sorted path
order, blank .jsonl lines skipped. The split is by whole documents and fixed: documents 1, 11, 21, ... go to val for
--val-fraction 0.1. Shards are written as *.partial and renamed only when all input was read, so an error leaves
nothing new behind; shards of an earlier run with the same OUT_PREFIX are replaced, stale ones removed.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import sys
import time
from array import array
from fractions import Fraction
from pathlib import Path
from typing import Iterator, TextIO

import numpy as np

REPO_DIR = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_DIR))
sys.path.insert(0, str(REPO_DIR / "data"))

from model import DataError, TokenizerError, get_tokenizer, write_data_shard  # noqa: E402
from runs import OneLineParser, progress_enabled  # noqa: E402
from shakespeare import FetchError, ensure_gpt2_ranks  # noqa: E402

SUFFIXES = (".txt", ".jsonl")
MAX_SHARD_TOKENS = 2**31 - 1  # the header stores the count as int32


class ConvertError(ValueError):
    """Bad input; the message names the file (and line)."""


def find_inputs(input_dir: Path) -> list[Path]:
    if not input_dir.is_dir():
        raise ConvertError(f"{input_dir}: no such directory")
    files = sorted(p for p in input_dir.rglob("*") if p.is_file() and p.suffix.lower() in SUFFIXES)
    if not files:
        raise ConvertError(f"{input_dir}: no .txt or .jsonl files found (searched recursively)")
    return files


def jsonl_text(path: Path, lineno: int, line: str, key: str) -> str:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        raise ConvertError(f"{path}:{lineno}: not valid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(record, dict):
        raise ConvertError(f"{path}:{lineno}: expected a JSON object with a {key!r} field, got {line.strip()[:40]}")
    if key not in record:
        raise ConvertError(f"{path}:{lineno}: no {key!r} field (has {', '.join(map(repr, list(record)[:8]))}); "
                           f"pick another with --text-key")
    if not isinstance(record[key], str):
        raise ConvertError(f"{path}:{lineno}: {key!r} must be a string, got {json.dumps(record[key])[:40]}")
    return record[key]


def iter_documents(files: list[Path], key: str) -> Iterator[str]:
    """Document texts in a fixed order; raises ConvertError naming the file (and line) of bad input."""
    for path in files:
        lineno = 0
        try:
            if path.suffix.lower() == ".txt":
                yield path.read_bytes().decode("utf-8-sig")
                continue
            with open(path, encoding="utf-8-sig") as f:  # streamed: a .jsonl can be larger than memory
                for lineno, line in enumerate(f, 1):
                    if line.strip():
                        yield jsonl_text(path, lineno, line, key)
        except UnicodeDecodeError as e:
            where = f"after line {lineno}" if lineno else f"at offset {e.start}"
            raise ConvertError(f"{path}: not UTF-8 text (invalid byte 0x{e.object[e.start]:02x} {where}); "
                               f"re-encode it as UTF-8 or remove it") from None


def is_val(i: int, val_fraction: Fraction) -> bool:
    """Whole-document split: ceil((n-1)*f) of the first n documents are val, never document 0. Exact integers."""
    p, q = val_fraction.numerator, val_fraction.denominator
    return i > 0 and -(-i * p // q) > -(-(i - 1) * p // q)


class ShardWriter:
    """One split's shards, written as they fill under NAME.partial; commit() renames them, abort() deletes them."""

    def __init__(self, prefix: str, split: str, shard_tokens: int):
        self.prefix, self.split, self.shard_tokens = prefix, split, shard_tokens
        self.buf, self.paths, self.docs, self.tokens = array("H"), [], 0, 0

    def add(self, doc: list[int]) -> None:
        self.buf.extend(doc)
        self.docs, self.tokens = self.docs + 1, self.tokens + len(doc)
        while len(self.buf) >= self.shard_tokens:
            self._flush(self.shard_tokens)

    def _flush(self, n: int) -> None:
        self.paths.append(Path(f"{self.prefix}_{self.split}_{len(self.paths):06d}.bin"))  # before: abort() sees it
        write_data_shard(f"{self.paths[-1]}.partial", np.frombuffer(self.buf, dtype=np.uint16, count=n))
        del self.buf[:n]

    def close(self) -> None:
        if self.buf:
            self._flush(len(self.buf))

    def commit(self) -> None:
        for path in self.paths:
            os.replace(f"{path}.partial", path)
        old = {Path(p).resolve() for p in glob.glob(f"{glob.escape(self.prefix)}_{self.split}_{'[0-9]' * 6}.bin")}
        for path in sorted(old - {p.resolve() for p in self.paths}):
            path.unlink()
            print(f"removed stale shard {path}")

    def abort(self) -> None:
        for path in self.paths:  # NAME.partial, and atomic_write's .NAME.partial.tmpPID should one be left
            partial = Path(f"{path}.partial")
            for leftover in [partial, *partial.parent.glob(f".{glob.escape(partial.name)}.tmp*")]:
                leftover.unlink(missing_ok=True)


class Progress:
    """A status line redrawn in place 5 times a second, only on a terminal (runs.progress_enabled): the total is
    unknown until every .jsonl line is read, so it counts documents, tokens and tokens/s instead of a tqdm bar."""

    def __init__(self, stream: TextIO):
        self.stream, self.live, self.shown = stream, progress_enabled(stream), False
        self.start = self.last = time.perf_counter()

    def update(self, docs: int, tokens: int) -> None:
        now = time.perf_counter()
        if self.live and now - self.last >= 0.2:
            self.last, self.shown = now, True
            line = f"{docs:,} documents, {tokens:,} tokens, {tokens / (now - self.start):,.0f} tokens/s"
            print(f"\r{line:<79}", end="", file=self.stream, flush=True)

    def close(self) -> None:
        if self.live and self.shown:
            print(file=self.stream)


def convert(input_dir: Path, out_prefix: str, val_fraction: float = 0.1, shard_tokens: int = 100_000_000,
            text_key: str = "text") -> dict[str, ShardWriter]:
    """Tokenise and shard a corpus; returns the committed writers by split ('train', 'val')."""
    if not 0 <= val_fraction < 1 or not 1 <= shard_tokens <= MAX_SHARD_TOKENS:
        raise ConvertError(f"need 0 <= --val-fraction < 1 and 1 <= --shard-tokens <= {MAX_SHARD_TOKENS}, "
                           f"got {val_fraction} and {shard_tokens}")
    if out_prefix.endswith(("/", os.sep)) or Path(out_prefix).is_dir():
        raise ConvertError(f"OUT_PREFIX {out_prefix!r} is a folder; give a name prefix such as DIR/name")
    files = find_inputs(input_dir)
    frac = Fraction(str(val_fraction))  # exact, so the split cannot depend on float rounding
    ensure_gpt2_ranks()  # fetched once from the package registry, then offline
    tok = get_tokenizer()
    out_dir = Path(out_prefix).parent
    made = [p for p in (out_dir, *out_dir.parents) if not p.exists()]  # deepest first
    out_dir.mkdir(parents=True, exist_ok=True)
    writers = {split: ShardWriter(out_prefix, split, shard_tokens) for split in ("train", "val")}
    progress, num_docs, num_tokens = Progress(sys.stderr), 0, 0
    try:
        for text in iter_documents(files, text_key):
            doc = tok.encode_document(text)
            writers["val" if is_val(num_docs, frac) else "train"].add(doc)
            num_docs, num_tokens = num_docs + 1, num_tokens + len(doc)
            progress.update(num_docs, num_tokens)
        for w in writers.values():
            w.close()
    except BaseException:
        for w in writers.values():
            w.abort()
        for p in made:  # only folders this run created, and only while empty
            if p.is_dir() and not any(p.iterdir()):
                p.rmdir()
        raise
    finally:
        progress.close()
    for split, w in writers.items():
        w.commit()
        print(f"{out_prefix}_{split}_*.bin: {len(w.paths)} shards, {w.docs:,} documents, {w.tokens:,} tokens")
    seconds = time.perf_counter() - progress.start
    print(f"{len(files)} files, {num_docs:,} documents, {num_tokens:,} tokens in {seconds:.1f}s "
          f"({num_tokens / max(seconds, 1e-9):,.0f} tokens/s)")
    return writers


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = OneLineParser(prog="data/convert.py", description=__doc__.split("\n")[0])
    parser.add_argument("input_dir", type=Path, help="folder searched recursively for .txt and .jsonl files")
    parser.add_argument("out_prefix", help="shards are written as OUT_PREFIX_{train,val}_000000.bin, ...")
    parser.add_argument("--val-fraction", type=float, default=0.1, help="fraction of documents for val (0.1)")
    parser.add_argument("--shard-tokens", type=int, default=100_000_000, help="tokens per shard (100_000_000)")
    parser.add_argument("--text-key", default="text", help="field holding the text in .jsonl records (text)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    try:
        convert(args.input_dir, args.out_prefix, args.val_fraction, args.shard_tokens, args.text_key)
    except (ConvertError, DataError, FetchError, TokenizerError) as e:
        print(f"data/convert.py: error: {e}", file=sys.stderr)
        sys.exit(2)
    except OSError as e:
        print(f"data/convert.py: error: {f'{e.filename}: {e.strerror}' if e.filename else e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
