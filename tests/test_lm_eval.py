"""lm-evaluation-harness (the real package, pinned in requirements-test.txt) as a client of an export, on CPU with
no network: docs/export.md's two lm_eval commands on data/lm_eval_tasks.py's local tasks give the figures eval.py gives.

- shakespeare_mc (HellaSwag's format): the same acc and acc_norm as `eval.py --hellaswag`, and every choice's
  log-likelihood equal to eval.py's to 1e-4;
- shakespeare_rolling (loglikelihood_rolling, add_bos_token=False): the same bits per byte as `eval.py --text` on
  each passage, since passages of a whole number of the checkpoint's rows make lm-eval's windows eval.py's rows.

    python -m pytest tests/test_lm_eval.py -q      # about 2 min on 2 cores (two lm_eval runs)
"""
from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path

import pytest
import torch

import eval as EV
import inference as I
import model as M
from conftest import REPO_DIR, randomize_zero_inits, run, tiny_hparams, write_checkpoint

pytestmark = pytest.mark.slow

MC_EXAMPLES = 40
PASSAGES, PASSAGE_TOKENS = 3, 384  # three rows of the tiny model's 128 each


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory, shakespeare_data: Path) -> dict[str, Path]:
    """A tiny checkpoint with random (non-zero) weights, its export, and the local tasks, small."""
    root = tmp_path_factory.mktemp("lm_eval")
    hp = tiny_hparams()
    torch.manual_seed(0)
    ckpt = write_checkpoint(root / "logs", "tiny", 6, randomize_zero_inits(M.GPT.from_hparams(hp), seed=3), hp)
    export = root / "export"
    r = run([sys.executable, "export.py", "--checkpoint", str(ckpt), "--out", str(export)])
    assert r.returncode == 0, r.stderr
    sys.path.insert(0, str(REPO_DIR / "data"))
    import lm_eval_tasks

    files = lm_eval_tasks.write_tasks(root / "tasks", lm_eval_tasks.held_out_works(), choices=MC_EXAMPLES,
                                      rolling=PASSAGES, rolling_tokens=PASSAGE_TOKENS, seed=1)
    return dict(ckpt=ckpt, export=export, tasks=root / "tasks", out=root / "results", **files)


def lm_eval(setup: dict[str, Path], task: str, *extra_model_args: str) -> tuple[dict, list[dict]]:
    """docs/export.md's command (as `python -m lm_eval`); returns the task's results and its logged samples."""
    model_args = ",".join([f"pretrained={setup['export']}", "trust_remote_code=True", "dtype=float32",
                           *extra_model_args])
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    r = run([sys.executable, "-m", "lm_eval", "--model", "hf", "--model_args", model_args, "--device", "cpu",
             "--batch_size", "16", "--tasks", task, "--include_path", str(setup["tasks"]),
             "--output_path", str(setup["out"] / task), "--log_samples"], timeout=600, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    results = sorted((setup["out"] / task).glob("*/results_*.json"))[-1]
    samples = sorted((setup["out"] / task).glob(f"*/samples_{task}_*.jsonl"))[-1]
    return (json.loads(results.read_text())["results"][task],
            [json.loads(line) for line in samples.read_text().splitlines()])


def test_multiple_choice_equals_eval_py(setup: dict[str, Path]) -> None:
    results, samples = lm_eval(setup, "shakespeare_mc")
    ours = run([sys.executable, "eval.py", "--checkpoint", str(setup["ckpt"]), "--dtype", "fp32", "--hellaswag",
                str(setup["mc"]), "--json", "--num-samples", "0"])
    assert ours.returncode == 0, ours.stderr
    choices = json.loads(ours.stdout)["choices"]
    assert choices["examples"] == results["sample_len"] == MC_EXAMPLES
    assert (choices["acc"], choices["acc_norm"]) == (results["acc,none"], results["acc_norm,none"])
    assert 0 < choices["acc"] < 1 and 0 < choices["acc_norm"] < 1  # not a degenerate model that always ties
    im = I.load_for_inference(str(setup["ckpt"]), device="cpu", dtype="fp32")
    for sample in sorted(samples, key=lambda s: s["doc_id"])[:10]:
        doc = sample["doc"]
        expected = EV.ending_logprobs(im, im.tokenizer.encode_document(doc["ctx"]),
                                      [im.tokenizer.encode(" " + e) for e in doc["endings"]])
        got = [float(resp[0][0]) for resp in sample["resps"]]
        assert got == pytest.approx(expected, abs=1e-4), doc["ctx"]


def test_rolling_loglikelihood_equals_eval_py_text(setup: dict[str, Path], tmp_path: Path) -> None:
    results, samples = lm_eval(setup, "shakespeare_rolling", "add_bos_token=False")
    nll = total_bytes = 0.0
    for n, line in enumerate(setup["text"].read_text().splitlines()):
        text = json.loads(line)["text"]
        (tmp_path / f"{n}.txt").write_text(text)
        r = run([sys.executable, "eval.py", "--checkpoint", str(setup["ckpt"]), "--dtype", "fp32", "--text",
                 str(tmp_path / f"{n}.txt"), "--json", "--num-samples", "0"])
        assert r.returncode == 0, r.stderr
        scored = json.loads(r.stdout)["text"]
        assert scored["tokens"] == PASSAGE_TOKENS and scored["bytes"] == len(text.encode())
        nll += scored["loss"] * scored["tokens"]
        total_bytes += scored["bytes"]
    assert results["sample_len"] == PASSAGES == len(samples)
    assert results["bits_per_byte,none"] == pytest.approx(nll / total_bytes / math.log(2), rel=1e-6)
