"""Progress on long work (runs.progress): bars only on a terminal, on stderr, counting exactly the items done; the
first compiled call's one-line notice. CPU, tiny checkpoints from conftest.py, no network.

    python -m pytest tests/test_progress.py -q
"""
from __future__ import annotations

import io
import json
import sys
from pathlib import Path

import pexpect
import pytest
import torch

import eval as EV
import model as M
import runs as R
from conftest import CPU, REPO_DIR, random_documents, script, script_env

convert = R.import_data_script("convert")
hellaswag = R.import_data_script("hellaswag")
shakespeare = R.import_data_script("shakespeare")

BAR_MARKS = ("\r", "\x1b[", "█", "it/s", "0%|")  # what a tqdm bar writes; clean output has none of them


class Terminal(io.StringIO):
    """A stream that says it is a terminal, so runs.progress draws on it as it would on a real one."""

    def isatty(self) -> bool:
        return True


@pytest.fixture
def drawn(monkeypatch: pytest.MonkeyPatch) -> list:
    """Every bar runs.progress makes from now on, forced on and kept (leave=True) so its last line shows the final
    count; each entry is (bar, the Terminal it drew on)."""
    made, real = [], R.progress

    def forced(iterable=None, **kwargs):
        stream = Terminal()
        bar = real(iterable, **dict(kwargs, enabled=True, leave=True, file=stream))
        made.append((bar, stream))
        return bar

    monkeypatch.setattr(R, "progress", forced)
    monkeypatch.setattr(shakespeare, "progress", forced)  # bound by `from runs import progress` at import
    monkeypatch.delenv(R.PROGRESS_OFF_ENV, raising=False)
    return made


def final_line(stream: io.StringIO) -> str:
    """The bar as it was last drawn (tqdm redraws in place after a carriage return)."""
    return stream.getvalue().rstrip("\n").split("\r")[-1]


def only_bar(drawn: list, desc: str) -> tuple:
    (bar,) = [(b, s) for b, s in drawn if b.desc.startswith(desc)]
    return bar


# -----------------------------------------------------------------------------
# The helper


def test_bars_are_drawn_only_on_a_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(R.PROGRESS_OFF_ENV, raising=False)
    pipe, tty = io.StringIO(), Terminal()
    assert not R.progress_enabled(pipe) and R.progress_enabled(tty)
    assert list(R.progress(range(5), desc="counting", file=pipe)) == list(range(5))
    assert pipe.getvalue() == ""
    with R.progress(desc="counting", total=3, file=tty) as bar:
        bar.update(3)
    assert "counting" in tty.getvalue() and "0/3" in tty.getvalue()
    for off in ("1", "true"):
        monkeypatch.setenv(R.PROGRESS_OFF_ENV, off)
        assert not R.progress_enabled(Terminal())
    monkeypatch.setenv(R.PROGRESS_OFF_ENV, "0")
    assert R.progress_enabled(Terminal())


def test_a_forced_bar_shows_its_name_and_the_number_of_items() -> None:
    tty = Terminal()
    assert list(R.progress(range(7), desc="scoring", unit="row", leave=True, enabled=True, file=tty)) == list(range(7))
    line = final_line(tty)
    assert line.startswith("scoring: 100%") and "7/7" in line and "row" in line
    cleared = Terminal()
    list(R.progress(range(7), desc="scoring", enabled=True, file=cleared))  # leave=False: the line is blanked
    assert final_line(cleared).strip() == ""


def test_convert_status_line_is_off_in_a_pipe(monkeypatch: pytest.MonkeyPatch) -> None:
    """convert.py's own status line (documents, tokens, tokens/s: the total is unknown) follows the same rule."""
    monkeypatch.delenv(R.PROGRESS_OFF_ENV, raising=False)
    for stream, drawn in ((io.StringIO(), False), (Terminal(), True)):
        status = convert.Progress(stream)
        status.start -= 20.0
        status.last -= 20.0  # past both the terminal's 0.2 s and the old 10 s log interval
        status.update(3, 1000)
        status.close()
        assert ("3 documents, 1,000 tokens" in stream.getvalue()) is drawn


# -----------------------------------------------------------------------------
# The first compiled call says what it is doing


def test_the_compile_notice_is_one_line_on_rank_0_of_a_compiled_run(capsys: pytest.CaptureFixture) -> None:
    """The scripts (not the library) print it before the first compiled step; uncompiled runs and other ranks don't."""
    def rt(compile: bool, rank: int) -> M.Runtime:
        return M.Runtime(device=torch.device("cpu"), rank=rank, local_rank=rank, world_size=2, autocast_dtype=None,
                         compile=compile, compile_head=not compile)

    R.announce_compile(rt(True, 0))
    out, err = capsys.readouterr()
    assert out == "" and err == R.compile_notice("the model") + "\n"
    assert err.startswith("compiling the model with torch.compile (first steps and first validation only; about ")
    for quiet in (rt(True, 1), rt(False, 0)):
        R.announce_compile(quiet)
        assert capsys.readouterr() == ("", "")


# -----------------------------------------------------------------------------
# eval.py: rows, examples and conversations


def eval_args(ckpt: Path, *extra: str) -> object:
    return EV.parse_args(["--checkpoint", str(ckpt), *CPU, "--dtype", "fp32", "--num-samples", "0", *extra])


