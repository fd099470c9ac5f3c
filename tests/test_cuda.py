"""The GPU-only paths: compiled FlexAttention vs the SDPA reference, the FP8 head, compiled training steps (the 2026
optimizer switches included), bf16
embeddings (training, Adam, checkpoints), the compiled model against eager SDPA, KV-cache decoding through
eval.py's and chat.py's loader, the two scripts on CUDA against CPU, and the Hugging Face export of a GPU checkpoint
loaded onto the GPU.

Skipped on machines without CUDA (CI has none). On a GPU, `python gpu_check.py --json-out gpu_check.json`
runs them with tests/test_train_gpt.py::test_cuda_runs_agree and the GPU benchmarks in a fixed time; alone:

    python -m pytest tests/test_cuda.py -v -o addopts=     # the tokenizer tests need data/gpt2.tiktoken
"""
from __future__ import annotations

import dataclasses

import json
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from conftest import random_documents, randomize_zero_inits, run, script, tiny_hparams, write_checkpoint

import inference as I
import model as M
import pretraining

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def doc_tokens(B: int, T: int, device: str) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 50000, (B, T), generator=g)
    tokens[:, ::300] = M.EOT_ID  # documents of 300 tokens, crossing 128-token blocks
    return tokens.to(device)


@pytest.mark.parametrize("window_blocks", [1, 3, 64])
def test_compiled_flex_attention_matches_sdpa_forward_and_backward(window_blocks: int) -> None:
    B, H, T, D = 2, 4, 1024, 64
    docs = (doc_tokens(B, T, "cuda") == M.EOT_ID).cumsum(1)
    q, k, v = (torch.randn(B, H, T, D, device="cuda", requires_grad=True) for _ in range(3))
    dense = M.attention(q, k, v, M.dense_attention_mask(docs, window_blocks), 0.12)
    grads_dense = torch.autograd.grad(dense.square().sum(), (q, k, v))
    from torch.nn.attention.flex_attention import flex_attention

    flex = torch.compile(flex_attention)(q, k, v, block_mask=M.flex_block_mask(docs, window_blocks), scale=0.12)
    grads_flex = torch.autograd.grad(flex.square().sum(), (q, k, v))
    torch.testing.assert_close(flex, dense, atol=2e-3, rtol=2e-3)
    for a, b in zip(grads_flex, grads_dense):
        torch.testing.assert_close(a, b, atol=2e-2, rtol=2e-2)


def test_gpu_model_loss_matches_cpu_model() -> None:
    hp = tiny_hparams(device="cuda", compile="off", dtype="fp32", fp8_head="off")
    cpu_model = M.GPT.from_hparams(hp)
    torch.nn.init.normal_(cpu_model.lm_head.weight, std=0.02)
    gpu_model = M.GPT.from_hparams(hp).cuda()
    gpu_model.load_state_dict(cpu_model.state_dict())
    gpu_model.use_flex = True
    x = doc_tokens(2, 256, "cpu")
    y = torch.roll(x, -1, dims=1)
    with torch.no_grad():
        ref = cpu_model(x, y, 2)
        got = gpu_model(x.cuda(), y.cuda(), 2)
    assert abs(got.item() - ref.item()) < 1e-3


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9),
                    reason="FP8 needs compute capability >= 8.9")
def test_fp8_head_loss_close_to_bf16_head() -> None:
    hp = tiny_hparams(device="cuda", model_dim=128, num_heads=2, head_dim=64)
    model = M.GPT.from_hparams(hp).cuda()
    torch.nn.init.normal_(model.lm_head.weight, std=0.02)
    model.use_flex = True
    x = doc_tokens(1, 512, "cuda")
    y = torch.roll(x, -1, dims=1)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        ref = model(x, y, 4)
        model.enable_fp8_head(True)
        fp8 = model(x, y, 4)
    fp8.backward()
    assert model.lm_head.weight.grad is not None and torch.isfinite(model.lm_head.weight.grad).all()
    assert abs(fp8.item() - ref.item()) < 0.05 * ref.item()


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9),
                    reason="FP8 needs compute capability >= 8.9")
