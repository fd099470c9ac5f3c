"""data/convert.py (your corpus -> shards) and the offline parts of data/fineweb.py. CPU, no network.

    python -m pytest tests/test_convert.py -q
"""
from __future__ import annotations

import io
import json
import math
import subprocess
import sys
from collections import Counter
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest

import model as M
import runs as R

REPO_DIR = Path(__file__).resolve().parent.parent


convert = R.import_data_script("convert")
fineweb = R.import_data_script("fineweb")

# tokenising tests need the GPT-2 ranks: the session fixture fetches them from the package registry once
needs_ranks = pytest.mark.usefixtures("shakespeare_data")

# The corpus, in the converter's reading order (sorted paths; .jsonl lines in order, the blank one skipped).
TXT = {"a.txt": "Hello, world.\nA second line.\n",
       "sub/b.txt": "The literal <|endoftext|> and <|user|> stay text, emoji too: 🦜🚀 naïve café\r\n"}
JSONL = {"c.jsonl": ["first record", "", "emoji 😀 then <|endoftext|> mid-record"],
         "sub/deep/d.jsonl": ["line\u2028separator is not a line break", "ünïcödé ☃", "last document"]}
TEXTS = [TXT["a.txt"], *JSONL["c.jsonl"], TXT["sub/b.txt"], *JSONL["sub/deep/d.jsonl"]]


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    root = tmp_path / "corpus"
    for name, text in TXT.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text, encoding="utf-8", newline="")
    for name, texts in JSONL.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        lines = [json.dumps({"id": i, "text": t}, ensure_ascii=False) for i, t in enumerate(texts)]
        (root / name).write_text("\n".join(lines[:1] + [""] + lines[1:]) + "\n", encoding="utf-8")
    (root / "README.md").write_text("not a document")
    return root


def read_split(prefix: Path, split: str) -> tuple[list[int], list[int]]:
    """(token stream, shard sizes) of OUT_PREFIX_split_*.bin, through model's own reader."""
    shards = sorted(prefix.parent.glob(f"{prefix.name}_{split}_*.bin"))
    tensors = [M._load_data_shard(p) for p in shards]
    return [t for x in tensors for t in x.tolist()], [len(x) for x in tensors]


def split_docs(stream: list[int]) -> list[list[int]]:
    starts = [i for i, t in enumerate(stream) if t == M.EOT_ID] + [len(stream)]
    return [stream[a:b] for a, b in zip(starts, starts[1:])]


@needs_ranks
def test_round_trip_documents_tokens_and_shards(corpus: Path, tmp_path: Path, capsys) -> None:
    prefix = tmp_path / "out" / "mine"
    convert.main([str(corpus), str(prefix), "--val-fraction", "0.25", "--shard-tokens", "16"])
    out = capsys.readouterr().out
    tok = M.get_tokenizer(M.GPT2_RANKS_FILE)
    decoded, num_eot = {}, 0
    for split in ("train", "val"):
        stream, sizes = read_split(prefix, split)
        assert stream[0] == M.EOT_ID  # every document starts with <|endoftext|>
        assert sizes[:-1] == [16] * (len(sizes) - 1) and 0 < sizes[-1] <= 16
        docs = split_docs(stream)
        num_eot += stream.count(M.EOT_ID)
        assert max(stream) < 50257  # "<|user|>" in the text did not become a chat token
        decoded[split] = [tok.decode(d[1:]) for d in docs]
        assert f"mine_{split}_*.bin: {len(sizes)} shards, {len(docs)} documents, {len(stream):,} tokens" in out
    assert num_eot == len(TEXTS)  # one per document: the literal "<|endoftext|>" in two texts stayed text
    assert Counter(decoded["train"] + decoded["val"]) == Counter(TEXTS)
    assert not set(decoded["train"]) & set(decoded["val"])
    assert decoded["val"] == [TEXTS[1], TEXTS[5]]  # documents 1 and 5 for f=1/4: ceil(i/4) steps up there
    total = sum(len(read_split(prefix, s)[0]) for s in ("train", "val"))
    assert total == sum(len(tok.encode_document(t)) for t in TEXTS)
    assert not list(prefix.parent.glob("*.partial*"))


