"""Peak resident memory (RSS) of this process while a block of code runs."""

from __future__ import annotations

import math
import threading

import psutil


class PeakRSS:
    """Peak resident set size of this process while the block runs, sampled every ``interval_s`` seconds.

        with PeakRSS() as rss:
            run()
        rss.peak_bytes, rss.delta_bytes

    Attributes:
        interval_s: seconds between samples (a background thread reads the RSS).
        start_bytes: the RSS at entry.
        peak_bytes: the largest RSS seen, entry and exit included.
        delta_bytes: ``peak_bytes - start_bytes``, the rise over the RSS at entry.
        peak: ``peak_bytes`` under its older name.

    Raises:
        ValueError: ``interval_s`` is not a finite number > 0.
    """

    def __init__(self, interval_s: float = 0.005) -> None:
        if (
            not isinstance(interval_s, (int, float))
            or isinstance(interval_s, bool)
            or not math.isfinite(interval_s)
            or interval_s <= 0
        ):
            raise ValueError(f"interval_s must be a finite number of seconds > 0, got {interval_s!r}")
        self._proc = psutil.Process()
        self.interval_s = interval_s
        self.start_bytes = 0
        self.peak_bytes = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak_bytes = max(self.peak_bytes, self._proc.memory_info().rss)
            self._stop.wait(self.interval_s)

    def __enter__(self) -> PeakRSS:
        self.start_bytes = self.peak_bytes = self._proc.memory_info().rss
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.peak_bytes = max(self.peak_bytes, self._proc.memory_info().rss)

    @property
    def delta_bytes(self) -> int:
        """The rise of the peak over the RSS at entry, in bytes."""
        return self.peak_bytes - self.start_bytes

    @property
    def peak(self) -> int:
        """``peak_bytes``: the largest RSS seen, in bytes."""
        return self.peak_bytes
