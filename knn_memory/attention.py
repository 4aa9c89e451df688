"""Memory attention: the one softmax over [local keys ; memory entries].

This is the only softmax of the project. Every attention layer of the model calls it; memory layers
pass their :class:`~knn_memory.backend.MemoryBackend`, the others pass none.

Numerics follow upstream LongLLaMA exactly:

* local scores ``q·k / sqrt(d)`` plus the additive causal/padding mask, memory scores ``q·k_mem / sqrt(d)``
  (``-inf`` for padding or empty slots), both in the activation dtype;
* each block clamped from below at ``max(finfo(dtype).min, -1e6)`` before concatenation;
* one softmax in float32 over the concatenation, cast back to the activation dtype, times
  ``[V_local ; V_mem]``.

For top-k hits the memory block holds the k retrieved entries of each query instead of all of them;
that is the only difference between dense and kNN memory attention.

A memory split over processes (``memory.SHARDED``) holds only part of the entries here. The same softmax
is then computed as mergeable partial states, the way split-K / flash-decoding merges attention over a
split KV cache: for the local window and for this process's part of the memory, the running max ``m``,
the sum of exponentials ``l`` and the unnormalised output ``o``. One max over the processes
(:meth:`~knn_memory.MemoryBackend.merge_max`) of the memory's ``m`` and one sum (``merge_sum``) of its
``(o, l)``, rescaled to the common max, give the softmax over every entry; the local window, the same on
every process, is added once after the sum. The scores are the same clamped scores as above; the
exponentials and sums run in float32.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

from knn_memory.backend import MemoryBackend
from knn_memory.hits import MemoryHits
from knn_memory.validate import check_grouping

CLAMP = -1e6


def _check(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor | None) -> None:
    for name, t in (("query", query), ("local_keys", keys), ("local_values", values)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor [B, H, n, d], got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name} must be 4-D [B, H, n, d], got shape {list(t.shape)}")
        if not t.is_floating_point():
            raise TypeError(f"{name} must be floating point, got dtype {t.dtype}")
        if t.device != query.device:
            raise ValueError(f"{name} is on {t.device}, but query is on {query.device}")
    B, H, q, d = query.shape
    if keys.shape[:2] != (B, H) or keys.shape[3] != d or keys.shape != values.shape:
        raise ValueError(
            f"local_keys {list(keys.shape)} and local_values {list(values.shape)} must be [B={B}, H={H}, n, d={d}]"
        )
    if keys.dtype != query.dtype or values.dtype != query.dtype:
        raise TypeError(
            f"query, local_keys, local_values must share a dtype, got {query.dtype}, {keys.dtype}, {values.dtype}"
        )
    # NaN or inf in any of them would turn whole rows of the output into NaN without a word; one
    # reduction per tensor and a single host sync (this runs once per layer per window): a float64 sum
    # is non-finite exactly when a term is (float32 / 16-bit values cannot overflow it)
    tensors = (("query", query), ("local_keys", keys), ("local_values", values))
    # (float64 input could overflow it: there, the count of non-finite values, which must be 0)
    wide = [t.dtype == torch.float64 for _, t in tensors]
    sums = torch.stack(
        [
            (~t.isfinite()).sum(dtype=torch.float64) if w else t.sum(dtype=torch.float64)
            for (_, t), w in zip(tensors, wide, strict=True)
        ]
    )
    finite = [v == 0.0 if w else math.isfinite(v) for v, w in zip(sums.tolist(), wide, strict=True)]
    if not all(finite):
        bad = [name for (name, _), ok in zip(tensors, finite, strict=True) if not ok]
        raise ValueError(f"{', '.join(bad)} contains NaN or inf (expected finite values)")
    if mask is not None:
        if not isinstance(mask, torch.Tensor):
            raise TypeError(f"local_mask must be an additive float torch.Tensor, got {type(mask).__name__}")
        if not mask.is_floating_point():
            raise TypeError(
                f"local_mask must be an additive float mask (0 = visible, finfo.min = masked), got dtype {mask.dtype}"
            )
        if mask.device != query.device:
            raise ValueError(f"local_mask is on {mask.device}, but query is on {query.device}")
        n = keys.shape[2]
        if (
            mask.dim() != 4
            or mask.shape[0] not in (1, B)
            or mask.shape[1] not in (1, H)
            or mask.shape[2:] != (q, n)
        ):
            raise ValueError(f"local_mask must be [B={B}, 1 or H, q={q}, n={n}], got {list(mask.shape)}")


def _check_grouping(grouping: tuple[int, int] | None, H: int, q: int) -> tuple[int, int]:
    grouping = check_grouping(grouping, "grouping")
    return (H, max(q, 1)) if grouping is None else grouping


def _joint_scores_in_place(
    scores: torch.Tensor, hits: MemoryHits, inv_scale: float, floor: float
) -> torch.Tensor:
    """``cat([scores, clamp(hits.scores / inv_scale)])`` [B, h, q, n + k] built in one buffer (no grad).

    The same numbers as the autograd path (the division and clamp run in ``scores.dtype``), but the
    memory scores are written straight into the joint buffer and the search's own [B, h, q, k] tensor
    is released before the softmax: two score-sized tensors alive at once instead of four.
    ``hits`` gives up its scores (see :meth:`MemoryHits.take_scores`).
    """
    n = scores.shape[-1]
    raw = hits.take_scores()  # the caller's frame holds ``hits`` until we return
    joint = torch.empty(*scores.shape[:-1], n + raw.shape[-1], dtype=scores.dtype, device=scores.device)
    joint[..., :n] = scores
    mem = joint[..., n:]
    mem.copy_(raw)
    del raw
    mem.div_(inv_scale).clamp_min_(floor)
    return joint


def _probs(scores: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The attention weights of ``scores`` [..., n]: softmax over the last dim in float32, cast to
    ``dtype`` (the activations'; the scores may be wider where an additive mask was). Every full softmax
    over [local ; memory] goes through here; a sharded memory's partial states are in
    :func:`_merged_partials`."""
    return F.softmax(scores, dim=-1, dtype=torch.float32).to(dtype)