def test_fp8_head_with_loss_modifiers_close_to_bf16_head() -> None:
    """The FP8 lm_head under label smoothing and a z-loss: the same terms as the bf16 head within FP8's error,
    and finite gradients through the FP8 backward."""
    hp = tiny_hparams(device="cuda", model_dim=128, num_heads=2, head_dim=64, label_smoothing=0.1, z_loss=1e-4)
    model = M.GPT.from_hparams(hp).cuda()
    model.loss_modifiers = M.loss_modifiers(hp)
    torch.nn.init.normal_(model.lm_head.weight, std=0.02)
    model.use_flex = True
    x = doc_tokens(1, 512, "cuda")
    y = torch.roll(x, -1, dims=1)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        ref, ref_parts = model(x, y, 4, None, True)
        model.enable_fp8_head(True)
        fp8, parts = model(x, y, 4, None, True)
    fp8.backward()
    assert parts.keys() == ref_parts.keys() == {"ce", "label_smoothing", "z_loss", "z_loss_lse"}
    assert torch.isfinite(model.lm_head.weight.grad).all()
    assert all(abs(parts[k].item() - ref_parts[k].item()) <= 0.05 * abs(ref_parts[k].item()) + 1e-3 for k in parts)


def compiled_losses(hp: M.Hyperparameters, steps: int, scheduled: bool = False) -> list[float]:
    """The loss of each of `steps` compiled training steps on CUDA on one batch of documents, the window one block;
    scheduled: pretraining.py's attach_extra_targets and schedule_step (window, multi-token weights) instead."""
    rt = M.init_runtime(hp)
    raw, forward = M.build_model(hp, rt)
    if scheduled:
        pretraining.attach_extra_targets(raw, hp, rt.device)
    optimizers = M.setup_optimizers(raw, hp, compile_ns=True)
    x = doc_tokens(2, 128, "cuda")
    y = torch.roll(x, -1, dims=1)
    window = torch.tensor(1, dtype=torch.int32, device="cuda")
    losses = []
    for step in range(steps):
        if scheduled:
            pretraining.schedule_step(raw, window, step, hp)
        with rt.autocast():
            loss = forward(x, y, window)
        loss.backward()
        M.optimizer_step(raw, optimizers, step, hp)
        losses.append(loss.item())
    return losses


def test_compiled_training_steps_lower_the_loss() -> None:
    losses = compiled_losses(tiny_hparams(device="cuda", compile="on", dtype="bf16"), 5)
    assert losses[-1] < losses[0]


def test_compiled_2026_optimizer_step_on_gpu_follows_cpu() -> None:
    """Every 2026 optimizer switch on (docs/optimizer.md), the orthogonalisation compiled on the GPU: three steps
    from the same weights and gradients end close to the eager CPU steps (bf16 iterations on both), and a compiled
    training run with them lowers the loss."""
    switches = dict(muon_orthogonalizer="polar_express", normuon=True, cautious_weight_decay=True,
                    muon_weight_decay=1.2, adam_update="record", adam_table="2026", adam_weight_decay=0.005,
                    adam_every=2, muon_lr_mults="2026", muon_momentum_cooldown=2, muon_qk_head_groups=1,
                    muon_row_equilibration=True, muon_norm_snap=True)
    models = {}
    for device in ("cpu", "cuda"):
        hp = tiny_hparams(device=device, compile="off", num_iterations=6, **switches)
        raw, _ = M.build_model(hp, M.init_runtime(hp))
        if device == "cpu":
            weights = {k: v.clone() for k, v in randomize_zero_inits(raw).state_dict().items()}
        raw.load_state_dict(weights)  # the same start on both devices
        optimizers = M.setup_optimizers(raw, hp, compile_ns=device == "cuda")
        for step in range(3):
            g = torch.Generator().manual_seed(step)
            for p in raw.parameters():
                p.grad = torch.randn(p.shape, generator=g).to(device, p.dtype)
            M.optimizer_step(raw, optimizers, step, hp)
        models[device] = raw
    for (name, a), b in zip(models["cpu"].named_parameters(), models["cuda"].parameters()):
        assert (a - b.cpu()).abs().max().item() <= 2e-2 * a.abs().max().item() + 1e-4, name

    losses = compiled_losses(tiny_hparams(device="cuda", compile="on", dtype="bf16", **switches), 6)
    assert losses[-1] < losses[0]


