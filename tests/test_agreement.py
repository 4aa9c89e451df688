"""Agreement metrics (recall@k, attention-mass recall, relative L2 error) and the knn-memory-agreement CLI."""

from __future__ import annotations

import json
import math

import pytest
import torch

from knn_memory import compare_backends, create_backend, measure_agreement
from knn_memory.agreement_cli import main
from knn_memory.synthetic import make_memory


def _independent_metrics(keys, values, queries, ids, k):
    """Per-head recall@k, mass recall and relative L2 error from plain torch, given retrieved ids [B, H, q, k]."""
    d = keys.shape[-1]
    scores = queries @ keys.transpose(-1, -2)  # [B, H, q, M]
    p = torch.softmax(scores / math.sqrt(d), dim=-1)
    exact_top = torch.topk(scores, min(k, keys.shape[2]), dim=-1).indices
    got = ids.clamp_min(0)
    valid = ids >= 0
    recall = (exact_top.unsqueeze(-1) == torch.where(valid, ids, -7).unsqueeze(-2)).any(-1).float().mean(-1)
    mass = (torch.gather(p, -1, got) * valid).sum(-1)
    ref_out = p @ values
    s_got = torch.gather(scores, -1, got).masked_fill(~valid, -math.inf)
    p_got = torch.softmax(s_got / math.sqrt(d), dim=-1)
    v_got = torch.gather(
        values.unsqueeze(2).expand(-1, -1, ids.shape[2], -1, -1), 3, got.unsqueeze(-1).expand(*got.shape, d)
    )
    got_out = (p_got.unsqueeze(-1) * v_got).sum(-2)
    err = (got_out - ref_out).transpose(0, 1).flatten(1).norm(dim=1) / ref_out.transpose(0, 1).flatten(
        1
    ).norm(dim=1)
    per_head = [x.transpose(0, 1).flatten(1).double() for x in (recall, mass)]
    return per_head[0].mean(1), per_head[1].mean(1), err


def test_flat_with_k_at_least_memory_size_agrees_exactly():
    keys, values, queries = make_memory(
        "gaussian", num_heads=2, head_dim=8, n_keys=96, n_queries=16, batch_size=2
    )
    for backend, kw in (("faiss", {"index": "Flat", "top_k": 100}), ("exact", {"top_k": 96}), ("exact", {})):
        report = measure_agreement(keys, values, queries, backend, **kw)
        assert report.k == (100 if backend == "faiss" else 96)
        assert report.recall_mean == report.recall_p01 == [1.0, 1.0]
        assert report.mass_recall_mean == pytest.approx([1.0, 1.0], abs=1e-5)
        assert report.mass_recall_p01 == pytest.approx([1.0, 1.0], abs=1e-5)
        assert max(report.rel_l2_error) < 1e-5


def test_padding_does_not_disturb_agreement():
    keys, values, queries = make_memory(
        "clustered", num_heads=2, head_dim=8, n_keys=60, n_queries=8, batch_size=2
    )
    mask = torch.rand(2, 60, generator=torch.Generator().manual_seed(0)) > 0.3
    report = measure_agreement(keys, values, queries, "faiss", mask=mask, index="Flat", top_k=64)
    assert report.recall_mean == [1.0, 1.0]
    assert report.mass_recall_mean == pytest.approx([1.0, 1.0], abs=1e-5)
    assert max(report.rel_l2_error) < 1e-5


def test_recall_ranks_by_score_where_the_softmax_underflows():
    keys, values, queries = make_memory("gaussian", num_heads=1, head_dim=8, n_keys=64, n_queries=8)
    keys = keys * 100  # most memory probabilities are exactly 0 in float32
    report = measure_agreement(keys, values, queries, "faiss", index="Flat", top_k=16)
    assert report.recall_mean == report.recall_p01 == [1.0]  # Flat retrieves the exact top 16


def test_a_bad_backend_is_measured_consistently():
    keys, values, queries = make_memory(
        "gaussian", num_heads=2, head_dim=16, n_keys=1024, n_queries=64, seed=1
    )
    k = 8
    candidate = create_backend(
        "faiss", num_heads=2, head_dim=16, mem_dtype="float32", index="IVF16,Flat", nprobe=1, top_k=k
    )
    reference = create_backend("exact", num_heads=2, head_dim=16, mem_dtype="float32")
    for mem in (candidate, reference):
        mem.add(keys, values)
    assert candidate.head_index(0, 0).uses_index
    report = compare_backends(candidate, reference, queries)
    print("IVF16,Flat nprobe=1 on gaussian keys:", report.summary())
    assert report.k == k
    assert max(report.recall_mean) < 0.9  # one list of 16 on unstructured keys misses neighbours
    assert min(report.rel_l2_error) > 1e-3
    for h in range(2):
        assert 0.0 <= report.recall_p01[h] <= report.recall_mean[h] <= 1.0
        assert 0.0 <= report.mass_recall_p01[h] <= report.mass_recall_mean[h] <= 1.0 + 1e-6
    # the same figures from plain torch, given the ids the candidate retrieved
    ids = candidate.search(queries, k=k).ids
    recall, mass, err = _independent_metrics(keys, values, queries, ids, k)
    assert report.recall_mean == pytest.approx(recall.tolist(), abs=1e-6)
    assert report.mass_recall_mean == pytest.approx(mass.tolist(), abs=1e-5)
    assert report.rel_l2_error == pytest.approx(err.tolist(), rel=1e-3)
    summary = report.summary()
    assert summary["recall_mean"] == pytest.approx(sum(report.recall_mean) / 2)
    assert summary["recall_p01_worst_head"] == min(report.recall_p01)
    assert summary["rel_l2_error_worst_head"] == max(report.rel_l2_error)
    assert report.to_dict()["summary"] == summary
    # a better index scores better on every figure
    better = measure_agreement(keys, values, queries, "faiss", index="IVF16,Flat", nprobe=8, top_k=k)
    assert better.summary()["recall_mean"] > summary["recall_mean"]
    assert better.summary()["mass_recall_mean"] > summary["mass_recall_mean"]
    assert better.summary()["rel_l2_error_mean"] < summary["rel_l2_error_mean"]


