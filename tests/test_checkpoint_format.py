"""The published checkpoint format (format 1) is a contract: a checkpoint written by an earlier version of this code
loads in eval.py, chat.py and export.py and resumes with pretraining.py, bitwise equal to an uninterrupted run.

The "old" checkpoint here is written the way the code before the library/harness split wrote it: one torch.save of
a plain dict with exactly the format-1 entries, the logged code holding only pretraining.py and model.py, and no
run.json beside it (a file copied in from elsewhere). Nothing of the current writer is called to produce it."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import metric_rows, read_metrics, run_script, tiny_args

pytestmark = pytest.mark.slow

# format 1 as written by pretraining.py since val_step/train_time_ms were added (the published layout)
FORMAT_1 = ("format", "step", "code", "model", "optimizers", "hyperparameters", "tokenizer", "data_position", "rng",
            "val_loss", "val_step", "train_time_ms")
CHAT_EXTRA = ("kind", "chat_template", "finetune")  # finetune.py's checkpoints add these
# hyperparameters that checkpoints written before the 2026 optimizer switches (issue 25) do not have
ISSUE_25_FIELDS = ("muon_orthogonalizer", "normuon", "normuon_beta2", "cautious_weight_decay", "adam_update",
                   "adam_table", "adam_weight_decay", "adam_every", "muon_lr_mults", "muon_momentum_cooldown",
                   "muon_qk_head_groups", "muon_row_equilibration", "muon_norm_snap")
# ... and before the 2026 schedule, head and loss (issue 26)
ISSUE_26_FIELDS = ("lr_floor", "stage_schedule", "mtp", "prefix_token", "logit_cap", "window_block", "yarn",
                   "tie_embed", "head_chunk", "doc_aligned")
# ... and before the 2026 architecture (issue 27)
ISSUE_27_FIELDS = ("bigram_rows", "bigram_dim", "bigram_sign_rows", "bigram_update", "smear", "value_embed_layers",
                   "value_embed_gates", "residual_lambdas", "skip_topology", "gated_skip_from", "backout_layer",
                   "long_window_layers", "key_offset", "xsa_layers", "attn_gate", "paired_head_layers")
NEWER_FIELDS = ISSUE_25_FIELDS + ISSUE_26_FIELDS + ISSUE_27_FIELDS


def write_format_1(source: dict, path: Path) -> None:
    """A format-1 checkpoint as a plain dict, built entry by entry from the tensors and values of `source`."""
    old = dict(format=1, step=int(source["step"]),
               code={"pretraining.py": "# the code that ran", "model.py": "# the code that ran"},
               model={k: v.clone() for k, v in source["model"].items()},
               optimizers=source["optimizers"], tokenizer="gpt2",
               hyperparameters={k: v for k, v in source["hyperparameters"].items() if k not in NEWER_FIELDS},
               data_position=dict(source["data_position"]), rng=dict(torch=source["rng"]["torch"], cuda=[]),
               val_loss=float(source["val_loss"]), val_step=int(source["val_step"]),
               train_time_ms=float(source["train_time_ms"]))
    path.parent.mkdir(parents=True)
    torch.save(old, path)


def test_the_writer_keeps_format_1(shard_dir: Path, tmp_path: Path) -> None:
    """What pretraining.py writes today has exactly the published entries, in the published order."""
    result = run_script(["pretraining.py", *tiny_args(shard_dir, tmp_path, "new", "--num-iterations", "3")])
    assert result.returncode == 0, result.stderr
    ckpt = torch.load(tmp_path / "new" / "state_step000003.pt", weights_only=True)
    assert tuple(ckpt) == FORMAT_1
    assert ckpt["format"] == 1 and ckpt["tokenizer"] == "gpt2" and ckpt["val_step"] == 3
    assert set(ckpt["code"]) == {"pretraining.py", "runs.py", "model.py"}


def test_an_old_checkpoint_evaluates_chats_and_resumes_bitwise(shard_dir: Path, tmp_path: Path) -> None:
    full = run_script(["pretraining.py", *tiny_args(shard_dir, tmp_path / "a", "full")])
    assert full.returncode == 0, full.stderr
    straight = torch.load(tmp_path / "a" / "full" / "state_step000006.pt", weights_only=True)
    old_path = tmp_path / "b" / "old" / "state_step000003.pt"
    source = torch.load(tmp_path / "a" / "full" / "state_step000003.pt", weights_only=True)
    assert set(NEWER_FIELDS) <= set(source["hyperparameters"])  # the lists name fields that exist
    write_format_1(source, old_path)

    scored = run_script(["eval.py", "--checkpoint", str(old_path), "--num-samples", "0", "--json"])
    assert scored.returncode == 0, scored.stderr
    results = json.loads(scored.stdout)
    assert results["step"] == 3 and results["kind"] == "base" and "samples" not in results
    # the same 512 validation tokens in rows of 128 as training validated: the loss training logged at step 3. A
    # checkpoint is written before its step's validation (so a failed evaluation loses nothing), so the val loss it
    # records is the one of its val_step
    assert results["val"]["tokens"] == 512
    logged = {r["step"]: r["val_loss"] for r in metric_rows(tmp_path / "a" / "full")[1]}
    old = torch.load(old_path, weights_only=True)
    assert old["val_loss"] == logged[old["val_step"]]
    assert results["val"]["loss"] == pytest.approx(logged[3], rel=1e-5)

    chat = run_script(["chat.py", "--checkpoint", str(old_path), "--prompt", "Good morrow", "--max-new-tokens", "5"])
    assert chat.returncode == 0, chat.stderr

    exported = run_script(["export.py", "--checkpoint", str(old_path), "--out", str(tmp_path / "hf")])
    assert exported.returncode == 0, exported.stderr  # export.py checks the exported logits against ours itself
    assert json.loads(exported.stdout)["max_logit_diff"] <= 1e-4 and (tmp_path / "hf" / "model.safetensors").is_file()

    resumed = run_script(["pretraining.py", "--resume", str(old_path)])
    assert resumed.returncode == 0, resumed.stderr
    assert f"resumed_from:{old_path} step:3" in resumed.stdout
    after = torch.load(old_path.parent / "state_step000006.pt", weights_only=True)
    for k, v in straight["model"].items():
        assert torch.equal(v, after["model"][k]), k
    for opt_a, opt_b in zip(straight["optimizers"], after["optimizers"]):
        for idx, state in opt_a["state"].items():
            for key, value in state.items():
                assert torch.equal(value, opt_b["state"][idx][key]), (idx, key)
    assert after["data_position"] == straight["data_position"] and after["val_loss"] == straight["val_loss"]
    assert read_metrics(old_path.parent)[0] == read_metrics(tmp_path / "a" / "full")[0][3:]


def test_a_chat_checkpoint_keeps_format_1_plus_its_lineage(shard_dir: Path, tmp_path: Path) -> None:
    pre = run_script(["pretraining.py", *tiny_args(shard_dir, tmp_path, "base", "--num-iterations", "2")])
    assert pre.returncode == 0, pre.stderr
    data = tmp_path / "chat.json"
    data.write_text(json.dumps({"conversations": [
        {"messages": [{"role": "user", "content": f"say {i}"}, {"role": "assistant", "content": str(i)}]}
        for i in range(12)]}))
    ft = run_script(["finetune.py", "--log-dir", str(tmp_path), "--run-id", "sft", "--data", str(data),
                     "--num-iterations", "2", "--val-loss-every", "0", "--compile", "off", "--device", "cpu"])
    assert ft.returncode == 0, ft.stderr
    ckpt = torch.load(tmp_path / "sft" / "state_step000002.pt", weights_only=True)
    assert tuple(ckpt) == FORMAT_1[:-2] + CHAT_EXTRA + ("val_step",)
    assert ckpt["kind"] == "chat" and ckpt["chat_template"] == 1 and ckpt["finetune"]["parent"].endswith(
        "state_step000002.pt")