def test_compiled_head_with_extra_targets_on_gpu_matches_cpu() -> None:
    """The 2026 head (issue 26): the compiled loss on the GPU with the 2026 logit cap, multi-token weights and the
    prefix-token target equals the eager CPU loss (fp32) and its gradient; a compiled training run with the stage
    schedule's windows (FlexAttention block masks) lowers the loss."""
    hp = tiny_hparams(logit_cap="2026", stage_schedule="2026", mtp=True, prefix_token=True, num_iterations=6)
    x, y = doc_tokens(2, 128, "cpu"), doc_tokens(2, 128, "cpu").roll(1, dims=1)
    results = {}
    for device in ("cpu", "cuda"):
        torch.manual_seed(0)
        model = randomize_zero_inits(M.GPT.from_hparams(hp), head_std=0.05).to(device)
        model.mtp_weights = torch.tensor([1.0, 0.5, 0.25], device=device)
        model.prefix_table = torch.arange(model.lm_head.weight.size(0), device=device).roll(3)  # any valid ids
        model.prefix_weight = torch.tensor([0.25], device=device)
        if device == "cuda":
            model.use_flex = True
            model.loss_fn = torch.compile(M.softcap_cross_entropy)
        loss = model(x.to(device), y.to(device), 2)
        loss.backward()
        results[device] = loss.item(), model.lm_head.weight.grad.cpu()
    assert abs(results["cpu"][0] - results["cuda"][0]) <= 1e-4 * abs(results["cpu"][0])
    torch.testing.assert_close(results["cuda"][1], results["cpu"][1], rtol=1e-3, atol=1e-5)

    # the compiled run without the prefix table (it needs the GPT-2 ranks, which a GPU machine may lack offline)
    losses = compiled_losses(dataclasses.replace(hp, device="cuda", compile="on", dtype="bf16", prefix_token=False),
                             6, scheduled=True)
    assert losses[-1] < losses[0]


def test_compiled_chunked_head_on_gpu_follows_the_whole_head() -> None:
    """--head-chunk on CUDA, the whole model compiled (its graph breaks at the chunked loss, whose chunk function is
    compiled on its own), with the stage schedule's windows, tie and YaRN: the same losses as the whole head to
    bf16 rounding over a few steps, and the loss falls."""
    base = dict(device="cuda", compile="on", dtype="bf16", logit_cap="2026", stage_schedule="2026", mtp=True,
                yarn=True, tie_embed=True, num_iterations=6)
    runs = []
    for chunk in (0, 96):
        torch.manual_seed(0)
        runs.append(compiled_losses(tiny_hparams(head_chunk=chunk, **base), 6, scheduled=True))
    whole, chunked = runs
    assert all(abs(a - b) <= 2e-2 * abs(a) for a, b in zip(whole, chunked)), runs
    assert chunked[-1] < chunked[0]


def test_kv_cache_generation_matches_reference_on_gpu() -> None:
    """The cached decode path on CUDA (SDPA with boolean masks) picks the reference's greedy tokens."""
    hp = tiny_hparams(row_len=256)
    torch.manual_seed(0)
    model = M.GPT.from_hparams(hp).cuda().eval()
    torch.nn.init.normal_(model.lm_head.weight, std=0.02)
    prompt = doc_tokens(1, 300, "cpu")[0].tolist()
    kv = [s[0] for s in I.generate(model, prompt, window_blocks=2, max_new_tokens=40, stop_ids=())]
    ref = [s[0] for s in I.generate(model, prompt, window_blocks=2, max_new_tokens=40, stop_ids=(), use_cache=False)]
    assert kv == ref


# -----------------------------------------------------------------------------
# Open GPU questions: bf16 embeddings, compiled vs eager, eval.py / chat.py / the export on CUDA

needs_ranks = pytest.mark.skipif(not M.GPT2_RANKS_FILE.is_file(),
                                 reason="needs data/gpt2.tiktoken (python data/shakespeare.py fetches it)")


