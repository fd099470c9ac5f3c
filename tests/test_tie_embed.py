"""--tie-embed (issue 26; records #51 and #53, as record #89 at f411b3d3 runs it): the token embedding and lm_head
are one matrix until the split step, then two. Against a reference written here, in which the two modules hold one
shared nn.Parameter until the split and then two, the second with a copy of the first's optimizer state; the
split step against the record's; config errors; checkpoints saved while tied load in every reader; a compiled model
across the split; and runs that resume before, at and after the split, and on two processes."""
from __future__ import annotations

import dataclasses
import shutil
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from conftest import cfg, one_and_two_processes, run, tiny_args, tiny_hparams, write_checkpoint

import finetune as FT  # noqa: E402
import model as M  # noqa: E402

STEPS = 8  # stages [0, 3), [3, 5), [5, 8): split step 5 | 1 = 5, so steps 0..5 update one matrix, 6 and 7 two


def tied_hp(**overrides) -> M.Hyperparameters:
    return tiny_hparams(**dict(dict(stage_schedule="2026", tie_embed=True, num_iterations=STEPS), **overrides))


def test_split_step_is_the_records() -> None:
    """Record #89: 1270 scheduled steps, stage 3 starts at round(1270 * 2 / 3) = 847, already odd."""
    record = M.Hyperparameters(stage_schedule="2026", num_iterations=1285, tie_embed=True)
    assert M.stage_boundaries(record)[2][0] == 847 and M.split_step(record) == 847
    assert M.split_step(tied_hp()) == 5
    assert M.split_step(tied_hp(num_iterations=9)) == 7  # stage 3 starts at 6: made odd
    assert [M.embed_tied_at(s, tied_hp()) for s in range(STEPS)] == [True] * 6 + [False] * 2
    assert not any(M.embed_tied_at(s, tied_hp(tie_embed=False)) for s in range(STEPS))


def test_tied_init_is_the_records_head() -> None:
    """One matrix drawn as the record's lm_head (normal, std 0.005), the embedding a copy; off, the 2025 init."""
    torch.manual_seed(0)
    model = M.GPT.from_hparams(tied_hp())
    assert torch.equal(model.embed.weight, model.lm_head.weight)
    assert abs(float(model.lm_head.weight.detach().std()) - M.TIED_INIT_STD) < 1e-4
    torch.manual_seed(0)
    assert not M.GPT.from_hparams(tied_hp(tie_embed=False)).lm_head.weight.any()  # zero head, as before


def shared_reference(hp: M.Hyperparameters) -> tuple[M.GPT, list[torch.optim.Optimizer], dict, int]:
    """The same model and optimizers with the embedding's weight replaced by the head's own nn.Parameter (autograd
    sums both uses into one gradient; only the head's Adam slot holds it); and where the embedding's weight was in
    the Adam groups (its group and index)."""
    ref = M.GPT.from_hparams(hp)
    opts = M.setup_optimizers(ref, dataclasses.replace(hp, tie_embed=False))
    group = next(g for g in opts[0].param_groups if any(p is ref.embed.weight for p in g["params"]))
    index = next(i for i, p in enumerate(group["params"]) if p is ref.embed.weight)
    del group["params"][index]
    ref.embed.weight = ref.lm_head.weight
    return ref, opts, group, index


def untie_reference(ref: M.GPT, opts: list[torch.optim.Optimizer], group: dict, index: int) -> None:
    """The split: a second parameter from the tied value, its optimizer state a copy of the head's."""
    head = ref.lm_head.weight
    ref.embed.weight = nn.Parameter(head.detach().clone())
    group["params"].insert(index, ref.embed.weight)
    opts[0].state[ref.embed.weight] = {k: v.clone() if torch.is_tensor(v) else v
                                       for k, v in opts[0].state[head].items()}


@pytest.mark.parametrize("adam", [dict(), dict(adam_update="record", adam_every=2, adam_weight_decay=0.005,
                                                adam_table="2026")])
