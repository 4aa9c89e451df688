"""Hypothesis fuzzing of the public entry points: a correct result or a ValueError/TypeError, nothing else.

Each property draws arguments that are sometimes valid and sometimes not, and predicts which: valid ones
must give a correct result (checked against a plain torch reference, with no NaN for finite input),
invalid ones a ``ValueError`` or ``TypeError``. Fuzzing that reaches Faiss with arbitrary index strings
(where a slip would abort the interpreter rather than raise) runs in a child interpreter.
"""

from __future__ import annotations

import io
import math
import subprocess
import sys
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import pytest
import torch
from backend_cases import backend_cases
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from knn_memory import MemoryBackend, create_backend, memory_attention

SETTINGS = settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large]
)
FLOATS = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
DTYPES = (*FLOATS, torch.int64, torch.int32, torch.bool)
JUNK_INTS = st.one_of(st.integers(-2, 5), st.just(2.0), st.just(True), st.none(), st.just("2"))


def is_pos_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 1


def tensor(shape: tuple[int, ...], dtype: torch.dtype, seed: int, special: str | None = None) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if dtype.is_floating_point:
        x = torch.randn(*shape, generator=g).to(dtype)
        if special and x.numel():
            x.view(-1)[seed % x.numel()] = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}[special]
        return x
    if dtype == torch.bool:
        return torch.rand(*shape, generator=g) > 0.5
    return torch.randint(-3, 3, shape, generator=g, dtype=dtype)


# ---------------------------------------------------------------------- create_backend
@SETTINGS
@given(
    name=st.sampled_from(["exact", "faiss", "annoy", None, 3]),
    num_heads=JUNK_INTS,
    head_dim=JUNK_INTS,
    batch_size=JUNK_INTS,
    mem_dtype=st.sampled_from(["float32", "bfloat16", "float16", "int8", torch.float32, torch.int64, None]),
    top_k=JUNK_INTS,
    device=st.sampled_from(["cpu", torch.device("cpu"), "cuda", "cuda:1", "meta", "tpu", 3, None]),
    index=st.sampled_from([None, "Flat", "HNSW8", "IVF2,Flat", "SQ8", "garbage", 7]),
)
def test_create_backend(name, num_heads, head_dim, batch_size, mem_dtype, top_k, device, index):
    try:
        mem = create_backend(
            name,
            num_heads=num_heads,
            head_dim=head_dim,
            batch_size=batch_size,
            mem_dtype=mem_dtype,
            top_k=top_k,
            device=device,
            index=index,
        )
    except (ValueError, TypeError):
        return
    assert isinstance(mem, MemoryBackend) and mem.name == name
    assert (mem.num_heads, mem.head_dim, mem.batch_size) == (num_heads, head_dim, batch_size)
    assert is_pos_int(num_heads) and is_pos_int(head_dim) and is_pos_int(batch_size)
    assert top_k is None or is_pos_int(top_k)
    assert str(mem.device) == "cpu" and len(mem) == 0
    assert name == "faiss" or index is None


# ---------------------------------------------------------------------- add / search
BACKENDS = {case.id: case for case in backend_cases()}  # every registered backend
B, H, D = 2, 2, 4


@st.composite
def add_call(draw):
    n = draw(st.integers(0, 7))
    shape = [B, H, n, D]
    if draw(st.integers(0, 5)) == 0:  # a wrong shape: one dimension off, or a dimension missing
        i = draw(st.integers(0, 3))
        shape = (
            shape[:i] + shape[i + 1 :] if draw(st.booleans()) else [*shape[:i], shape[i] + 1, *shape[i + 1 :]]
        )
    dtype = draw(st.sampled_from(DTYPES)) if draw(st.integers(0, 4)) == 0 else torch.float32
    values_dtype = dtype if draw(st.integers(0, 6)) else draw(st.sampled_from(FLOATS))
    special = draw(st.sampled_from([None] * 6 + ["nan", "inf", "-inf"]))
    mask_kind = draw(st.sampled_from(["none", "good", "good", "float", "short", "list"]))
    return tuple(shape), dtype, values_dtype, special, mask_kind, draw(st.integers(0, 2**16))


