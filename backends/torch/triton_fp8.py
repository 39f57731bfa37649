"""FP8 (E4M3) on CUDA: activation quantization in Triton and the FP8 linear on the tensor cores.

before: `moec.fp8_linear(x, weight e4m3 [N, K], weight_scale f32[], input_scale)` ran its float32 reference on CUDA
(both operands dequantized to float32 per call).
after:  x is quantized once with its static scale (`quantize`: one Triton launch writing e4m3 codes, the rounding
of compiler/fp8.py: float32 division, saturation to ±448, round to nearest even) and multiplied on the FP8 tensor
cores by cuBLASLt (`torch._scaled_mm`, float32 accumulation, both per-tensor scales applied to the accumulator, the
result in x's dtype). The weight stays e4m3 in memory: 1 byte per element, half of bf16.

The fused MoE kernels (triton_moe.py, `QUANT == 3`) share `fp8_codes` for their intermediate activation.

Triton's CPU interpreter (seen with 3.9.0) mis-rounds float32 -> e4m3 casts whose mantissa carries into the exponent
(127.3 became 64), so under the interpreter `fp8_codes` rounds on the float32 bits first and the cast only sees
values on the e4m3 grid; compiled kernels use the hardware's round-to-nearest-even conversion.
"""

from __future__ import annotations

import torch

from backends.torch.triton_support import HAVE_TRITON as _HAVE_TRITON
from backends.torch.triton_support import device_reason, interpreting, pdl_launch, tl, triton, wait_for_producers
from compiler.fp8 import FP8_DTYPE

__all__ = ["ACTIVATION_DTYPES", "capability_reason", "linear", "linear_unsupported_reason", "quantize", "scale_tensor"]

ACTIVATION_DTYPES = (torch.bfloat16, torch.float16)


def capability_reason(device: torch.device) -> str | None:
    """FP8 tensor cores start with Ada / Hopper (sm89); the interpreter has none to lack."""
    if interpreting() or device.type != "cuda":
        return None
    major, minor = torch.cuda.get_device_capability(device)
    if (major, minor) < (8, 9):
        return f"sm{major}{minor} has no FP8 tensor cores (sm89 or newer)"
    return None


def linear_unsupported_reason(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
                              bias: torch.Tensor | None) -> str | None:
    """Why an `fp8_linear` cannot run on the FP8 tensor cores (None when it can): the dispatch's one rule."""
    if not x.is_cuda:
        return f"operands are on {x.device}, not CUDA"
    reason = device_reason(x, _HAVE_TRITON) or capability_reason(x.device)
    if reason is not None:
        return reason
    if x.dtype not in ACTIVATION_DTYPES:
        return f"activation dtype {x.dtype} is not among {ACTIVATION_DTYPES}"
    if weight.dtype != FP8_DTYPE or weight.dim() != 2 or weight_scale.numel() != 1:
        return f"weight {weight.dtype}{list(weight.shape)} is not one e4m3 matrix with one scale"
    if weight.stride(1) != 1 or weight.data_ptr() % 16:
        return f"weight strides {list(weight.stride())}: cuBLASLt takes a row-major, 16-byte aligned [N, K] weight"
    if weight.shape[0] % 16 or weight.shape[1] % 16:
        return f"weight {list(weight.shape)}: cuBLASLt's FP8 GEMM needs both dims divisible by 16"
    if bias is not None and bias.dtype != x.dtype:
        return f"bias {bias.dtype} differs from the activations' {x.dtype}"
    return None


