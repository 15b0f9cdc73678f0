"""The decoder's fused Triton ops (RMSNorm + residual, q/k norm + rotary, SiLU-and-mul) against
their plain-torch references, run under Triton's CPU interpreter on fresh random inputs."""
import pytest
import torch

from kvray import kernels
from kvray.kernels import reference


@pytest.fixture(autouse=True)
def _interpret(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")


def _rand(*shape, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g)


@pytest.mark.parametrize("d", [64, 96, 1024])
@pytest.mark.parametrize("with_residual", [False, True])
def test_rms_norm(d, with_residual):
    x, w = _rand(7, d, seed=d), 1 + 0.1 * _rand(d, seed=d + 1)
    res = _rand(7, d, seed=d + 2) if with_residual else None
    ref_res = res.clone() if with_residual else None
    expected = reference.rms_norm(x, w, 1e-6, ref_res)
    out_res = res.clone() if with_residual else None
    got = kernels.rms_norm(x, w, 1e-6, out_res)
    if with_residual:
        torch.testing.assert_close(got[0], expected[0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(out_res, ref_res, rtol=0, atol=0)  # the residual sum is exact
        assert not torch.equal(out_res, res)
    else:
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("qk_norm", [False, True])
@pytest.mark.parametrize("heads,kv_heads,d", [(4, 2, 16), (8, 1, 64), (2, 2, 128)])
def test_qk_norm_rope(qk_norm, heads, kv_heads, d):
    t = 9
    q, k = _rand(t, heads, d, seed=1), _rand(t, kv_heads, d, seed=2)
    pos = torch.tensor([0, 1, 2, 5, 17, 100, 511, 4000, 3])
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, d, 2).float() / d))
    qw = 1 + 0.1 * _rand(d, seed=3) if qk_norm else None
    kw = 1 + 0.1 * _rand(d, seed=4) if qk_norm else None
    q_ref, k_ref = q.clone(), k.clone()
    reference.qk_norm_rope(q_ref, k_ref, pos, inv_freq, qw, kw, 1e-6)
    # q and k as strided views of one fused qkv buffer, as the model passes them
    qkv = torch.cat([q.reshape(t, -1), k.reshape(t, -1), torch.full((t, kv_heads * d), float("nan"))], dim=1)
    qv, kv, _ = qkv.split([heads * d, kv_heads * d, kv_heads * d], dim=1)
    qv, kv = qv.view(t, heads, d), kv.view(t, kv_heads, d)
    kernels.qk_norm_rope(qv, kv, pos, inv_freq, qw, kw, 1e-6)
    torch.testing.assert_close(qv, q_ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(kv, k_ref, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(q_ref, q)  # the op really rotated


@pytest.mark.parametrize("n,i", [(1, 16), (5, 192), (3, 3000)])
def test_silu_and_mul(n, i):
    x = _rand(n, 2 * i, seed=i)
    torch.testing.assert_close(kernels.silu_and_mul(x), reference.silu_and_mul(x), rtol=1e-5, atol=1e-5)