def test_bf16_embeddings_train_and_checkpoint_on_gpu(tmp_path: Path) -> None:
    """build_model on CUDA keeps the embeddings in bf16 (the record): the loss stays within bf16 error of the fp32 CPU
    model with the same weights, fused Adam steps them, and a checkpoint of them loads on CPU into fp32 exactly."""
    hp = tiny_hparams(device="cuda", compile="off", dtype="bf16", fp8_head="off")
    rt = M.init_runtime(hp)
    raw, forward = M.build_model(hp, rt)
    randomize_zero_inits(raw)
    assert raw.use_flex and raw.lm_head.weight.dtype == torch.float32
    assert {m.weight.dtype for m in [raw.embed, *raw.value_embeds]} == {torch.bfloat16}
    cpu = M.GPT.from_hparams(hp)
    cpu.load_state_dict({k: v.float().cpu() for k, v in raw.state_dict().items()})
    x = doc_tokens(2, 128, "cpu")
    y = torch.roll(x, -1, dims=1)
    with torch.no_grad():
        ref = cpu(x, y, 1)
    with rt.autocast():
        loss = forward(x.cuda(), y.cuda(), torch.tensor(1, dtype=torch.int32, device="cuda"))
    assert abs(loss.item() - ref.item()) < 2e-2 * ref.item()
    loss.backward()
    grad = raw.embed.weight.grad
    assert grad.dtype == torch.bfloat16 and torch.isfinite(grad.float()).all() and grad.abs().sum() > 0
    before = raw.embed.weight.detach().clone()
    optimizers = M.setup_optimizers(raw, hp)
    M.optimizer_step(raw, optimizers, 0, hp)
    assert raw.embed.weight.dtype == torch.bfloat16 and not torch.equal(raw.embed.weight, before)
    path = M.save_checkpoint(tmp_path / "state_step000001.pt", step=1, model=raw, optimizers=optimizers, hp=hp,
                             code={})
    loaded, _, ckpt = M.load_model(path)
    assert ckpt["model"]["embed.weight"].dtype == torch.bfloat16 and loaded.embed.weight.dtype == torch.float32
    assert all(torch.equal(v.float().cpu(), loaded.state_dict()[k]) for k, v in raw.state_dict().items())


