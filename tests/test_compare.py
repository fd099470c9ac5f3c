"""compare.py: the ablation table of pretraining run directories written by hand in tmp_path (val loss at equal steps,
tokens and training time, time to the reference's loss, settings and seeds, the seed spread, the lines that refuse
a directory) and the peer comparison's schedule, model, step and bookkeeping; --peer --quick end to end (slow).

    python -m pytest -q tests/test_compare.py
"""
from __future__ import annotations

import json
import math
import statistics
import sys
from pathlib import Path

import pytest
import torch

from conftest import tiny_hparams

import compare
import model as M
import runs as R

# -----------------------------------------------------------------------------
# ablation: run directories as pretraining.py leaves them


def write_run(run_dir: Path, optimizer: str, points: list[tuple[int, float, float]], *, checkpoint: bool = False,
              **fields: object) -> Path:
    """A run as pretraining.py leaves it: its config in run.json (or, checkpoint=True, only in a checkpoint's
    "hyperparameters") and metrics.jsonl, a train row before each validation row (step, seconds, val loss)."""
    run_dir.mkdir(parents=True)
    hp = M.Hyperparameters(**dict(M.PRESETS["shakespeare"], preset="shakespeare", optimizer=optimizer, **fields))
    if checkpoint:
        torch.save(dict(format=1, step=points[-1][0], model={}, hyperparameters=hp.to_dict()),
                   run_dir / f"state_step{points[-1][0]:06d}.pt")
    else:
        (run_dir / R.RUN_INFO).write_text(json.dumps(dict(script="pretraining.py", hyperparameters=hp.to_dict())))
    rows = [row for s, t, v in points for row in (dict(step=s, train_loss=v + 1, train_time_ms=1000 * t),
                                                   dict(step=s, val_loss=v, train_time_ms=1000 * t))]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return run_dir


def ablate(*run_dirs: Path) -> dict:
    return compare.ablation(compare.read_runs(list(run_dirs)))


def refused(argv: list[str], capsys: pytest.CaptureFixture) -> str:
    """compare.py's main on argv: it must exit 2 with one line on stderr, which is returned."""
    with pytest.raises(SystemExit) as exit_info:
        compare.main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1, err
    return err


