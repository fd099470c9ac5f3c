"""The training-loss modifiers (model.py, "Loss modifiers"): label smoothing, z-loss and entropy against formulas
written out here, loss and gradient; no modifier leaves the old loss bit for bit; terms add up; evaluation stays
plain cross-entropy; a custom term from --plugins reaches metrics.jsonl; bad values are one line and exit 2;
torchrun and --resume with modifiers on; fine-tuning's per-conversation weighting. CPU only.

    python -m pytest tests/test_loss_modifiers.py -q      # about a minute on 2 cores
"""
from __future__ import annotations

import math
import os
import shutil
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

import finetune as FT
import model as M
import pretraining
import runs as R
from conftest import (final_weights, free_port, ft_args, metric_rows, random_documents, random_tokens,
                      randomize_zero_inits, run, run_script, tiny_args, tiny_hparams)

IGNORE = M.IGNORE_INDEX
CPU = M.Runtime(device=torch.device("cpu"))
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1"]
BUILTIN = {name: fn for name, (_, fn) in M.BUILTIN_MODIFIERS.items()}
WEIGHTS = {"label_smoothing": 0.1, "z_loss": 0.05, "entropy": -0.3}  # large enough that every term shows
GPT_WEIGHTS = {"label_smoothing": 0.1, "z_loss": 1e-3, "entropy": -0.05}  # soft-capped logits: lse ~ 25
PLUGIN = '''"""A custom loss term for the --plugins test: the mean squared logit, and the largest logit as a metric."""
import model as M


@M.register_loss_modifier("test_logit_sq")
def logit_sq(t):
    return t.logits.square().mean(dim=-1), {"max": t.logits.max(dim=-1).values}
'''
# every pretraining run here: 4 steps (checkpoints at 2 and 4), the three built-ins and the plugin's term
RUN_FLAGS = ("--num-iterations", "4", "--val-loss-every", "2", "--label-smoothing", "0.1", "--z-loss", "1e-4",
             "--entropy-weight", "-0.01", "--loss-terms", "test_logit_sq=0.001", "--plugins", "lm_test_plugin")
TERMS = ("label_smoothing", "z_loss", "entropy", "test_logit_sq")  # the names whose values add to the loss


# -----------------------------------------------------------------------------
# Helpers


def modifier(name: str, weights: dict[str, float] = WEIGHTS) -> M.LossModifier:
    return M.LossModifier(name, weights[name], BUILTIN[name])


def logits_and_targets(N: int = 12, V: int = 20, classes: int = 17) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, V) fp32 logits and (N,) targets below classes, three of them ignored."""
    g = torch.Generator().manual_seed(5)
    logits = torch.randn(N, V, generator=g) * 2
    targets = torch.randint(0, classes, (N,), generator=g)
    targets[[1, 6, 7]] = IGNORE
    return logits, targets


def reference(logits: torch.Tensor, targets: torch.Tensor, name: str, weight: float, classes: int) -> torch.Tensor:
    """The modified loss written out: explicit softmax, smoothed target distribution, log-partition, entropy."""
    keep = targets != IGNORE
    z, t = logits[keep], targets[keep]
    lse = torch.log(torch.exp(z).sum(dim=-1))  # (n,)
    logp = z - lse[:, None]  # (n, V) log-softmax over every row, padding included
    ce = -logp[torch.arange(len(t)), t]
    if name == "label_smoothing":
        q = torch.zeros_like(z)
        q[:, :classes] = weight / classes  # the smoothing mass covers the real classes, not the padding rows
        q[torch.arange(len(t)), t] += 1 - weight
        return -(q * logp).sum(dim=-1).mean()
    if name == "z_loss":
        return ce.mean() + weight * lse.square().mean()
    p = torch.exp(logp)
    return ce.mean() + weight * (-(p * logp).sum(dim=-1)).mean()


def library(logits: torch.Tensor, targets: torch.Tensor, modifiers: tuple, classes: int, weights=None):
    """(loss, metrics, gradient w.r.t. the logits) of model.modified_cross_entropy."""
    leaf = logits.clone().requires_grad_()
    loss, metrics = M.modified_cross_entropy(leaf, targets, modifiers, classes, weights)
    loss.backward()
    return loss.detach(), metrics, leaf.grad


def tiny_gpt() -> tuple[M.GPT, torch.Tensor, torch.Tensor, int]:
    """The tiny model with random lm_head and projections, a (1, 128) batch and the final window."""
    hp = tiny_hparams()
    model = randomize_zero_inits(M.GPT.from_hparams(hp), seed=1)
    return model, random_tokens(1, 128, seed=3), random_tokens(1, 128, seed=4), M.final_window_blocks(hp)


def loss_and_grads(model: M.GPT, *args, call=None) -> tuple[object, dict[str, torch.Tensor]]:
    """model(*args), or call(), (its loss the first item when it returns a tuple), backward, and the gradient of
    every parameter of the model."""
    model.zero_grad(set_to_none=True)
    out = call() if call else model(*args)
    (out[0] if isinstance(out, tuple) else out).backward()
    return out, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def train_rows(run_dir: Path) -> list[dict]:
    """metrics.jsonl's train rows without their wall-clock time."""
    return [{k: v for k, v in r.items() if k != "train_time_ms"} for r in metric_rows(run_dir)[0]]