def test_compare_backends_refuses_mismatched_inputs():
    keys, values, queries = make_memory("gaussian", num_heads=1, head_dim=4, n_keys=10, n_queries=2)
    geometry = {"num_heads": 1, "head_dim": 4, "mem_dtype": "float32"}
    dense, topk, flat = (
        create_backend("exact", **geometry),
        create_backend("exact", **geometry, top_k=3),
        create_backend("faiss", **geometry),
    )
    with pytest.raises(ValueError, match=r"the memories are empty"):
        compare_backends(flat, dense, queries)
    with pytest.raises(TypeError, match=r"reference must be a dense 'exact' backend \(top_k=None\)"):
        compare_backends(flat, topk, queries)
    flat.add(keys, values)
    with pytest.raises(ValueError, match=r"different entries per row: \[10\] vs \[0\]"):
        compare_backends(flat, dense, queries)


# ---------------------------------------------------------------------- the CLI
SMALL = ["--keys", "256", "--queries", "16", "--heads", "2", "--dim", "8", "--k", "16"]


def test_cli_end_to_end(tmp_path, capsys):
    out = tmp_path / "report.json"
    assert main([*SMALL, "--k", "256", "--index", "Flat", "--source", "clustered", "--json", str(out)]) == 0
    printed = capsys.readouterr()
    assert printed.err == ""
    report = json.loads(out.read_text())
    assert report["args"]["index"] == "Flat" and report["args"]["backend"] == "faiss" and report["k"] == 256
    assert report["recall_mean"] == [1.0, 1.0]  # k >= memory size: everything retrieved, exact output
    assert report["mass_recall_mean"] == pytest.approx([1.0, 1.0], abs=1e-5)
    assert report["summary"]["rel_l2_error_worst_head"] < 1e-5
    assert json.loads(printed.out.strip().splitlines()[-1]) == report["summary"]


def test_cli_approximate_index(tmp_path, capsys):
    out = tmp_path / "ivf.json"
    argv = [
        "--keys",
        "1024",
        "--queries",
        "16",
        "--heads",
        "1",
        "--dim",
        "8",
        "--k",
        "8",
        "--source",
        "gaussian",
    ]
    assert main([*argv, "--index", "IVF16,Flat", "--nprobe", "1", "--json", str(out)]) == 0
    summary = json.loads(out.read_text())["summary"]
    assert 0.0 < summary["recall_mean"] < 1.0 and summary["rel_l2_error_mean"] > 0
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["--k", "abc"], "argument --k: invalid int value: 'abc'"),
        (["--k", "0"], "top_k must be a positive int, got 0 "),
        (["--backend", "annoy"], "unknown memory backend 'annoy'"),
        (["--source", "real"], "argument --source: invalid choice: 'real'"),
        (["--keys", "0"], "--keys must be >= 1, got 0"),
        (["--queries", "0"], "--queries must be >= 1, got 0"),
        (["--heads", "0"], "num_heads must be a positive int, got 0"),
        (["--index", "Bogus"], "index 'Bogus' is not a usable Faiss index_factory string"),
        (["--index", "HNSW8", "--nprobe", "4"], "nprobe=4 does not apply to index 'HNSW8'"),
        (["--backend", "exact", "--index", "Flat"], "the 'exact' backend is dense and takes no Faiss index"),
        (["--backend", "exact", "--nprobe", "4"], "the 'exact' backend takes no option(s) ['nprobe']"),
        (["--mem-dtype", "int8"], "argument --mem-dtype: invalid choice: 'int8'"),
        (["--json", "/nonexistent-dir/out.json"], "its directory does not exist"),
        (["--no-such-flag"], "unrecognized arguments: --no-such-flag"),
    ],
)
def test_cli_bad_arguments(argv, needle, capsys):
    assert main([*SMALL, *argv]) == 2
    printed = capsys.readouterr()
    lines = printed.err.splitlines()
    assert len(lines) == 1, printed.err
    assert lines[0].startswith("knn-memory-agreement: error: ")
    assert needle in lines[0]
    assert printed.out == ""