def test_eval_counts_rows_examples_and_conversations(long_logs: dict[str, Path], drawn: list, tmp_path: Path,
                                                     chat_tasks) -> None:
    """The bars count exactly what is scored: every validation row, multiple-choice example and conversation."""
    EV.run(eval_args(long_logs["base"], "--val-tokens", "1024"))  # 1,024 tokens in rows of 128
    bar, stream = only_bar(drawn, "val rows")
    assert bar.n == bar.total == 8 and "8/8" in final_line(stream)
    choices = tmp_path / "h.jsonl"
    choices.write_text("".join(json.dumps(dict(ctx=f"Context {i}.", endings=["a b", "c", "d e f"], label=i % 3)) + "\n"
                               for i in range(5)))
    _, heldout = chat_tasks.build(1, 6, seed=0)
    convs = tmp_path / "heldout.json"
    convs.write_text(json.dumps({"conversations": heldout}))
    drawn.clear()
    EV.run(eval_args(long_logs["chat"], "--hellaswag", str(choices), "--chat-eval", str(convs), "--limit", "4"))
    for desc, n in (("multiple choice", 4), ("chat eval", 4)):
        bar, stream = only_bar(drawn, desc)
        assert bar.n == bar.total == n and f"{n}/{n}" in final_line(stream), desc
    assert not any(b.desc.startswith("val rows") for b, _ in drawn)  # ending_logprobs and chat losses draw no bar


@pytest.mark.slow
def test_eval_json_in_a_pipe_has_no_bar(long_logs: dict[str, Path]) -> None:
    """Piped (as under pytest, in logs and CI): stdout is exactly the JSON, stderr holds no bar."""
    r = script("eval.py", *CPU, "--json", "--checkpoint", str(long_logs["base"]), "--num-samples", "0")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["val"]["tokens"] == 512
    assert not any(mark in r.stdout + r.stderr for mark in BAR_MARKS), r.stderr
    assert "val rows" not in r.stderr


@pytest.mark.slow
def test_eval_on_a_terminal_draws_and_clears_its_bar(long_logs: dict[str, Path]) -> None:
    """On a real pseudo-terminal the bar appears under its name and is blanked before the table is printed."""
    child = pexpect.spawn(sys.executable, ["eval.py", *CPU, "--checkpoint", str(long_logs["base"]),
                                           "--num-samples", "0"], cwd=str(REPO_DIR), env=script_env(),
                          encoding="utf-8", timeout=120, dimensions=(24, 120))
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0, child.before
    text = child.before
    assert "val rows:" in text and "/4 [" in text  # 512 tokens in rows of 128
    assert "val loss (nats/token)" in text.split("val rows:")[-1]  # the table comes after the bar


# -----------------------------------------------------------------------------
# Data scripts: corpus preparation, conversion and downloads


@pytest.mark.slow
def test_convert_in_a_pipe_has_no_bar(tmp_path: Path, shakespeare_data: Path) -> None:
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(3):
        (corpus / f"{i}.txt").write_text(f"Document number {i}.\n" * 50)
    r = script("data/convert.py", str(corpus), str(tmp_path / "out" / "x"))
    assert r.returncode == 0, r.stderr
    assert "3 files, 3 documents" in r.stdout and r.stderr == ""
    assert not any(mark in r.stdout for mark in BAR_MARKS), r.stdout


def test_shakespeare_counts_the_works_it_tokenizes(tmp_path: Path, shakespeare_data: Path, drawn: list,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(shakespeare, "REPO_DIR", tmp_path.parent)  # the summary line names paths relative to it
    shakespeare.prepare(tmp_path / "shakespeare", force=True)  # the works come from the cached sdist
    bar, stream = only_bar(drawn, "tokenizing works")
    assert bar.n == bar.total == 42 and "42/42" in final_line(stream)
    assert shakespeare.shards_ready(tmp_path / "shakespeare")


def test_hellaswag_download_counts_its_bytes(tmp_path: Path, drawn: list, monkeypatch: pytest.MonkeyPatch) -> None:
    record = json.dumps(dict(ctx="A man", endings=["a", "b", "c", "d"], label=0)) + "\n"
    body = (record * 3000).encode()  # several chunks of the 64 KiB reads

    class Response(io.BytesIO):
        headers = {"Content-Length": str(len(body))}

    monkeypatch.setattr(hellaswag.urllib.request, "urlopen", lambda url, timeout: Response(body))
    monkeypatch.setattr(hellaswag, "NUM_EXAMPLES", 3000)
    out = hellaswag.fetch(tmp_path / "hellaswag_val.jsonl")
    assert out.read_bytes() == body
    bar, _ = only_bar(drawn, "hellaswag_val.jsonl")
    assert bar.n == bar.total == len(body)


def test_fineweb_turns_the_hub_bar_off_in_a_pipe(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """hf_hub_download draws its own byte bar; off when runs.progress would be (here stderr is not a terminal)."""
    import huggingface_hub
    from huggingface_hub.utils import are_progress_bars_disabled, enable_progress_bars

    fineweb = R.import_data_script("fineweb")
    seen = []

    def fake_download(repo_id: str, filename: str, repo_type: str, local_dir: Path) -> str:
        seen.append(are_progress_bars_disabled())
        Path(local_dir).mkdir(parents=True, exist_ok=True)
        M.write_data_shard(Path(local_dir) / filename, random_documents(1000))
        return str(Path(local_dir) / filename)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    monkeypatch.setattr(sys, "stderr", io.StringIO())
    try:
        fineweb.download_shard("fineweb_val_000000.bin", tmp_path)
    finally:
        enable_progress_bars()
    assert seen == [True] and (tmp_path / "fineweb_val_000000.bin").is_file()