def assert_loss_is_sum_of_parts(row: dict, terms: tuple[str, ...]) -> None:
    assert row["train_loss"] == pytest.approx(row["train_ce"] + sum(row[f"train_{t}"] for t in terms), rel=1e-5)


@pytest.fixture
def custom_term():
    """A modifier registered for one test under a name nothing else uses, removed from the registry afterwards."""
    name = "lm_test_custom_sq"
    assert name not in M.LOSS_MODIFIERS

    def fn(t: M.TokenStats):
        return t.logits.square().mean(dim=-1), {"max": t.logits.max(dim=-1).values}

    M.register_loss_modifier(name)(fn)
    yield name, fn
    del M.LOSS_MODIFIERS[name]


@pytest.fixture
def restore_determinism():
    """pretraining.main calls init_runtime, which switches deterministic algorithms on for the whole process."""
    flags = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    yield
    torch.use_deterministic_algorithms(flags[0], warn_only=flags[1])


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    """One 4-step pretraining.py run of the tiny model with RUN_FLAGS, its plugin importable through PYTHONPATH;
    the torchrun, resume and metrics tests compare with it."""
    root = tmp_path_factory.mktemp("modifiers")
    shards, plugins = root / "data", root / "plugins"
    shards.mkdir()
    plugins.mkdir()
    for name, n, seed in [("tiny_train_000000", 6000, 1), ("tiny_train_000001", 6000, 2), ("tiny_val_000000", 3000, 3)]:
        M.write_data_shard(shards / f"{name}.bin", random_documents(n, seed=seed))
    (plugins / "lm_test_plugin.py").write_text(PLUGIN)
    env = {"PYTHONPATH": os.pathsep.join(p for p in [str(plugins), os.environ.get("PYTHONPATH", "")] if p)}
    r = run([sys.executable, "pretraining.py", *tiny_args(shards, root / "logs", "one", *RUN_FLAGS)], env=env)
    assert r.returncode == 0, r.stderr
    return SimpleNamespace(root=root, shards=shards, env=env, one=root / "logs" / "one", log=r.stdout)


# -----------------------------------------------------------------------------
# Each term against its formula; no term, the old loss; terms add up; evaluation is plain cross-entropy


@pytest.mark.parametrize("name", list(WEIGHTS))
def test_builtin_term_matches_its_formula(name: str) -> None:
    """Each built-in's loss and gradient equal the written-out formula (float64) to 1e-6, with ignored targets
    and padding rows beyond `classes` (which label smoothing must not cover)."""
    logits, targets = logits_and_targets()
    loss, metrics, grad = library(logits, targets, (modifier(name),), classes=17)
    ref_leaf = logits.double().requires_grad_()
    ref = reference(ref_leaf, targets, name, WEIGHTS[name], classes=17)
    ref.backward()
    torch.testing.assert_close(loss.double(), ref.detach(), rtol=0, atol=1e-6)
    torch.testing.assert_close(grad.double(), ref_leaf.grad, rtol=0, atol=1e-6)
    assert not grad[targets == IGNORE].any()  # an ignored token takes no part, in any term
    plain = F.cross_entropy(logits, targets)
    torch.testing.assert_close(metrics["ce"], plain, rtol=0, atol=1e-6)
    torch.testing.assert_close(metrics[name], loss.detach() - plain, rtol=0, atol=1e-6)


