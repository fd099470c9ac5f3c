"""Document-aligned batches (--doc-aligned, issue 26; record #89's BOS-aligned loader): rows against a reference
written here from the documents as lists, by hand on a tiny shard, every row a document start, resume with the
per-batch cut, two ranks = one, bad input, and a staged run that stops and resumes bitwise.

    python -m pytest -n 0 -q tests/test_doc_aligned.py
"""
from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import model as M
import pretraining
from conftest import cfg, random_documents, run, stopped_and_resumed, tiny_args, tiny_hparams

E = M.EOT_ID


def write_shards(directory: Path, shards: list[list[int] | np.ndarray]) -> str:
    """Shards doc_000000.bin, doc_000001.bin, ... under directory; returns their glob."""
    for i, tokens in enumerate(shards):
        M.write_data_shard(directory / f"doc_{i:06d}.bin", tokens)
    return str(directory / "doc_*.bin")


def batches(pattern: str, limits: list[int], batch_size: int, row_len: int, rank: int = 0, world_size: int = 1,
            start: dict | None = None) -> list[tuple[list[list[int]], list[list[int]], dict]]:
    """(input rows, target rows, position) of one batch per limit."""
    loader = M.doc_aligned_generator(pattern, batch_size, rank, world_size, row_len=row_len, start=start)
    out = []
    for limit in limits:
        inputs, targets, pos = loader.send(limit)
        out.append((inputs.view(-1, row_len).tolist(), targets.view(-1, row_len).tolist(), pos))
    return out


