"""model.py's GPU-only paths: compiled FlexAttention vs the SDPA reference, the FP8 head, a compiled training step.

Skipped on machines without CUDA (CI has none); run them with `python -m pytest tests/test_cuda.py` on a GPU.
"""
from __future__ import annotations

import pytest
import torch

from conftest import tiny_hparams

import model as M

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


def test_compiled_training_steps_lower_the_loss() -> None:
    hp = tiny_hparams(device="cuda", compile="on", dtype="bf16")
    rt = M.init_runtime(hp)
    raw, forward = M.build_model(hp, rt)
    optimizers = M.setup_optimizers(raw, hp, compile_ns=True)
    x = doc_tokens(2, 128, "cuda")
    y = torch.roll(x, -1, dims=1)
    window = torch.tensor(1, dtype=torch.int32, device="cuda")
    losses = []
    for step in range(5):
        with rt.autocast():
            loss = forward(x, y, window)
        loss.backward()
        M.apply_schedules(optimizers, step, hp)
        for opt in optimizers:
            opt.step()
        raw.zero_grad(set_to_none=True)
        losses.append(loss.item())
    assert losses[-1] < losses[0]


def test_kv_cache_generation_matches_reference_on_gpu() -> None:
    """The cached decode path on CUDA (SDPA with boolean masks) picks the reference's greedy tokens."""
    hp = tiny_hparams(row_len=256)
    torch.manual_seed(0)
    model = M.GPT.from_hparams(hp).cuda().eval()
    torch.nn.init.normal_(model.lm_head.weight, std=0.02)
    prompt = doc_tokens(1, 300, "cpu")[0].tolist()
    kv = [s[0] for s in M.generate(model, prompt, window_blocks=2, max_new_tokens=40, stop_ids=())]
    ref = [s[0] for s in M.generate(model, prompt, window_blocks=2, max_new_tokens=40, stop_ids=(), use_cache=False)]
    assert kv == ref
