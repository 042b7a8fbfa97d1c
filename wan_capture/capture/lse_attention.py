"""The model's own attention output plus each query's log-sum-exp, from the kernel PyTorch's SDPA runs for it.

Sink statistics need every query's log-sum-exp over its keys; the attention kernel computes it anyway. On CUDA,
ComfyUI's attention puts cuDNN first among SDPA's backends, and ``aten._scaled_dot_product_cudnn_attention`` returns
the log-sum-exp beside the output. :class:`LseAttention` runs it in place of the model's call only where that is
safe: the first time it meets a (shape, dtype, device) it runs both and keeps the log-sum-exp only if the outputs
are **bit-identical**; otherwise (another backend, an earlier override such as SageAttention) the model's own call
runs and the statistics compute the log-sum-exp themselves. ``WAN_CAPTURE_LSE=off`` turns it off.
"""
from __future__ import annotations

import os
from typing import Callable, Dict, Optional, Tuple

import torch

Output = Tuple[torch.Tensor, Optional[torch.Tensor]]


def enabled() -> bool:
    return os.environ.get("WAN_CAPTURE_LSE", "on").lower() not in ("off", "0", "false", "no")


def cudnn_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """cuDNN attention of ``[B, H, L, D]`` tensors: the output and the log-sum-exp ``[B, H, Lq]`` (float32)."""
    res = torch.ops.aten._scaled_dot_product_cudnn_attention(q, k, v, None, True, 0.0, False, False)
    out, lse = res[0], res[1]
    return out, lse.reshape(q.shape[0], q.shape[1], q.shape[2]).float()


class LseAttention:
    """Attention with log-sum-exp for ``[B, L, heads*D]`` q/k/v (ComfyUI's layout), verified per signature."""

    def __init__(self):
        self.verified: Dict[tuple, bool] = {}

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int,
                 reference: Callable[[], torch.Tensor]) -> Output:
        """``(output, lse [B, heads, Lq] or None)``; the output always equals ``reference()`` bit for bit."""
        if not (enabled() and q.is_cuda and q.dim() == 3 and q.dtype in (torch.float16, torch.bfloat16)):
            return reference(), None
        sig = (tuple(q.shape), tuple(k.shape), tuple(v.shape), q.dtype, str(q.device), heads)
        ok = self.verified.get(sig)
        if ok is False:
            return reference(), None
        b, lq, inner = q.shape
        d = inner // heads
        split = lambda x: x.view(b, x.shape[1], heads, -1).transpose(1, 2)  # noqa: E731
        try:
            out4, lse = cudnn_attention(split(q), split(k), split(v))
        except (RuntimeError, NotImplementedError):  # no cuDNN attention for these inputs
            self.verified[sig] = False
            return reference(), None
        out = out4.transpose(1, 2).reshape(b, lq, heads * d)
        if ok is None:
            ref = reference()
            ok = self.verified[sig] = bool(torch.equal(ref, out))
            return ref, (lse if ok else None)
        return out, lse
