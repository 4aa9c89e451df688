"""How LongLLaMA splits one call's input into context windows (upstream README's "m-2 / m-1 / m" rule).

With ``n`` input tokens, window length ``W`` (``max_position_embeddings``) and ``L`` (``last_context_length``):

* the first ``max(n - L, 0)`` tokens (the prefix) go, in order, through chunks of at most ``W`` tokens;
  they end up in memory;
* the last ``min(n, L)`` tokens form the final window, which stays in the local cache (``use_cache=True``).

The alignment (``window_alignment`` in the config) says where the prefix's chunk boundaries lie:

* ``"start"`` (upstream): at multiples of ``W`` from the input's start; the last prefix chunk holds the
  remainder. Left padding therefore moves every boundary relative to the real tokens.
* ``"end"``: at multiples of ``W`` counted back from the end of the prefix (so from the input's end, past
  the final window); the first prefix chunk holds the remainder. Left padding never moves a boundary
  relative to the real tokens, but appending tokens moves all of them.

If ``n <= L`` the input is a single window. Only the current call's input counts: an existing local cache
does not change the split. ``L > W`` is accepted, as upstream does: the final window is then
longer than a window (a warning says so when that happens) and the local cache exceeds its capacity until the
next call flushes it.
"""

from __future__ import annotations

import itertools
import warnings

from knn_memory.validate import INT64_MAX, check_int

WINDOW_ALIGNMENTS = ("start", "end")


def split_windows(
    input_length: int, window_length: int, last_context_length: int, alignment: str = "start"
) -> list[tuple[int, int]]:
    """Token spans ``[begin, end)`` of the windows of one input, in order; the last span is the final window.

    Args:
        input_length: n, the number of tokens in this call (>= 0).
        window_length: W, the length of the chunks the prefix is cut into (> 0).
        last_context_length: L, the number of last tokens kept out of memory (> 0).
        alignment: ``"start"`` (upstream) cuts the prefix ``[0, n - L)`` into chunks of W from its start,
            ``"end"`` from its end (see the module docstring).

    Returns:
        With P = n - L and r = P mod W, when ``n > L``:
        ``"start"``: ``[(0, W), (W, 2W), ..., (P - r, P), (P, n)]``;
        ``"end"``: ``[(0, r), (r, r + W), ..., (P - W, P), (P, n)]``;
        (no empty span: the chunk holding r is left out when r = 0). ``[(0, n)]`` when ``n <= L``.

    Raises:
        ValueError: a negative ``input_length``, a non-positive ``window_length`` / ``last_context_length``,
            or an ``alignment`` other than ``"start"`` / ``"end"``.
    """
    for name, value, low in (
        ("input_length", input_length, 0),
        ("window_length", window_length, 1),
        ("last_context_length", last_context_length, 1),
    ):
        check_int(value, name, low, INT64_MAX)
    if alignment not in WINDOW_ALIGNMENTS:
        raise ValueError(f"alignment must be one of {list(WINDOW_ALIGNMENTS)}, got {alignment!r}")
    if min(input_length, last_context_length) > window_length:
        warnings.warn(
            f"last_context_length ({last_context_length}) is larger than the window ({window_length}): the final "
            f"window has {min(input_length, last_context_length)} tokens and the local cache exceeds its capacity "
            "until the next call flushes it (accepted, as upstream does)",
            UserWarning,
            stacklevel=2,
        )
    prefix_length = max(input_length - last_context_length, 0)
    # prefix boundaries lie at offset + k*W: from the start (offset 0) or counted back from the prefix's end
    offset = 0 if alignment == "start" else prefix_length % window_length
    boundaries = sorted({0, prefix_length, *range(offset, prefix_length, window_length)})
    spans = list(itertools.pairwise(boundaries))
    spans.append((prefix_length, input_length))
    return spans
