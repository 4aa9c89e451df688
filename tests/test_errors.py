"""Bad input gets a ValueError / TypeError that names the argument and what was received, never a crash.

Every case is a ``(id, call, exception, message pattern)`` row of ``CASES``. The pytest cases run them
in this process; ``test_nothing_aborts_the_interpreter`` runs all of them again, plus inputs that abort
a bare Faiss (SIGABRT / SIGSEGV / SIGFPE), in a child interpreter that must exit normally.
"""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from indexes import StreamingIndex
from knn_memory import create_backend, memory_attention

NAN = float("nan")
INF = float("inf")


def mem(name: str = "exact", **kw):
    """A memory with B=1, H=2, d=4."""
    return create_backend(name, num_heads=2, head_dim=4, batch_size=1, mem_dtype="float32", **kw)


def filled(name: str = "exact", **kw):
    m = mem(name, **kw)
    m.add(torch.randn(1, 2, 3, 4), torch.randn(1, 2, 3, 4))
    return m


def t(*shape, dtype=torch.float32, device="cpu", fill_value=None):
    x = torch.randn(*shape).to(dtype) if dtype.is_floating_point else torch.ones(*shape, dtype=dtype)
    if fill_value is not None:
        x = x.clone()
        x.view(-1)[0] = fill_value
    return x.to(device)


def attend(query=None, keys=None, values=None, mask=None, memory=None, **kw):
    q = t(1, 2, 3, 4) if query is None else query
    k = t(1, 2, 5, 4) if keys is None else keys
    v = t(1, 2, 5, 4) if values is None else values
    return memory_attention(q, k, v, mask, memory, **kw)


Case = tuple[str, Callable[[], object], type[Exception], str]


