"""model.py's model, Muon optimizer and schedules sections against references: Newton-Schulz, Muon (1 and 2
processes), attention masks, the GPT, the schedules (the record script's checkpoints:
tests/test_config_and_checkpoints.py).

    python -m pytest tests/test_model.py -q      # CPU, about 35 s on 2 cores
"""
from __future__ import annotations

import math
import os
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

import model as M
import runs as R
from conftest import (PADDED_VOCAB, REPO_DIR, doc_ids, random_documents, random_tokens, randomize_zero_inits,
                      tiny_hparams)

TESTS_DIR = Path(__file__).resolve().parent


# -----------------------------------------------------------------------------
# Helpers


def document_causal(docs_BT: Tensor) -> Tensor:
    """(B, T, T) token-level rule: a query sees earlier-or-same keys of its own document."""
    T = docs_BT.size(1)
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    return causal & (docs_BT[:, :, None] == docs_BT[:, None, :])


def brute_force_window_mask(docs_BT: Tensor, window: int) -> Tensor:
    """(B, 1, T, T) mask from block_keep_mask's documented rule, written with loops over blocks.

    A kv block is "full" for a query block when every (query, key) pair of the two blocks is allowed by the
    document-causal rule, "partial" when only some are. Per query block keep the window-1 most recent full blocks
    and the max(window - num_full, 1) most recent partial ones, then AND with the token-level rule.
    """
    B, T = docs_BT.shape
    NB, S = T // M.BLOCK_SIZE, M.BLOCK_SIZE
    allowed = document_causal(docs_BT)
    keep = torch.zeros(B, T, T, dtype=torch.bool)
    for b in range(B):
        for qb in range(NB):
            full, partial = [], []
            for kb in range(qb, -1, -1):  # most recent first
                pairs = allowed[b, qb * S:(qb + 1) * S, kb * S:(kb + 1) * S]
                if bool(pairs.all()):
                    full.append(kb)
                elif bool(pairs.any()):
                    partial.append(kb)
            kept = full[:max(window - 1, 0)] + partial[:max(window - len(full), 1)]
            for kb in kept:
                keep[b, qb * S:(qb + 1) * S, kb * S:(kb + 1) * S] = True
    return (keep & allowed)[:, None]