def reference(shards: list[list[int]], limits: list[int], batch_size: int, row_len: int
              ) -> list[tuple[list[list[int]], dict]]:
    """The record's rule written from the documents as lists: (rows of row_len + 1 tokens, position) per batch.
    A document is an <|endoftext|> and what follows it up to the next one (tokens before a shard's first one belong
    to none); a row takes documents in order, each cut to the limit and to the space left, the rest dropped; a batch
    the shard cannot fill comes from the next shard's first document, the shards repeating."""
    documents = []
    for tokens in shards:
        starts = [i for i, t in enumerate(tokens) if t == E]
        documents.append([list(tokens[a:b]) for a, b in zip(starts, starts[1:] + [len(tokens)])])
    shard, doc, epoch, out = 0, 0, 0, []
    for limit in limits:
        while True:
            rows, d = [], doc
            for _ in range(batch_size // row_len):
                row: list[int] = []
                while len(row) < row_len + 1 and d < len(documents[shard]):
                    row += documents[shard][d][:limit or None][:row_len + 1 - len(row)]
                    d += 1
                if len(row) < row_len + 1:
                    break
                rows.append(row)
            if len(rows) == batch_size // row_len:
                break
            shard, doc = (shard + 1) % len(shards), 0
            epoch += shard == 0
        doc = d
        out.append((rows, dict(shard=shard, doc=doc, epoch=epoch)))
    return out


# -----------------------------------------------------------------------------
# The generator


def test_pieces_cuts_and_dropped_tails_by_hand(tmp_path: Path) -> None:
    """Shard 0: documents [E 1 2 3 4 5] [E 6 7] [E 8 .. 14] [E 15]; shard 1: a stray 99, then [E 20 .. 23] [E 24 25]
    [E 26 27 28] [E 29] [E 30 31]. Rows of 4 tokens (+1 target), 2 rows a batch."""
    pattern = write_shards(tmp_path, [[E, 1, 2, 3, 4, 5, E, 6, 7, E, 8, 9, 10, 11, 12, 13, 14, E, 15],
                                      [99, E, 20, 21, 22, 23, E, 24, 25, E, 26, 27, 28, E, 29, E, 30, 31]])
    got = batches(pattern, [0, 3, 3, 0], batch_size=8, row_len=4)
    rows = [[inputs + targets[-1:] for inputs, targets in zip(*b[:2])] for b in got]  # each row's 5 tokens
    # 5 is dropped (the row ends); [E 6 7] whole, then [E 8] cut by the row's end and 9 .. 14 dropped
    assert rows[0] == [[E, 1, 2, 3, 4], [E, 6, 7, E, 8]] and got[0][2] == dict(shard=0, doc=3, epoch=0)
    # cut at 3: [E 15] then no document left in shard 0, so the whole batch comes from shard 1 (99 is in none)
    assert rows[1] == [[E, 20, 21, E, 24], [E, 26, 27, E, 29]] and got[1][2] == dict(shard=1, doc=4, epoch=0)
    # [E 30] then shard 1 runs out: shard 0 again, a new epoch
    assert rows[2] == [[E, 1, 2, E, 6], [E, 8, 9, E, 15]] and got[2][2] == dict(shard=0, doc=4, epoch=1)
    assert rows[3] == [[E, 20, 21, 22, 23], [E, 24, 25, E, 26]] and got[3][2] == dict(shard=1, doc=3, epoch=1)
    # inputs are a row's first 4 tokens, targets its last 4: across piece boundaries, as the record's buf[1:]
    assert got[0][0][1] == [E, 6, 7, E] and got[0][1][1] == [6, 7, E, 8]


def test_against_the_reference_on_random_documents(tmp_path: Path) -> None:
    shards = [random_documents(3000, seed=1, mean_doc_len=40), random_documents(2500, seed=2, mean_doc_len=60)]
    shards[1][0] = 7  # a shard that does not start with a document
    pattern = write_shards(tmp_path, shards)
    limits = [0, 16, 16, 48, 48, 48, 12, 0] * 8  # several epochs, the cut changing between batches
    got = batches(pattern, limits, batch_size=256, row_len=64)
    want = reference([s.tolist() for s in shards], limits, batch_size=256, row_len=64)
    assert [pos for *_, pos in got] == [pos for _, pos in want]
    assert max(pos["epoch"] for _, pos in want) >= 2
    for (inputs, targets, _), (rows, _) in zip(got, want):
        assert inputs == [row[:-1] for row in rows] and targets == [row[1:] for row in rows]


@pytest.mark.parametrize("limit", [0, 7, 30])
def test_every_row_starts_a_document_and_no_piece_is_longer_than_the_limit(tmp_path: Path, limit: int) -> None:
    pattern = write_shards(tmp_path, [random_documents(4000, seed=3, mean_doc_len=60)])
    for inputs, targets, _ in batches(pattern, [limit] * 20, batch_size=512, row_len=128):
        for row_in, row_tg in zip(inputs, targets):
            row = row_in + row_tg[-1:]
            assert row[0] == E
            starts = [i for i, t in enumerate(row) if t == E] + [len(row)]
            assert max(b - a for a, b in zip(starts, starts[1:])) <= (limit or len(row))


def test_resume_from_any_position_across_a_change_of_the_cut(tmp_path: Path) -> None:
    """The position after each batch, passed back with the following limits, gives the same following batches."""
    pattern = write_shards(tmp_path, [random_documents(2000, seed=4, mean_doc_len=50),
                                      random_documents(2000, seed=5, mean_doc_len=50)])
    limits = [28] * 6 + [64] * 10  # the record's 7 then 16 blocks, in blocks of 4 tokens
    straight = batches(pattern, limits, batch_size=256, row_len=64)
    for i in range(1, len(limits)):
        again = batches(pattern, limits[i:], batch_size=256, row_len=64, start=straight[i - 1][2])
        assert again == straight[i:]


@pytest.mark.parametrize("row_len", [32, 64])
def test_two_ranks_together_see_what_one_sees(tmp_path: Path, row_len: int) -> None:
    pattern = write_shards(tmp_path, [random_documents(3000, seed=6, mean_doc_len=70),
                                      random_documents(1500, seed=7, mean_doc_len=30)])
    limits = [0, 20, 20, 50, 50] * 6
    one = batches(pattern, limits, batch_size=256, row_len=row_len)
    ranks = [batches(pattern, limits, batch_size=256, row_len=row_len, rank=r, world_size=2) for r in (0, 1)]
    for whole, half0, half1 in zip(one, *ranks):
        assert half0[0] + half1[0] == whole[0] and half0[1] + half1[1] == whole[1]
        assert half0[2] == half1[2] == whole[2]


def test_the_unit_is_the_rank_sequence_without_rows(tmp_path: Path) -> None:
    """--row-len 0: each rank-equivalent sequence of --train-seq-len tokens is one row built of documents."""
    pattern = write_shards(tmp_path, [random_documents(6000, seed=8, mean_doc_len=100)])
    hp = tiny_hparams(row_len=0, doc_aligned=True, shuffle_rows=False, train_files=pattern)
    rt = SimpleNamespace(rank=0, world_size=1, device=torch.device("cpu"))
    inputs, _, _ = pretraining.make_train_loader(hp, rt).send(0)
    assert inputs.numel() == hp.tokens_per_step
    assert inputs.view(-1, hp.train_seq_len)[:, 0].tolist() == [E] * hp.rank_equivalents
    assert (inputs.view(-1, 128)[:, 0] != E).any()  # not also at every 128-token block


# -----------------------------------------------------------------------------
# The cut as a function of the step


def test_max_doc_len_follows_the_record_and_the_window_block() -> None:
    hp = M.Hyperparameters(stage_schedule="2026", num_iterations=1285, doc_aligned=True)
    bounds = M.stage_boundaries(hp)
    assert [M.max_doc_len(start, hp) for start, _ in bounds] == [896, 2048, 2048, 2048]  # record #89
    assert M.max_doc_len(bounds[1][0] - 1, hp) == 896 and M.max_doc_len(1285, hp) == 2048
    small = M.Hyperparameters(**dict(hp.to_dict(), window_block=32))
    assert [M.max_doc_len(start, small) for start, _ in bounds] == [224, 512, 512, 512]  # 7 and 16 blocks of 32
    assert M.max_doc_len(0, M.Hyperparameters(doc_aligned=True)) == 0  # no schedule: only the row's end cuts


# -----------------------------------------------------------------------------
# Bad input: one line naming the flag or the file


def test_a_shard_without_documents_is_named(tmp_path: Path) -> None:
    pattern = write_shards(tmp_path, [random_documents(3000, seed=9), list(range(1, 3000))])
    loader = M.doc_aligned_generator(pattern, 256, 0, 1, row_len=64)
    with pytest.raises(M.DataError) as e:
        for _ in range(100):
            loader.send(0)
    assert str(e.value).startswith(f"{tmp_path / 'doc_000001.bin'}: no <|endoftext|> (id 50256) in the shard")
    assert "\n" not in str(e.value)


def test_a_shard_too_small_for_one_batch_is_named(tmp_path: Path) -> None:
    pattern = write_shards(tmp_path, [[E, 1, 2, 3, E, 4, 5, 6, 7, 8]])
    with pytest.raises(M.DataError, match=r"doc_000000.bin: its documents, cut at 2 tokens, do not fill one batch"):
        M.doc_aligned_generator(pattern, 8, 0, 1, row_len=4).send(2)


def test_a_position_of_the_other_loader_is_refused(tmp_path: Path) -> None:
    pattern = write_shards(tmp_path, [random_documents(3000, seed=10)])
    with pytest.raises(M.DataError, match="is not a --doc-aligned one"):
        M.doc_aligned_generator(pattern, 256, 0, 1, row_len=64, start=dict(shard=0, pos=0, epoch=0))
    with pytest.raises(M.DataError, match="is a --doc-aligned one"):
        next(M.distributed_data_generator(pattern, 256, 0, 1, start=dict(shard=0, doc=0, epoch=0)))


def test_shuffled_rows_are_refused() -> None:
    with pytest.raises(M.ConfigError) as e:
        cfg("--preset", "shakespeare", "--doc-aligned", "true").validate()
    assert str(e.value) == ("--shuffle-rows with --doc-aligned is not implemented (aligned rows are built from the "
                            "documents in order); pass --shuffle-rows false")


@pytest.mark.slow
def test_pretraining_names_a_shard_without_documents_and_exits_2(shard_dir: Path, tmp_path: Path) -> None:
    M.write_data_shard(shard_dir / "tiny_train_000000.bin", list(range(1, 6000)))
    result = run([sys.executable, "pretraining.py", *tiny_args(shard_dir, tmp_path, "bad", "--doc-aligned", "true",
                                                               "--shuffle-rows", "false")])
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "tiny_train_000000.bin: no <|endoftext|>" in lines[0], result.stderr
    assert not (tmp_path / "bad").exists()


# -----------------------------------------------------------------------------
# A staged run: 8 steps are stages [0, 3), [3, 5), [5, 8); with 16-token window blocks the cut is 112 tokens in
# stage 1 and 256 after, so stage 1's 128-token rows hold cut documents


@pytest.mark.slow
def test_staged_run_stops_and_resumes_bitwise_across_the_cut_change(shard_dir: Path, tmp_path: Path) -> None:
    staged = ("--stage-schedule", "2026", "--doc-aligned", "true", "--shuffle-rows", "false", "--window-block", "16",
              "--num-iterations", "8", "--val-loss-every", "3", "--keep-checkpoints", "0")
    a, b, full, again = stopped_and_resumed(shard_dir, tmp_path, staged, stop=3, end=8)  # resumed where stage 2
    #   starts and the cut grows
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert a["data_position"] == b["data_position"] and a["val_loss"] == b["val_loss"]
    assert set(a["data_position"]) == {"shard", "doc", "epoch"}
    lines = [line.split(" train_time")[0] for line in full.stdout.splitlines() if "train_loss" in line]
    assert [line.split(" train_time")[0] for line in again.stdout.splitlines() if "train_loss" in line] == lines[3:]
