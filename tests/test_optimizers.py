"""The 2026 record's optimizer switches (model.py's optimizer section): Polar Express, NorMuon, cautious weight decay,
the record's Adam, Muon LR multipliers, momentum cool-down and head groups for Q and K. Each piece against a reference
written here from the formula; the whole-run contracts (two processes, resume, bad flags) are slow tests below.

    python -m pytest tests/test_optimizers.py -q      # CPU, under a minute without the slow tests
"""
from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch

import model as M
from conftest import assert_same_run, free_port, metric_rows, run, stopped_and_resumed, tiny_args, tiny_hparams

# The record's Polar Express coefficients at f411b3d3 (record #38), restated: 5 iterations, safety 2e-2, cushion 2
RECORD_COEFFS = [(8.156554524902461, -22.48329292557795, 15.878769915207462),
                 (4.042929935166739, -2.808917465908714, 0.5000178451051316),
                 (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
                 (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
                 (2.3465413258596377, -1.7097828382687081, 0.42323551169305323)]


def with_spectrum(rows: int, cols: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """A random rows x cols matrix U diag(s) V^T with singular values log-spaced over [0.01, 1]."""
    g = torch.Generator().manual_seed(seed)
    k = min(rows, cols)
    U = torch.linalg.qr(torch.randn(rows, k, generator=g, dtype=torch.float64))[0]
    V = torch.linalg.qr(torch.randn(cols, k, generator=g, dtype=torch.float64))[0]
    s = torch.logspace(-2, 0, k, dtype=torch.float64)
    return U @ torch.diag(s) @ V.T, U, s, V


def polar_express_reference(U: torch.Tensor, s: torch.Tensor, V: torch.Tensor) -> torch.Tensor:
    """U p(s / (||s|| * 1.02)) V^T in fp64: the five quintics of the record applied to each singular value."""
    x = s / (s.norm() * 1.02)
    for a, b, c in RECORD_COEFFS:
        x = a * x + b * x**3 + c * x**5
    return U @ torch.diag(x) @ V.T


# -----------------------------------------------------------------------------
# Polar Express


def test_polar_express_coefficients_are_the_records() -> None:
    assert [tuple(c) for c in M.POLAR_EXPRESS_COEFFS] == RECORD_COEFFS and M.POLAR_EXPRESS_SAFETY == 2e-2


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows, cols", [(96, 32), (32, 96), (64, 64)])
def test_polar_express_maps_singular_values_as_its_polynomials_do(rows: int, cols: int, dtype: torch.dtype) -> None:
    # tall, wide and square; the composed quintics keep every normalised singular value above 1e-3 within
    # [0.859, 1.141] (computed from the coefficients), where the 2025 Newton-Schulz leaves [0.47, 1.20]
    G, U, s, V = with_spectrum(rows, cols, seed=rows + cols)
    out = M.zeropower_via_polar_express(G.to(dtype))
    assert out.dtype == dtype and out.shape == (rows, cols)
    want = polar_express_reference(U, s, V)
    got = out.double()
    assert float((got - want).norm() / want.norm()) < 0.08  # the same matrix, up to bf16 arithmetic throughout
    sv = torch.linalg.svdvals(got)
    torch.testing.assert_close(sv, torch.linalg.svdvals(want), atol=0.03, rtol=0)  # each singular value's image
    assert float(sv.min()) > 0.84 and float(sv.max()) < 1.16
    ns = torch.linalg.svdvals(M.zeropower_via_newtonschulz5(G.to(dtype)).double())
    assert float(ns.max() - ns.min()) > float(sv.max() - sv.min())  # a tighter band than Newton-Schulz


def test_polar_express_batches_over_leading_dims() -> None:
    G = torch.stack([with_spectrum(32, 48, seed=i)[0] for i in range(3)]).float()
    batched = M.zeropower_via_polar_express(G)
    for i in range(3):
        torch.testing.assert_close(batched[i], M.zeropower_via_polar_express(G[i]), atol=1e-2, rtol=0)


# -----------------------------------------------------------------------------
# NorMuon


@pytest.mark.parametrize("rows, cols", [(12, 5), (5, 12), (7, 7)])
def test_normuon_normalises_per_neuron_and_keeps_the_norm(rows: int, cols: int) -> None:
    # a neuron: a row of a tall or square update, a column of a wide one; two steps of the EMA from zero
    g = torch.Generator().manual_seed(rows * cols)
    beta2 = 0.9
    wide = rows < cols
    state = torch.zeros((1, cols) if wide else (rows, 1))
    moment = torch.zeros(cols if wide else rows, dtype=torch.float64)
    for _ in range(2):
        v = torch.randn(rows, cols, generator=g) * torch.rand(rows, 1, generator=g) * 3
        per_neuron = (v.double() ** 2).mean(dim=0 if wide else 1)  # mean square of each neuron's update
        moment = beta2 * moment + (1 - beta2) * per_neuron
        scaled = v.double() / (moment.sqrt()[None, :] if wide else moment.sqrt()[:, None])
        want = scaled * (v.double().norm() / scaled.norm())
        got = M.normuon_scale(v, state, beta2)
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(state.double().flatten(), moment, rtol=1e-6, atol=1e-9)
        assert abs(float(got.norm()) - float(v.norm())) < 1e-4 * float(v.norm())


# -----------------------------------------------------------------------------
# nanochat's refinements: row equilibration before, norm snapping after


def test_equilibrate_rows_gives_every_row_the_mean_row_norm() -> None:
    X = torch.randn(2, 6, 4, generator=torch.Generator().manual_seed(0)) * torch.arange(1, 7.0)[None, :, None]
    out = M.equilibrate_rows(X)
    for i in range(2):
        target = X[i].norm() / math.sqrt(6)  # ||X||_F / sqrt(rows): the root-mean-square row norm
        torch.testing.assert_close(out[i].norm(dim=-1), torch.full((6,), float(target)), rtol=1e-5, atol=1e-6)
        cos = torch.nn.functional.cosine_similarity(out[i], X[i], dim=-1)  # each row keeps its direction
        torch.testing.assert_close(cos, torch.ones(6), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("rows, cols", [(8, 3), (3, 8)])
def test_snap_norm_gives_the_norm_of_a_semi_orthogonal_matrix(rows: int, cols: int) -> None:
    v = torch.randn(rows, cols, generator=torch.Generator().manual_seed(rows)) * 7
    out = M.snap_norm(v)
    assert float(out.norm()) == pytest.approx(math.sqrt(min(rows, cols)), rel=1e-5)
    torch.testing.assert_close(out / out.norm(), v / v.norm(), rtol=1e-5, atol=1e-6)
    Q = torch.linalg.qr(torch.randn(rows, cols).mT if rows < cols else torch.randn(rows, cols))[0]
    Q = Q.mT if rows < cols else Q
    torch.testing.assert_close(M.snap_norm(Q), Q, rtol=1e-5, atol=1e-5)  # exactly semi-orthogonal: unchanged


# -----------------------------------------------------------------------------
# Cautious weight decay


def test_cautious_masks_on_hand_built_tensors() -> None:
    update = torch.tensor([1.0, -1.0, 1.0, -1.0, 0.0, 2.0])
    weight = torch.tensor([2.0, -3.0, -1.0, 1.0, 5.0, 0.0])
    assert M.cautious_mask(update, weight, strict=False).tolist() == [True, True, False, False, True, True]
    assert M.cautious_mask(update, weight, strict=True).tolist() == [True, True, False, False, False, False]


def test_muon_cautious_decay_is_lr_squared_where_update_and_weight_agree() -> None:
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(8, 4))
    p.grad = torch.randn(8, 4)
    lr, wd, momentum = 0.05, 1.2, 0.9
    muon = M.Muon([p], lr=lr, momentum=momentum, weight_decay=wd, cautious=True, lr_mults={p: 3.0})
    w0, g = p.detach().clone(), p.grad.clone()
    buf = (1 - momentum) * g  # the momentum after one step from zero
    v = M.zeropower_via_newtonschulz5(g + momentum * (buf - g))  # Nesterov: g.lerp(buf, momentum)
    muon.step()
    lr_eff = lr * 3.0
    mask = (v * w0 >= 0).float()
    torch.testing.assert_close(p.detach(), w0 - mask * w0 * wd * lr * lr_eff - v * lr_eff, rtol=1e-6, atol=1e-7)


# -----------------------------------------------------------------------------
# The record's Adam


def hand_adam(w: torch.Tensor, grads: list[torch.Tensor], lr: float, betas: tuple[float, float], eps: float,
              wd: float, cautious: bool, every: int) -> torch.Tensor:
    """The record's Adam written out: every `every` calls, one step on the summed gradients."""
    m, v, t, pending = torch.zeros_like(w), torch.zeros_like(w), 0, torch.zeros_like(w)
    for call, g in enumerate(grads, 1):
        pending = pending + g
        if call % every:
            continue
        g, pending, t = pending, torch.zeros_like(w), t + 1
        m = betas[0] * m + (1 - betas[0]) * g
        v = betas[1] * v + (1 - betas[1]) * g * g
        update = m / (v.sqrt() + eps) * (lr * math.sqrt(1 - betas[1] ** t) / (1 - betas[0] ** t))
        decay = lr * lr * wd * w
        update = update + (decay * (update * w > 0) if cautious else decay)
        w = w - update
    return w


@pytest.mark.parametrize("every, cautious", [(1, False), (2, True), (3, True)])
def test_record_adam_equals_the_hand_written_steps(every: int, cautious: bool) -> None:
    g = torch.Generator().manual_seed(every)
    w0 = torch.randn(6, 5, generator=g, dtype=torch.float64)
    grads = [torch.randn(6, 5, generator=g, dtype=torch.float64) * 0.1 for _ in range(7)]
    p = torch.nn.Parameter(w0.clone())
    lr, betas, eps, wd = 0.01, (0.75, 0.95), 1e-3, 3.0  # a large eps: its placement shows in the numbers
    adam = M.RecordAdam([dict(params=[p], lr=lr, weight_decay=wd)], betas, eps, every=every, cautious=cautious)
    for grad in grads:
        p.grad = grad.clone()
        adam.step()
    torch.testing.assert_close(p.detach(), hand_adam(w0, grads, lr, betas, eps, wd, cautious, every), rtol=1e-12,
                               atol=1e-14)
    assert adam.state[p]["step"] == len(grads) // every and adam.state[p]["calls"] == len(grads)


def test_record_adam_differs_from_torch_only_by_the_epsilon_placement() -> None:
    # no decay, every step: the record's m / (sqrt(v) + eps) * lr sqrt(1 - b2^t) / (1 - b1^t) against torch's
    # m-hat / (sqrt(v-hat) + eps); with eps 0 the two are one formula
    g = torch.Generator().manual_seed(0)
    grads = [torch.randn(4, 3, generator=g, dtype=torch.float64) for _ in range(4)]
    a, b = torch.nn.Parameter(torch.ones(4, 3, dtype=torch.float64)), torch.nn.Parameter(torch.ones(4, 3,
                                                                                                    dtype=torch.float64))
    ours = M.RecordAdam([dict(params=[a], lr=0.1)], (0.8, 0.95), 0.0)
    torch_adam = torch.optim.Adam([b], lr=0.1, betas=(0.8, 0.95), eps=0.0)
    for grad in grads:
        a.grad, b.grad = grad.clone(), grad.clone()
        ours.step()
        torch_adam.step()
    torch.testing.assert_close(a.detach(), b.detach(), rtol=1e-12, atol=1e-14)


def test_adam_table_2026_groups_betas_lrs_and_decay() -> None:
    hp = tiny_hparams(adam_update="record", adam_table="2026", adam_weight_decay=0.005)
    model = M.GPT.from_hparams(hp)
    adam = M.setup_optimizers(model, hp)[0]
    assert isinstance(adam, M.RecordAdam)
    by_first = {id(g["params"][0]): g for g in adam.param_groups}
    head, embed = by_first[id(model.lm_head.weight)], by_first[id(model.embed.weight)]
    ve = by_first[id(model.value_embeds[0].weight)]
    scalars = next(g for g in adam.param_groups if g["params"][0].ndim < 2)
    assert head["betas"] == (0.5, 0.95) and head["lr"] == pytest.approx(hp.head_lr * 0.008 / 0.22)
    assert head["weight_decay"] == pytest.approx(0.005 * 150) and embed["weight_decay"] == pytest.approx(0.75)
    assert embed["lr"] == pytest.approx(hp.embed_lr * 0.008 / 0.6) and ve["betas"] == (0.75, 0.95)
    assert ve["lr"] == pytest.approx(hp.embed_lr) and ve["weight_decay"] == pytest.approx(0.005 * 5)
    assert scalars["betas"] == (0.9, 0.99) and scalars["lr"] == pytest.approx(hp.scalar_lr)
    assert scalars["weight_decay"] == 0
    assert sum(len(g["params"]) for g in adam.param_groups) == sum(
        1 for n, p in model.named_parameters() if "embed" in n or p.ndim < 2 or n == "lm_head.weight")


# -----------------------------------------------------------------------------
# Muon: LR multipliers, momentum cool-down, head groups, NorMuon state across ranks


def test_muon_lr_mults_2026_are_the_records_mlp_multipliers() -> None:
    model = M.GPT.from_hparams(tiny_hparams())
    assert M.muon_lr_mults(model, tiny_hparams()) == {}  # the shape rule of 2025
    mults = M.muon_lr_mults(model, tiny_hparams(muon_lr_mults="2026"))
    assert {mults[b.mlp.c_fc.weight] for b in model.blocks} == {2.0}  # sqrt(4): MLP width 4x
    assert {mults[b.mlp.c_proj.weight] for b in model.blocks} == {4.0}  # and twice that for the output
    assert len(mults) == 2 * len(model.blocks)


def test_muon_momentum_warms_up_then_cools_down() -> None:
    hp = tiny_hparams(num_iterations=100, muon_momentum_warmup=20, muon_momentum_cooldown=10)
    values = [M.get_muon_momentum(s, hp) for s in range(101)]
    assert values[0] == pytest.approx(0.85) and values[10] == pytest.approx(0.90) and values[20] == 0.95
    assert values[90] == 0.95 and values[95] == pytest.approx(0.90) and values[100] == pytest.approx(0.85)
    off = tiny_hparams(num_iterations=100, muon_momentum_warmup=20)
    assert [M.get_muon_momentum(s, off) for s in range(101)][-1] == 0.95
    overlap = tiny_hparams(num_iterations=10, muon_momentum_warmup=100, muon_momentum_cooldown=5)
    assert M.get_muon_momentum(9, overlap) == pytest.approx(0.85 + 0.1 * 9 / 100)  # the warm-up wins, as there


def test_qk_head_groups_orthogonalise_q_and_k_per_group_of_heads() -> None:
    H, D, dim = 4, 8, 32
    x = torch.arange(3 * H * D * dim, dtype=torch.float32).view(3, H * D, dim)
    p = torch.nn.Parameter(torch.zeros(3, H * D, dim))
    muon = M.Muon([p], qk_heads={p: (H, 2)})
    qk, v = muon.blocks(p, x)
    assert qk.shape == (4, 2 * D, dim) and v.shape == (1, H * D, dim)
    assert torch.equal(qk[1], x[0, 2 * D:4 * D]) and torch.equal(qk[2], x[1, :2 * D]) and torch.equal(v[0], x[2])
    assert qk.data_ptr() == x.data_ptr()  # views: the update writes back in place
    torch.manual_seed(1)
    p.grad = torch.randn(3, H * D, dim)
    muon.step()
    update = -p.detach() / 0.05  # lr 0.05, shape rule 1 (rows <= cols), no decay: the orthogonalised update
    for group in muon.blocks(p, update)[0]:  # each group of two heads' rows is orthogonal on its own
        sv = torch.linalg.svdvals(group)
        assert float(sv.min()) > 0.4 and float(sv.max()) < 1.3
    whole = torch.linalg.svdvals(update[0])  # Q as a whole is not: its two groups are independent
    assert float(whole.max()) > 1.3


# -----------------------------------------------------------------------------
# Whole runs (subprocesses)

SWITCHES = ("--muon-orthogonalizer", "polar_express", "--normuon", "true", "--cautious-weight-decay", "true",
            "--muon-weight-decay", "1.2", "--adam-update", "record", "--adam-table", "2026", "--adam-weight-decay",
            "0.005", "--adam-every", "2", "--muon-lr-mults", "2026", "--muon-momentum-cooldown", "2",
            "--muon-qk-head-groups", "1", "--muon-row-equilibration", "true", "--muon-norm-snap", "true")
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--nnodes=1"]


@pytest.mark.slow
def test_every_switch_on_two_processes_follow_one(shard_dir: Path, tmp_path: Path) -> None:
    """NorMuon's per-neuron state is gathered with the matrices each rank orthogonalised; Adam's summed gradients
    are averaged like the rest: two processes end where one does."""
    one = run([sys.executable, "pretraining.py", *tiny_args(shard_dir, tmp_path, "one", *SWITCHES)])
    assert one.returncode == 0, one.stderr
    two = run([*TORCHRUN, f"--master_port={free_port()}", "pretraining.py",
               *tiny_args(shard_dir, tmp_path, "two", *SWITCHES)])
    assert two.returncode == 0, two.stderr
    assert_same_run(tmp_path / "one", tmp_path / "two", steps=6)


@pytest.mark.slow
def test_every_switch_on_resume_is_bitwise(shard_dir: Path, tmp_path: Path) -> None:
    """Stopped after step 3 (Adam's gradient sum of an odd step pending) and resumed: the same losses, weights and
    optimizer state, NorMuon's second moments and Adam's step counts included, as without the stop."""
    a, b, _, _ = stopped_and_resumed(shard_dir, tmp_path, SWITCHES, stop=3, end=6)
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    for opt_a, opt_b in zip(a["optimizers"], b["optimizers"]):
        for idx, state in opt_a["state"].items():
            for key, value in state.items():
                same = torch.equal(value, opt_b["state"][idx][key]) if torch.is_tensor(value) else \
                    value == opt_b["state"][idx][key]
                assert same, (idx, key)
    assert {"second_moment"} <= set(a["optimizers"][1]["state"][0]) and "grad_sum" in a["optimizers"][0]["state"][0]
    losses = [[(r["step"], r.get("train_loss"), r.get("val_loss")) for rows in metric_rows(tmp_path / run_id)
               for r in rows] for run_id in ("full", "half")]
    assert losses[0] == losses[1]