def _merged_partials(
    query: torch.Tensor,
    scores: torch.Tensor,
    values: torch.Tensor,
    memory: MemoryBackend,
    top_k: int | None,
    heads: slice,
    inv_scale: float,
    floor: float,
) -> torch.Tensor:
    """Attention over [local ; memory] as partial states merged over the memory's processes.

    Args:
        query: [B, h, q, d] the block's queries; scores: [B, h, q, n] its clamped local scores;
        values: [B, h, n, d] the local values.

    Returns:
        [B, h, q, d] in ``query.dtype``; equal (float32: to rounding) to the one softmax of the
        unsharded path over the union of every process's memory entries.
    """
    hits = memory.search(query.to(memory.device), k=top_k, heads=heads)
    mem = torch.clamp_min(hits.scores.to(query.device, query.dtype) / inv_scale, floor).float()
    local = scores.float()
    empty = torch.full(local.shape[:-1], -math.inf, dtype=torch.float32, device=local.device)
    top = local.amax(-1) if local.shape[-1] else empty  # [B, h, q]
    mem_max = mem.amax(-1) if mem.shape[-1] else empty
    top = torch.maximum(top, memory.merge_max(mem_max.to(memory.device)).to(query.device))
    p_mem = torch.exp(mem - top.unsqueeze(-1))
    del mem
    part = torch.cat([hits.weighted_values(p_mem), p_mem.sum(-1, keepdim=True)], dim=-1)  # [B, h, q, d + 1]
    part = memory.merge_sum(part.to(memory.device)).to(query.device)
    p_local = torch.exp(local - top.unsqueeze(-1))
    out = torch.matmul(p_local, values.float()) + part[..., :-1]
    total = p_local.sum(-1, keepdim=True) + part[..., -1:]
    return (out / total).to(query.dtype)