@needs_ranks
def test_split_is_deterministic_and_sized(tmp_path: Path, capsys) -> None:
    root = tmp_path / "many"
    root.mkdir()
    for i in range(40):
        (root / f"doc{i:02d}.txt").write_text(f"document number {i}\n" * (i % 3 + 1))
    a, b = tmp_path / "a" / "x", tmp_path / "b" / "x"
    convert.main([str(root), str(a)])
    convert.main([str(root), str(b)])
    for split in ("train", "val"):
        files_a, files_b = sorted(a.parent.glob(f"x_{split}_*")), sorted(b.parent.glob(f"x_{split}_*"))
        assert [f.name for f in files_a] == [f.name for f in files_b]
        assert all(fa.read_bytes() == fb.read_bytes() for fa, fb in zip(files_a, files_b))
    num_val = len(split_docs(read_split(a, "val")[0]))
    assert num_val == math.ceil(39 * 0.1) == 4
    assert len(split_docs(read_split(a, "train")[0])) == 36


@needs_ranks
@pytest.mark.parametrize("num_docs, val_fraction, expect_val", [(1, "0.1", 0), (2, "0.1", 1), (3, "0", 0)])
def test_small_corpora(tmp_path: Path, num_docs: int, val_fraction: str, expect_val: int, capsys) -> None:
    root = tmp_path / "in"
    root.mkdir()
    for i in range(num_docs):
        (root / f"{i}.txt").write_text(f"text {i}")
    prefix = tmp_path / "x"
    convert.main([str(root), str(prefix), "--val-fraction", val_fraction])
    assert len(split_docs(read_split(prefix, "val")[0])) == expect_val
    assert len(split_docs(read_split(prefix, "train")[0])) == num_docs - expect_val
    assert len(list(tmp_path.glob("x_val_*.bin"))) == min(expect_val, 1)  # no empty shard is ever written


def test_is_val_takes_about_the_fraction_and_at_least_one() -> None:
    for f in ("0.01", "0.1", "0.25", "0.5", "0.9"):
        frac = Fraction(f)
        for n in range(2, 300):
            val = sum(convert.is_val(i, frac) for i in range(n))
            assert val == math.ceil((n - 1) * frac) and val >= 1 and not convert.is_val(0, frac)


@needs_ranks
def test_rerun_replaces_shards_and_removes_stale_ones(corpus: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)
    convert.main([str(corpus), "./out/x", "--shard-tokens", "8"])
    assert len(list((tmp_path / "out").glob("x_train_*.bin"))) > 2
    convert.main([str(corpus), "./out/x"])  # "./" prefix: the new shards must not count as stale
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["x_train_000000.bin", "x_val_000000.bin"]
    assert "removed stale shard" in capsys.readouterr().out


# name -> (files to add to a valid corpus, fragments the one-line error must hold)
ERROR_CASES = {
    "missing_dir": (None, ["no such directory"]),
    "no_inputs": ({"notes.md": b"hello", "data.json": b"{}"}, ["no .txt or .jsonl files"]),
    "bad_json": ({"zz.jsonl": b'{"text": "ok"}\n\n{"text": oops}\n'}, ["zz.jsonl:3", "not valid JSON"]),
    "missing_key": ({"zz.jsonl": b'{"text": "ok"}\n{"body": "x"}\n'}, ["zz.jsonl:2", "'text'", "--text-key"]),
    "not_a_string": ({"zz.jsonl": b'{"text": ["a", "b"]}\n'}, ["zz.jsonl:1", "must be a string"]),
    "not_an_object": ({"zz.jsonl": b'"just a string"\n'}, ["zz.jsonl:1", "JSON object"]),
    "txt_not_utf8": ({"zz.txt": "caf\u00e9".encode("latin-1")}, ["zz.txt", "not UTF-8", "0xe9"]),
    "jsonl_not_utf8": ({"zz.jsonl": b'{"text": "ok"}\n{"text": "\xff"}\n'}, ["zz.jsonl", "not UTF-8"]),
}