def test_training_follows_a_shared_parameter(adam: dict) -> None:
    """Eight steps of ours (two parameters, the embedding's gradient folded into the head's, the embedding a copy
    after each tied step) against the shared-parameter reference: the same losses and weights, bitwise, through
    the split and after it; and each half then moves on its own."""
    hp = tied_hp(**adam)
    torch.manual_seed(0)
    model = M.GPT.from_hparams(hp)
    opts = M.setup_optimizers(model, hp)
    torch.manual_seed(0)
    ref, ref_opts, group, index = shared_reference(hp)
    plain = dataclasses.replace(hp, tie_embed=False)
    gen = torch.Generator().manual_seed(1)
    for step in range(STEPS):
        x = torch.randint(0, M.EOT_ID, (2, 128), generator=gen)
        y = torch.randint(0, M.EOT_ID, (2, 128), generator=gen)
        losses = []
        for net, optimizers, config in ((model, opts, hp), (ref, ref_opts, plain)):
            loss = net(x, y, 2)
            loss.backward()
            M.optimizer_step(net, optimizers, step, config)
            losses.append(float(loss.detach()))
        if step == M.split_step(hp):
            untie_reference(ref, ref_opts, group, index)
        assert losses[0] == losses[1], (step, losses)
        for name, p in ref.named_parameters(remove_duplicate=False):
            assert torch.equal(model.get_parameter(name), p), (step, name)
        if step <= M.split_step(hp):
            assert torch.equal(model.embed.weight, model.lm_head.weight), step
    assert not torch.equal(model.embed.weight, model.lm_head.weight)  # step 7 updates Adam in both tables
    assert opts[0].state[model.embed.weight]["step"] == opts[0].state[model.lm_head.weight]["step"]


def optimizer_step_before(model: nn.Module, optimizers: list[torch.optim.Optimizer], step: int,
                          hp: M.Hyperparameters) -> None:
    """model.optimizer_step as it was before --tie-embed (one process)."""
    M.apply_schedules(optimizers, step, hp)
    for opt in optimizers:
        opt.step()
    model.zero_grad(set_to_none=True)


def test_off_trains_as_before() -> None:
    """--tie-embed off: a stage-scheduled run's losses and weights are bitwise those of the update before the
    switch existed (the 2025 init, nothing folded, nothing copied)."""
    hp = tied_hp(tie_embed=False)
    nets = []
    for step_fn in (M.optimizer_step, optimizer_step_before):
        torch.manual_seed(0)
        model = M.GPT.from_hparams(hp)
        opts = M.setup_optimizers(model, hp)
        gen = torch.Generator().manual_seed(1)
        losses = []
        for step in range(STEPS):
            x = torch.randint(0, M.EOT_ID, (2, 128), generator=gen)
            loss = model(x, x, 2)
            loss.backward()
            step_fn(model, opts, step, hp)
            losses.append(float(loss.detach()))
        nets.append((losses, model.state_dict()))
    (a, sa), (b, sb) = nets
    assert a == b and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["embed.weight"], sa["lm_head.weight"])


def test_compiled_model_does_not_recompile_at_the_split() -> None:
    """The forward pass never reads whether it is tied (the optimizer ties the weights), so a compiled model runs
    across the split without a recompile and follows the eager model."""
    hp = tied_hp()
    losses = []
    torch._dynamo.reset()  # another test in this process may have compiled GPT.forward: start from no cache entry
    for compiled in (False, True):
        torch.manual_seed(0)
        model = M.GPT.from_hparams(hp)
        opts = M.setup_optimizers(model, hp)
        forward = torch.compile(model, backend="eager") if compiled else model
        gen = torch.Generator().manual_seed(1)
        window = torch.tensor(2, dtype=torch.int32)
        run_losses = []
        with torch._dynamo.config.patch(error_on_recompile=True):
            for step in range(STEPS):
                x = torch.randint(0, M.EOT_ID, (2, 128), generator=gen)
                loss = forward(x, x, window)
                loss.backward()
                M.optimizer_step(model, opts, step, hp)
                run_losses.append(float(loss.detach()))
        losses.append(run_losses)
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)