def backend_cases(label: str, name: str, **kw) -> list[Case]:
    """Bad add / search input, the same for every backend."""
    p = f"{label}-"
    return [
        # wrong rank
        (p + "keys-rank", lambda: mem(name, **kw).add(t(2, 3, 4), t(2, 3, 4)), ValueError,
         r"keys must be 4-D \[B, H, n, d\], got shape \[2, 3, 4\]"),
        (p + "values-rank", lambda: mem(name, **kw).add(t(1, 2, 3, 4), t(1, 1, 2, 3, 4)), ValueError,
         r"values must be 4-D \[B, H, n, d\], got shape \[1, 1, 2, 3, 4\]"),
        (p + "queries-rank", lambda: filled(name, **kw).search(t(2, 5, 4)), ValueError,
         r"queries must be 4-D \[B, h, q, d\], got shape \[2, 5, 4\]"),
        # heads / dims / batch that do not match the memory (and so what was added)
        (p + "add-heads", lambda: mem(name, **kw).add(t(1, 3, 5, 4), t(1, 3, 5, 4)), ValueError,
         r"keys must have shape \[B=1, H=2, n, d=4\], got \[1, 3, 5, 4\]"),
        (p + "add-dim", lambda: mem(name, **kw).add(t(1, 2, 5, 6), t(1, 2, 5, 6)), ValueError,
         r"keys must have shape \[B=1, H=2, n, d=4\], got \[1, 2, 5, 6\]"),
        (p + "add-batch", lambda: mem(name, **kw).add(t(2, 2, 5, 4), t(2, 2, 5, 4)), ValueError,
         r"keys must have shape \[B=1, H=2, n, d=4\], got \[2, 2, 5, 4\]"),
        (p + "keys-values-length", lambda: mem(name, **kw).add(t(1, 2, 3, 4), t(1, 2, 5, 4)), ValueError,
         r"keys \[1, 2, 3, 4\] and values \[1, 2, 5, 4\] must have the same shape"),
        (p + "search-heads", lambda: filled(name, **kw).search(t(1, 3, 5, 4)), ValueError,
         r"queries must have shape \[B=1, h=2, q, d=4\] for heads 0:2, got \[1, 3, 5, 4\]"),
        (p + "search-dim", lambda: filled(name, **kw).search(t(1, 2, 5, 8)), ValueError,
         r"queries must have shape \[B=1, h=2, q, d=4\] for heads 0:2, got \[1, 2, 5, 8\]"),
        (p + "search-head-slice", lambda: filled(name, **kw).search(t(1, 2, 5, 4), heads=slice(1, 2)), ValueError,
         r"queries must have shape \[B=1, h=1, q, d=4\] for heads 1:2, got \[1, 2, 5, 4\]"),
        (p + "heads-step", lambda: filled(name, **kw).search(t(1, 1, 5, 4), heads=slice(0, 2, 2)), TypeError,
         r"heads must be a contiguous slice of head indices, got slice\(0, 2, 2\)"),
        # NaN / inf
        (p + "keys-nan", lambda: mem(name, **kw).add(t(1, 2, 3, 4, fill_value=NAN), t(1, 2, 3, 4)), ValueError,
         r"keys contains NaN or inf"),
        (p + "values-inf", lambda: mem(name, **kw).add(t(1, 2, 3, 4), t(1, 2, 3, 4, fill_value=INF)), ValueError,
         r"values contains NaN or inf"),
        (p + "queries-nan", lambda: filled(name, **kw).search(t(1, 2, 3, 4, fill_value=NAN)), ValueError,
         r"queries contain NaN or inf"),
        (p + "queries-inf-empty", lambda: mem(name, **kw).search(t(1, 2, 3, 4, fill_value=-INF)), ValueError,
         r"queries contain NaN or inf"),
        # k
        (p + "k-zero", lambda: filled(name, **kw).search(t(1, 2, 3, 4), k=0), ValueError, r"k must be a positive int, got 0 "),
        (p + "k-negative", lambda: filled(name, **kw).search(t(1, 2, 3, 4), k=-5), ValueError,
         r"k must be a positive int, got -5 "),
        (p + "k-float", lambda: filled(name, **kw).search(t(1, 2, 3, 4), k=2.5), TypeError,
         r"k must be a positive int, got float 2\.5"),
        (p + "top_k-zero", lambda: mem(name, **{**kw, "top_k": 0}), ValueError, r"top_k must be a positive int, got 0 "),
        (p + "top_k-str", lambda: mem(name, **{**kw, "top_k": "8"}), TypeError,
         r"top_k must be a positive int, got str '8'"),
        # dtype
        (p + "keys-int", lambda: mem(name, **kw).add(t(1, 2, 3, 4, dtype=torch.int64), t(1, 2, 3, 4)), TypeError,
         r"keys must be floating point, got dtype torch\.int64"),
        (p + "keys-values-dtype", lambda: mem(name, **kw).add(t(1, 2, 3, 4), t(1, 2, 3, 4, dtype=torch.float64)),
         TypeError, r"keys \(torch\.float32\) and values \(torch\.float64\) must have the same dtype"),
        (p + "queries-int", lambda: filled(name, **kw).search(t(1, 2, 3, 4, dtype=torch.int32)), TypeError,
         r"queries must be floating point, got dtype torch\.int32"),
        (p + "keys-not-tensor", lambda: mem(name, **kw).add([[1.0]], t(1, 2, 3, 4)), TypeError,
         r"keys must be a torch\.Tensor \[B, H, n, d\], got list"),
        # masks
        (p + "mask-float", lambda: mem(name, **kw).add(t(1, 2, 3, 4), t(1, 2, 3, 4), torch.ones(1, 3)), TypeError,
         r"mask must have dtype torch\.bool \(True = real token\), got torch\.float32"),
        (p + "mask-shape", lambda: mem(name, **kw).add(t(1, 2, 3, 4), t(1, 2, 3, 4), t(1, 4, dtype=torch.bool)),
         ValueError, r"mask must have shape \[B=1, n=3\], got \[1, 4\]"),
        (p + "mask-list", lambda: mem(name, **kw).add(t(1, 2, 3, 4), t(1, 2, 3, 4), [[True] * 3]), TypeError,
         r"mask must be a bool torch\.Tensor \[B, n\], got list"),
        # device
        (p + "keys-device", lambda: mem(name, **kw).add(t(1, 2, 3, 4, device="meta"), t(1, 2, 3, 4)), ValueError,
         r"keys is on meta, but this memory lives on cpu"),
        (p + "queries-device", lambda: filled(name, **kw).search(t(1, 2, 3, 4, device="meta")), ValueError,
         r"queries are on meta, but this memory lives on cpu"),
        (p + "device-unknown", lambda: mem(name, **{**kw, "device": "tpu"}), ValueError,
         r"device 'tpu'"),
        (p + "device-type", lambda: mem(name, **{**kw, "device": 3}), TypeError,
         r"device must be a str or torch\.device, got int"),
        # rows
        (p + "reset-row", lambda: filled(name, **kw).reset([1]), ValueError, r"row 1 out of range for batch_size=1"),
        (p + "reset-row-float", lambda: filled(name, **kw).reset(torch.tensor([0.0])), TypeError,
         r"rows must hold integer row indices, got dtype torch\.float32"),
        (p + "reorder-range", lambda: filled(name, **kw).reorder(torch.tensor([0, 2])), ValueError,
         r"rows must lie in \[0, batch_size=1\), got \[0, 2\]"),
        (p + "reorder-empty", lambda: filled(name, **kw).reorder(torch.tensor([], dtype=torch.int64)), ValueError,
         r"rows must be 1-D and non-empty, got shape \[0\]"),
        (p + "reorder-float", lambda: filled(name, **kw).reorder(torch.tensor([0.0])), TypeError,
         r"rows must be an int64 torch\.Tensor of row indices"),
        # geometry and dtype of the memory itself
        (p + "num_heads-zero", lambda: create_backend(name, num_heads=0, head_dim=4), ValueError,
         r"num_heads must be a positive int, got 0 "),
        (p + "head_dim-float", lambda: create_backend(name, num_heads=2, head_dim=4.0), TypeError,
         r"head_dim must be a positive int, got float 4\.0"),
        (p + "mem_dtype", lambda: create_backend(name, num_heads=2, head_dim=4, mem_dtype="int8"), ValueError,
         r"mem_dtype must be one of \['float32', 'float16', 'bfloat16'\], got 'int8'"),
    ]  # fmt: skip