@st.composite
def search_call(draw):
    q = draw(st.integers(0, 4))
    heads = draw(st.sampled_from([None, slice(0, 1), slice(1, 2), slice(0, 2), slice(0, 2, 2)]))
    h = 2 if heads is None else len(range(*heads.indices(H)))
    shape = [B, h, q, D]
    if draw(st.integers(0, 5)) == 0:
        shape[draw(st.integers(0, 3))] += 1
    dtype = draw(st.sampled_from(DTYPES)) if draw(st.integers(0, 4)) == 0 else torch.float32
    special = draw(st.sampled_from([None] * 6 + ["nan", "inf"]))
    k = draw(st.one_of(st.none(), st.integers(-1, 40), st.just(2.5)))
    return tuple(shape), dtype, special, heads, k, draw(st.integers(0, 2**16))


def add_is_valid(shape, dtype, values_dtype, special, mask_kind) -> bool:
    return (
        len(shape) == 4
        and shape[0] == B
        and shape[1] == H
        and shape[3] == D
        and dtype.is_floating_point
        and values_dtype == dtype
        and (special is None or shape[2] == 0)
        and mask_kind in ("none", "good")
    )


def check_hits(
    hits, ref_keys: list[torch.Tensor], queries: torch.Tensor, heads: slice, k: int | None, dense: bool
):
    """Scores are the raw q·k of the returned ids; top-k hits are the best ones, in order.

    The exact backend scores in the query's dtype (as upstream), hence the tolerance per query dtype.
    """
    rtol, atol = {torch.bfloat16: (2e-2, 5e-2), torch.float16: (2e-3, 1e-2)}.get(queries.dtype, (1e-4, 1e-4))
    assert hits.ids.dtype == torch.int64 and hits.scores.dtype == torch.float32
    for b in range(B):
        keys = ref_keys[b][heads]  # [h, m, d] float32, as stored (rounded to mem_dtype)
        m = keys.shape[1]
        exact = torch.einsum("hqd,hmd->hqm", queries[b].double(), keys.double())  # [h, q, m]
        exact = exact.to(queries.dtype).double() if queries.dtype != torch.float32 else exact
        ids, scores = hits.ids[b], hits.scores[b]
        empty = ids < 0
        assert bool(torch.isneginf(scores[empty]).all()) and bool(torch.isfinite(scores[~empty]).all())
        assert bool((ids < m).all())
        if m == 0:
            assert bool(empty.all())
            continue
        got = torch.gather(exact, -1, ids.clamp(min=0))
        torch.testing.assert_close(scores[~empty].double(), got[~empty], rtol=rtol, atol=atol)
        if dense:
            continue
        want = min(k, m)
        assert hits.k == k and bool((~empty).sum(-1).eq(want).all())
        if want:
            best = torch.topk(exact, want, dim=-1).values
            torch.testing.assert_close(scores[..., :want].double(), best, rtol=rtol, atol=atol)
    if hits.values is not None:
        assert bool(torch.isfinite(hits.values).all())


