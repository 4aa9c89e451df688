"""How LongLLaMA splits one call's input into context windows (upstream README's "m-2 / m-1 / m" rule).

With ``n`` input tokens, window length ``W`` (``max_position_embeddings``) and ``L`` (``last_context_length``):

* the first ``max(n - L, 0)`` tokens go, in order, through chunks of ``W`` tokens (the last of them holds
  the remainder); they end up in memory;
* the last ``min(n, L)`` tokens form the final window, which stays in the local cache (``use_cache=True``).

If ``n <= L`` the input is a single window. Only the current call's input counts: an existing local cache
does not change the split. ``L > W`` is accepted, as upstream does: the final window is then
longer than a window (a warning says so when that happens) and the local cache exceeds its capacity until the
next call flushes it.
"""

from __future__ import annotations

import warnings


def split_windows(input_length: int, window_length: int, last_context_length: int) -> list[tuple[int, int]]:
    """Token spans ``[begin, end)`` of the windows of one input, in order; the last span is the final window.

    Args:
        input_length: n, the number of tokens in this call (>= 0).
        window_length: W, the length of the chunks the prefix is cut into (> 0).
        last_context_length: L, the number of last tokens kept out of memory (> 0).

    Returns:
        ``[(0, W), (W, 2W), ..., (kW, n - L), (n - L, n)]``, or ``[(0, n)]`` when ``n <= L``.

    Raises:
        ValueError: a negative ``input_length`` or a non-positive ``window_length`` / ``last_context_length``.
    """
    for name, value, low in (
        ("input_length", input_length, 0),
        ("window_length", window_length, 1),
        ("last_context_length", last_context_length, 1),
    ):
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    if min(input_length, last_context_length) > window_length:
        warnings.warn(
            f"last_context_length ({last_context_length}) is larger than the window ({window_length}): the final "
            f"window has {min(input_length, last_context_length)} tokens and the local cache exceeds its capacity "
            "until the next call flushes it (accepted, as upstream does)",
            UserWarning,
            stacklevel=2,
        )
    prefix_length = max(input_length - last_context_length, 0)
    spans = [
        (begin, min(begin + window_length, prefix_length)) for begin in range(0, prefix_length, window_length)
    ]
    spans.append((prefix_length, input_length))
    return spans