CASES: list[Case] = [
    *backend_cases("exact", "exact"),
    *backend_cases("exact_topk", "exact", top_k=2),
    *backend_cases("faiss_flat", "faiss", index="Flat", top_k=2),
    *backend_cases("faiss_hnsw", "faiss", index="HNSW8", top_k=2),
    # unknown backend or index
    ("backend-unknown", lambda: create_backend("annoy", num_heads=2, head_dim=4), ValueError,
     r"unknown memory backend 'annoy'; available: \[.*'exact', 'faiss'.*\]"),
    ("backend-type", lambda: create_backend(None, num_heads=2, head_dim=4), TypeError,
     r"backend name must be a str, got NoneType"),
    ("index-bogus", lambda: mem("faiss", index="IVF,Bogus"), ValueError,
     r"index 'IVF,Bogus' is not a usable Faiss index_factory string"),
    ("index-not-str", lambda: mem("faiss", index=1024), TypeError,
     r"index must be a Faiss index_factory string, 'auto' or an object with the KeyIndex members \(indexes.KeyIndex\), got int"),
    ("index-nsg", lambda: mem("faiss", index="NSG16"), ValueError, r"index 'NSG16': NSG graphs cannot be extended"),
    ("index-hnsw1", lambda: mem("faiss", index="HNSW1"), ValueError, r"index 'HNSW1': HNSW1 has M=1; HNSW needs M >= 2"),
    ("index-pq-0-bits", lambda: mem("faiss", index="PQ2x0"), ValueError, r"index 'PQ2x0': PQ2x0 has codes of 0 bits"),
    ("index-rr0", lambda: mem("faiss", index="RR0,Flat"), ValueError,
     r"index 'RR0,Flat': RandomRotationMatrix maps dim 4 to 0"),
    ("index-ivf0", lambda: mem("faiss", index="IVF0,Flat"), ValueError,
     r"index 'IVF0,Flat': an IVF index needs at least 1 list, got nlist=0"),
    ("index-for-exact", lambda: mem("exact", index="Flat"), ValueError,
     r"index='Flat': the 'exact' backend is dense and takes no Faiss index"),
    ("nprobe-on-hnsw", lambda: mem("faiss", index="HNSW8", nprobe=4), ValueError,
     r"search parameter nprobe=4 does not apply to index 'HNSW8'"),
    ("nprobe-zero", lambda: mem("faiss", index="IVF4,Flat", nprobe=0), ValueError,
     r"nprobe must be a positive int, got 0"),
    ("nprobe-for-exact", lambda: mem("exact", nprobe=4), TypeError, r"the 'exact' backend takes no option\(s\) \['nprobe'\]"),
    ("retrain-factor", lambda: mem("faiss", index="IVF4,Flat", retrain_factor=0.5), ValueError,
     r"retrain_factor must be a finite number in \(1\.0, 1000000000\.0\], got 0\.5"),
    ("workers-zero", lambda: mem("faiss", workers=0), ValueError, r"workers must be a positive int, got 0 "),
    # the index layer on its own
    ("index-add-dim", lambda: StreamingIndex(8, "HNSW8").add(t(5, 9)), ValueError,
     r"keys must have shape \[n, 8\], got \[5, 9\]"),
    ("index-search-dim", lambda: StreamingIndex(8, "IVF4,Flat").search(t(5, 4), 3), ValueError,
     r"queries must have shape \[n, 8\], got \[5, 4\]"),
    ("index-add-nan", lambda: StreamingIndex(8).add(t(5, 8, fill_value=NAN)), ValueError, r"keys contains NaN or inf"),
    ("index-k-zero", lambda: StreamingIndex(8).search(t(5, 8), 0), ValueError, r"k must be a positive int, got 0 "),
    ("index-keys-int", lambda: StreamingIndex(8).add(t(5, 8, dtype=torch.int64)), TypeError,
     r"keys must be a floating-point tensor, got dtype torch\.int64"),
    # memory_attention
    ("attn-query-rank", lambda: attend(query=t(2, 3, 4)), ValueError, r"query must be 4-D \[B, H, n, d\], got shape \[2, 3, 4\]"),
    ("attn-keys-rank", lambda: attend(keys=t(5, 4)), ValueError, r"local_keys must be 4-D \[B, H, n, d\], got shape \[5, 4\]"),
    ("attn-values-shape", lambda: attend(values=t(1, 2, 6, 4)), ValueError,
     r"local_keys \[1, 2, 5, 4\] and local_values \[1, 2, 6, 4\] must be \[B=1, H=2, n, d=4\]"),
    ("attn-dtype", lambda: attend(keys=t(1, 2, 5, 4, dtype=torch.float64)), TypeError,
     r"query, local_keys, local_values must share a dtype, got torch\.float32, torch\.float64, torch\.float32"),
    ("attn-query-int", lambda: attend(query=t(1, 2, 3, 4, dtype=torch.int64)), TypeError,
     r"query must be floating point, got dtype torch\.int64"),
    ("attn-device", lambda: attend(values=t(1, 2, 5, 4, device="meta")), ValueError,
     r"local_values is on meta, but query is on cpu"),
    ("attn-mask-bool", lambda: attend(mask=t(1, 1, 3, 5, dtype=torch.bool)), TypeError,
     r"local_mask must be an additive float mask .* got dtype torch\.bool"),
    ("attn-mask-shape", lambda: attend(mask=t(1, 1, 5, 3)), ValueError,
     r"local_mask must be \[B=1, 1 or H, q=3, n=5\], got \[1, 1, 5, 3\]"),
    ("attn-mask-rank", lambda: attend(mask=t(3, 5)), ValueError, r"local_mask must be \[B=1, 1 or H, q=3, n=5\], got \[3, 5\]"),
    ("attn-mask-list", lambda: attend(mask=[[0.0]]), TypeError, r"local_mask must be an additive float torch\.Tensor, got list"),
    ("attn-grouping", lambda: attend(grouping=(0, 2)), ValueError,
     r"grouping must be None or a pair of positive ints \(heads, queries\), got \(0, 2\)"),
    ("attn-memory-heads", lambda: attend(query=t(1, 3, 3, 4), keys=t(1, 3, 5, 4), values=t(1, 3, 5, 4), memory=filled()),
     ValueError, r"memory holds \[B=1, H=2, d=4\] but query has shape \[1, 3, 3, 4\]"),
    ("attn-memory-dim-empty", lambda: attend(query=t(1, 2, 3, 8), keys=t(1, 2, 5, 8), values=t(1, 2, 5, 8), memory=mem()),
     ValueError, r"memory holds \[B=1, H=2, d=4\] but query has shape \[1, 2, 3, 8\]"),
    ("attn-memory-type", lambda: attend(memory="exact"), TypeError, r"memory must be a MemoryBackend or None, got str"),
    ("attn-top_k-zero", lambda: attend(memory=filled(), top_k=0), ValueError, r"k must be a positive int, got 0 "),
]  # fmt: skip