@pytest.mark.parametrize("backend", list(BACKENDS))
@SETTINGS
@given(
    calls=st.lists(
        st.one_of(add_call().map(lambda c: ("add", c)), search_call().map(lambda c: ("search", c))),
        max_size=8,
    )
)
def test_add_and_search(backend, calls):
    case = BACKENDS[backend]
    mem = create_backend(
        case.name, num_heads=H, head_dim=D, batch_size=B, mem_dtype="float32", **case.options
    )
    ref_keys = [torch.empty(H, 0, D) for _ in range(B)]  # real entries per row, in insertion order
    exactly_ranked = case.exact
    for kind, call in calls:
        if kind == "add":
            shape, dtype, values_dtype, special, mask_kind, seed = call
            keys = tensor(shape, dtype, seed, special)
            values = tensor(shape, values_dtype, seed + 1)
            n = shape[2] if len(shape) == 4 else 0
            mask = {
                "none": None,
                "good": torch.rand(B, n, generator=torch.Generator().manual_seed(seed)) > 0.3,
                "float": torch.ones(B, n),
                "short": torch.ones(B, n + 1, dtype=torch.bool),
                "list": [[True] * n] * B,
            }[mask_kind]
            valid = add_is_valid(shape, dtype, values_dtype, special, mask_kind)
            try:
                mem.add(keys, values, mask)
            except (ValueError, TypeError):
                assert not valid, "a valid add was refused"
                continue
            assert valid, f"an invalid add was accepted: {shape} {dtype} {values_dtype} {special} {mask_kind}"
            for b in range(B):
                keep = mask[b] if mask is not None else torch.ones(n, dtype=torch.bool)
                ref_keys[b] = torch.cat([ref_keys[b], keys[b][:, keep].float()], dim=1)
            assert mem.lengths.tolist() == [r.shape[1] for r in ref_keys]
        else:
            shape, dtype, special, heads, k, seed = call
            queries = tensor(shape, dtype, seed, special)
            h = 2 if heads is None else len(range(*heads.indices(H)))
            valid = (
                shape == (B, h, shape[2], D)
                and dtype.is_floating_point
                and (special is None or shape[2] == 0)
                and (heads is None or heads.step is None)
                and (k is None or is_pos_int(k))
            )
            try:
                hits = mem.search(queries, k=k, heads=heads)
            except (ValueError, TypeError):
                assert not valid, "a valid search was refused"
                continue
            assert valid, f"an invalid search was accepted: {shape} {dtype} {special} {heads} {k}"
            sel = slice(0, H) if heads is None else heads
            k_eff = k if k is not None else mem.top_k
            dense = k_eff is None
            assert hits.scores.shape[:3] == (B, h, shape[2])
            if exactly_ranked:
                check_hits(hits, ref_keys, queries, sel, k_eff, dense)
            else:  # approximate: every hit is a real entry with its true score
                check_hits(hits, ref_keys, queries, sel, k_eff, dense=True)
                real = hits.ids[hits.ids >= 0]
                assert real.numel() == 0 or int(real.max()) < max(r.shape[1] for r in ref_keys)


# ---------------------------------------------------------------------- memory_attention
def reference_attention(query, keys, values, mask, mem_keys, mem_values, mem_valid):
    """One softmax over [local ; memory] in float64, clamped as upstream, for B=1 dense memory."""
    d = query.shape[-1]
    floor = max(torch.finfo(query.dtype).min, -1e6)
    scores = query.double() @ keys.double().transpose(-1, -2) / math.sqrt(d)
    if mask is not None:
        scores = scores + mask.double()
    scores = scores.clamp_min(floor)
    parts_v = [values.double()]
    if mem_keys is not None and mem_keys.shape[-2]:
        ms = query.double() @ mem_keys.double().transpose(-1, -2) / math.sqrt(d)
        ms = ms.masked_fill(~mem_valid[:, None, None, :], -math.inf).clamp_min(floor)
        scores = torch.cat([scores, ms], dim=-1)
        parts_v.append(mem_values.double())
    return torch.softmax(scores, dim=-1) @ torch.cat(parts_v, dim=-2)


