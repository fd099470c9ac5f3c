"""The 2026 record's head and loss (issue 26), against references written here from the formulas: the logit cap
(--logit-cap 2026) in every path to the logits and the loss, checkpoints that carry it, and bad values."""
from __future__ import annotations

import math
import sys
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from conftest import cfg, random_tokens, randomize_zero_inits, read_metrics, run, tiny_args, tiny_hparams

import inference as I  # noqa: E402
import model as M  # noqa: E402


def capped_2025(z: float, dim: int) -> float:
    return 30 / (1 + math.exp(-z / (7.5 * math.sqrt(dim))))


def capped_2026(z: float) -> float:
    return 23 / (1 + math.exp(-(z + 5) / 7.5))  # record #54: 23 * sigmoid((z + 5) / 7.5)


def test_logit_caps_follow_their_formulas() -> None:
    z = torch.tensor([-400.0, -37.5, -5.0, -1.0, 0.0, 0.5, 7.5, 60.0, 1e4], dtype=torch.float64)
    dim = 256
    want_2025 = torch.tensor([capped_2025(v, dim) for v in z.tolist()], dtype=torch.float64)
    want_2026 = torch.tensor([capped_2026(v) for v in z.tolist()], dtype=torch.float64)
    torch.testing.assert_close(M.softcap(z, dim), want_2025, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(M.softcap(z, dim, "2025"), want_2025, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(M.softcap(z, dim, "2026"), want_2026, rtol=1e-12, atol=1e-12)
    # the 2026 form: half its ceiling at z = -5, ceiling 23, no dependence on the width
    assert float(M.softcap(torch.tensor(-5.0), dim, "2026")) == 11.5
    assert float(M.softcap(torch.tensor(1e4), 4, "2026")) == 23.0
    assert torch.equal(M.softcap(z, 64, "2026"), M.softcap(z, 4096, "2026"))


def reference_loss(model: M.GPT, tokens: Tensor, targets: Tensor, form: str) -> Tensor:
    """Mean next-token cross-entropy written out: the normed hidden states times lm_head, the cap's formula, and
    -log softmax at the target as logsumexp minus the target's logit."""
    x = model.hidden_states(tokens, *model.attention_masks(tokens, 2))
    z = (x @ model.lm_head.weight.T).double()
    if form == "2026":
        capped = 23 / (1 + torch.exp(-(z + 5) / 7.5))
    else:
        capped = 30 / (1 + torch.exp(-z / (7.5 * math.sqrt(model.model_dim))))
    nll = torch.logsumexp(capped, dim=-1) - capped.gather(-1, targets[..., None])[..., 0]
    return nll.mean()


@pytest.mark.parametrize("form", ["2025", "2026"])
def test_training_and_evaluation_loss_use_the_cap(form: str) -> None:
    hp = tiny_hparams(logit_cap=form)
    torch.manual_seed(0)
    model = randomize_zero_inits(M.GPT.from_hparams(hp), head_std=0.2)
    assert model.logit_cap == form
    tokens = random_tokens(2, 128, seed=1, eot_positions={0: [0, 40], 1: [0]})
    targets = random_tokens(2, 128, seed=2)
    want = reference_loss(model, tokens, targets, form)
    for training in (True, False):  # the plain loss head, in training and validation
        model.train(training)
        torch.testing.assert_close(model(tokens, targets, 2).double(), want, rtol=1e-5, atol=1e-5)
    model.train()
    ones = torch.full(targets.shape, 1 / targets.numel())  # token weights: the modified-loss head, same mean
    torch.testing.assert_close(model(tokens, targets, 2, token_weights=ones).double(), want, rtol=1e-5, atol=1e-5)
    model.eval()
    logits = model(tokens, None, 2)  # the logits eval.py, generation and the export read
    x = model.hidden_states(tokens, *model.attention_masks(tokens, 2))
    torch.testing.assert_close(logits, M.softcap((x @ model.lm_head.weight.T).float(), model.model_dim, form))


def test_the_two_caps_differ() -> None:
    """The switch is not a no-op: same weights, different losses."""
    torch.manual_seed(0)
    a = randomize_zero_inits(M.GPT.from_hparams(tiny_hparams()), head_std=0.2)
    b = M.GPT.from_hparams(tiny_hparams(logit_cap="2026"))
    b.load_state_dict(a.state_dict())
    tokens, targets = random_tokens(1, 128, seed=1), random_tokens(1, 128, seed=2)
    with torch.no_grad():
        assert abs(float(a(tokens, targets, 2)) - float(b(tokens, targets, 2))) > 1e-3


def test_checkpoint_carries_the_cap(tmp_path) -> None:
    hp = tiny_hparams(logit_cap="2026")
    torch.manual_seed(0)
    model = randomize_zero_inits(M.GPT.from_hparams(hp), head_std=0.2).eval()
    path = M.save_checkpoint(M.checkpoint_path(tmp_path, "cap", 3), step=3, model=model, optimizers=[], hp=hp,
                             code={})
    loaded, loaded_hp, _ = M.load_model(path)
    assert loaded_hp.logit_cap == "2026" and loaded.logit_cap == "2026"
    tokens = random_tokens(1, 128, seed=3, eot_positions={0: [0, 70]})
    with torch.no_grad():
        assert torch.equal(loaded.eval()(tokens, None, 2), model(tokens, None, 2))
        # the KV cache reads the same cap: prefill, then one decoding step, equal the full forward's logits
        cache = I.KVCache(loaded, 1, 100)
        prefilled = I.prefill(loaded, tokens[:, :100], cache, 2)[:, -1]
        torch.testing.assert_close(prefilled, I.reference_logits(loaded, tokens[:, :100], 2), rtol=0, atol=1e-4)
        stepped = I.decode_step(loaded, tokens[:, 100], I.RingCache(cache, 2))
        torch.testing.assert_close(stepped, I.reference_logits(loaded, tokens[:, :101], 2), rtol=0, atol=1e-4)
    greedy = [list(I.generate(loaded, tokens[0, :60].tolist(), window_blocks=2, max_new_tokens=12, stop_ids=(),
                              use_cache=use)) for use in (True, False)]
    assert greedy[0] == greedy[1] and len(greedy[0]) == 12


def test_bad_logit_cap_is_one_line() -> None:
    with pytest.raises(M.ConfigError, match=r"^--logit-cap='2027' must be one of 2025, 2026$"):
        cfg("--logit-cap", "2027").validate()


# -----------------------------------------------------------------------------
# Multi-token prediction on the same head (--mtp, record #53)


def reference_mtp(logits: Tensor, targets: Tensor, weights: list[float]) -> Tensor:
    """The record's multi-token loss written out in float64: for each position t and target k with t + k in the
    row and targets[t + k] >= 0, weights[k] * -log_softmax(logits[t])[targets[t + k]]; summed, over B * T."""
    B, T, V = logits.shape
    z = logits.double()
    total = torch.zeros((), dtype=torch.float64)
    for b in range(B):
        for t in range(T):
            log_probs = z[b, t] - torch.log(torch.exp(z[b, t]).sum())
            for k, w in enumerate(weights):
                if t + k < T and targets[b, t + k] >= 0:
                    total = total - w * log_probs[targets[b, t + k]]
    return total / (B * T)


def test_multi_token_loss_and_gradient_against_the_formula() -> None:
    gen = torch.Generator().manual_seed(0)
    B, T, V = 2, 7, 13  # classes 11 and 12 play the padding rows: in the softmax, never a target
    logits = (torch.randn(B, T, V, generator=gen) * 3).requires_grad_()
    targets = torch.randint(0, 11, (B, T), generator=gen)
    targets[1, 2] = M.IGNORE_INDEX  # an ignored target: nothing for the positions that would score it
    weights = [1.0, 0.5, 0.25]
    loss, next_token = M.multi_token_cross_entropy(logits, targets, torch.tensor(weights))
    ref_logits = logits.detach().double().requires_grad_()
    want = reference_mtp(ref_logits, targets, weights)
    assert abs(loss.item() - want.item()) < 1e-6
    loss.backward()
    want.backward()
    torch.testing.assert_close(logits.grad.double(), ref_logits.grad, rtol=0, atol=1e-6)
    plain = reference_mtp(logits.detach(), targets, [1.0]) * (B * T) / int((targets >= 0).sum())
    assert abs(float(next_token) - float(plain)) < 1e-6  # the logged part: mean next-token cross-entropy


def test_multi_token_loss_with_one_target_is_cross_entropy() -> None:
    gen = torch.Generator().manual_seed(1)
    logits, targets = torch.randn(3, 5, 17, generator=gen), torch.randint(0, 17, (3, 5), generator=gen)
    loss, _ = M.multi_token_cross_entropy(logits, targets, torch.tensor([1.0, 0.0, 0.0]))
    torch.testing.assert_close(loss, F.cross_entropy(logits.view(-1, 17), targets.view(-1)), rtol=1e-6, atol=1e-6)


def test_model_trains_on_multi_token_loss_and_validates_on_next_token() -> None:
    hp = tiny_hparams(logit_cap="2026")
    torch.manual_seed(0)
    model = randomize_zero_inits(M.GPT.from_hparams(hp), head_std=0.2)
    model.mtp_weights = torch.tensor([1.0, 0.5, 0.125])
    tokens = random_tokens(2, 128, seed=1, eot_positions={0: [0, 40], 1: [0]})
    targets = random_tokens(2, 128, seed=2)
    with torch.no_grad():
        x = model.hidden_states(tokens, *model.attention_masks(tokens, 2))
        capped = M.softcap((x @ model.lm_head.weight.T).float(), model.model_dim, "2026")
        model.train()
        loss, parts = model(tokens, targets, 2, parts=True)
        want = reference_mtp(capped, targets, [1.0, 0.5, 0.125])
        assert abs(float(loss) - float(want)) < 1e-4 * float(want)
        assert abs(float(parts["ce"]) - float(reference_mtp(capped, targets, [1.0]))) < 1e-4 * float(want)
        model.eval()  # validation, eval.py: plain next-token cross-entropy whatever the weights
        torch.testing.assert_close(model(tokens, targets, 2).double(), reference_loss(model, tokens, targets, "2026"),
                                   rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("argv,message", [
    (["--mtp", "true"], "--mtp needs --stage-schedule (its weights are the stages')"),
    (["--mtp", "true", "--stage-schedule", "2026", "--z-loss", "1e-4"],
     "--mtp with loss modifiers is not implemented (the extra targets would need their own token weights)"),
    (["--prefix-token", "true"], "--prefix-token needs --stage-schedule (its weights are the stages')"),
])
def test_bad_mtp_settings(argv: list[str], message: str) -> None:
    with pytest.raises(M.ConfigError) as e:
        cfg("--preset", "shakespeare", *argv).validate()
    assert str(e.value) == message


# -----------------------------------------------------------------------------
# The prefix-token target (--prefix-token, record #88)


class ToyTokenizer:
    """token_bytes over a hand-built vocabulary."""

    def __init__(self, pieces: list[bytes]):
        self.pieces = pieces

    def token_bytes(self, i: int) -> bytes:
        return self.pieces[i]


def test_prefix_table_on_a_toy_vocabulary() -> None:
    pieces = [b"a", b"b", b"ab", b"abc", b"abcd", b"bcd", b"abd", b"x"]
    table = M.prefix_token_table(ToyTokenizer(pieces), 10, tokens=8)  # 2 rows past the tokens (padding)
    # a, b, x: single bytes, no proper prefix; ab -> a; abc -> ab; abcd -> abc (not ab, not a);
    # bcd -> b (bc is no token); abd -> ab
    assert table.tolist() == [-1, -1, 0, 2, 3, 1, 2, -1, -1, -1]


def test_prefix_table_on_the_gpt2_ranks(tok) -> None:
    table = M.prefix_token_table(tok, 50304)
    known = {262: 294, 278: 259, 31373: 12758, 2677: 16645}  # " the" -> " th", "ing" -> "in", "hello" -> "hell",
    assert {i: int(table[i]) for i in known} == known  # " King" -> " Kin"
    assert int(table[0]) == -1 and int(table[M.EOT_ID]) == -1 and bool((table[M.EOT_ID:] == -1).all())
    single = [i for i in range(M.EOT_ID) if len(tok.token_bytes(i)) == 1]
    assert len(single) == 256 and bool((table[single] == -1).all())
    # every other token: tiktoken's own lookup finds no longer proper prefix than the table's
    gen = torch.Generator().manual_seed(0)
    for i in torch.randint(0, M.EOT_ID, (300,), generator=gen).tolist():
        piece = tok.token_bytes(i)
        longest = -1
        for cut in range(1, len(piece)):
            try:
                longest = tok.enc.encode_single_token(piece[:cut])
            except KeyError:
                pass
        assert int(table[i]) == longest, (i, piece)


def test_prefix_target_joins_the_one_loss() -> None:
    gen = torch.Generator().manual_seed(2)
    B, T, V = 2, 6, 9
    logits = torch.randn(B, T, V, generator=gen, dtype=torch.float64)
    targets = torch.randint(0, V, (B, T), generator=gen)
    prefix = torch.randint(-1, V, (B, T), generator=gen)  # -1: no prefix, nothing added
    loss, _ = M.multi_token_cross_entropy(logits, targets, torch.tensor([1.0, 0.5, 0.0], dtype=torch.float64),
                                          prefix, torch.tensor([0.25], dtype=torch.float64))
    want = reference_mtp(logits, targets, [1.0, 0.5, 0.0]) * B * T
    log_probs = logits - torch.logsumexp(logits, dim=-1, keepdim=True)
    for b in range(B):
        for t in range(T):
            if prefix[b, t] >= 0:
                want = want - 0.25 * log_probs[b, t, prefix[b, t]]
    assert abs(float(loss) - float(want / (B * T))) < 1e-12


# -----------------------------------------------------------------------------
# The chunked head (--head-chunk): the same loss and gradients at a fraction of the memory


def reference_head_loss(x: Tensor, weight: Tensor, targets: Tensor, form: str, weights: list[float] | None = None,
                        prefix: Tensor | None = None, prefix_weight: float = 0.0) -> Tensor:
    """The soft-capped head's loss written out in float64 with autograd: capped logits from the formula, -log
    softmax at each target; the plain mean over the counted targets, or (weights) reference_mtp's multi-token
    loss plus the prefix targets' weighted nll over all positions."""
    z = x.double() @ weight.double().T
    capped = (23 / (1 + torch.exp(-(z + 5) / 7.5)) if form == "2026"
              else 30 / (1 + torch.exp(-z / (7.5 * math.sqrt(x.size(-1))))))
    if weights is None:
        nll = torch.logsumexp(capped, -1) - capped.gather(-1, targets.clamp(min=0)[..., None])[..., 0]
        return torch.where(targets >= 0, nll, 0.0).sum() / (targets >= 0).sum()
    loss = reference_mtp(capped, targets, weights)
    if prefix is not None:
        nll = torch.logsumexp(capped, -1) - capped.gather(-1, prefix.clamp(min=0)[..., None])[..., 0]
        loss = loss + prefix_weight * torch.where(prefix >= 0, nll, 0.0).sum() / targets.numel()
    return loss


@pytest.mark.parametrize("form", ["2025", "2026"])
@pytest.mark.parametrize("extra", ["plain", "mtp", "mtp+prefix"])
@pytest.mark.parametrize("chunk", [1, 5, 14, 1000])  # one position, chunks that do not divide 28, all at once
def test_chunked_head_loss_and_gradients_against_the_formula(form: str, extra: str, chunk: int) -> None:
    gen = torch.Generator().manual_seed(0)
    B, T, d, V = 2, 14, 16, 37  # rows 35, 36 play the padding rows: in the softmax, never a target
    x = torch.randn(B, T, d, generator=gen, requires_grad=True)
    weight = (torch.randn(V, d, generator=gen) * 4).requires_grad_()
    targets = torch.randint(0, 35, (B, T), generator=gen)
    targets[0, 3] = targets[1, -1] = M.IGNORE_INDEX
    kwargs, ref_kwargs = {}, {}
    if extra != "plain":
        weights = [1.0, 0.5, 0.25]
        kwargs = dict(mtp_weights=torch.tensor(weights))
        ref_kwargs = dict(weights=weights)
    if extra == "mtp+prefix":
        prefix = torch.where(targets >= 0, (targets * 7) % 35, -1)
        prefix[1, 2] = -1  # a next token without a prefix token
        kwargs.update(prefix_targets=prefix, prefix_weight=torch.tensor([0.25]))
        ref_kwargs.update(prefix=prefix, prefix_weight=0.25)
    out = M.chunked_head_loss(x, weight, targets, form, chunk, **kwargs)
    loss = out if extra == "plain" else out[0]
    ref_x, ref_w = x.detach().double().requires_grad_(), weight.detach().double().requires_grad_()
    want = reference_head_loss(ref_x, ref_w, targets, form, **ref_kwargs)
    assert abs(loss.item() - want.item()) < 1e-6 * want.item()  # fp32: to 1e-6 relative
    loss.backward()
    want.backward()
    torch.testing.assert_close(x.grad.double(), ref_x.grad, rtol=0, atol=1e-6)
    torch.testing.assert_close(weight.grad.double(), ref_w.grad, rtol=0, atol=1e-6)
    if extra != "plain":  # the logged part: the mean next-token cross-entropy
        plain = reference_head_loss(x.detach().double(), weight.detach().double(), targets, form)
        assert abs(float(out[1]) - float(plain)) < 1e-6 * float(plain)


def test_chunked_head_equals_the_whole_head_in_the_model() -> None:
    """A GPT with --head-chunk against the same weights without: training loss and every gradient, the
    multi-token loss, and validation, to fp32 rounding."""
    torch.manual_seed(0)
    whole = randomize_zero_inits(M.GPT.from_hparams(tiny_hparams(logit_cap="2026")), head_std=0.2)
    chunked = M.GPT.from_hparams(tiny_hparams(logit_cap="2026", head_chunk=48))
    chunked.load_state_dict(whole.state_dict())
    assert chunked.head_chunk == 48 and whole.head_chunk == 0
    tokens = random_tokens(2, 128, seed=1, eot_positions={0: [0, 40], 1: [0]})
    targets = random_tokens(2, 128, seed=2)
    for weights in (None, torch.tensor([1.0, 0.5, 0.25])):
        grads = []
        for model in (whole, chunked):
            model.train()
            model.zero_grad()
            model.mtp_weights = weights
            loss, parts = model(tokens, targets, 2, parts=True)
            loss.backward()
            grads.append((loss.detach(), parts, {n: p.grad.clone() for n, p in model.named_parameters()}))
        (loss_w, parts_w, grad_w), (loss_c, parts_c, grad_c) = grads
        torch.testing.assert_close(loss_c, loss_w, rtol=1e-6, atol=1e-6)
        assert parts_w.keys() == parts_c.keys()
        for name in parts_w:
            torch.testing.assert_close(parts_c[name], parts_w[name], rtol=1e-6, atol=1e-6)
        for name in grad_w:
            torch.testing.assert_close(grad_c[name], grad_w[name], rtol=1e-4, atol=1e-6, msg=name)
    with torch.no_grad():
        whole.eval(), chunked.eval()
        torch.testing.assert_close(chunked(tokens, targets, 2), whole(tokens, targets, 2), rtol=1e-6, atol=1e-6)


def saved_bytes(fn: Any) -> int:
    """The bytes of the tensors autograd keeps for the backward while fn() runs its forward pass."""
    total = [0]

    def pack(t: Tensor) -> Tensor:
        total[0] += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return total[0]


def test_chunked_head_keeps_no_logits_for_the_backward() -> None:
    """The whole head keeps (positions, V) tensors for its backward; the chunked one only the gradients with respect
    to its inputs, (positions, d) and (V, d), whatever the number of positions."""
    gen = torch.Generator().manual_seed(0)
    N, d, V = 512, 16, 1000
    x = torch.randn(N, d, generator=gen, requires_grad=True)
    weight = (torch.randn(V, d, generator=gen) * 0.1).requires_grad_()
    targets = torch.randint(0, V, (N,), generator=gen)
    whole = saved_bytes(lambda: M.softcap_cross_entropy(x, weight, targets))
    chunked = saved_bytes(lambda: M.chunked_head_loss(x, weight, targets, "2025", 64))
    assert whole >= 2 * N * V * 4  # at least two fp32 (positions, V) tensors
    assert chunked == (N * d + V * d) * 4  # dx and dW, fp32


@pytest.mark.parametrize("argv,message", [
    (["--head-chunk", "-1"], "--head-chunk=-1 must be >= 0 (positions per chunk; 0 = whole)"),
    (["--head-chunk", "1024", "--z-loss", "1e-4"],
     "--head-chunk with loss modifiers is not implemented (their terms need the whole logits)"),
])
def test_bad_head_chunk(argv: list[str], message: str) -> None:
    with pytest.raises(M.ConfigError) as e:
        cfg("--preset", "shakespeare", *argv).validate()
    assert str(e.value) == message


def test_compiled_model_with_chunked_head_follows_eager() -> None:
    """--compile on with --head-chunk (CPU pretraining's default compile): the compiled model breaks its graph at
    the chunked loss, whose chunk function is compiled on its own; loss and gradients follow the eager model."""
    hp = tiny_hparams(head_chunk=128, compile="on")
    rt = M.Runtime(device=torch.device("cpu"), compile=True)
    torch.manual_seed(0)
    model, forward = M.build_model(hp, rt)
    randomize_zero_inits(model, head_std=0.2)
    assert model.head_chunk_fn is not M.head_chunk_loss  # the compiled copy
    tokens = random_tokens(2, 128, seed=1, eot_positions={0: [0, 40], 1: [0]})
    targets = random_tokens(2, 128, seed=2)
    results = []
    for call in (forward, model):
        model.zero_grad()
        loss = call(tokens, targets, torch.tensor(2, dtype=torch.int32))
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in model.parameters()]))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-5, atol=1e-5)
    for compiled_grad, eager_grad in zip(results[0][1], results[1][1]):
        torch.testing.assert_close(compiled_grad, eager_grad, rtol=1e-4, atol=1e-5)


def test_pretraining_with_chunked_head_follows_the_whole_head(shard_dir, tmp_path) -> None:
    """A run with --head-chunk logs the same train and validation losses as without, to fp32 rounding: the first
    step's to 1e-6, the later ones to 1e-4 (Muon's orthogonalisation of the first, tiny gradients amplifies the last
    bits the chunk sums round differently)."""
    runs = {}
    for run_id, extra in (("whole", ()), ("chunked", ("--head-chunk", "96"))):
        r = run([sys.executable, "pretraining.py", *tiny_args(shard_dir, tmp_path, run_id, *extra)])
        assert r.returncode == 0, r.stderr
        runs[run_id] = read_metrics(tmp_path / run_id)
    (train_w, val_w), (train_c, val_c) = runs["whole"], runs["chunked"]
    assert len(train_w) == len(train_c) == 6 and len(val_w) == len(val_c) == 3
    assert abs(train_w[0] - train_c[0]) <= 1e-6 * train_w[0]
    for a, b in zip(train_w + val_w, train_c + val_c):
        assert abs(a - b) <= 1e-4 * a, (train_w + val_w, train_c + val_c)