@pytest.mark.parametrize(("call", "exc", "match"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_raises_a_clear_error(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


def test_case_ids_are_unique():
    ids = [c[0] for c in CASES]
    assert len(ids) == len(set(ids))


def test_cuda_device_without_cuda():
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(ValueError, match=r"device 'cuda:0' asked for, but torch sees no CUDA device"):
        mem("faiss", device="cuda:0")


@pytest.mark.parametrize(("name", "kw"), [("exact", {}), ("exact", {"top_k": 3}), ("faiss", {"top_k": 3})])
def test_search_on_empty_memory_is_a_defined_result(name, kw):
    hits = mem(name, **kw).search(t(1, 2, 5, 4))
    width = 0 if hits.dense else 3
    assert hits.scores.shape == hits.ids.shape == (1, 2, 5, width)
    assert bool((hits.ids == -1).all()) and bool(torch.isneginf(hits.scores).all())


# ---------------------------------------------------------------------- the child interpreter
def _hostile() -> list[tuple[str, Callable[[], object]]]:
    """Inputs that abort or crash a bare Faiss; through this library they return or raise."""

    def ivf_before_training():
        ix = StreamingIndex(8, "IVF64,Flat", nprobe=8)
        ix.add(t(10, 8))
        assert not ix.uses_index
        _, ids = ix.search(t(2, 8), 4)
        assert ids.shape == (2, 4) and bool((ids >= 0).all())
        m = mem("faiss", index="IVF16,Flat", nprobe=4)
        m.add(t(1, 2, 3, 4), t(1, 2, 3, 4))
        assert m.search(t(1, 2, 2, 4)).ids.shape == (1, 2, 2, 2 * 64)

    def huge_k():
        m = filled("faiss", index="Flat")
        hits = m.search(t(1, 2, 1, 4), k=100_000)
        assert hits.ids.shape == (1, 2, 1, 100_000) and int((hits.ids >= 0).sum()) == 2 * 3
        for k in (2**40,):  # 8 TiB of results per query: refused by the allocator on any machine
            for ix in (StreamingIndex(4, "IVF1,Flat"), StreamingIndex(4, "HNSW8"), StreamingIndex(4)):
                ix.add(t(50, 4))
                try:
                    ix.search(t(2, 4), k)
                except (MemoryError, RuntimeError, ValueError):
                    pass  # the allocation fails, as a Python exception

    def hnsw_dim_mismatch():
        ix = StreamingIndex(8, "HNSW8")
        ix.add(t(40, 8))
        for bad in (t(3, 7), t(3, 9), t(8)):
            try:
                ix.search(bad, 2)
            except ValueError:
                continue
            raise AssertionError(f"no error for queries {list(bad.shape)}")
        m = filled("faiss", index="HNSW8")
        try:
            m.search(t(1, 2, 3, 5))
        except ValueError:
            return
        raise AssertionError("no error for 5-dim queries on a 4-dim HNSW memory")

    def bogus_specs():
        for spec in ("HNSW0", "HNSW1", "IVF4_HNSW1,Flat", "PQ8x0", "IVF4,PQ2x0", "RQ2x0", "LSQ2x0",
                     "HNSW8_PQ2x0", "RR0,Flat", "PCA0,Flat", "PCA16,Flat", "IVF0,Flat", "SQ0", "OPQ3,PQ2",
                     "IDMap,Flat", "NSG32", "IVF4(,Flat", "Flat,Flat", "\x00", "IVF99999999999999999999,Flat"):  # fmt: skip
            try:
                ix = StreamingIndex(8, spec)
            except ValueError:
                continue
            ix.add(t(20000, 8))  # a spec that is accepted must work end to end
            ix.search(t(3, 8), 5)

    def big_nprobe_and_small_ef():
        ix = StreamingIndex(8, "IVF4,Flat", nprobe=10_000)
        ix.add(t(400, 8))
        assert ix.uses_index and ix.search(t(2, 8), 3)[1].shape == (2, 3)
        ix = StreamingIndex(8, "HNSW8", efSearch=1)
        ix.add(t(400, 8))
        scores, ids = ix.search(t(2, 8), 300)
        assert bool(torch.isneginf(scores[ids < 0]).all())

    def wrong_mask_dtypes():
        for mask in (torch.ones(1, 3), torch.ones(1, 3, dtype=torch.int64)):
            try:
                mem("faiss").add(t(1, 2, 3, 4), t(1, 2, 3, 4), mask)
            except TypeError:
                continue
            raise AssertionError(f"no error for a {mask.dtype} mask")

    def corrupt_index_state():
        ix = StreamingIndex(8, "IVF4,Flat")
        ix.add(t(400, 8))
        state = ix.state()
        for index in (state["index"][:100], torch.full_like(state["index"], 255)):
            try:
                StreamingIndex.from_state({**state, "index": index})
            except ValueError:
                continue
            raise AssertionError("a broken index was loaded")

    return [
        ("ivf_before_training", ivf_before_training),
        ("huge_k", huge_k),
        ("hnsw_dim_mismatch", hnsw_dim_mismatch),
        ("bogus_specs", bogus_specs),
        ("big_nprobe_and_small_ef", big_nprobe_and_small_ef),
        ("wrong_mask_dtypes", wrong_mask_dtypes),
        ("corrupt_index_state", corrupt_index_state),
    ]


def child_main() -> int:
    """Run every case of this file; print one line per problem; exit status 1 if any misbehaved."""
    problems = []
    for name, call, exc, pattern in CASES:
        try:
            call()
        except exc as err:
            if not re.search(pattern, str(err)):
                problems.append(f"{name}: message {str(err)!r} does not match {pattern!r}")
        except Exception as err:
            problems.append(f"{name}: {type(err).__name__} instead of {exc.__name__}: {err}")
        else:
            problems.append(f"{name}: no error")
    for name, call in _hostile():
        try:
            call()
        except Exception as err:
            problems.append(f"{name}: {type(err).__name__}: {err}")
    for line in problems:
        print(line)
    print(
        f"checked {len(CASES)} bad inputs and {len(_hostile())} Faiss-hostile ones: {len(problems)} problems"
    )
    return 1 if problems else 0


def test_nothing_aborts_the_interpreter():
    here = Path(__file__).parent
    code = f"import sys; sys.path.insert(0, {str(here)!r}); import test_errors; sys.exit(test_errors.child_main())"
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=here.parent
    )
    assert proc.returncode >= 0, (
        f"child killed by signal {-proc.returncode}\n{proc.stdout}\n{proc.stderr[-3000:]}"
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    assert f"checked {len(CASES)} bad inputs and 7 Faiss-hostile ones: 0 problems" in proc.stdout