def memory_attention(
    query: torch.Tensor,
    local_keys: torch.Tensor,
    local_values: torch.Tensor,
    local_mask: torch.Tensor | None = None,
    memory: MemoryBackend | None = None,
    *,
    grouping: tuple[int, int] | None = None,
    use_sdpa: bool = False,
    top_k: int | None = None,
) -> torch.Tensor:
    """Attention of ``query`` over its local keys and, if given, a memory.

    Args:
        query: [B, H, q, d], rotated by local position when positional encodings are on.
        local_keys: [B, H, n, d] (rotated likewise).
        local_values: [B, H, n, d].
        local_mask: additive float mask [B, 1 or H, q, n] (0 = visible, ``finfo.min`` = masked), or None.
        memory: the layer's memory backend; None or empty means local attention only.
        grouping: ``(h, q)``: compute in blocks of at most h heads x q queries (upstream's
            ``mem_attention_grouping``); bounds the scores held at once to ``B*h*q*(n+M)``.
        use_sdpa: use ``F.scaled_dot_product_attention`` when there is no memory (upstream's
            ``torch_attention``); with a memory the explicit path runs (equal to 1e-5 on valid rows).
        top_k: entries per query for a top-k backend (default: the backend's ``top_k``).

    Returns:
        [B, H, q, d] in ``query.dtype``.
    """
    _check(query, local_keys, local_values, local_mask)
    B, H, q, d = query.shape
    if memory is not None:
        if not isinstance(memory, MemoryBackend):
            raise TypeError(f"memory must be a MemoryBackend or None, got {type(memory).__name__}")
        if (memory.batch_size, memory.num_heads, memory.head_dim) != (B, H, d):
            raise ValueError(
                f"memory holds [B={memory.batch_size}, H={memory.num_heads}, d={memory.head_dim}] "
                f"but query has shape {list(query.shape)}"
            )
    if q == 0 or H == 0:
        return query.new_empty(query.shape)
    use_memory = memory is not None and not memory.is_empty
    if use_sdpa and not use_memory:
        return F.scaled_dot_product_attention(query, local_keys, local_values, attn_mask=local_mask)
    gh, gq = _check_grouping(grouping, H, q)
    dtype = query.dtype
    floor = max(torch.finfo(dtype).min, CLAMP)
    inv_scale = math.sqrt(d)
    n = local_keys.shape[2]
    out_h = []
    for h0 in range(0, H, gh):
        hs = slice(h0, min(h0 + gh, H))
        # contiguous operands: matmul picks its kernel from the strides, and a one-row view of the
        # projections' [B, n, H, d] layout takes another kernel (other rounding) than a batch of rows,
        # so without the copies a row's scores would depend on the batch around it
        keys_t = local_keys[:, hs].contiguous().transpose(-1, -2)
        out_q = []
        for q0 in range(0, q, gq):
            qs = slice(q0, min(q0 + gq, q))
            qg = query[:, hs, qs].contiguous()
            scores = torch.matmul(qg, keys_t) / inv_scale
            if local_mask is not None:
                m = local_mask[:, :, qs] if local_mask.shape[1] == 1 else local_mask[:, hs, qs]
                scores = scores + m
            scores = torch.clamp_min(scores, floor)
            if use_memory and memory.SHARDED:
                out = _merged_partials(qg, scores, local_values[:, hs], memory, top_k, hs, inv_scale, floor)
            elif use_memory:
                # the memory may live on another device (mem_device): search there, attend here
                hits = memory.search_for_attention(qg.to(memory.device), k=top_k, heads=hs)
                if torch.is_grad_enabled():
                    mem_scores = torch.clamp_min(hits.scores.to(query.device, dtype) / inv_scale, floor)
                    joint = torch.cat([scores, mem_scores], dim=-1)
                else:
                    joint = _joint_scores_in_place(scores, hits, inv_scale, floor)
                probs = _probs(joint, dtype)
                del joint
                out = torch.matmul(probs[..., :n], local_values[:, hs]) + hits.weighted_values(probs[..., n:])
            else:
                probs = _probs(scores, dtype)
                out = torch.matmul(probs, local_values[:, hs])
            out_q.append(out)
        out_h.append(out_q[0] if len(out_q) == 1 else torch.cat(out_q, dim=-2))
    return out_h[0] if len(out_h) == 1 else torch.cat(out_h, dim=1)