def make_case(tmp_path: Path, name: str) -> tuple[Path, list[str]]:
    """A corpus of 12 good documents followed (in sorted order) by the bad file of case `name`."""
    files, fragments = ERROR_CASES[name]
    root = tmp_path / name
    if files is None:
        return root, fragments
    root.mkdir()
    if name != "no_inputs":
        for i in range(12):
            (root / f"good{i:02d}.txt").write_text(f"a good document, number {i}, " * 5)
    for fname, data in files.items():
        (root / fname).write_bytes(data)
    return root, fragments


@needs_ranks
@pytest.mark.parametrize("name", sorted(ERROR_CASES))
def test_bad_input_one_line_exit_2_nothing_left(tmp_path: Path, name: str, capsys) -> None:
    root, fragments = make_case(tmp_path, name)
    prefix = tmp_path / "out" / "deeper" / "x"  # tiny shards: some are written before the bad file is read
    with pytest.raises(SystemExit) as exc:
        convert.main([str(root), str(prefix), "--shard-tokens", "8"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("data/convert.py: error: ")
    assert all(f in err for f in fragments), err
    assert not (tmp_path / "out").exists()  # no shard, no .partial, not even the folders it made


@needs_ranks
def test_failed_write_leaves_nothing(corpus: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    """A full disk mid-shard: one line, exit 2, and neither .partial files nor write_data_shard's temp file stay."""
    def disk_full(path, tokens) -> None:
        tmp = Path(path).with_name(f".{Path(path).name}.tmp123")  # model.atomic_write's temporary name
        tmp.write_bytes(b"half a shard")
        raise OSError(28, "No space left on device", str(tmp))

    monkeypatch.setattr(convert, "write_data_shard", disk_full)
    with pytest.raises(SystemExit) as exc:
        convert.main([str(corpus), str(tmp_path / "out" / "x"), "--shard-tokens", "8"])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and err.count("\n") == 1 and "No space left on device" in err
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
@needs_ranks
def test_bad_input_as_subprocess(tmp_path: Path) -> None:
    """The real command line: exit code 2 and exactly one stderr line (three kinds of case, run side by side;
    each start imports torch, so the in-process test above covers every case)."""
    runs = {}
    for name in ("missing_dir", "bad_json", "txt_not_utf8"):
        root, fragments = make_case(tmp_path, name)
        cmd = [sys.executable, str(REPO_DIR / "data" / "convert.py"), str(root), str(tmp_path / "out" / name)]
        runs[name] = (subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True), fragments)
    for name, (proc, fragments) in runs.items():
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 2, (name, out, err)
        assert len(err.splitlines()) == 1 and err.startswith("data/convert.py: error: "), (name, err)
        assert all(f in err for f in fragments), (name, err)
    assert not (tmp_path / "out").exists()


def test_bad_flags_are_one_line_errors(tmp_path: Path, capsys) -> None:
    for flags in (["--val-fraction", "1"], ["--shard-tokens", "0"]):
        with pytest.raises(SystemExit) as exc:
            convert.main([str(tmp_path), str(tmp_path / "x"), *flags])
        assert exc.value.code == 2 and capsys.readouterr().err.count("\n") == 1
    with pytest.raises(SystemExit):
        convert.main([str(tmp_path), str(tmp_path)])  # OUT_PREFIX names a folder
    assert "is a folder" in capsys.readouterr().err


def test_progress_line_is_redrawn_in_place() -> None:
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    stream = Terminal()
    progress = convert.Progress(stream)
    progress.start -= 2.0
    progress.last -= 1.0
    progress.update(3, 1000)
    progress.update(4, 2000)  # within 0.2 s of the last redraw: skipped
    progress.close()
    text = stream.getvalue()
    assert text.startswith("\r3 documents, 1,000 tokens, ") and text.rstrip().endswith(" tokens/s")
    assert text.count("\r") == 1 and text.endswith("\n")  # one redraw, then the line is ended


# -----------------------------------------------------------------------------
# data/fineweb.py, offline: the hub download is replaced by a copy of a local shard

def test_fineweb_shard_names() -> None:
    assert fineweb.shard_names(0) == ["fineweb_val_000000.bin"]
    assert fineweb.shard_names(3) == ["fineweb_val_000000.bin", "fineweb_train_000001.bin",
                                      "fineweb_train_000002.bin", "fineweb_train_000003.bin"]
    names = fineweb.shard_names(fineweb.MAX_TRAIN_SHARDS)
    assert len(names) == 104 and names[-1] == "fineweb_train_000103.bin"
    for bad in (-1, 104):
        with pytest.raises(ValueError, match="0..103"):
            fineweb.shard_names(bad)


@pytest.fixture
def fake_hub(tmp_path: Path, monkeypatch) -> list[str]:
    """Patch hf_hub_download to 'download' a valid 1000-token shard; returns the filenames it was asked for."""
    import huggingface_hub

    source = tmp_path / "source.bin"
    M.write_data_shard(source, np.arange(1000) % 50257)
    calls: list[str] = []

    def fake_download(repo_id: str, filename: str, *, repo_type: str, local_dir: Path, **kwargs) -> str:
        assert (repo_id, repo_type) == (fineweb.REPO_ID, "dataset")
        calls.append(filename)
        dest = Path(local_dir) / filename
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes(source.read_bytes())
        return str(dest)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    return calls


def test_fineweb_skips_valid_and_refetches_corrupt(tmp_path: Path, fake_hub: list[str], capsys) -> None:
    out = tmp_path / "fineweb10B"
    out.mkdir()
    M.write_data_shard(out / "fineweb_val_000000.bin", np.full(500, 7))  # valid: kept as it is
    M.write_data_shard(out / "fineweb_train_000001.bin", np.arange(1000))
    with open(out / "fineweb_train_000001.bin", "r+b") as f:
        f.truncate(1500)  # corrupt: cut off mid-tokens
    (out / "fineweb_train_000002.bin").write_bytes(b"<html>oops</html>")  # corrupt: not even a header
    fineweb.main(["3", "--out-dir", str(out)])
    assert fake_hub == ["fineweb_train_000001.bin", "fineweb_train_000002.bin", "fineweb_train_000003.bin"]
    assert M.read_shard_header(out / "fineweb_val_000000.bin") == 500
    assert all(M.read_shard_header(out / n) == 1000 for n in fineweb.shard_names(3)[1:])
    log = capsys.readouterr().out
    assert "fineweb_train_000001.bin: truncated shard: header claims 1000 tokens" in log
    assert "fineweb_train_000002.bin: truncated shard header (17 bytes" in log
    assert sorted(p.name for p in out.iterdir()) == sorted(fineweb.shard_names(3))  # .partial/ removed
    fineweb.main(["3", "--out-dir", str(out)])  # idempotent: nothing more to fetch
    assert len(fake_hub) == 3


def test_fineweb_rejects_a_bad_download(tmp_path: Path, monkeypatch, capsys) -> None:
    import huggingface_hub

    def garbage(repo_id: str, filename: str, *, local_dir: Path, **kwargs) -> str:
        dest = Path(local_dir) / filename
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes(b"<html>rate limited</html>")
        return str(dest)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", garbage)
    out = tmp_path / "fw"
    with pytest.raises(SystemExit) as exc:
        fineweb.main(["0", "--out-dir", str(out)])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and err.count("\n") == 1 and "not a valid shard" in err
    assert not (out / "fineweb_val_000000.bin").exists() and not list(out.glob(".partial/*.bin"))


def test_fineweb_network_error_is_one_line(tmp_path: Path, monkeypatch, capsys) -> None:
    import huggingface_hub
    from huggingface_hub.errors import LocalEntryNotFoundError

    def offline(*args, **kwargs) -> str:
        try:
            raise OSError("[Errno -2] Name or service not known")
        except OSError as e:
            raise LocalEntryNotFoundError("An error happened while trying to locate the file\non the Hub") from e

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", offline)
    with pytest.raises(SystemExit) as exc:
        fineweb.main(["1", "--out-dir", str(tmp_path / "fw")])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and err.count("\n") == 1
    assert "fineweb_val_000000.bin" in err and "Name or service not known" in err