if _HAVE_TRITON:

    @triton.jit
    def fp8_codes(v, scale, EMULATE: tl.constexpr):
        """float32 `v` -> e4m3 codes of v / scale (IEEE division, saturated to ±448 = compiler.fp8.FP8_MAX, round to
        nearest even)."""
        q = tl.clamp(tl.math.div_rn(v, scale), -448.0, 448.0, propagate_nan=tl.PropagateNan.ALL)  # NaN stays NaN
        if EMULATE:  # interpreter only: round to the e4m3 grid on the float32 bits (see the module docstring)
            bits = q.to(tl.uint32, bitcast=True)
            # Normal range: keep 3 mantissa bits, round half to even (a carry into the exponent is correct here).
            normal = ((bits + 0x7FFFF + ((bits >> 20) & 1)) & 0xFFF00000).to(tl.float32, bitcast=True)
            # Subnormals (|q| < 2^-6) are multiples of 2^-9: the 1.5 * 2^23 trick rounds half to even.
            subnormal = (tl.abs(q) * 512.0 + 12582912.0 - 12582912.0) / 512.0
            subnormal = tl.where(q < 0, -subnormal, subnormal)  # -0.0 stays negative, as the cast keeps the sign
            q = tl.where(tl.abs(q) < 0.015625, subnormal, normal)
            # The interpreter casts NaN to a finite code; e4m3's NaN is 0x7F (what torch and the GPU write).
            nan_code = tl.full(q.shape, 0x7F, tl.uint8).to(tl.float8e4nv, bitcast=True)
            codes = tl.where(q != q, nan_code, q.to(tl.float8e4nv))
        else:
            codes = q.to(tl.float8e4nv)
        return codes

    @triton.jit
    def _quantize_kernel(x_ptr, out_ptr, scale, numel, BLOCK: tl.constexpr, EMULATE: tl.constexpr,
                         USE_PDL: tl.constexpr = False):
        wait_for_producers(USE_PDL)
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        ok = offs < numel
        v = tl.load(x_ptr + offs, mask=ok, other=0.0).to(tl.float32)
        tl.store(out_ptr + offs, fp8_codes(v, scale, EMULATE), mask=ok)


def quantize(x: torch.Tensor, scale: float) -> torch.Tensor:
    """e4m3 codes of `x` under a static `scale`, exactly compiler/fp8.quantize's; one launch, no host sync."""
    if not _HAVE_TRITON:
        raise RuntimeError("fp8 quantize needs triton")
    if not scale > 0:
        raise ValueError(f"scale {scale} must be positive")
    x = x.contiguous()
    out = torch.empty(x.shape, dtype=FP8_DTYPE, device=x.device)
    numel = x.numel()
    if numel:
        block = 1024
        _quantize_kernel[(triton.cdiv(numel, block),)](x, out, float(scale), numel, BLOCK=block,
                                                       EMULATE=interpreting(), **pdl_launch(x), num_warps=4)
    return out


_SCALES: dict[tuple[float, torch.device], torch.Tensor] = {}


def scale_tensor(value: float, device: torch.device) -> torch.Tensor:
    """A float32 scalar tensor of `value` on `device`, made once: cuBLASLt takes its scales on the device, and a
    fresh host-to-device copy per call could not be captured in a CUDA graph."""
    key = (float(value), device)
    tensor = _SCALES.get(key)
    if tensor is None:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            # Made inside a capture, it would live in the graph's pool and be filled only on replay.
            raise RuntimeError(
                f"fp8 scale {value} is first used inside a CUDA-graph capture: run the step once before capturing"
            )
        tensor = _SCALES[key] = torch.full((), float(value), dtype=torch.float32, device=device)
    return tensor


def linear(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor, input_scale: float,
           bias: torch.Tensor | None = None) -> torch.Tensor:
    """`moec.fp8_linear` on the FP8 tensor cores: quantize x, one cuBLASLt FP8 GEMM, result in x's dtype."""
    reason = linear_unsupported_reason(x, weight, weight_scale, bias)
    if reason is not None:
        raise TypeError(reason)
    lead, k = x.shape[:-1], x.shape[-1]
    codes = quantize(x.reshape(-1, k), input_scale)
    # _scaled_mm takes the second operand column-major: the [N, K] row-major weight transposed is exactly that.
    out = torch._scaled_mm(
        codes, weight.t(), scale_a=scale_tensor(input_scale, x.device),
        scale_b=weight_scale.reshape(()).to(torch.float32), bias=bias, out_dtype=x.dtype,
    )
    return out.reshape(*lead, weight.shape[0])