def memory_attention_windows(
    query: torch.Tensor,
    local_keys: torch.Tensor,
    local_values: torch.Tensor,
    local_mask: torch.Tensor | None,
    memory: MemoryBackend,
    *,
    windows: int,
    after_search: Callable[[int], None] | None = None,
    grouping: tuple[int, int] | None = None,
    use_sdpa: bool = False,
    top_k: int | None = None,
) -> torch.Tensor:
    """:func:`memory_attention` of G consecutive windows stacked along the batch, each attending to the
    memory as the windows before it left it.

    Window g searches ``memory``, then ``after_search(g)`` runs (the caller adds window g's keys and
    values there) before window g + 1 searches. The result is that of G calls of
    :func:`memory_attention`, one per window, each followed by ``after_search``, bit for bit.

    Only the searches (and ``after_search``) need that order. For a top-k memory with one block of
    heads and queries (``grouping`` None or covering ``[H, q]``), not sharded, without autograd,
    everything else runs once for the G windows instead of once per window: the local scores, the
    joint buffer's scaling and clamp, the softmax and the local values' product (the embedded model's
    64-token windows spent ~0.9 ms per window and memory layer in those small operations). Otherwise
    (dense memory, grouping, sharding, autograd) the windows run one by one.

    Args:
        query: [G * B, H, q, d], window-major: rows ``g * B`` to ``(g + 1) * B - 1`` are window g.
        local_keys, local_values: [G * B, H, n, d], each window's own (rotated keys, as
            :func:`memory_attention` takes them).
        local_mask: additive float mask [G * B, 1 or H, q, n], or None.
        memory: the memory backend, of batch size B.
        windows: G, which divides the batch.
        after_search: called with g after window g's search, or None.
        grouping, use_sdpa, top_k: as for :func:`memory_attention`.

    Returns:
        [G * B, H, q, d] in ``query.dtype``.
    """
    if not isinstance(windows, int) or isinstance(windows, bool) or windows < 1:
        raise ValueError(f"windows must be a positive int, got {windows!r}")
    if not isinstance(query, torch.Tensor) or query.dim() != 4 or query.shape[0] % windows:
        shape = list(query.shape) if isinstance(query, torch.Tensor) else type(query).__name__
        raise ValueError(f"query must be [G * B, H, q, d] with G = windows = {windows}, got {shape}")
    if not isinstance(memory, MemoryBackend):
        raise TypeError(f"memory must be a MemoryBackend, got {type(memory).__name__}")
    _check(query, local_keys, local_values, local_mask)
    rows = query.shape[0] // windows
    H, q, d = query.shape[1:]
    if (memory.batch_size, memory.num_heads, memory.head_dim) != (rows, H, d):
        raise ValueError(
            f"memory holds [B={memory.batch_size}, H={memory.num_heads}, d={memory.head_dim}] "
            f"but each window of query {list(query.shape)} is [B={rows}, H={H}, q={q}, d={d}]"
        )
    gh, gq = _check_grouping(grouping, H, q)
    k = memory.top_k if top_k is None else top_k

    def one(g: int) -> torch.Tensor:
        r = slice(g * rows, (g + 1) * rows)
        mask = None if local_mask is None else local_mask[r] if local_mask.shape[0] > 1 else local_mask
        out = memory_attention(
            query[r],
            local_keys[r],
            local_values[r],
            mask,
            memory,
            grouping=grouping,
            use_sdpa=use_sdpa,
            top_k=top_k,
        )
        if after_search is not None:
            after_search(g)
        return out

    together = (
        k is not None
        and not memory.SHARDED
        and not torch.is_grad_enabled()
        and gh >= H
        and gq >= q
        and q > 0
        and H > 0
    )
    outs = []
    first = 0
    while first < windows and (not together or memory.is_empty):  # no hits yet: local attention alone
        outs.append(one(first))
        first += 1
    if first < windows:
        outs.append(
            _windows_together(
                query, local_keys, local_values, local_mask, memory, first, windows, rows, k, after_search
            )
        )
    return outs[0] if len(outs) == 1 else torch.cat(outs)


def _windows_together(
    query: torch.Tensor,
    local_keys: torch.Tensor,
    local_values: torch.Tensor,
    local_mask: torch.Tensor | None,
    memory: MemoryBackend,
    first: int,
    windows: int,
    rows: int,
    k: int,
    after_search: Callable[[int], None] | None,
) -> torch.Tensor:
    """Windows ``first`` .. G - 1 of :func:`memory_attention_windows` (the memory holds entries), their
    local scores, softmax and products in one operation each; -> [(G - first) * B, H, q, d]."""
    B, d = query.shape[0], query.shape[3]
    r = slice(first * rows, B)
    dtype = query.dtype
    floor = max(torch.finfo(dtype).min, CLAMP)
    inv_scale = math.sqrt(d)
    n = local_keys.shape[2]
    qg = query[r].contiguous()  # contiguous operands: see memory_attention
    scores = torch.matmul(qg, local_keys[r].contiguous().transpose(-1, -2)) / inv_scale
    if local_mask is not None:
        scores = scores + (local_mask[r] if local_mask.shape[0] > 1 else local_mask)
    scores = torch.clamp_min(scores, floor)
    found = []
    for g in range(first, windows):
        w = slice((g - first) * rows, (g - first + 1) * rows)
        found.append(memory.search_for_attention(qg[w].to(memory.device), k=k))
        if after_search is not None:
            after_search(g)
    raw = [hits.take_scores() for hits in found]
    width = n + raw[0].shape[-1]
    joint = torch.empty(*scores.shape[:-1], width, dtype=dtype, device=query.device)
    joint[..., :n] = scores
    del scores
    mem = joint[..., n:]
    for i, part in enumerate(raw):
        mem[i * rows : (i + 1) * rows].copy_(part)
    del raw
    mem.div_(inv_scale).clamp_min_(floor)
    probs = _probs(joint, dtype)
    del joint, mem
    local = torch.matmul(probs[..., :n], local_values[r])
    weighted = [
        hits.weighted_values(probs[i * rows : (i + 1) * rows, ..., n:]) for i, hits in enumerate(found)
    ]
    return local + (weighted[0] if len(weighted) == 1 else torch.cat(weighted))