def block_mask_as_kernel_reads_it(block_mask: Any, B: int, T: int) -> Tensor:
    """(B, 1, T, T) mask a compiled FlexAttention kernel applies: full blocks whole, mask_mod inside partial ones."""
    S = M.BLOCK_SIZE
    out = torch.zeros(B, 1, T, T, dtype=torch.bool)
    q_idx, kv_idx = torch.arange(S)[:, None], torch.arange(S)[None, :]
    for b in range(B):
        for qb in range(T // S):
            for j in range(int(block_mask.full_kv_num_blocks[b, 0, qb])):
                kb = int(block_mask.full_kv_indices[b, 0, qb, j])
                out[b, 0, qb * S:(qb + 1) * S, kb * S:(kb + 1) * S] = True
            for j in range(int(block_mask.kv_num_blocks[b, 0, qb])):
                kb = int(block_mask.kv_indices[b, 0, qb, j])
                tile = block_mask.mask_mod(torch.tensor(b), torch.tensor(0), qb * S + q_idx, kb * S + kv_idx)
                out[b, 0, qb * S:(qb + 1) * S, kb * S:(kb + 1) * S] = tile
    return out


def flex_forward(q: Tensor, k: Tensor, v: Tensor, block_mask: Any, scale: float) -> Tensor:
    """model.attention with a BlockMask, eagerly: FlexAttention warns that it is unfused, which is the point here."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return M.attention(q, k, v, block_mask, scale)


# Rows used by the attention tests: row 0 has documents starting mid-block (100, 200) and a last document
# covering whole blocks 2 and 3 (so "full" blocks exist next to partial ones); row 1 has no <|endoftext|>.
ATTN_EOTS = {0: [0, 100, 200]}


# -----------------------------------------------------------------------------
# Newton-Schulz


@pytest.mark.parametrize("shape", [(256, 128), (128, 256)])
def test_newtonschulz_singular_values_in_band(shape: tuple[int, int]) -> None:
    # The quintic coefficients are tuned to land singular values near Uniform(0.5, 1.5), not exactly at 1.
    G = torch.randn(*shape)
    X = M.zeropower_via_newtonschulz5(G)
    assert X.shape == G.shape
    s = torch.linalg.svdvals(X.double())
    assert s.min() > 0.5 and s.max() < 1.5, (s.min().item(), s.max().item())


@pytest.mark.parametrize("shape", [(3, 64, 32), (3, 32, 64), (2, 3, 16, 16)])
def test_newtonschulz_batched_equals_stacked(shape: tuple[int, ...]) -> None:
    # Muon orthogonalises the merged (3, hdim, dim) QKV weight in one call; each matrix must get exactly the
    # result it would get alone (measured: bitwise equal, the per-matrix norm and bf16 matmuls do not mix).
    G = torch.randn(*shape)
    batched = M.zeropower_via_newtonschulz5(G)
    flat = G.reshape(-1, *shape[-2:])
    stacked = torch.stack([M.zeropower_via_newtonschulz5(g) for g in flat]).reshape(shape)
    assert torch.equal(batched, stacked)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_newtonschulz_keeps_dtype(dtype: torch.dtype) -> None:
    G = torch.randn(32, 48, dtype=dtype)
    assert M.zeropower_via_newtonschulz5(G).dtype == dtype


# -----------------------------------------------------------------------------
# Muon, one process


COLLECTIVES = ["all_gather_into_tensor", "all_gather", "all_gather_single", "all_reduce", "reduce_scatter_tensor",
               "broadcast", "barrier", "reduce", "all_to_all_single"]


def test_world_size_one_makes_no_collective_call(monkeypatch: pytest.MonkeyPatch) -> None:
    # distributed is optional: plain `python pretraining.py` has no process group, so any collective would crash it.
    def refuse(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("collective called at world size 1")

    for name in COLLECTIVES:
        if hasattr(dist, name):
            monkeypatch.setattr(dist, name, refuse)
    hp = tiny_hparams()
    model = randomize_zero_inits(M.GPT.from_hparams(hp))
    tokens = random_tokens(2, 129, seed=0, eot_positions={0: [0, 50], 1: [0]})
    model(tokens[:, :-1], tokens[:, 1:], 2).backward()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    M.all_reduce_gradients(model, 1)
    optimizers = M.setup_optimizers(model, hp)
    for opt in optimizers:
        opt.step()
    muon = optimizers[1]
    assert isinstance(muon, M.Muon)
    muon_params = {id(p) for g in muon.param_groups for p in g["params"]}
    for n, p in model.named_parameters():
        if id(p) in muon_params:  # every hidden matrix was updated by this process alone
            assert not torch.equal(p, before[n]), n


def test_setup_optimizers_partitions_parameters(tiny_hp: M.Hyperparameters) -> None:
    # Each parameter is stepped by exactly one optimizer: matrices in blocks by Muon, the rest by Adam.
    model = M.GPT.from_hparams(tiny_hp)
    adam, muon = M.setup_optimizers(model, tiny_hp)
    seen = [id(p) for opt in (adam, muon) for g in opt.param_groups for p in g["params"]]
    assert sorted(seen) == sorted(id(p) for p in model.parameters())
    hidden = {id(p) for n, p in model.named_parameters() if n.startswith("blocks.") and p.ndim >= 2}
    assert {id(p) for g in muon.param_groups for p in g["params"]} == hidden


@pytest.mark.parametrize("shape", [(64, 32), (32, 64), (3, 16, 24)])
def test_muon_first_step_follows_formula(shape: tuple[int, ...]) -> None:
    # From zero momentum: buf = lerp(0, g, 1-m), nesterov = lerp(g, buf, m), and the step is
    # -lr * max(1, rows/cols)**0.5 * NS(nesterov); tall matrices get the sqrt(rows/cols) boost.
    lr, m = 0.05, 0.9
    p = nn.Parameter(torch.randn(*shape))
    g = torch.randn(*shape)
    p.grad = g.clone()
    p0 = p.detach().clone()
    muon = M.Muon([p], lr=lr, momentum=m)
    muon.step()
    buf = torch.zeros(shape).lerp_(g, 1 - m)
    blended = g.lerp(buf, m)
    scale = max(1.0, shape[-2] / shape[-1]) ** 0.5
    # torch.add(alpha=) rounds once, p0 - (lr * scale) * X twice: same formula, ours matches to the bit
    expected = torch.add(p0, M.zeropower_via_newtonschulz5(blended), alpha=-lr * scale)
    assert torch.equal(p.detach(), expected)
    assert torch.equal(muon.state[p]["momentum_buffer"], buf)
    assert torch.equal(p.grad, g)  # the gradient is read, not overwritten


def test_apply_schedules_sets_lr_and_momentum(tiny_hp: M.Hyperparameters) -> None:
    optimizers = M.setup_optimizers(M.GPT.from_hparams(tiny_hp), tiny_hp)
    step = tiny_hp.num_iterations - 1
    M.apply_schedules(optimizers, step, tiny_hp)
    for opt in optimizers:
        for group in opt.param_groups:
            assert group["lr"] == pytest.approx(group["initial_lr"] * M.get_lr(step, tiny_hp))
    for group in optimizers[1].param_groups:
        assert group["momentum"] == M.get_muon_momentum(step, tiny_hp)


# -----------------------------------------------------------------------------
# Muon, two gloo processes


MUON_CASES = {
    "even": [(16, 8)] * 2 + [(3, 8, 16)] * 2,  # every chunk of world_size matrices is full; QKV-like 3-D too
    "odd": [(16, 8)] * 3 + [(8, 24)],  # rank 1 owns no matrix in the last chunk of each group
}


def muon_trajectory(shapes: list[tuple[int, ...]], rank: int, world_size: int, steps: int = 2) -> dict[str, Any]:
    """Parameters and Muon state after `steps` steps; parameters and (already averaged) gradients are seeded,
    so every rank sees the same ones."""
    gen = torch.Generator().manual_seed(1234)
    params = [nn.Parameter(torch.randn(s, generator=gen)) for s in shapes]
    opt = M.Muon(params, lr=0.05, momentum=0.9, rank=rank, world_size=world_size)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen)
        opt.step()
    return dict(params=[p.detach().clone() for p in params], state=opt.state_dict())


def muon_gloo_worker(rank: int, work_dir: str, out_file: str) -> None:
    """Entry point of one spawned rank: for each case a distributed run (its own process group) and, for
    reference, a world-size-1 run in the same process, so thread counts and kernels are the same."""
    from datetime import timedelta

    results: dict[str, Any] = {}
    for case, shapes in sorted(MUON_CASES.items()):
        dist.init_process_group("gloo", init_method=f"file://{work_dir}/pg_{case}", rank=rank, world_size=2,
                                timeout=timedelta(seconds=60))
        distributed, error = None, ""
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)  # all_gather_into_tensor's deprecation notice
                distributed = muon_trajectory(shapes, rank, 2)
        except Exception as e:  # noqa: BLE001 - reported by the test of this case; the other case still runs
            error = f"{type(e).__name__}: {str(e).strip().splitlines()[0]}"
        finally:
            dist.destroy_process_group()
        results[case] = dict(distributed=distributed, error=error, single=muon_trajectory(shapes, 0, 1))
    torch.save(results, out_file)


@pytest.fixture(scope="module")
def gloo_results(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    """Run both Muon cases on 2 gloo processes once (process start-up dominates the cost)."""
    work_dir = tmp_path_factory.mktemp("gloo")
    code = (f"import sys; sys.path[:0] = [{str(REPO_DIR)!r}, {str(TESTS_DIR)!r}]; import test_model; "
            f"test_model.muon_gloo_worker(int(sys.argv[1]), sys.argv[2], sys.argv[3])")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    outs = [work_dir / f"rank{r}.pt" for r in range(2)]
    procs = [subprocess.Popen([sys.executable, "-c", code, str(r), str(work_dir), str(outs[r])], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in range(2)]
    logs = []
    try:
        for proc in procs:
            logs.append(proc.communicate(timeout=150)[0])
    finally:
        for proc in procs:  # a hung rank (e.g. its peer died mid-collective) must not outlive the test
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    for r, (proc, log) in enumerate(zip(procs, logs)):
        assert proc.returncode == 0, f"rank {r} exited {proc.returncode}:\n{log[-3000:]}"
    return [torch.load(out, weights_only=True) for out in outs]


@pytest.mark.parametrize("case", sorted(MUON_CASES))
def test_muon_two_gloo_ranks_match_one_process(case: str, gloo_results: list[dict[str, Any]]) -> None:
    # Distributed Muon splits only the Newton-Schulz work; the trajectory must be the single-process one, bit for
    # bit (all-gather copies values), and every rank must hold the whole momentum state (resume on any world size).
    rank0, rank1 = (result[case] for result in gloo_results)
    for r, result in enumerate((rank0, rank1)):
        assert not result["error"], f"rank {r}: {result['error']}"
        for i, (got, want) in enumerate(zip(result["distributed"]["params"], result["single"]["params"])):
            assert torch.equal(got, want), f"rank {r} parameter {i} differs from the world-size-1 run"
    for got, want in zip(rank0["distributed"]["params"], rank1["distributed"]["params"]):
        assert torch.equal(got, want)
    s0, s1 = rank0["distributed"]["state"], rank1["distributed"]["state"]
    assert s0["param_groups"] == s1["param_groups"]
    assert sorted(s0["state"]) == sorted(s1["state"]) == list(range(len(MUON_CASES[case])))
    for i in s0["state"]:
        assert torch.equal(s0["state"][i]["momentum_buffer"], s1["state"][i]["momentum_buffer"])
        assert torch.equal(s0["state"][i]["momentum_buffer"], rank0["single"]["state"]["state"][i]["momentum_buffer"])


# -----------------------------------------------------------------------------
# Attention masks


WINDOWS: list[int | Tensor] = [1, 2, 3, 1 << 20, torch.tensor(2, dtype=torch.int32)]


@pytest.mark.parametrize("window", WINDOWS, ids=["w1", "w2", "w3", "wlarge", "w2tensor"])
def test_dense_mask_equals_brute_force_rule(window: int | Tensor) -> None:
    docs = doc_ids(random_tokens(2, 512, seed=0, eot_positions=ATTN_EOTS))
    expected = brute_force_window_mask(docs, int(window))
    assert torch.equal(M.dense_attention_mask(docs, window), expected)


def test_dense_mask_rule_on_random_documents() -> None:
    # Many short documents: block boundaries, empty windows of full blocks and long partial runs all occur.
    rows = [random_documents(1024, seed=s, mean_doc_len=150) for s in range(3)]
    docs = doc_ids(torch.from_numpy(np.stack(rows).astype(np.int64)))
    for window in [0, 1, 2, 4, 8]:
        assert torch.equal(M.dense_attention_mask(docs, window), brute_force_window_mask(docs, window)), window


def test_dense_mask_invariants() -> None:
    rows = [random_documents(1024, seed=s, mean_doc_len=300) for s in range(2)]
    docs = doc_ids(torch.from_numpy(np.stack(rows).astype(np.int64)))
    allowed = document_causal(docs)[:, None]
    blk = torch.arange(1024) // M.BLOCK_SIZE
    same_block = (blk[:, None] == blk[None, :])
    for window in [1, 2, 5]:
        mask = M.dense_attention_mask(docs, window)
        assert not (mask & ~allowed).any()  # causal and never across documents
        assert mask.diagonal(dim1=-2, dim2=-1).all()  # every query sees itself, so no softmax row is empty
        # a query never sees further back than its window (in blocks)
        assert not (mask & ((blk[:, None] - blk[None, :]) >= window)).any()
    assert torch.equal(M.dense_attention_mask(docs, 1 << 20), allowed)
    assert torch.equal(M.dense_attention_mask(docs, 1), allowed & same_block)


@pytest.mark.parametrize("window", WINDOWS, ids=["w1", "w2", "w3", "wlarge", "w2tensor"])
def test_flex_block_mask_as_kernel_reads_it_equals_dense(window: int | Tensor) -> None:
    # What a compiled FlexAttention kernel applies (block lists + mask_mod in partial blocks) is the dense mask.
    docs = doc_ids(random_tokens(2, 512, seed=0, eot_positions=ATTN_EOTS))
    block_mask = M.flex_block_mask(docs, window)
    assert torch.equal(block_mask_as_kernel_reads_it(block_mask, 2, 512), M.dense_attention_mask(docs, window))


@pytest.mark.parametrize("window", WINDOWS, ids=["w1", "w2", "w3", "wlarge", "w2tensor"])
def test_sdpa_dense_mask_equals_flex_attention(window: int | Tensor) -> None:
    # The CPU path (SDPA + dense mask) must compute what the CUDA path (FlexAttention + block mask) computes.
    # Eager FlexAttention evaluates only the mask_mod, densely, so the mask_mod must carry the window as well.
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 2, 512, 32, generator=gen) for _ in range(3))  # (B, H, T, D)
    docs = doc_ids(random_tokens(2, 512, seed=0, eot_positions=ATTN_EOTS))
    dense = M.attention(q, k, v, M.dense_attention_mask(docs, window), 0.12)
    flex = flex_forward(q, k, v, M.flex_block_mask(docs, window), 0.12)
    torch.testing.assert_close(flex, dense, atol=1e-5, rtol=0)


# -----------------------------------------------------------------------------
# GPT


def causal_model() -> tuple[M.Hyperparameters, M.GPT]:
    hp = tiny_hparams(row_len=256)  # rows of 256 = two attention blocks, so windows matter
    return hp, randomize_zero_inits(M.GPT.from_hparams(hp).eval())


@pytest.mark.parametrize("window", [1, 2, 1 << 30])
def test_gpt_is_causal(window: int) -> None:
    _, model = causal_model()
    eots = {0: [0, 60, 150], 1: [0]}
    tokens = random_tokens(2, 256, seed=0, eot_positions=eots)
    t = 140  # inside the second block, so future tokens share the query block of earlier ones
    changed = tokens.clone()
    changed[:, t:] = random_tokens(2, 256 - t, seed=1, eot_positions={0: [5, 30], 1: [50]})  # new documents too
    with torch.no_grad():
        a, b = model(tokens, None, window), model(changed, None, window)
    assert torch.equal(a[:, :t], b[:, :t])
    assert not torch.equal(a[:, t], b[:, t])  # the test is sensitive: the changed token's own logits move


@pytest.mark.parametrize("window", [1, 2, 1 << 30])
def test_gpt_documents_are_independent(window: int) -> None:
    # Attention is document-masked and every other op (embeddings, value embeddings, MLP, lm_head) is per token,
    # so the tokens of an earlier document never reach a later one.
    _, model = causal_model()
    start = 150  # second document of row 0 (starts mid-block); row 1 is a single document
    tokens = random_tokens(2, 256, seed=0, eot_positions={0: [0, start], 1: [0]})
    changed = tokens.clone()
    changed[:, 1:start] = random_tokens(2, start - 1, seed=2)  # same boundaries, different earlier text
    with torch.no_grad():
        a, b = model(tokens, None, window), model(changed, None, window)
    assert torch.equal(a[0, start:], b[0, start:])
    assert not torch.equal(a[1, start:], b[1, start:])  # without a boundary, the same change does propagate


def test_loss_at_init_is_uniform(tiny_hp: M.Hyperparameters) -> None:
    # lm_head is zero-initialised, so every logit is 30 * sigmoid(0) = 15 and the loss is ln(padded vocab).
    model = M.GPT.from_hparams(tiny_hp)
    tokens = random_tokens(2, 129, seed=0, eot_positions={0: [0, 40], 1: [0]})
    logits = model(tokens[:, :-1])
    assert logits.shape == (2, 128, PADDED_VOCAB)
    assert torch.equal(logits, torch.full_like(logits, 15.0))
    loss = model(tokens[:, :-1], tokens[:, 1:])
    assert abs(loss.item() - math.log(PADDED_VOCAB)) < 1e-4


def test_soft_cap_bounds_logits(tiny_hp: M.Hyperparameters) -> None:
    # Large random head weights push raw logits to +-15 (sigmoid still below 1 in fp32): the cap keeps (0, 30)
    # and is exactly 30 * sigmoid(raw / (7.5 * sqrt(model_dim))).
    model = randomize_zero_inits(M.GPT.from_hparams(tiny_hp), head_std=20.0)
    raw: list[Tensor] = []
    model.lm_head.register_forward_hook(lambda mod, inp, out: raw.append(out.detach().float()))
    tokens = random_tokens(1, 128, seed=0, eot_positions={0: [0]})
    with torch.no_grad():
        logits = model(tokens)
    assert logits.min() > 0 and logits.max() < 30
    assert logits.min() < 1 and logits.max() > 29  # the cap is exercised, not idle near 15
    assert torch.equal(logits, 30 * torch.sigmoid(raw[0] / (7.5 * tiny_hp.model_dim**0.5)))


def test_record_calling_convention(tiny_hp: M.Hyperparameters) -> None:
    # The record calls model(input_seq, target_seq, window) with 1-D sequences and a 0-d int32 window.
    model = randomize_zero_inits(M.GPT.from_hparams(tiny_hp)).eval()
    tokens = random_tokens(1, 129, seed=3, eot_positions={0: [0, 70]})[0]
    x, y = tokens[:-1], tokens[1:]
    window = torch.tensor(1, dtype=torch.int32)
    with torch.no_grad():
        loss_1d = model(x, y, window)
        loss_2d = model(x[None], y[None], window)
        logits = model(x[None], None, window)
    assert loss_1d.ndim == 0
    assert torch.equal(loss_1d, loss_2d)
    torch.testing.assert_close(loss_1d, F.cross_entropy(logits[0], y), atol=0, rtol=0)


def test_value_embed_layout_and_long_windows_match_record() -> None:
    # record (May 2025): ve = [ve0, ve1, ve2] + [None]*6 + [ve0, ve1, ve2]; masks long at layers 0, 4, 7, 11
    assert M.value_embed_layout(12) == [0, 1, 2] + [None] * 6 + [0, 1, 2]
    assert [i for i, is_long in enumerate(M.long_window_layers(12)) if is_long] == [0, 4, 7, 11]


@pytest.mark.parametrize("num_layers, layout, long", [
    (2, [0, 0], [True, True]),
    (4, [0, 1, 0, 1], [True, False, False, True]),
    (6, [0, 1, 2, 0, 1, 2], [True, False, False, False, False, True]),
])
def test_value_embed_layout_and_long_windows_small(num_layers: int, layout: list[int | None],
                                                   long: list[bool]) -> None:
    # Shallow models keep the record's shape: first and last k layers share value embeddings, windows mirror.
    assert M.value_embed_layout(num_layers) == layout
    assert M.long_window_layers(num_layers) == long
    assert long == long[::-1]
    k = num_layers // 2
    assert layout[:k] == layout[num_layers - k:]
    assert len(M.GPT(M.EOT_ID + 1, num_layers, 1, 16, 16, 128, -1).value_embeds) == max(layout) + 1


# -----------------------------------------------------------------------------
# Schedules


def test_lr_schedule_matches_record() -> None:
    hp = M.Hyperparameters()  # speedrun: 1770 steps, last 40% linear cooldown to 0.1x
    cooldown_start = (1 - hp.cooldown_frac) * hp.num_iterations  # 1062
    for step in range(hp.num_iterations + 1):
        if step <= cooldown_start:
            expected = 1.0
        else:
            expected = 1.0 - 0.9 * (step - cooldown_start) / (hp.num_iterations - cooldown_start)
        assert M.get_lr(step, hp) == pytest.approx(expected, abs=1e-12), step
    assert M.get_lr(hp.num_iterations, hp) == pytest.approx(0.1, abs=1e-12)


def test_muon_momentum_warmup() -> None:
    hp = M.Hyperparameters()
    assert M.get_muon_momentum(0, hp) == pytest.approx(0.85)
    assert M.get_muon_momentum(150, hp) == pytest.approx(0.90)
    for step in [300, 301, 1000, hp.num_iterations]:
        assert M.get_muon_momentum(step, hp) == pytest.approx(0.95)


def test_window_schedule_matches_record() -> None:
    hp = M.Hyperparameters()

    def record_next_multiple_of_n(v: float, n: int) -> int:  # the record's own helper
        return next(i for i in range(n, int(v) + 1 + n, n) if i >= v)

    for step in range(hp.num_iterations + 1):
        want = record_next_multiple_of_n(1728 * step / hp.num_iterations, n=128) // 128
        assert M.get_window_size_blocks(step, hp) == want, step
    assert M.get_window_size_blocks(0, hp) == 1
    assert M.get_window_size_blocks(hp.num_iterations, hp) == 14  # 1792 tokens


def test_compile_failure_falls_back_to_eager(monkeypatch: pytest.MonkeyPatch) -> None:
    """A machine without a working compiler still trains: the compiled loss head falls back to eager, same loss."""
    def broken_compile(fn, **kwargs):
        def call(*args):
            raise RuntimeError("no C++ compiler found")
        return call

    monkeypatch.setattr(torch, "compile", broken_compile)
    head = M.compile_with_fallback(M.softcap_cross_entropy, "the loss head")
    x = torch.randn(8, 64)
    w = torch.randn(128, 64)
    y = torch.randint(0, 128, (8,))
    with pytest.warns(UserWarning, match="torch.compile of the loss head failed .*no C\\+\\+ compiler found"):
        loss = head(x, w, y)
    assert torch.equal(loss, M.softcap_cross_entropy(x, w, y))
    assert torch.equal(head(x, w, y), loss)  # later calls go straight to eager, without another warning


def test_whole_model_compile_failure_falls_back_to_eager(monkeypatch: pytest.MonkeyPatch) -> None:
    """--compile on (the CPU pretraining default) on a machine whose compiler fails: one warning, then the eager
    model's exact loss; train()/eval() still reach the model."""
    def broken_compile(fn, **kwargs):
        def call(*args):
            raise RuntimeError("no C++ compiler found")
        return call

    monkeypatch.setattr(torch, "compile", broken_compile)
    hp = tiny_hparams(compile="on")
    rt = M.init_runtime(hp)
    torch.manual_seed(0)
    raw, forward = M.build_model(hp, rt)
    assert isinstance(forward, M.CompiledModule) and forward.module is raw
    x = torch.randint(0, hp.vocab_size, (1, 128), dtype=torch.int32)
    y = torch.randint(0, hp.vocab_size, (1, 128))
    with pytest.warns(UserWarning, match="torch.compile of the model failed .*no C\\+\\+ compiler found"):
        loss = forward(x, y, 1)
    assert torch.equal(loss, raw(x, y, 1))
    forward.eval()
    assert not raw.training


def test_compile_fallback_lets_the_callers_own_errors_through(monkeypatch: pytest.MonkeyPatch) -> None:
    """An error eager raises as well (a bad argument, not the compiler) propagates without the fallback warning,
    and the compiled version is kept for the next call."""
    calls = []

    def fake_compile(fn, **kwargs):
        def call(*args):
            calls.append("compiled")
            return fn(*args)
        return call

    monkeypatch.setattr(torch, "compile", fake_compile)
    head = M.compile_with_fallback(M.softcap_cross_entropy, "the loss head")
    x, w = torch.randn(8, 64), torch.randn(128, 64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(RuntimeError):
            head(x, torch.randn(128, 32), torch.randint(0, 128, (8,)))  # shapes do not match: eager fails too
        head(x, w, torch.randint(0, 128, (8,)))
    assert calls == ["compiled", "compiled"]


def test_compile_auto_picks_whole_model_for_cpu_pretraining_only() -> None:
    """--compile auto on CPU: the whole model where the caller asks (pretraining.py, finetune.py, bench.py), else the loss
    head; 'head' and 'on' choose explicitly; warm-up is 2 steps compiled on CPU, 0 uncompiled; CPU runtimes use
    deterministic algorithms."""
    pick = {}
    for mode in ("auto", "on", "head", "off"):
        for whole in (False, True):
            hp = tiny_hparams(compile=mode)
            rt = M.init_runtime(hp, whole_model_on_cpu=whole)
            pick[mode, whole] = (rt.compile, rt.compile_head, R.warm_up_steps(hp, rt))
    assert pick == {("auto", False): (False, True, 0), ("auto", True): (True, False, 2),
                    ("on", False): (True, False, 2), ("on", True): (True, False, 2),
                    ("head", False): (False, True, 0), ("head", True): (False, True, 0),
                    ("off", False): (False, False, 0), ("off", True): (False, False, 0)}
    assert R.warm_up_steps(tiny_hparams(compile="on", warmup_steps=5), M.Runtime(device=torch.device("cpu"),
                                                                                 compile=True)) == 5
    assert torch.are_deterministic_algorithms_enabled()  # CPU runs: compiled scatter-adds in a fixed order


def test_cpu_dtype_auto_follows_the_probe_and_keeps_its_answer(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """--dtype auto on a CPU: fp32 without bf16 instructions (no probe); with them, bf16 exactly where the probe
    finds bf16 at least BF16_MIN_SPEEDUP times as fast; the answer is kept per machine and shape, so a later run
    (another speed now) makes the same choice; as given for bf16 and fp32."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    cpu, probes = torch.device("cpu"), []

    def probe(speedup: float) -> Any:
        return lambda dim, vocab: probes.append((dim, vocab)) or speedup

    monkeypatch.setattr(M, "cpu_model_name", lambda: "Xeon model 207 avx512_bf16")
    monkeypatch.setattr(M, "bf16_speedup", probe(0.66))
    slow = M.choose_autocast("auto", cpu, 256, 50304)
    assert slow.dtype is None and slow.reason.startswith("auto: fp32, bf16 products ran 0.66x fp32's speed")
    monkeypatch.setattr(M, "bf16_speedup", probe(6.0))
    assert M.choose_autocast("auto", cpu, 256, 50304) == slow and probes == [(256, 50304)]  # kept, not probed
    fast = M.choose_autocast("auto", cpu, 768, 50304)  # another shape: its own probe
    assert fast.dtype == torch.bfloat16 and "6.00x" in fast.reason and probes[-1] == (768, 50304)
    assert len(list((tmp_path / "modded-nanogpt").glob("cpu_dtype_*.json"))) == 2
    for damaged in (tmp_path / "modded-nanogpt").glob("cpu_dtype_*.json"):
        damaged.write_text("{not json")  # a damaged cache: each run's own probe decides, nothing crashes
    assert M.choose_autocast("auto", cpu, 256, 50304).dtype == torch.bfloat16 and probes[-1] == (256, 50304)
    for speedup, dtype in ((M.BF16_MIN_SPEEDUP, torch.bfloat16), (M.BF16_MIN_SPEEDUP - 0.01, None)):
        monkeypatch.setattr(M, "bf16_speedup", probe(speedup))
        assert M.choose_autocast("auto", cpu, 64, 100 + len(probes)).dtype == dtype
    monkeypatch.setattr(M, "cpu_model_name", lambda: "Core i7 avx2")
    count = len(probes)
    assert M.choose_autocast("auto", cpu, 256, 50304).reason == ("auto: fp32, this CPU has no bf16 instructions "
                                                                 "(avx512_bf16, amx_bf16)")
    assert len(probes) == count
    assert M.choose_autocast("bf16", cpu) == M.DtypeChoice(torch.bfloat16, "--dtype bf16")
    assert M.choose_autocast("fp32", cpu) == M.DtypeChoice(None, "--dtype fp32")


def test_cpu_dtype_cache_first_writer_wins_and_train_gpt_reads_it(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """A process that finds the answer already written (another process probed at the same time, or train_gpt.py
    ran first) uses it, whatever its own probe says; with no writable cache each run decides by its own probe."""
    import train_gpt as T

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    for module, speedup in ((M, 3.0), (T, 0.5)):
        monkeypatch.setattr(module, "cpu_model_name", lambda: "EPYC avx512_bf16")
        monkeypatch.setattr(module, "bf16_speedup", lambda dim, vocab, s=speedup: s)
    ours = M.choose_autocast("auto", torch.device("cpu"), 256, 50304)
    theirs = T.pick_autocast_dtype("auto", torch.device("cpu"), 256, 50304)
    assert ours.dtype == torch.bfloat16 and theirs == (ours.dtype, ours.reason)
    blocked = tmp_path / "file"
    blocked.write_text("")
    monkeypatch.setenv("XDG_CACHE_HOME", str(blocked))  # a file where the cache directory would be
    assert T.pick_autocast_dtype("auto", torch.device("cpu"), 256, 50304)[0] is None
    assert M.choose_autocast("auto", torch.device("cpu"), 256, 50304).dtype == torch.bfloat16


def test_bf16_speedup_is_a_ratio_of_two_timings() -> None:
    """The real probe on a tiny shape: a positive, finite ratio (its value is the machine's: never asserted)."""
    ratio = M.bf16_speedup(64, 512, rows=16, repeats=1)
    assert 0 < ratio < math.inf


def test_adamw_ablation_replaces_only_muon() -> None:
    """--optimizer adamw: the hidden matrices Muon would train get GPT-2-style AdamW; the Adam groups (lm_head,
    embeddings, scalars) are the same objects with the same settings; a Muon checkpoint cannot resume into it."""
    model = M.GPT.from_hparams(tiny_hparams())
    muon_run = M.setup_optimizers(model, tiny_hparams())
    adamw_run = M.setup_optimizers(model, tiny_hparams(optimizer="adamw", adamw_lr=2e-3, adamw_weight_decay=0.05))
    assert isinstance(muon_run[1], M.Muon) and type(adamw_run[1]) is torch.optim.AdamW
    ids = lambda opt: [id(p) for g in opt.param_groups for p in g["params"]]  # noqa: E731
    assert sorted(ids(adamw_run[1])) == sorted(ids(muon_run[1])) and ids(adamw_run[0]) == ids(muon_run[0])
    group = adamw_run[1].param_groups[0]
    assert (group["lr"], group["initial_lr"], group["betas"], group["eps"], group["weight_decay"]) == \
        (2e-3, 2e-3, (0.9, 0.95), 1e-8, 0.05)
    assert [g["lr"] for g in adamw_run[0].param_groups] == [g["lr"] for g in muon_run[0].param_groups]
    ckpt = dict(model=model.state_dict(), optimizers=[o.state_dict() for o in muon_run], rng={}, step=1)
    hp = tiny_hparams(optimizer="adamw", resume="x.pt")
    with pytest.raises(M.CheckpointError, match="x.pt: its optimizer state does not fit --optimizer=adamw"):
        M.restore(ckpt, hp, model, adamw_run)


FAULTS_SCRIPT = """
import resource, sys, torch
sys.path.insert(0, {repo!r})
import model as M
kept = M.keep_freed_memory() if sys.argv[1] == "keep" else None
faults = []
for _ in range(8):  # a training loop's pattern: one large tensor made, used and freed, small ones in between
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    torch.ones(64 << 20).sum()  # 256 MB
    small = [torch.ones(1000) for _ in range(50)]
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(kept, *faults)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc")
def test_keep_freed_memory_reuses_large_blocks_without_page_faults() -> None:
    """With glibc's defaults every freed 256 MB tensor goes back to the kernel, so each new one page-faults its
    65,536 pages again; after keep_freed_memory() (what CPU runs call) the heap grows for the first two or three
    and the rest reuse their memory without a fault."""
    faults = {}
    for mode in ("default", "keep"):
        out = subprocess.run([sys.executable, "-c", FAULTS_SCRIPT.format(repo=str(REPO_DIR)), mode],
                             capture_output=True, text=True, check=True).stdout.split()
        faults[mode] = (out[0], [int(n) for n in out[1:]])
    assert faults["default"][0] == "None" and min(faults["default"][1]) > 60_000
    assert faults["keep"][0] == "True" and sum(faults["keep"][1][3:]) < 1_000, faults["keep"]