def test_ablation_reports_time_to_the_reference_loss(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """The reference's final loss 4.0 is reached by the other run between its validations at 30 s (5.0) and
    60 s (3.0): at 45 s by linear interpolation, 1.5x the reference's 30 s; a run that never gets there says so."""
    ref = write_run(tmp_path / "muon", "muon", [(0, 0, 10.0), (10, 30, 4.0)])
    slow = write_run(tmp_path / "adamw", "adamw", [(0, 0, 10.0), (10, 30, 5.0), (20, 60, 3.0)])
    never = write_run(tmp_path / "never", "adamw", [(0, 0, 10.0), (10, 30, 6.0)])
    result = ablate(ref, slow, never)
    rows = result["runs"]
    assert [r["seconds_to_reference"] for r in rows] == [30.0, 45.0, None]
    assert [r["final_val_loss"] for r in rows] == [4.0, 3.0, 6.0]
    assert rows[1]["tokens"] == 20 * M.Hyperparameters(**M.PRESETS["shakespeare"]).tokens_per_step
    compare.print_ablation(result)
    out = capsys.readouterr().out
    assert "at 45 s (1.5x)" in out and "reaches 4.0000 at never" in out


def test_ablation_labels_name_the_loss_modifiers(tmp_path: Path) -> None:
    """A loss-modifier ablation's rows say which terms each run had, with their weights."""
    plain = write_run(tmp_path / "none", "muon", [(0, 0, 10.0), (75, 30, 4.6)])
    smooth = write_run(tmp_path / "ls", "muon", [(0, 0, 10.0), (75, 31, 4.7)], label_smoothing=0.1, z_loss=1e-4)
    labels = [r["label"] for r in ablate(plain, smooth)["runs"]]
    assert labels == ["Muon + Adam, 75 steps", "Muon + Adam, label smoothing 0.1, z-loss 0.0001, 75 steps"]


def test_ablation_compares_at_equal_steps_tokens_and_time(tmp_path: Path) -> None:
    """Two batch sizes: the reference takes 8,192 tokens a step and validates every 10 steps, the other 16,384
    (rank_equivalents 4, its config only in a checkpoint) every 5. They share steps 0 and 10 (6.0 vs 5.5) and
    every token count, the last 245,760 = step 30 vs step 15 (4.0 vs 4.5). Equal time is the other run's end,
    45 s: the reference is 5.0 at 40 s and 4.0 at 60 s, so 5.0 - 1.0 * 5/20 = 4.75 there. A resumed run's step
    logged twice counts once (the later row), and a line a kill cut short is skipped."""
    ref = write_run(tmp_path / "ref", "muon", [(0, 0, 10.0), (10, 20, 6.0), (20, 40, 5.0), (30, 60, 4.0)])
    with open(ref / "metrics.jsonl", "r+") as f:
        lines = f.readlines()
        stale = json.dumps(dict(step=20, val_loss=9.0, train_time_ms=39_000)) + "\n"  # before the resume
        f.seek(0)
        f.writelines(lines[:4] + [stale] + lines[4:] + ['{"step": 31, "val_lo'])
    big = write_run(tmp_path / "big", "muon", [(0, 0, 10.0), (5, 15, 7.0), (10, 30, 5.5), (15, 45, 4.5)],
                    checkpoint=True, rank_equivalents=4, label_smoothing=0.1)
    result = ablate(ref, big)
    assert result["shared_steps"] == [0, 10] and result["shared_tokens"] == [0, 81_920, 163_840, 245_760]
    assert result["equal_time_s"] == 45.0 and result["equal_time_run"] == "big"
    one, two = result["runs"]
    assert (one["val_loss_at_step"], two["val_loss_at_step"]) == (6.0, 5.5)
    assert (one["val_loss_at_tokens"], two["val_loss_at_tokens"]) == (4.0, 4.5)
    assert one["val_loss_at_time"] == pytest.approx(4.75) and two["val_loss_at_time"] == 4.5
    assert one["val_loss_at_shared_steps"] == {0: 10.0, 10: 6.0} and two["val_loss_at_shared_steps"][10] == 5.5
    assert (one["tokens"], two["tokens"], two["steps"]) == (245_760, 245_760, 15)
    assert one["seconds_to_reference"] == 60.0 and two["seconds_to_reference"] is None  # 4.5 never gets to 4.0
    settings = result["settings"]
    assert [s["differs"] for s in settings] == ["", "rank_equivalents=4, label_smoothing=0.1"]
    assert settings[1]["changes"] == dict(rank_equivalents=4, label_smoothing=0.1)
    at_time = settings[1]["figures"]["val_loss_at_time"]
    assert at_time["difference"] == pytest.approx(4.5 - 4.75) and at_time["se"] is None  # one seed each: no spread
    assert at_time["beyond_spread"] is None and result["spread"]["val_loss_at_time"] == dict(std=None, dof=0)
    json.dumps(result)


@pytest.mark.parametrize("x, y", [(0, 5.0), (10, 3.0), (15, 2.5), (12.5, 2.75), (20, 2.0), (25, None), (-1, None)])
def test_value_at_is_linear_between_points_and_none_outside(x: float, y: float | None) -> None:
    assert compare.value_at([0, 10, 20], [5.0, 3.0, 2.0], x) == (None if y is None else pytest.approx(y))


def test_seeds_of_a_setting_give_mean_std_and_the_difference_in_standard_errors(
        tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """Two seeds of the reference (their configs differ only in seed and bookkeeping: run_id, val_loss_every,
    device, warmup_steps, trackers) end at 4.0 and 4.2; one run with muon_lr 0.03 ends at 4.5. By hand: reference
    mean 4.1, sample std sqrt(0.02); the pooled spread is that std (1 degree of freedom); the other setting's
    difference 0.4 has se = sqrt(0.02) * sqrt(1/1 + 1/2) = 0.17321, 2.31 se: beyond 2 se. At equal time (30 s,
    the shortest run) the second seed is 10 - 5.8 * 30/32 = 4.5625 and the other 10 - 5.5 * 30/31. The target is
    the reference's mean 4.1: the first seed reaches it at 30 * 5.9/6 = 29.5 s, the others never."""
    a0 = write_run(tmp_path / "a0", "muon", [(0, 0, 10.0), (10, 30, 4.0)])
    a1 = write_run(tmp_path / "a1", "muon", [(0, 0, 10.0), (10, 32, 4.2)], seed=1, run_id="a1", val_loss_every=5,
                   device="cpu", warmup_steps=0, trackers="tensorboard")
    lr = write_run(tmp_path / "lr", "muon", [(0, 0, 10.0), (10, 31, 4.5)], muon_lr=0.03)
    result = ablate(a0, a1, lr)
    ref, other = result["settings"]
    assert (ref["runs"], ref["seeds"], ref["differs"]) == (["a0", "a1"], [0, 1], "")
    assert (other["runs"], other["differs"]) == (["lr"], "muon_lr=0.03")
    assert [r["setting"] for r in result["runs"]] == [1, 1, 2]
    final = ref["figures"]["final_val_loss"]
    assert final["mean"] == pytest.approx(4.1) and final["std"] == pytest.approx(math.sqrt(0.02)) and final["n"] == 2
    assert result["spread"]["final_val_loss"]["std"] == pytest.approx(math.sqrt(0.02))
    assert result["spread"]["final_val_loss"]["dof"] == 1
    vs = other["figures"]["final_val_loss"]
    assert (vs["mean"], vs["std"], vs["n"]) == (4.5, None, 1)
    assert vs["difference"] == pytest.approx(0.4) and vs["se"] == pytest.approx(math.sqrt(0.02) * math.sqrt(1.5))
    assert vs["standard_errors"] == pytest.approx(0.4 / (math.sqrt(0.02) * math.sqrt(1.5)))
    assert vs["beyond_spread"] is True
    assert result["equal_time_s"] == 30.0
    at_time = [4.0, 10 - 5.8 * 30 / 32]
    assert [r["val_loss_at_time"] for r in result["runs"]] == pytest.approx([*at_time, 10 - 5.5 * 30 / 31])
    assert ref["figures"]["val_loss_at_time"]["mean"] == pytest.approx(statistics.fmean(at_time))
    assert ref["figures"]["val_loss_at_time"]["std"] == pytest.approx(abs(at_time[0] - at_time[1]) / math.sqrt(2))
    assert result["target_val_loss"] == pytest.approx(4.1)
    assert [r["seconds_to_reference"] for r in result["runs"]] == [pytest.approx(29.5), None, None]
    reach = other["figures"]["seconds_to_reference"]
    assert (ref["figures"]["seconds_to_reference"]["n"], reach["n"], reach["difference"]) == (1, 0, None)
    assert compare.legend_labels(result) == ["Muon + Adam, 75 steps (reference), seed 0",  # the plot's legend
                                             "Muon + Adam, 75 steps (reference), seed 1",
                                             "Muon + Adam, 75 steps (muon_lr=0.03)"]
    compare.main([str(a0), str(a1), str(lr), "--json"])
    out, err = capsys.readouterr()
    assert json.loads(out)["settings"][1]["figures"]["final_val_loss"]["beyond_spread"] is True
    assert "muon_lr=0.03" in err and "yes (+2.3 se)" in err  # the tables go to stderr under --json


def test_ablation_refuses_what_it_cannot_compare_in_one_line(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """Not a directory, a directory that is not a run, a run without metrics or without a validation yet, a run
    given twice, --plot without matplotlib: one line naming it, exit 2."""
    ok = write_run(tmp_path / "ok", "muon", [(0, 0, 10.0), (10, 30, 4.0)])
    empty = tmp_path / "empty"
    empty.mkdir()
    no_metrics = write_run(tmp_path / "no-metrics", "muon", [(0, 0, 10.0)])
    (no_metrics / "metrics.jsonl").unlink()
    no_val = write_run(tmp_path / "no-val", "muon", [(0, 0, 10.0)])
    (no_val / "metrics.jsonl").write_text(json.dumps(dict(step=1, train_loss=9.0, train_time_ms=900.0)) + "\n")
    assert refused([ok, tmp_path / "missing"], capsys) == (f"compare.py: error: {tmp_path / 'missing'}: not a "
                                                           f"directory (give pretraining run directories, e.g. "
                                                           f"logs/RUN_ID)\n")
    assert refused([ok, empty], capsys) == (f"compare.py: error: {empty}: not a pretraining run directory (no "
                                            f"readable run.json and no checkpoint holding a config)\n")
    assert refused([ok, no_metrics], capsys).startswith(f"compare.py: error: {no_metrics / 'metrics.jsonl'}: "
                                                        f"cannot be read (No such file or directory)")
    assert refused([no_val, ok], capsys) == (f"compare.py: error: {no_val / 'metrics.jsonl'}: no validation rows "
                                             f"(val_loss) yet; a run compares once it has validated\n")
    assert refused([ok, tmp_path / "ok"], capsys) == (f"compare.py: error: {tmp_path / 'ok'}: given twice (each "
                                                      f"run counts once; seeds are separate runs)\n")
    assert refused([], capsys).startswith("compare.py: error: give the pretraining run directories to compare")
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as where it is not installed
    assert refused([ok, "--plot", tmp_path / "a.png"], capsys) == (
        "compare.py: error: --plot needs matplotlib (pip install matplotlib==3.11.2)\n")
    assert not (tmp_path / "a.png").exists()
    assert refused(["--peer", ok], capsys).startswith("compare.py: error: --peer trains its own runs")
    assert refused([ok, "--quick"], capsys) == ("compare.py: error: --quick, --peer-seconds and --peer-lrs go with "
                                                "--peer\n")


# -----------------------------------------------------------------------------
# peer: ours against GPT2LMHeadModel + AdamW at the same wall clock


def test_seconds_to_reach_a_loss_the_first_validation_already_meets() -> None:
    """A loss above the initial one (the other run diverged) is reached at the first validation, never before it."""
    run = dict(seconds=[0.0, 30.0], val_loss=[10.0, 4.0])
    assert compare.seconds_to_reach(run, 11.0) == 0.0 and compare.seconds_to_reach(run, 7.0) == 15.0


@pytest.mark.parametrize("frac, mult", [(0.0, 0.0), (0.025, 0.5), (0.05, 1.0), (0.525, 0.55), (1.0, 0.1),
                                        (1.5, 0.1), (-1.0, 0.0)])
def test_peer_schedule_warms_up_linearly_then_decays_by_cosine_to_a_tenth(frac: float, mult: float) -> None:
    assert compare.peer_lr_mult(frac) == pytest.approx(mult)


def peer_run(lr: float, seconds: list[float], val_loss: list[float], tokens_per_s: int = 1000) -> dict:
    return dict(lr=lr, seconds=seconds, val_loss=val_loss, final_val_loss=val_loss[-1], train_s=seconds[-1],
                tokens_per_s=tokens_per_s)


def test_peer_comparison_times_each_to_the_others_final_loss() -> None:
    """Ours ends at 4.0 in 100 s; the best AdamW (lr 2e-3, the lowest final loss; a diverged run is never the best)
    ends at 5.0: ours gets there at 50 s, 2x faster, and AdamW never reaches 4.0."""
    ours = peer_run(0, [0.0, 50.0, 100.0], [10.0, 5.0, 4.0], tokens_per_s=500)
    adamw = [peer_run(1e-3, [0.0, 50.0, 99.0], [10.0, 7.0, 5.5]), peer_run(2e-3, [0.0, 50.0, 100.0], [10.0, 6.0, 5.0]),
             peer_run(3e-3, [0.0, 50.0], [10.0, float("nan")])]
    c = compare.peer_comparison(ours, adamw)
    assert c["best_lr"] == 2e-3 and c["val_loss_gap"] == 1.0
    assert c["ours_seconds_to_adamw_loss"] == 50.0 and c["speedup_to_adamw_loss"] == 2.0
    assert c["adamw_seconds_to_ours_loss"] is None and c["speedup_to_ours_loss"] is None
    assert c["tokens_per_s_ratio"] == 0.5


def test_peer_comparison_when_adamw_ends_lower() -> None:
    """The other way round: AdamW passes ours' 4.0 at 75 s (0.75x ours' 100 s); ours never reaches its 3.5."""
    ours = peer_run(0, [0.0, 100.0], [10.0, 4.0])
    c = compare.peer_comparison(ours, [peer_run(1e-3, [0.0, 50.0, 100.0], [10.0, 4.5, 3.5])])
    assert c["adamw_seconds_to_ours_loss"] == 75.0 and c["speedup_to_ours_loss"] == 0.75
    assert c["ours_seconds_to_adamw_loss"] is None and c["speedup_to_adamw_loss"] is None and c["val_loss_gap"] == -0.5


def test_peer_model_maps_our_shape_and_its_loss_is_transformers_own() -> None:
    """GPT2LMHeadModel at our width, depth, heads and padded vocabulary; PeerLoss on (inputs, next tokens) is the
    loss transformers computes from labels (which it shifts itself)."""
    hp = tiny_hparams()
    hf = compare.peer_gpt2(hp).eval()
    config = hf.config
    assert (config.n_embd, config.n_layer, config.n_head) == (hp.model_dim, hp.num_layers, hp.num_heads)
    assert config.vocab_size == 50304 and config.n_positions >= hp.row_len
    tokens = torch.randint(0, hp.vocab_size, (2, hp.row_len), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = compare.PeerLoss(hf)(tokens[:, :-1], tokens[:, 1:])
        theirs = hf(input_ids=tokens, labels=tokens).loss
    assert ours == pytest.approx(float(theirs), rel=1e-5)


def test_peer_step_takes_our_micro_batches_and_rows() -> None:
    """One AdamW step sees the batch as ours does: rank_equivalents micro-batches of train_seq_len tokens, each as
    (train_seq_len / row_len, row_len) rows, in order; the loss is their mean."""
    hp = tiny_hparams(train_seq_len=512, row_len=128, rank_equivalents=2)
    seen = []

    class Recorder(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = torch.nn.Parameter(torch.ones(()))

        def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            seen.append((x.clone(), y.clone()))
            return self.w * (len(seen) + 1.0)

    loss_fn = Recorder()
    inputs = torch.arange(hp.tokens_per_step, dtype=torch.int32)
    loss = compare.peer_step(loss_fn, torch.optim.AdamW(loss_fn.parameters()), (inputs, inputs.long() + 1), hp,
                           M.Runtime(device=torch.device("cpu")))
    assert loss == 2.5 and [x.shape for x, _ in seen] == [(4, 128), (4, 128)]
    assert torch.equal(torch.cat([x.reshape(-1) for x, _ in seen]), inputs)
    assert torch.equal(torch.cat([y.reshape(-1) for _, y in seen]), inputs.long() + 1)


@pytest.mark.slow
def test_peer_quick_compares_both_at_one_budget(capsys: pytest.CaptureFixture) -> None:
    """--peer --quick end to end: our pretraining.py run, the dtype probe and an AdamW run in their own
    processes; one budget (our training seconds) for both, finite val losses, the same tokens per step and val
    tokens as ours, and the table prints."""
    compare.main(["--peer", "--quick", "--json", "--device", "cpu"])
    peer = json.loads(capsys.readouterr().out)["peer"]
    ours, adamw = peer["ours"], peer["adamw"]
    quick = M.Hyperparameters(**dict(M.PRESETS["shakespeare"], **compare.PEER_QUICK))
    assert peer["quick"] and peer["equal_budget"] and peer["budget_s"] == ours["train_s"] > 0
    assert [r["lr"] for r in adamw] == list(compare.PEER_QUICK_LRS)
    assert all(r["budget_s"] == peer["budget_s"] for r in adamw)
    assert ours["tokens_per_step"] == peer["tokens_per_step"] == quick.tokens_per_step
    assert all(r["tokens_per_step"] == quick.tokens_per_step and r["train_steps"] >= 1 for r in adamw)
    assert peer["val_tokens"] == quick.val_tokens and ours["train_steps"] == quick.num_iterations
    for run in [ours, *adamw]:
        assert all(math.isfinite(v) for v in run["val_loss"]) and run["final_val_loss"] == run["val_loss"][-1]
        assert run["seconds"] == sorted(run["seconds"]) and run["tokens_per_s"] > 0
    assert peer["adamw_dtype"] in ("fp32", "bf16") and set(peer["dtype_probe_step_ms"]) == {"fp32", "bf16"}
    assert set(peer["comparison"]) >= {"best_lr", "ours_val_loss", "adamw_val_loss", "ours_seconds_to_adamw_loss",
                                       "adamw_seconds_to_ours_loss", "speedup_to_adamw_loss",
                                       "speedup_to_ours_loss", "tokens_per_s_ratio"}
    compare.print_peer(peer)
    assert "ours reaches the best AdamW's" in capsys.readouterr().out
