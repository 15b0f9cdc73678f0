"""The FP8 GEMM entry points and their dispatch: dynamic e4m3 activation quantization, the
per-row-scaled GEMM (cuBLASLt through ``torch._scaled_mm``) and the block-scaled GEMM (Triton).
Same routing as the other kernels: CUDA tensors run the GPU kernels, CPU tensors the plain-torch
reference unless ``TRITON_INTERPRET=1``."""
from __future__ import annotations

import torch

from kvray.kernels import dispatch
from kvray.kernels import reference
from kvray.kernels._checks import check_fp8_gemm


def quant_fp8(x: torch.Tensor, group_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic e4m3 quantization of x [M, K] (row-major): (x_fp8, scale [M, G] float32), one scale
    per row (``group_size=None``) or per ``group_size`` elements of a row; ``scale = amax / 448``."""
    if x.dim() != 2 or not x.is_floating_point() or x.stride(1) != 1:
        raise ValueError(f"quant_fp8 takes a row-major float [M, K] tensor, got {x.dtype} {tuple(x.shape)}")
    use_triton, interpret = dispatch.route(x.device)
    if not use_triton:
        return reference.quant_fp8(x, group_size)
    return dispatch.triton_impl(interpret).fp8.quant_fp8_triton(x, group_size)


def fp8_scaled_mm(a: torch.Tensor, a_scale: torch.Tensor, b: torch.Tensor, b_scale: torch.Tensor,
                  out_dtype: torch.dtype, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``(a * a_scale) @ (b * b_scale)^T (+ bias)``: a [M, K] e4m3 with per-row a_scale [M, 1], b
    [N, K] e4m3 (a weight as stored) with per-row b_scale [N] float32. On CUDA: cuBLASLt through
    ``torch._scaled_mm`` (row-wise scales, bfloat16 product; K and N multiples of 16, else the
    reference), elsewhere the reference."""
    check_fp8_gemm(a, a_scale, b, b_scale.view(-1, 1), 1, (b.shape[0], 1))
    if a.device.type != "cuda" or dispatch.get_attention_backend() == "reference" or a.shape[1] % 16 or b.shape[0] % 16:
        return reference.fp8_scaled_mm(a, a_scale, b, b_scale, out_dtype, bias)
    # cuBLASLt's row-wise scaling writes bfloat16 only
    out = torch._scaled_mm(a, b.t(), scale_a=a_scale, scale_b=b_scale.view(1, -1), out_dtype=torch.bfloat16)
    if bias is not None:
        out = out.add_(bias) if bias.dtype == torch.bfloat16 else out.float().add_(bias)
    return out.to(out_dtype)


def fp8_block_gemm(a: torch.Tensor, a_scale: torch.Tensor, b: torch.Tensor, b_scale: torch.Tensor,
                   block: tuple[int, int], out_dtype: torch.dtype) -> torch.Tensor:
    """``(a * a_scale) @ (b * b_scale)^T``: a [M, K] e4m3 with a_scale [M, cdiv(K, block[1])], b
    [N, K] e4m3 with one scale per ``block`` = (rows, columns) tile, b_scale [cdiv(N, block[0]),
    cdiv(K, block[1])] float32 (the layout of block-quantized checkpoints' ``weight_scale_inv``)."""
    bn, bk = int(block[0]), int(block[1])
    k, n = a.shape[1], b.shape[0]
    check_fp8_gemm(a, a_scale, b, b_scale, -(-k // bk), (-(-n // bn), -(-k // bk)))
    use_triton, interpret = dispatch.route(a.device)
    if not use_triton:
        return reference.fp8_block_gemm(a, a_scale, b, b_scale, (bn, bk), out_dtype)
    if bk not in (32, 64, 128, 256):
        raise ValueError(f"the Triton block-FP8 GEMM needs a K block of 32, 64, 128 or 256, got {bk}")
    return dispatch.triton_impl(interpret).fp8.fp8_block_gemm_triton(a, a_scale, b, b_scale, (bn, bk), out_dtype)
