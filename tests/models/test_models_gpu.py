"""GPU checks of models/ (skipped without CUDA): the fast paths equal the CPU reference paths."""
from __future__ import annotations

import pytest
import torch

from pararnn_lm.models import ParaRNNLMForCausalLM, config_for

pytestmark = pytest.mark.gpu
ARCHS = ("paragru", "paralstm", "mamba2", "attention")


def _pair(arch: str, **kw):
    torch.manual_seed(0)
    cpu = ParaRNNLMForCausalLM(config_for(arch, "tiny", rnn_mode="newton_torch", ssd_backend="torch", **kw)).eval()
    gpu = ParaRNNLMForCausalLM(config_for(arch, "tiny", rnn_mode="auto", ssd_backend="auto", **kw)).eval()
    gpu.load_state_dict(cpu.state_dict())
    return cpu, gpu.cuda()


@pytest.mark.parametrize("arch", ARCHS)
def test_cuda_fast_paths_match_cpu_reference(arch):
    cpu, gpu = _pair(arch)
    pos = torch.arange(96).repeat(2, 1)
    pos[0, 40:] -= 40  # a packed document boundary
    ids = torch.randint(0, cpu.config.vocab_size, (2, 96))
    with torch.no_grad():
        ref = cpu(ids, position_ids=pos).logits
        got = gpu(ids.cuda(), position_ids=pos.cuda()).logits.float().cpu()
    torch.testing.assert_close(got, ref, atol=5e-3, rtol=5e-3)


@pytest.mark.parametrize("arch", ARCHS)
def test_cuda_bf16_train_step_and_decode(arch):
    _, gpu = _pair(arch)
    gpu.train()
    ids = torch.randint(0, gpu.config.vocab_size, (4, 128), device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = gpu(ids, labels=ids).loss
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in gpu.parameters())
    gpu.eval()
    with torch.no_grad():
        full = gpu(ids[:, :24], use_cache=False).logits
        out = gpu(ids[:, :16], use_cache=True)
        pieces, cache = [out.logits], out.state
        for t in range(16, 24):
            out = gpu(ids[:, t : t + 1], cache=cache, use_cache=True)
            pieces.append(out.logits)
        torch.testing.assert_close(torch.cat(pieces, 1), full, atol=2e-3, rtol=2e-3)
        gen = gpu.generate(ids[:1, :8], max_new_tokens=8, do_sample=False, pad_token_id=0)
    assert gen.shape == (1, 16)