@SETTINGS
@given(
    H_=st.integers(1, 3),
    q=st.integers(0, 5),
    n=st.integers(1, 6),
    d=st.sampled_from([2, 4, 8]),
    dtype=st.sampled_from([torch.float32, torch.float64, torch.bfloat16]),
    mask_kind=st.sampled_from([None, "causal", "padding", "all-masked", "bool", "bad-shape"]),
    grouping=st.one_of(st.none(), st.tuples(st.integers(0, 3), st.integers(0, 4))),
    memory_entries=st.integers(-1, 20),
    seed=st.integers(0, 2**16),
)
def test_memory_attention(H_, q, n, d, dtype, mask_kind, grouping, memory_entries, seed):
    g = torch.Generator().manual_seed(seed)
    query, keys, values = (torch.randn(1, H_, m, d, generator=g).to(dtype) for m in (q, n, n))
    mask, low = None, torch.finfo(dtype).min
    if mask_kind == "causal":
        mask = torch.zeros(1, 1, q, n, dtype=dtype).masked_fill(
            torch.ones(q, n, dtype=torch.bool).triu(1), low
        )
    elif mask_kind == "padding":
        mask = torch.zeros(1, 1, q, n, dtype=dtype)
        mask[..., 0] = low
    elif mask_kind == "all-masked":
        mask = torch.full((1, H_, q, n), low, dtype=dtype)
    elif mask_kind == "bool":
        mask = torch.ones(1, 1, q, n, dtype=torch.bool)
    elif mask_kind == "bad-shape":
        mask = torch.zeros(1, 1, q + 1, n, dtype=dtype)
    memory, mem_keys, mem_values, mem_valid = None, None, None, None
    if memory_entries >= 0:
        memory = create_backend("exact", num_heads=H_, head_dim=d, mem_dtype="float32")
        mem_keys = torch.randn(1, H_, memory_entries, d, generator=g)
        mem_values = torch.randn(1, H_, memory_entries, d, generator=g)
        mem_valid = torch.rand(1, memory_entries, generator=g) > 0.2
        memory.add(mem_keys, mem_values, mem_valid)
    valid = mask_kind not in ("bool", "bad-shape") and (
        grouping is None or (grouping[0] >= 1 and grouping[1] >= 1) or q == 0
    )
    try:
        out = memory_attention(query, keys, values, mask, memory, grouping=grouping)
    except (ValueError, TypeError):
        assert not valid
        return
    assert valid
    assert out.shape == query.shape and out.dtype == dtype
    if q == 0:
        return
    assert bool(torch.isfinite(out).all())
    want = reference_attention(query, keys, values, mask, mem_keys, mem_values, mem_valid)
    # a query whose every key is masked is a garbage row (upstream: uniform over everything, masked memory
    # included); its value is never used, so only rows that see a real key are compared
    sees = torch.ones(1, H_, q, dtype=torch.bool)
    if mask is not None:
        sees = sees & (mask > torch.finfo(dtype).min / 2).any(-1)
    if mem_valid is not None:
        sees = sees | bool(mem_valid.any())
    out, want = out[sees], want[sees]
    # the softmax runs in float32 whatever the dtype (upstream); bfloat16 rounds scores and output
    tol = {torch.float64: 1e-6, torch.float32: 1e-5, torch.bfloat16: 5e-2}[dtype]
    torch.testing.assert_close(out.double(), want, rtol=tol, atol=tol)


# ---------------------------------------------------------------------- the model
@pytest.fixture(scope="module")
def models():
    from tiny import tiny_model

    out = {}
    for name, extra in (("exact", {}), ("faiss", {"mem_backend": "faiss", "mem_top_k": 3})):
        out[name] = tiny_model(
            vocab_size=40,
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=2,
            max_position_embeddings=8,
            last_context_length=4,
            **extra,
        )
    return out


@st.composite
def model_call(draw):
    B_ = draw(st.integers(0, 3))
    n = draw(st.integers(0, 30))
    use_embeds = draw(st.integers(0, 5)) == 0
    dtype = draw(st.sampled_from([torch.int64] * 4 + [torch.int32, torch.float32, torch.bool]))
    low, high = draw(st.sampled_from([(0, 40)] * 5 + [(-3, 40), (0, 45)]))
    mask_kind = draw(st.sampled_from([None, None, "ones", "left-pad", "all-pad", "wrong-shape", "1d"]))
    positions = draw(st.sampled_from([None, None, "shifted", "huge", "float"]))
    lcl = draw(st.one_of(st.none(), st.integers(-1, 40)))
    labels = draw(st.sampled_from([None, None, "good", "ignored", "out-of-range", "wrong-shape"]))
    return B_, n, use_embeds, dtype, low, high, mask_kind, positions, lcl, labels, draw(st.integers(0, 2**16))


