"""The memory backends the tests run, generated from the registry (importable by any test module).

Every name in :func:`knn_memory.available_backends` is a case, after importing ``knn_memory`` and the
benchmark module that registers ``"capture"``. :data:`OPTIONS` adds, per name, a few option sets worth
running; a name it does not list (a newly registered backend) runs once with its default options, so
registering a backend is enough to put it under the contract (``tests/test_backend_contract.py``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import benchmarks.capture  # noqa: F401  registers "capture" (the exact backend that records its inputs)
import knn_memory

# the "auto" policy at toy sizes: exact until 64 keys per head, then IVF (4 lists at 64, 8 at 256)
AUTO_SMALL = {"exact_until": 64, "lists_per_sqrt": 0.5, "min_lists": 4, "train_per_list": 16, "niter": 4}


@dataclass(frozen=True)
class BackendCase:
    """One backend with one set of constructor options.

    ``exact``: the backend promises exact results (dense attention over every entry, or the exact top-k
    of a Flat search), so its searches must equal the exact dense backend's.
    """

    name: str
    label: str
    options: dict = field(default_factory=dict)
    exact: bool = False

    @property
    def id(self) -> str:
        return self.name if self.label == "defaults" else f"{self.name}-{self.label}"

    @property
    def top_k(self) -> int | None:
        return self.options.get("top_k")

    def model_settings(self) -> dict:
        """The same memory as ``LongLlamaConfig`` / ``from_pretrained`` keywords."""
        rest = {k: v for k, v in self.options.items() if k not in ("top_k", "index")}
        out: dict = {"mem_backend": self.name}
        if "top_k" in self.options:
            out["mem_top_k"] = self.options["top_k"]
        if "index" in self.options:
            out["mem_index"] = self.options["index"]
        if rest:
            out["mem_index_params"] = rest
        return out


#: name -> (label, options, exact) per option set; names absent here run once with their defaults
OPTIONS: dict[str, list[tuple[str, dict, bool]]] = {
    "exact": [("dense", {}, True), ("top4", {"top_k": 4}, True)],
    "faiss": [
        ("Flat", {"index": "Flat", "top_k": 4}, True),
        # trains at 156 keys per head; probing every list keeps the ranking exact
        ("IVF4-all", {"index": "IVF4,Flat", "top_k": 4, "nprobe": 4}, True),
        ("IVF4", {"index": "IVF4,Flat", "top_k": 4, "nprobe": 1}, False),
        ("HNSW8", {"index": "HNSW8", "top_k": 4, "efSearch": 16}, False),
        ("auto", {"index": "auto", "top_k": 4, **AUTO_SMALL}, False),
    ],
    "capture": [("dense", {}, True)],
    # one process: the whole memory is one slice, and the partial-state merge must give exact numbers
    "sharded": [
        ("exact", {"inner": "exact"}, True),
        ("Flat-global", {"inner": "faiss", "index": "Flat", "top_k": 4, "mode": "global"}, True),
    ],
}


def backend_cases() -> list[BackendCase]:
    """Every registered backend with each of its option sets (its defaults when :data:`OPTIONS` has none)."""
    return [
        BackendCase(name, label, options, exact)
        for name in knn_memory.available_backends()
        for label, options, exact in OPTIONS.get(name, [("defaults", {}, False)])
    ]