def test_compiled_model_matches_eager_sdpa_on_gpu() -> None:
    """The whole model compiled on CUDA (block masks built inside the graph, FlexAttention, the FP8 head where the GPU
    has it, bf16 autocast) gives the loss and gradients of the same weights run eagerly through SDPA with dense masks:
    the check that a compiled run computes the right thing, not only one that learns."""
    hp = tiny_hparams(device="cuda", compile="on", dtype="bf16", row_len=512)
    rt = M.init_runtime(hp)
    raw, forward = M.build_model(hp, rt)
    randomize_zero_inits(raw)
    x = doc_tokens(2, 512, "cuda")  # documents of 300 tokens across the 4 blocks of each row
    y = torch.roll(x, -1, dims=1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with rt.autocast():
            compiled = forward(x, y, torch.tensor(2, dtype=torch.int32, device="cuda"))
        compiled.backward()
    assert not [str(w.message) for w in caught if "running it eagerly" in str(w.message)]  # no silent fallback
    grads = {n: p.grad.float().clone() for n, p in raw.named_parameters() if p.ndim >= 2}
    raw.zero_grad(set_to_none=True)
    raw.use_flex = False
    with rt.autocast():
        eager = raw(x, y, 2)
    eager.backward()
    assert abs(compiled.item() - eager.item()) < 1e-2 * eager.item()
    for name, p in raw.named_parameters():
        if p.ndim >= 2:
            cos = F.cosine_similarity(grads[name].flatten(), p.grad.float().flatten(), dim=0)
            assert cos > 0.98, (name, cos.item())


@needs_ranks
def test_inference_model_on_gpu_decodes_like_the_reference(tmp_path: Path) -> None:
    """eval.py's and chat.py's loader on CUDA: in fp32 the KV cache's greedy tokens equal the full-recompute
    reference's; with the default bf16 autocast each step's cached logits stay within bf16 error of the reference's
    and of fp32; sampling on the GPU streams a reply."""
    hp = tiny_hparams(row_len=256)
    torch.manual_seed(0)
    path = write_checkpoint(tmp_path, "tiny", 6, randomize_zero_inits(M.GPT.from_hparams(hp)), hp)
    fp32 = I.load_for_inference(str(path), tmp_path, device="cuda", dtype="fp32")
    assert fp32.device.type == "cuda" and fp32.decode_dtype is None
    prompt = doc_tokens(1, 300, "cpu")[0].tolist()
    w = fp32.window_blocks
    kv = [s[0] for s in I.generate(fp32.model, prompt, window_blocks=w, max_new_tokens=32, stop_ids=())]
    ref = [s[0] for s in I.generate(fp32.model, prompt, window_blocks=w, max_new_tokens=32, stop_ids=(),
                                    use_cache=False)]
    assert kv == ref
    bf16 = I.load_for_inference(str(path), tmp_path, device="cuda")
    assert bf16.score_dtype == bf16.decode_dtype == torch.bfloat16
    tokens = torch.tensor([prompt + kv], device="cuda")  # (1, 332)
    cache = I.KVCache(bf16.model, 1, tokens.size(1))
    with torch.no_grad():
        with bf16.autocast(bf16.decode_dtype):
            cached = [I.prefill(bf16.model, tokens[:, :300], cache, w)[:, -1]]
            cached += [I.prefill(bf16.model, tokens[:, t:t + 1], cache, w)[:, -1] for t in range(300, 331)]
            full = [I.reference_logits(bf16.model, tokens[:, :t + 1], w) for t in range(299, 331)]
        exact = [I.reference_logits(fp32.model, tokens[:, :t + 1], w) for t in (299, 315, 330)]
    assert min(float(c.std()) for c in cached) > 0.5  # logits that differ: the tolerances below mean something
    assert max(float((c - f).abs().max()) for c, f in zip(cached, full)) < 0.1
    assert max(float((cached[t - 299] - e).abs().max()) for t, e in zip((299, 315, 330), exact)) < 0.15
    reply = "".join(I.stream_reply(bf16, prompt, max_new_tokens=16, temperature=0.8, top_k=50, seed=1))
    assert isinstance(reply, str)


@pytest.mark.slow
@needs_ranks
def test_eval_and_chat_scripts_on_gpu_agree_with_cpu(tmp_path: Path) -> None:
    """eval.py scores a checkpoint on CUDA (bf16 autocast, SDPA) within 1% of its fp32 val loss on CPU; chat.py's
    greedy fp32 reply through the KV cache on CUDA is the CPU's word for word, and its default bf16 reply runs."""
    M.write_data_shard(tmp_path / "tiny_val_000000.bin", random_documents(3000, seed=3))
    hp = tiny_hparams(val_files=str(tmp_path / "tiny_val_*.bin"))
    torch.manual_seed(0)  # random weights: a greedy reply of varied tokens, 24 of them (no blank line ends it)
    path = write_checkpoint(tmp_path / "logs", "tiny", 6, randomize_zero_inits(M.GPT.from_hparams(hp)), hp)
    scores = {}
    for device, dtype in (("cuda", "auto"), ("cpu", "fp32")):
        r = script("eval.py", "--checkpoint", str(path), "--device", device, "--dtype", dtype, "--num-samples", "0",
                   "--json", timeout=300)
        assert r.returncode == 0, r.stderr
        scores[device] = json.loads(r.stdout)
    assert scores["cuda"]["device"].startswith("cuda") and scores["cuda"]["dtype"] == "torch.bfloat16"
    assert scores["cuda"]["val"]["tokens"] == scores["cpu"]["val"]["tokens"] == hp.val_tokens
    assert abs(scores["cuda"]["val"]["loss"] - scores["cpu"]["val"]["loss"]) < 1e-2 * scores["cpu"]["val"]["loss"]
    replies = {}
    for device, dtype in (("cuda", "fp32"), ("cpu", "fp32"), ("cuda", "auto")):
        r = script("chat.py", "--checkpoint", str(path), "--device", device, "--dtype", dtype, "--prompt",
                   "Good morrow", "--temperature", "0", "--max-new-tokens", "24", timeout=300)
        assert r.returncode == 0, r.stderr
        replies[device, dtype] = r.stdout
    assert replies["cuda", "fp32"].strip() and replies["cuda", "fp32"] == replies["cpu", "fp32"]
    assert replies["cuda", "auto"].strip()


@pytest.mark.slow
@needs_ranks
def test_hf_export_of_a_gpu_checkpoint_runs_on_gpu(tmp_path: Path) -> None:
    """A checkpoint saved from the CUDA-built model (bf16 embeddings) exports; transformers loads the export onto the
    GPU, where its logits are ours on the GPU: to 1e-4 in fp32, and within bf16 error when it computes in bf16."""
    pytest.importorskip("transformers")
    from transformers import AutoModelForCausalLM

    hp = tiny_hparams(device="cuda", compile="off", fp8_head="off")
    raw, _ = M.build_model(hp, M.init_runtime(hp))
    randomize_zero_inits(raw)
    path = M.save_checkpoint(tmp_path / "logs" / "gpu" / "state_step000006.pt", step=6, model=raw, optimizers=[],
                             hp=hp, code={})
    r = run([sys.executable, "export.py", "--checkpoint", str(path), "--out", str(tmp_path / "hf"), "--no-verify"],
            timeout=300, env=dict(HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false"))
    assert r.returncode == 0, r.stderr
    ours, saved, _ = M.load_model(path, "cuda")
    tokens = doc_tokens(2, 640, "cuda")  # documents of 300 tokens, beyond the 256-token window

    @torch.no_grad()
    def hf_error(dtype: torch.dtype) -> Tensor:
        hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", trust_remote_code=True, dtype=dtype)
        return (hf.cuda().eval()(tokens, use_cache=False).logits.float() - want).abs()

    with torch.no_grad():
        ours.eval().ensure_positions(tokens.size(1))
        want = ours(tokens, None, M.final_window_blocks(saved))  # (B, T, V) fp32
    assert float(hf_error(torch.float32).max()) < 1e-4
    assert float(hf_error(torch.bfloat16).mean()) < 0.05  # bf16 rounding alone stays far below (same check, CPU)


@pytest.mark.parametrize("window_blocks", [1, 3])
def test_compiled_flex_attention_of_paired_heads_matches_sdpa(window_blocks: int) -> None:
    """Paired-head layers (issue 27) attend over the interleaved sequence: its block mask from the repeated document
    ids, compiled FlexAttention against SDPA with the dense mask, forward and backward."""
    B, H, T, D = 2, 2, 1024, 64
    docs = M.paired_docs((doc_tokens(B, T // 2, "cuda") == M.EOT_ID).cumsum(1))
    q, k, v = (torch.randn(B, H, T, D, device="cuda", requires_grad=True) for _ in range(3))
    dense = M.attention(q, k, v, M.dense_attention_mask(docs, window_blocks), 0.12)
    grads_dense = torch.autograd.grad(dense.square().sum(), (q, k, v))
    from torch.nn.attention.flex_attention import flex_attention

    flex = torch.compile(flex_attention)(q, k, v, block_mask=M.flex_block_mask(docs, window_blocks), scale=0.12)
    grads_flex = torch.autograd.grad(flex.square().sum(), (q, k, v))
    torch.testing.assert_close(flex, dense, atol=2e-3, rtol=2e-3)
    for a, b in zip(grads_flex, grads_dense):
        torch.testing.assert_close(a, b, atol=2e-2, rtol=2e-2)


def test_compiled_model_with_every_2026_switch_matches_eager_sdpa_on_gpu() -> None:
    """The model with every architecture switch of issue 27 compiled on CUDA (FlexAttention, paired masks, the
    bigram hash in int32 on the GPU, bf16 autocast) against the same weights run eagerly through SDPA."""
    from test_arch import ALL_ON, randomize_everything

    hp = tiny_hparams(**dict(ALL_ON, num_heads=4, head_dim=16), device="cuda", compile="on", dtype="bf16",
                      row_len=512, fp8_head="off")
    rt = M.init_runtime(hp)
    raw, forward = M.build_model(hp, rt)
    randomize_everything(raw)
    x = doc_tokens(2, 512, "cuda")
    y = torch.roll(x, -1, dims=1)
    with rt.autocast():
        compiled = forward(x, y, torch.tensor(2, dtype=torch.int32, device="cuda"))
    compiled.backward()
    grads = {n: p.grad.float().clone() for n, p in raw.named_parameters() if p.grad is not None}
    raw.zero_grad(set_to_none=True)
    raw.use_flex = False
    with rt.autocast():
        eager = raw(x, y, 2)
    eager.backward()
    assert abs(compiled.item() - eager.item()) < 1e-2 * eager.item()
    for name, p in raw.named_parameters():
        if p.grad is not None and p.grad.abs().sum() > 0:
            cos = F.cosine_similarity(grads[name].flatten(), p.grad.float().flatten(), dim=0)
            assert cos > 0.98, (name, cos.item())
