"""Rotary position embeddings (RoPE), LLaMA style, as LongLLaMA uses them.

``inv_freq[i] = theta^(-2i/d)``; the angle of position p is ``p * inv_freq`` repeated twice along the head
dimension (``cat(freqs, freqs)``), and rotation is ``x * cos + rotate_half(x) * sin`` with the half-split
``rotate_half``. LongLLaMA rotates by positions *relative to the oldest key of the local window*, recomputed
on every call; memory keys are never rotated (they sit at position 0).

Nothing here is a parameter or a buffer: the table is rebuilt from the config when needed, so a checkpoint's
stray ``rotary_emb.inv_freq`` tensors are irrelevant and ``from_pretrained`` cannot leave stale values.
"""

from __future__ import annotations

import torch

# Longest table kept (positions); longer local windows compute their angles on each call.
TABLE_LIMIT = 65536


def inverse_frequencies(head_dim: int, theta: float, device: torch.device | None = None) -> torch.Tensor:
    """``theta^(-2i/head_dim)`` for i in [0, head_dim/2), float32 [head_dim/2]."""
    exponents = torch.arange(0, head_dim, 2, device=device).float() / head_dim
    return 1.0 / (theta**exponents)


class RotaryTable:
    """cos/sin of every position in ``[0, length)``, float32 ``[length, head_dim]``, grown on demand.

    The table is computed once per device for at least ``min_length`` positions (the window length, as
    upstream's cache) and regrown when a longer local window needs it.
    """

    def __init__(self, head_dim: int, theta: float, min_length: int) -> None:
        self.head_dim = head_dim
        self.theta = theta
        self.min_length = min_length
        self._cos: torch.Tensor | None = None
        self._sin: torch.Tensor | None = None

    def _build(self, length: int, device: torch.device) -> None:
        inv_freq = inverse_frequencies(self.head_dim, self.theta, device)  # [d/2]
        t = torch.arange(length, device=device, dtype=inv_freq.dtype)  # [length]
        freqs = torch.einsum("i,j->ij", t, inv_freq)  # [length, d/2]
        angles = torch.cat((freqs, freqs), dim=-1)  # [length, d]
        self._cos, self._sin = angles.cos(), angles.sin()

    def lookup(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin at ``positions`` (int64 [B, n], each >= 0) -> two [B, 1, n, d] in ``dtype``.

        Positions far beyond the window (more than ``TABLE_LIMIT`` and 4x the window) are computed
        directly instead of growing the table to that length.
        """
        needed = max(self.min_length, int(positions.max()) + 1 if positions.numel() else 0)
        if needed > max(TABLE_LIMIT, 4 * self.min_length):
            inv_freq = inverse_frequencies(self.head_dim, self.theta, positions.device)  # [d/2]
            freqs = positions.to(inv_freq.dtype).unsqueeze(-1) * inv_freq  # [B, n, d/2]
            angles = torch.cat((freqs, freqs), dim=-1)  # [B, n, d]
            return angles.cos().to(dtype).unsqueeze(1), angles.sin().to(dtype).unsqueeze(1)
        if self._cos is None or self._cos.shape[0] < needed or self._cos.device != positions.device:
            self._build(needed, positions.device)
        cos = self._cos.to(dtype)[positions].unsqueeze(1)  # [B, 1, n, d]
        sin = self._sin.to(dtype)[positions].unsqueeze(1)
        return cos, sin


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """[x1, x2] -> [-x2, x1] along the last dimension (halves, not interleaved pairs)."""
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` [B, H, n, d] by the angles whose cos/sin are [B, 1, n, d]."""
    return x * cos + rotate_half(x) * sin


def relative_positions(position_ids: torch.Tensor) -> torch.Tensor:
    """Positions of a local window relative to its oldest key: ``pos - min(pos)`` per row, [B, n] int64."""
    return position_ids - position_ids.min(dim=-1, keepdim=True).values