def test_label_smoothing_over_the_whole_vocabulary_is_torchs() -> None:
    """With classes == V, label smoothing is F.cross_entropy(label_smoothing=eps), loss and gradient; with padding
    rows it is not (the mass stays off them)."""
    logits, targets = logits_and_targets()
    loss, _, grad = library(logits, targets, (modifier("label_smoothing"),), classes=20)
    leaf = logits.clone().requires_grad_()
    expected = F.cross_entropy(leaf, targets, label_smoothing=0.1)
    expected.backward()
    torch.testing.assert_close(loss, expected.detach(), rtol=0, atol=1e-6)
    torch.testing.assert_close(grad, leaf.grad, rtol=0, atol=1e-6)
    padded, _, _ = library(logits, targets, (modifier("label_smoothing"),), classes=17)
    assert abs(float(padded - loss)) > 1e-3


def test_no_modifier_is_the_old_loss_bit_for_bit() -> None:
    """Every modifier off: forward(x, y, w), forward(x, y, w, None, True)[0] and softcap_cross_entropy give the
    same loss and parameter gradients, bitwise, and a default config builds no modifier."""
    assert M.loss_modifiers(tiny_hparams()) == ()
    assert M.build_model(tiny_hparams(), CPU)[0].loss_modifiers == ()
    model, x, y, window = tiny_gpt()
    old, g_old = loss_and_grads(model, x, y, window)
    (new, parts), g_new = loss_and_grads(model, x, y, window, None, True)
    assert parts == {}
    plain, g_plain = loss_and_grads(model, call=lambda: M.softcap_cross_entropy(  # the pre-existing loss
        model.hidden_states(x, *model.attention_masks(x, window)), model.lm_head.weight, y))
    assert torch.equal(old, new) and torch.equal(old, plain)
    assert g_old.keys() == g_new.keys() == g_plain.keys()
    assert all(torch.equal(g_old[k], g_new[k]) and torch.equal(g_old[k], g_plain[k]) for k in g_old)