@pytest.mark.parametrize("backend", ["exact", "faiss"])
@SETTINGS
@given(calls=st.lists(model_call(), min_size=1, max_size=2))
def test_model_forward(models, backend, calls):
    model = models[backend]
    V, Dm = model.config.vocab_size, model.config.hidden_size
    cache = None
    for B_, n, use_embeds, dtype, low, high, mask_kind, positions, lcl, labels_kind, seed in calls:
        g = torch.Generator().manual_seed(seed)
        if use_embeds:
            kwargs = {"inputs_embeds": torch.randn(B_, n, Dm, generator=g)}
        else:
            ids = torch.randint(low, high, (B_, n), generator=g) if high > low else torch.zeros(B_, n)
            kwargs = {"input_ids": ids.to(dtype)}
        past = 0 if cache is None else cache.local_length
        if mask_kind == "ones":
            kwargs["attention_mask"] = torch.ones(B_, past + n, dtype=torch.long)
        elif mask_kind == "left-pad":
            mask = torch.ones(B_, past + n, dtype=torch.long)
            mask[:, : (past + n) // 3] = 0
            kwargs["attention_mask"] = mask
        elif mask_kind == "all-pad":
            kwargs["attention_mask"] = torch.zeros(B_, past + n, dtype=torch.long)
        elif mask_kind == "wrong-shape":
            kwargs["attention_mask"] = torch.ones(B_ + 1, past + n)
        elif mask_kind == "1d":
            kwargs["attention_mask"] = torch.ones(past + n)
        if positions == "shifted":
            kwargs["position_ids"] = torch.arange(n) + 1000
        elif positions == "huge":
            kwargs["position_ids"] = torch.arange(n) * 2**30
        elif positions == "float":
            kwargs["position_ids"] = torch.arange(n).float()
        if labels_kind is not None and not use_embeds:
            lab = torch.randint(0, V, (B_, n), generator=g)
            if labels_kind == "ignored":
                lab[:, ::2] = -100
            elif labels_kind == "out-of-range":
                lab = lab + V
            elif labels_kind == "wrong-shape":
                lab = lab[:, :-1]
            kwargs["labels"] = lab
        if use_embeds:
            labels_kind = None
        valid_ids = use_embeds or (
            dtype in (torch.int64, torch.int32)
            and (ids.numel() == 0 or (int(ids.min()) >= 0 and int(ids.max()) < V))
        )
        valid = (
            B_ >= 1
            and n >= 1
            and valid_ids
            and mask_kind not in ("wrong-shape", "1d")
            and not (positions == "huge" and n > 1)
            and positions != "float"
            and (lcl is None or lcl >= 1)
            and labels_kind not in ("out-of-range", "wrong-shape")
            and (cache is None or cache.batch_size == B_)
        )
        before = None if cache is None else (cache.seen_tokens, cache.local_length, cache.memory_lengths())
        try:
            with torch.no_grad():
                out = model(**kwargs, past_key_values=cache, last_context_length=lcl)
        except (ValueError, TypeError):
            assert not valid, f"a valid call was refused: {kwargs.keys()} B={B_} n={n}"
            # a refused call leaves the cache as it was
            assert cache is None or before == (cache.seen_tokens, cache.local_length, cache.memory_lengths())
            continue
        assert valid, (
            f"an invalid call was accepted: B={B_} n={n} {dtype} [{low},{high}) {mask_kind} {positions} {lcl} {labels_kind}"
        )
        assert out.logits.shape == (B_, n, V) and bool(torch.isfinite(out.logits).all())
        if out.loss is not None:  # NaN only when no position has a target (mean over nothing), as in HF
            counted = int((kwargs["labels"][:, 1:] != -100).sum())
            assert bool(torch.isfinite(out.loss)) == (counted > 0)
        cache = out.cache


# ---------------------------------------------------------------------- the CLI
@SETTINGS
@given(
    argv=st.lists(
        st.tuples(
            st.sampled_from(["--backend", "--index", "--nprobe", "--efSearch", "--k", "--keys", "--queries",
                             "--heads", "--dim", "--mem-dtype", "--source", "--seed", "--bogus"]),
            st.sampled_from(["0", "1", "3", "-2", "8", "abc", "exact", "faiss", "Flat", "HNSW8", "IVF2,Flat",
                             "float32", "int8", "clustered", "1e9", ""]),
        ),
        max_size=5,
    )
)  # fmt: skip
def test_agreement_cli_exit_codes(argv):
    from knn_memory.agreement_cli import main

    flat = [x for pair in argv for x in pair]
    for _, value in argv:
        assume(value != "1e9")  # sizes the machine cannot hold are covered by the child below
    err, out = io.StringIO(), io.StringIO()
    base = ["--keys", "64", "--queries", "4", "--heads", "1", "--dim", "4", "--k", "4"]
    with redirect_stderr(err), redirect_stdout(out):
        code = main([*base, *flat])
    assert code in (0, 2)
    if code == 2:
        lines = err.getvalue().splitlines()
        assert len(lines) == 1 and lines[0].startswith("knn-memory-agreement: error: "), err.getvalue()
    else:
        assert err.getvalue() == ""


# ---------------------------------------------------------------------- Faiss index strings (child)
SPEC_PARTS = st.sampled_from(
    ["Flat", "HNSW{m}", "IVF{m},Flat", "IVF{m},PQ{p}", "IVF{m},SQ8", "PQ{p}", "PQ{p}x{b}", "SQ{s}", "SQfp16",
     "PCA{p},Flat", "OPQ{p},PQ{p}", "RR{p},Flat", "IVF{m}_HNSW{m},Flat", "LSH", "IDMap,Flat", "NSG{m}",
     "Bogus{m}", "IVF{m},Flat,Flat", "{m}", ""]
)  # fmt: skip


@settings(max_examples=300, deadline=None, database=None, suppress_health_check=list(HealthCheck))
@given(
    part=SPEC_PARTS,
    m=st.integers(-1, 40),
    p=st.sampled_from([-1, 0, 1, 2, 3, 4, 8]),
    b=st.integers(-1, 12),
    s=st.integers(-1, 9),
    dim=st.sampled_from([1, 4, 8, 12]),
    n=st.sampled_from([0, 1, 5, 200, 2000]),
    k=st.integers(1, 600),
    nprobe=st.one_of(st.none(), st.integers(0, 5000)),
)
def fuzz_index_specs(part, m, p, b, s, dim, n, k, nprobe):
    """Any index string: refused with ValueError/TypeError at creation, or a memory that adds and searches."""
    spec = part.format(m=m, p=p, b=b, s=s)
    try:
        knob = (
            {"nprobe": nprobe} if spec.startswith("IVF") else {"efSearch": nprobe} if "HNSW" in spec else {}
        )
        mem = create_backend("faiss", num_heads=1, head_dim=dim, index=spec, top_k=4, **knob)
    except (ValueError, TypeError):
        return
    g = torch.Generator().manual_seed(n)
    mem.add(torch.randn(1, 1, n, dim, generator=g), torch.randn(1, 1, n, dim, generator=g))
    hits = mem.search(torch.randn(1, 1, 3, dim, generator=g), k=k)
    assert hits.ids.shape == (1, 1, 3, k) and bool((hits.ids < max(n, 1)).all())
    real = hits.ids >= 0
    assert bool(torch.isfinite(hits.scores[real]).all()) and bool(torch.isneginf(hits.scores[~real]).all())


def fuzz_big_cli_sizes() -> None:
    """The agreement CLI with sizes no machine holds: exit code 2 and one line, no traceback."""
    from knn_memory.agreement_cli import main

    for argv in (["--keys", "5", "--k", "100000"], ["--dim", "100000", "--keys", "1", "--queries", "1"]):
        err = io.StringIO()
        with redirect_stderr(err), redirect_stdout(io.StringIO()):
            code = main(argv)
        assert code == 2 and len(err.getvalue().splitlines()) == 1, (argv, code, err.getvalue())


def test_faiss_paths_never_abort():
    here = Path(__file__).parent
    code = (
        f"import sys; sys.path.insert(0, {str(here)!r}); import test_fuzz; "
        "test_fuzz.fuzz_index_specs(); test_fuzz.fuzz_big_cli_sizes(); print('fuzzed')"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=600, cwd=here.parent
    )
    assert proc.returncode >= 0, f"killed by signal {-proc.returncode}\n{proc.stdout}\n{proc.stderr[-3000:]}"
    assert proc.returncode == 0 and "fuzzed" in proc.stdout, proc.stdout + proc.stderr[-3000:]