def test_checkpoint_saved_while_tied_loads_everywhere(tmp_path: Path) -> None:
    """A checkpoint saved while tied holds both weights (equal), so every loader reads it unchanged: load_model's
    logits equal the saved model's, and a fine-tune of it starts untied."""
    hp = tied_hp()
    torch.manual_seed(0)
    model = M.GPT.from_hparams(hp)
    path = write_checkpoint(tmp_path / "logs", "tied", 3, model, hp)
    saved = torch.load(path, weights_only=True)["model"]
    assert torch.equal(saved["embed.weight"], saved["lm_head.weight"])
    loaded, got_hp, _ = M.load_model(path)
    assert got_hp.tie_embed
    x = torch.randint(0, M.EOT_ID, (1, 128), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(loaded(x, None, 2), model(x, None, 2))
    ft, *_ = FT.resolve(["--checkpoint", str(path), "--log-dir", str(tmp_path / "ft")])
    assert not ft.tie_embed and not ft.stage_schedule


def test_bad_tie_values(tmp_path: Path) -> None:
    with pytest.raises(M.ConfigError) as e:
        cfg("--preset", "shakespeare", "--tie-embed", "true").validate()
    assert str(e.value) == "--tie-embed needs --stage-schedule (the tied matrix splits at a stage's start)"
    hp = tied_hp()
    path = write_checkpoint(tmp_path / "logs", "tied", 3, M.GPT.from_hparams(hp), hp)
    with pytest.raises(M.ConfigError, match=r"^--tie-embed is pretraining's \(it splits at a stage schedule's step; "
                                            r"a fine-tune starts from its parent's two matrices, untied\)$"):
        FT.resolve(["--checkpoint", str(path), "--tie-embed", "true"])


# -----------------------------------------------------------------------------
# Runs: 8 staged steps with a checkpoint after every step; resumed before the split (4), at it (5: the next update
# is the last tied one), just after it (6) and later (7)

# The record's Adam (its table, arithmetic and odd-step updates): the tied matrix at the record's head LR. At the 2025
# table's head LR a tiny tied run's loss climbs, which magnifies the rounding by which two processes already differ
# from one in stage 2 (its batches are summed in another order) past the 1e-5 the comparison allows.
TIED = ("--stage-schedule", "2026", "--tie-embed", "true", "--num-iterations", str(STEPS), "--val-loss-every", "4",
        "--adam-table", "2026", "--adam-update", "record", "--adam-every", "2", "--save-every", "1",
        "--keep-checkpoints", "0")


@pytest.mark.slow
def test_tied_run_resumes_bitwise_across_the_split(shard_dir: Path, tmp_path: Path) -> None:
    full = run([sys.executable, "pretraining.py", *tiny_args(shard_dir, tmp_path, "full", *TIED)])
    assert full.returncode == 0, full.stderr
    end = torch.load(tmp_path / "full" / f"state_step{STEPS:06d}.pt", weights_only=True)
    tied_at = torch.load(tmp_path / "full" / "state_step000005.pt", weights_only=True)["model"]
    assert torch.equal(tied_at["embed.weight"], tied_at["lm_head.weight"])
    assert not torch.equal(end["model"]["embed.weight"], end["model"]["lm_head.weight"])
    for stop in (4, 5, 6, 7):
        shutil.copytree(tmp_path / "full", tmp_path / f"from{stop}")
        again = run([sys.executable, "pretraining.py", "--resume", str(tmp_path / f"from{stop}" /
                                                                       f"state_step{stop:06d}.pt")])
        assert again.returncode == 0, again.stderr
        got = torch.load(tmp_path / f"from{stop}" / f"state_step{STEPS:06d}.pt", weights_only=True)
        assert all(torch.equal(got["model"][k], end["model"][k]) for k in end["model"]), stop
        assert got["val_loss"] == end["val_loss"] and got["data_position"] == end["data_position"]
        for saved, want in zip(got["optimizers"], end["optimizers"]):
            for index, state in want["state"].items():
                assert all(torch.equal(v, saved["state"][index][k]) if torch.is_tensor(v) else
                           v == saved["state"][index][k] for k, v in state.items()), (stop, index)


@pytest.mark.slow
def test_tied_run_two_processes_follow_one(shard_dir: Path, tmp_path: Path) -> None:
    losses = one_and_two_processes(shard_dir, tmp_path, TIED[:-4])
    assert len(losses[0]) > STEPS
