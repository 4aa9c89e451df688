"""The window-splitting rule (upstream README's m-2 / m-1 / m rule)."""

from __future__ import annotations

import itertools
import warnings

import pytest
from hypothesis import given
from hypothesis import strategies as st

from longllama import split_windows


def test_short_input_is_one_window():
    assert split_windows(5, 16, 8) == [(0, 5)]
    assert split_windows(8, 16, 8) == [(0, 8)]


def test_prefix_in_full_windows_then_remainder_then_last_context():
    # 100 tokens, W=32, L=12: 88 go to memory as 32 + 32 + 24, the last 12 stay local
    assert split_windows(100, 32, 12) == [(0, 32), (32, 64), (64, 88), (88, 100)]
    # the prefix is an exact multiple of W: no remainder window
    assert split_windows(40, 16, 8) == [(0, 16), (16, 32), (32, 40)]
    # the prefix is shorter than a window
    assert split_windows(10, 16, 8) == [(0, 2), (2, 10)]


def test_last_context_longer_than_window_warns_when_it_matters():
    with pytest.warns(UserWarning, match="last_context_length"):
        spans = split_windows(100, 32, 40)
    assert spans == [(0, 32), (32, 60), (60, 100)]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        # L > W but the input is no longer than the window: nothing unusual happens
        assert split_windows(12, 16, 40) == [(0, 12)]


@pytest.mark.parametrize(
    ("args", "name"),
    [((-1, 16, 8), "input_length"), ((10, 0, 8), "window_length"), ((10, 16, 0), "last_context_length")],
)
def test_bad_arguments(args, name):
    with pytest.raises(ValueError, match=name):
        split_windows(*args)


@given(
    n=st.integers(1, 300),
    window=st.integers(1, 40),
    last=st.integers(1, 40),
)
def test_split_properties(n, window, last):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        spans = split_windows(n, window, last)
    # contiguous cover of [0, n), non-empty spans
    assert spans[0][0] == 0 and spans[-1][1] == n
    assert all(b == a_end for (_, a_end), (b, _) in itertools.pairwise(spans))
    assert all(end > begin for begin, end in spans)
    # the final window is the last min(n, L) tokens
    assert spans[-1] == (n - min(n, last), n)
    # prefix windows: all full except the last one, which holds the remainder
    prefix = spans[:-1]
    assert all(end - begin == window for begin, end in prefix[:-1])
    assert all(0 < end - begin <= window for begin, end in prefix)
    assert len(prefix) == -(-max(n - last, 0) // window)