def test_terms_add_up() -> None:
    """All three built-ins together on the tiny GPT: each term equals its value alone, loss - ce is their sum, and
    the gradient is the plain one plus each term's own contribution (1e-6 relative)."""
    model, x, y, window = tiny_gpt()
    plain, g_plain = loss_and_grads(model, x, y, window)
    alone = {}
    for name in GPT_WEIGHTS:
        model.loss_modifiers = (modifier(name, GPT_WEIGHTS),)
        alone[name] = loss_and_grads(model, x, y, window, None, True)
    model.loss_modifiers = tuple(modifier(name, GPT_WEIGHTS) for name in GPT_WEIGHTS)
    (loss, parts), g_all = loss_and_grads(model, x, y, window, None, True)
    assert list(parts) == ["ce", "label_smoothing", "z_loss", "z_loss_lse", "entropy"]
    close = dict(rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(parts["ce"], plain.detach(), **close)
    for name, ((single, single_parts), _) in alone.items():
        torch.testing.assert_close(parts[name], single_parts[name], **close)
        torch.testing.assert_close(single.detach() - single_parts["ce"], single_parts[name], **close)
        assert abs(float(parts[name])) > 1e-2, name  # every term moves the loss, so the sums below test something
    torch.testing.assert_close(loss.detach() - parts["ce"], sum(parts[n] for n in GPT_WEIGHTS), **close)
    for k in g_all:
        expected = g_plain[k] + sum(g[k] - g_plain[k] for _, g in alone.values())
        torch.testing.assert_close(g_all[k], expected, rtol=1e-5, atol=1e-6, msg=k)


def test_eval_mode_is_plain_cross_entropy() -> None:
    """model.eval() ignores modifiers and token weights: the loss equals the plain cross-entropy exactly."""
    model, x, y, window = tiny_gpt()
    with torch.no_grad():
        plain = model(x, y, window)
        model.loss_modifiers = tuple(modifier(name, GPT_WEIGHTS) for name in GPT_WEIGHTS)
        assert not torch.equal(model(x, y, window), plain)  # on in training
        model.eval()
        assert torch.equal(model(x, y, window), plain)
        loss, parts = model(x, y, window, torch.full(y.shape, 0.01), True)
    assert torch.equal(loss, plain) and parts == {}


# -----------------------------------------------------------------------------
# Custom terms: registered in-process, and through --plugins in a real run


def test_custom_term_registered_and_chosen_by_loss_terms(custom_term) -> None:
    """A registered function becomes a modifier through loss_terms, after the built-ins; its weighted term and its
    metric (NAME_max) join the parts; names that are not identifiers are refused."""
    name, fn = custom_term
    hp = tiny_hparams(z_loss=0.05, loss_terms=f"{name}=0.5")
    assert M.loss_modifiers(hp) == (modifier("z_loss"), M.LossModifier(name, 0.5, fn))
    logits, targets = logits_and_targets()
    loss, metrics, _ = library(logits, targets, M.loss_modifiers(hp), classes=17)
    keep = targets != IGNORE
    torch.testing.assert_close(metrics[name], 0.5 * logits[keep].square().mean(dim=-1).mean(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(metrics[f"{name}_max"], logits[keep].max(dim=-1).values.mean(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(loss.detach(), metrics["ce"] + metrics["z_loss"] + metrics[name], rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="must be lower-case letters"):
        M.register_loss_modifier("Bad-Name")(fn)


@pytest.mark.slow
def test_plugin_term_reaches_metrics_jsonl(pretrained: SimpleNamespace) -> None:
    """pretraining.py --plugins MODULE --loss-terms NAME=W: every term and metric is logged per step, the optimized
    loss is ce plus the terms, and step 1 (zero lm_head: every logit 15) has the hand-computed values."""
    rows = train_rows(pretrained.one)
    assert len(rows) == 4
    keys = {"train_ce", "train_label_smoothing", "train_z_loss", "train_z_loss_lse", "train_entropy",
            "train_test_logit_sq", "train_test_logit_sq_max"}
    for row in rows:
        assert keys <= set(row), row
        assert_loss_is_sum_of_parts(row, TERMS)
    first, ln_v = rows[0], math.log(50304)
    assert first["train_ce"] == pytest.approx(ln_v, rel=1e-6)
    assert first["train_z_loss_lse"] == pytest.approx(15 + ln_v, rel=1e-6)
    assert first["train_z_loss"] == pytest.approx(1e-4 * (15 + ln_v) ** 2, rel=1e-5)
    assert first["train_entropy"] == pytest.approx(-0.01 * ln_v, rel=1e-5)
    assert first["train_label_smoothing"] == pytest.approx(0, abs=1e-6)
    assert first["train_test_logit_sq"] == pytest.approx(1e-3 * 225, rel=1e-5)
    assert first["train_test_logit_sq_max"] == pytest.approx(15, rel=1e-6)
    assert "test_logit_sq:0.2250" in pretrained.log


# -----------------------------------------------------------------------------
# Bad values: one line, exit 2, nothing written


VALIDATION_ERRORS = [
    (dict(label_smoothing=-0.1), "--label-smoothing=-0.1 must be in [0, 1)"),
    (dict(label_smoothing=1.0), "--label-smoothing=1.0 must be in [0, 1)"),
    (dict(z_loss=math.nan), "--z-loss=nan must be >= 0 and finite"),
    (dict(z_loss=-1e-4), "--z-loss=-0.0001 must be >= 0 and finite"),
    (dict(entropy_weight=math.inf), "--entropy-weight=inf must be finite"),
    (dict(loss_terms="x"), "--loss-terms item 'x' must be NAME=WEIGHT with a finite number"),
    (dict(loss_terms="a=1,b=nan"), "--loss-terms item 'b=nan' must be NAME=WEIGHT with a finite number"),
    (dict(loss_terms="z_loss=1"), "--loss-terms: 'z_loss' has its own flag, --z-loss"),
    (dict(loss_normalization="doc"), "--loss-normalization='doc' must be one of token, sequence"),
    (dict(loss_terms="a=1,a=2"), "--loss-terms: 'a' is given twice (its metrics are logged under its name)"),
]


@pytest.mark.parametrize("values, message", VALIDATION_ERRORS, ids=[m.split("=")[0] for _, m in VALIDATION_ERRORS])
def test_validate_names_the_flag(values: dict, message: str) -> None:
    """Hyperparameters.validate refuses each bad loss setting with the exact message."""
    with pytest.raises(M.ConfigError) as e:
        tiny_hparams(**values).validate()
    assert str(e.value) == message


def test_unknown_term_and_plugin_are_config_errors() -> None:
    """An unregistered --loss-terms name and an unimportable --plugins module are ConfigErrors naming them."""
    with pytest.raises(M.ConfigError, match=r"^--loss-terms: no loss modifier 'bogus' is registered \(registered:"):
        M.loss_modifiers(tiny_hparams(loss_terms="bogus=1"))
    with pytest.raises(M.ConfigError) as e:
        R.import_plugins(tiny_hparams(plugins="no_such_module"))
    assert str(e.value) == ("--plugins: cannot import 'no_such_module' (ModuleNotFoundError: No module named "
                            "'no_such_module')")


BAD_FLAGS = [(("--label-smoothing=-0.1",), "--label-smoothing=-0.1"),
             (("--label-smoothing", "1"), "--label-smoothing=1.0"),
             (("--z-loss", "nan"), "--z-loss=nan"), (("--entropy-weight", "inf"), "--entropy-weight=inf"),
             (("--loss-terms", "bogus=1"), "--loss-terms: no loss modifier 'bogus'"),
             (("--loss-terms", "x"), "--loss-terms item 'x'"),
             (("--loss-normalization", "sequence"), "--loss-normalization=sequence is for fine-tuning"),
             (("--plugins", "no_such_module"), "--plugins: cannot import 'no_such_module'")]


@pytest.mark.parametrize("flags, fragment", BAD_FLAGS, ids=["".join(f) for f, _ in BAD_FLAGS])
def test_bad_flag_exits_2_in_one_line(flags: tuple, fragment: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                      capsys: pytest.CaptureFixture[str], restore_determinism) -> None:
    """pretraining.main with a bad loss flag: exit code 2, one stderr line naming the flag, no run directory."""
    for key in [k for k in os.environ if k.startswith("NANOGPT_")]:
        monkeypatch.delenv(key)
    monkeypatch.chdir(tmp_path)  # no .env but this (empty) directory's
    with pytest.raises(SystemExit) as e:
        pretraining.main(tiny_args(tmp_path / "data", tmp_path / "logs", "bad", *flags))
    lines = capsys.readouterr().err.splitlines()
    assert e.value.code == 2
    assert len(lines) == 1 and lines[0].startswith(f"pretraining.py: error: {fragment}"), lines
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_bad_plugin_from_the_command_line(tmp_path: Path) -> None:
    """`python pretraining.py --plugins no_such_module`: exit 2, exactly one line, no run directory."""
    r = run_script(["pretraining.py", *tiny_args(tmp_path / "data", tmp_path / "logs", "bad", "--plugins",
                                                  "no_such_module")], timeout=120)
    assert r.returncode == 2, r.stderr
    assert r.stderr.splitlines() == ["pretraining.py: error: --plugins: cannot import 'no_such_module' "
                                     "(ModuleNotFoundError: No module named 'no_such_module')"]
    assert not (tmp_path / "logs").exists()


# -----------------------------------------------------------------------------
# torchrun and --resume with modifiers on


@pytest.mark.slow
def test_torchrun_with_modifiers_follows_one_process(pretrained: SimpleNamespace) -> None:
    """RUN_FLAGS on 2 gloo processes: the same metrics keys, losses and terms (1e-5 of the loss) and final weights
    (the tolerance of tests/test_torchrun.py) as on one."""
    args = tiny_args(pretrained.shards, pretrained.root / "logs", "two", *RUN_FLAGS)
    r = run([*TORCHRUN, f"--master_port={free_port()}", "pretraining.py", *args], env=pretrained.env)
    assert r.returncode == 0, r.stderr
    assert "world_size:2" in r.stdout
    one, two = train_rows(pretrained.one), train_rows(pretrained.root / "logs" / "two")
    assert [sorted(a) for a in one] == [sorted(b) for b in two]
    for a, b in zip(one, two, strict=True):
        for key in a:
            assert abs(a[key] - b[key]) <= 1e-5 * abs(a["train_loss"]), (a["step"], key, a[key], b[key])
    val_one, val_two = metric_rows(pretrained.one)[1], metric_rows(pretrained.root / "logs" / "two")[1]
    for a, b in zip(val_one, val_two, strict=True):
        assert abs(a["val_loss"] - b["val_loss"]) <= 1e-5 * abs(a["val_loss"])
    w1, w2 = final_weights(pretrained.one, 4), final_weights(pretrained.root / "logs" / "two", 4)
    assert w1.keys() == w2.keys()
    for k in w1:
        torch.testing.assert_close(w1[k], w2[k], rtol=1e-4, atol=1e-5, msg=k)


@pytest.mark.slow
def test_resume_with_modifiers_is_bitwise_exact(pretrained: SimpleNamespace) -> None:
    """The step-2 checkpoint of the RUN_FLAGS run, resumed (its plugin imported again from the saved config),
    ends with the uninterrupted run's weights, optimizer state and step metrics, bit for bit."""
    half = pretrained.root / "resumed" / "half"
    half.mkdir(parents=True)
    shutil.copy(pretrained.one / "state_step000002.pt", half)
    r = run([sys.executable, "pretraining.py", "--resume", str(half / "state_step000002.pt")], env=pretrained.env)
    assert r.returncode == 0, r.stderr
    assert "resumed_from" in r.stdout
    a = torch.load(pretrained.one / "state_step000004.pt", weights_only=True)
    b = torch.load(half / "state_step000004.pt", weights_only=True)
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    for opt_a, opt_b in zip(a["optimizers"], b["optimizers"], strict=True):
        for idx, state in opt_a["state"].items():
            assert all(torch.equal(v, opt_b["state"][idx][key]) for key, v in state.items()), idx
    assert b["hyperparameters"]["loss_terms"] == "test_logit_sq=0.001"
    assert train_rows(half) == train_rows(pretrained.one)[2:]


# -----------------------------------------------------------------------------
# Fine-tuning: per-conversation weights; label smoothing covers the chat tokens


def two_conversations(T: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """(1, T) inputs and targets: conversation a at 0..9 trains target 5, b at 10..29 trains 20..22, then
    <|endoftext|> padding, untrained."""
    x = random_tokens(1, T, seed=7, eot_positions={0: [0, 10, *range(30, T)]})
    y = torch.full((1, T), IGNORE)
    y[0, [5, 20, 21, 22]] = random_tokens(1, 4, seed=8)[0]
    return x, y


def test_conversation_weights_by_hand() -> None:
    """Each conversation's trained tokens weigh 1 in total (1; 1/3, 1/3, 1/3), two conversations counted;
    the same row twice is four conversations (documents do not merge across rows)."""
    x, y = two_conversations()
    w, count = FT.conversation_weights(x, y)
    expected = torch.zeros(1, 128, dtype=torch.float64)
    expected[0, 5], expected[0, 20:23] = 1, 1 / 3
    assert count == 2 and torch.equal(w, expected)
    w2, count2 = FT.conversation_weights(x.repeat(2, 1), y.repeat(2, 1))
    assert count2 == 4 and torch.equal(w2, expected.repeat(2, 1))


def test_sequence_weighted_forward_by_hand() -> None:
    """A training forward with token_weights = w / 2 is 0.5 * nll_a + 0.5 * mean(nll_b) of the per-token
    cross-entropy of the model's logits."""
    model, _, _, window = tiny_gpt()
    x, y = two_conversations()
    w, count = FT.conversation_weights(x, y)
    loss = model(x, y, window, (w / count).float())
    with torch.no_grad():
        nll = F.cross_entropy(model(x)[0], y[0], reduction="none")  # (T,), 0 where ignored
    torch.testing.assert_close(loss.detach(), 0.5 * nll[5] + 0.5 * nll[20:23].mean(), rtol=1e-6, atol=1e-6)


def test_train_step_weighs_conversations_over_micro_batches() -> None:
    """finetune.train_step with --loss-normalization sequence and a z-loss: conversations a (1 token) and b
    (3 tokens) in micro-batch 1, c (2 tokens) in micro-batch 2 weigh a third each, in the ce and in the z-loss."""
    hp = tiny_hparams(loss_normalization="sequence", z_loss=1e-3, optimizer="adamw")
    raw, forward = M.build_model(hp, CPU, chat=True)
    randomize_zero_inits(raw, seed=1)
    opts = M.setup_optimizers(raw, hp)
    x_ab, y_ab = two_conversations()
    x_c = random_tokens(1, 128, seed=9, eot_positions={0: [0, *range(40, 128)]})
    y_c = torch.full((1, 128), IGNORE)
    y_c[0, [30, 31]] = random_tokens(1, 2, seed=10)[0]
    rows = [FT.Example(x[0].tolist(), y[0].tolist()) for x, y in [(x_ab, y_ab), (x_c, y_c)]]
    window = M.final_window_blocks(hp)
    with torch.no_grad():
        logits = [forward(x, None, window)[0] for x in (x_ab, x_c)]  # (T, V) each
    nll = [F.cross_entropy(z, y[0], reduction="none") for z, y in zip(logits, (y_ab, y_c))]
    lse2 = [torch.logsumexp(z, dim=-1).square() for z in logits]
    per_conv = [[v[0][5], v[0][20:23].mean(), v[1][30:32].mean()] for v in (nll, lse2)]
    ce, z = (float(sum(p) / 3) for p in per_conv)
    loss, trained, parts = FT.train_step(forward, raw, opts, rows, 0, hp, CPU, window)
    assert trained == 6
    assert parts["ce"] == pytest.approx(ce, rel=1e-6)
    assert parts["z_loss"] == pytest.approx(1e-3 * z, rel=1e-6)
    assert loss == pytest.approx(ce + 1e-3 * z, rel=1e-6)


@pytest.mark.slow
def test_finetune_with_sequence_normalization(parent: Path, task_files: tuple[Path, Path], tmp_path: Path) -> None:
    """finetune.py --loss-normalization sequence --label-smoothing 0.1 on the chat task: exit 0, every step logs
    train_loss = ce + label_smoothing, and the checkpoint records the normalisation."""
    train, heldout = task_files
    r = run([sys.executable, *ft_args(tmp_path, "seq", "--checkpoint", str(parent), "--data", str(train),
                                      "--val-data", str(heldout), "--loss-normalization", "sequence",
                                      "--label-smoothing", "0.1")])
    assert r.returncode == 0, r.stderr
    rows = train_rows(tmp_path / "seq")
    assert len(rows) == 4
    for row in rows:
        assert math.isfinite(row["train_loss"])
        assert_loss_is_sum_of_parts(row, ("label_smoothing",))
    saved = torch.load(tmp_path / "seq" / "state_step000004.pt", weights_only=True)["hyperparameters"]
    assert saved["loss_normalization"] == "sequence" and saved["label_smoothing"] == 0.1


def test_label_smoothing_classes() -> None:
    """Label smoothing covers the GPT-2 vocabulary, and in a fine-tune the 4 chat tokens too; build_model turns
    the config's weights into modifiers in a fixed order."""
    hp = tiny_hparams(z_loss=1e-4, label_smoothing=0.1)
    base, chat = M.build_model(hp, CPU)[0], M.build_model(hp, CPU, chat=True)[0]
    assert base.loss_classes == hp.vocab_size == 50257
    assert chat.loss_classes == hp.vocab_size + 4 == 50257 + len(M.CHAT_SPECIAL_TOKENS)
    assert [(m.name, m.weight) for m in chat.loss_modifiers] == [("label_smoothing", 0.1), ("z_loss", 1e-4)]


def test_finetune_starts_without_the_parents_modifiers_and_trackers(parent: Path, tmp_path: Path) -> None:
    """A parent pretrained with loss modifiers, a plugin and trackers hands none of them to its fine-tune; flags
    given to finetune.py still apply."""
    import finetune as FT

    ckpt = torch.load(parent, weights_only=True)
    ckpt["hyperparameters"].update(label_smoothing=0.1, z_loss=1e-4, entropy_weight=-0.01, loss_terms="x=1",
                                   plugins="gone_module", trackers="tensorboard", tracker_dir="/nowhere")
    path = tmp_path / "state_step000006.pt"
    torch.save(ckpt, path)
    hp = FT.resolve(["--checkpoint", str(path)])[0]
    assert (hp.label_smoothing, hp.z_loss, hp.entropy_weight, hp.loss_terms, hp.plugins, hp.trackers,
            hp.tracker_dir) == (0.0, 0.0, 0.0, "", "", "", "")
    assert FT.resolve(["--checkpoint", str(path), "--z-loss", "1e-4"])[0].z_loss == 1e-4


def test_docs_custom_modifier_works_as_shown() -> None:
    """docs/loss_modifiers.md's custom modifier is complete and under 15 lines: run as written, it registers a term
    that composes with the cross-entropy and reports its metric."""
    text = (M.REPO_DIR / "docs" / "loss_modifiers.md").read_text()
    block = text.split("```python\n# my_terms.py", 1)[1].split("```", 1)[0]
    source = "# my_terms.py" + block
    assert len(source.strip().splitlines()) < 15
    try:
        exec(compile(source, "docs/loss_modifiers.md", "exec"), {})
        logits, targets = torch.randn(6, 12), torch.tensor([0, 3, 9, M.IGNORE_INDEX, 1, 2])
        mods = M.loss_modifiers(tiny_hparams(loss_terms="logit_l2=0.5"))
        loss, parts = M.modified_cross_entropy(logits, targets, mods, 10)
        trained = targets != M.IGNORE_INDEX
        expected = logits[trained][:, :10].square().mean(dim=-1).mean()
        assert torch.allclose(parts["logit_l2"], 0.5 * expected)
        assert torch.allclose(parts["logit_l2_max"], logits[trained].amax(dim=-1).mean())
        assert torch.allclose(loss, parts["ce"] + parts["logit_l2"])
    finally:
        M.LOSS_MODIFIERS.pop("logit_l2", None)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch.compile's own use of torch.jit
def test_compiled_head_with_modifiers_equals_eager() -> None:
    """The loss head compiled as --compile head compiles it (torch.compile, no fallback) gives eager's loss, terms
    and gradients with every built-in modifier on and token weights given."""
    torch.manual_seed(0)
    x, w = torch.randn(64, 32), torch.randn(200, 32) * 0.5
    y = torch.randint(0, 150, (64,))
    y[::7] = M.IGNORE_INDEX
    weights = torch.rand(64)
    mods = tuple(M.LossModifier(name, GPT_WEIGHTS[name], fn) for name, fn in BUILTIN.items())
    compiled = torch.compile(M.softcap_modified_loss, dynamic=False)
    results = []
    for fn in (M.softcap_modified_loss, compiled):
        xg, wg = x.clone().requires_grad_(), w.clone().requires_grad_()
        loss, parts = fn(xg, wg, y, weights, mods, 150)
        loss.backward()
        results.append((loss.detach(), parts, xg.grad, wg.grad))
    (eager_loss, eager_parts, eager_gx, eager_gw), (loss, parts, gx, gw) = results
    assert torch.allclose(loss, eager_loss, rtol=1e-5, atol=1e-6)
    assert parts.keys() == eager_parts.keys()
    assert all(torch.allclose(parts[k], eager_parts[k], rtol=1e-5, atol=1e-6) for k in parts)
    assert torch.allclose(gx, eager_gx, rtol=1e-4, atol=1e-6) and torch.allclose(gw, eager_gw, rtol=1e-4, atol=1e-6)
