"""The benchmark tools on tiny problems: they run, write what they promise, and resume.

Timings are never asserted (benchmarks hold speed targets, tests do not).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from benchmarks import ceilings, measure, results_io, scaling, scaling_group, scaling_run
from benchmarks.ceilings import Ceilings

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
TINY_CHECKPOINT = Path(__file__).parent / "data" / "upstream" / "tiny"
FAMILIES = "exact;Flat;IVF{nlist},Flat;HNSW32;SQfp16"


def fake_ceilings(device: str = "cpu", quick: bool = False) -> Ceilings:
    return Ceilings(
        device=device,
        matmul_fp32_gflops=100.0,
        matmul_bf16_gflops=200.0,
        mem_read_gbs=10.0,
        search_shape_fp32_gflops=80.0,
        matmul_n=64,
        read_mib=1,
        threads=1,
        seconds=0.0,
        machine=ceilings.machine_info(device),
    )


def _patch_ceilings(mp: pytest.MonkeyPatch) -> None:
    """The sweep's ceiling measurement takes seconds; its own test covers it."""
    mp.setattr(scaling_run, "measure_ceilings", fake_ceilings)
    mp.setattr(scaling_run, "matmul_gflops", lambda *a, **k: 1.0)
    mp.setattr(scaling_group, "matmul_gflops", lambda *a, **k: 1.0)


@pytest.fixture
def fast_ceilings(monkeypatch):
    _patch_ceilings(monkeypatch)


@pytest.fixture(scope="module")
def swept(tmp_path_factory) -> Path:
    """One sweep of every family at N=4096, shared by the tests that read its results."""
    out = tmp_path_factory.mktemp("sweep")
    with pytest.MonkeyPatch.context() as mp:
        _patch_ceilings(mp)
        assert sweep(out) == 0
    return out


def sweep(out: Path, *extra: str) -> int:
    return scaling.main(
        [
            "--sizes", "4096", "--heads", "1", "--queries", "64,1", "--k", "16",
            "--indexes", FAMILIES, "--nprobe", "4", "--efsearch", "32",
            "--agree-queries", "64", "--out", str(out), "--no-progress", "--no-plots", *extra,
        ]
    )  # fmt: skip


def points(path: Path) -> list[dict]:
    return [r for r in results_io.read_rows(path) if r.get("kind") == "point"]


def test_ceilings_measure_positive_rates():
    assert ceilings.matmul_gflops(128, torch.float32, repeats=2, budget_s=0.2) > 0
    assert ceilings.matmul_gflops(128, torch.bfloat16, repeats=2, budget_s=0.2) > 0
    assert ceilings.search_shape_gflops(64, 1024, 100, repeats=2, budget_s=0.2) > 0
    assert ceilings.read_bandwidth_gbs(8, repeats=2, budget_s=0.2) > 0
    c = fake_ceilings()
    assert c.ratio_flops(50.0) == pytest.approx(0.5)
    assert c.ratio_flops(50.0, "bfloat16") == pytest.approx(0.25)
    assert c.ratio_bandwidth(5.0) == pytest.approx(0.5)
    assert "fp32 matmul" in ceilings.format_ceilings(c)


def test_one_point_per_family_written_to_jsonl_and_csv(swept):
    tmp_path = swept
    rows = points(tmp_path / "scaling.jsonl")
    assert {r["status"] for r in rows} == {"ok"}
    assert {r["family"] for r in rows} == {"exact", "Flat", "IVF,Flat", "HNSW32", "SQfp16"}
    assert {r["queries"] for r in rows} == {64, 1}
    for r in rows:
        assert r["n_keys"] == 4096 and r["heads"] == 1 and r["k"] == 16 and r["head_dim"] == 100
        assert r["search_s"] > 0 and r["build_s"] > 0 and r["add_window_s"] > 0
        assert 0 <= r["recall_mean"] <= 1 and 0 <= r["recall_p01"] <= r["recall_mean"] + 1e-9
        assert 0 <= r["mass_recall_mean"] <= 1 + 1e-6 and r["rel_err_mean"] >= 0
        assert 0 < r["fraction_scanned"] <= 1
        assert r["bytes_per_token"] > 0 and r["dense_bf16_kv_bytes_per_token"] == 400
        assert r["search_gflops_ratio"] == pytest.approx(r["search_gflops"] / 100.0)
        if r["backend"] == "faiss":
            assert r["index_search_s"] > 0
    flat = [r for r in rows if r["family"] == "Flat"]
    assert all(r["recall_mean"] == pytest.approx(1.0) for r in flat)  # exact top-k
    ivf = next(r for r in rows if r["family"] == "IVF,Flat")
    assert ivf["index"] == f"IVF{measure.nlist_for(4096)},Flat" and ivf["nprobe"] == 4
    assert ivf["fraction_scanned"] == pytest.approx(4 / measure.nlist_for(4096))
    header = (tmp_path / "scaling.csv").read_text().splitlines()[0].split(",")
    for column in (
        "point_id",
        "search_s",
        "recall_mean",
        "mass_recall_p01",
        "bytes_per_token",
        "fraction_scanned",
    ):
        assert column in header
    assert len((tmp_path / "scaling.csv").read_text().splitlines()) == len(rows) + 1


def test_resume_skips_points_already_measured(tmp_path, fast_ceilings, capsys):
    assert sweep(tmp_path, "--indexes", "exact;Flat") == 0
    first = points(tmp_path / "scaling.jsonl")
    assert len(first) == 4
    assert sweep(tmp_path, "--indexes", "exact;Flat") == 0
    assert "nothing to do" in capsys.readouterr().out
    assert len(points(tmp_path / "scaling.jsonl")) == 4
    # a torn last line (an interrupted run) is ignored, and only the missing points run again
    path = tmp_path / "scaling.jsonl"
    lines = path.read_text().splitlines()
    kept = [ln for ln in lines if '"family": "Flat"' not in ln]
    path.write_text("\n".join(kept) + '\n{"kind": "point", "point_id": "tor')
    assert sweep(tmp_path, "--indexes", "exact;Flat") == 0
    again = points(path)
    assert sorted(r["point_id"] for r in again) == sorted(r["point_id"] for r in first)
    assert sum(r["family"] == "Flat" for r in again) == 2


def test_index_that_cannot_train_is_skipped_not_faked(tmp_path, fast_ceilings):
    assert sweep(tmp_path, "--indexes", "IVF{nlist},SQ8", "--queries", "64") == 0
    (row,) = points(tmp_path / "scaling.jsonl")
    assert row["status"] == "skipped" and "needs" in row["reason"]


def test_plots_are_valid_pngs(swept, tmp_path):
    from matplotlib.image import imread

    from benchmarks.plots import pareto_front, plot_all

    written = plot_all(swept / "scaling.jsonl", tmp_path / "plots")
    names = {p.name for p in written}
    assert {"latency_vs_n_attention.png", "pareto_attention.png", "bytes_per_token.png"} <= names
    for p in written:
        assert p.read_bytes()[:8] == PNG_MAGIC
        image = imread(p)
        assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100
    assert pareto_front([(1, 0.9), (2, 0.8), (3, 0.95), (0.5, 1.0)]) == [(0.5, 1.0), (3, 0.95)]


def test_report_written_from_results(swept):
    from benchmarks.report import write_report

    tmp_path = swept
    readme = write_report(swept, swept / "README.md")
    text = readme.read_text()
    for heading in ("## Machine and ceilings", "## Targets", "Bytes per stored token", "## Results: prefill"):
        assert heading in text
    assert "(plots/latency_vs_n_attention.png)" in text
    assert "/tmp" not in text and str(tmp_path) not in text


def test_phase_report_lists_worker_thread_calls(tmp_path):
    """The phase section of ``benchmarks/README.md`` shows each profile's table and, where a profile has
    them, the calls that ran on worker threads (not part of the table's sum)."""
    from benchmarks.report import _phases_section

    profile = {
        "tokens": 2048, "backend": "faiss:auto:workers=2", "top_k": 8, "threads": 1, "prefill_seconds": 3.0,
        "decode_tokens_per_second": None, "memory_entries_per_head": 2000, "lists_per_head": 16,
        "peak_rss_mib": 500.0, "ceilings": {"matmul_fp32_gflops": 100.0, "mem_read_gbs": 10.0},
        "phases": [
            {"phase": "model forward", "seconds": 2.0, "share": 2 / 3, "floor_seconds": 1.0},
            {"phase": "index builds", "seconds": 1.0, "share": 1 / 3, "floor_seconds": None},
        ],
    }  # fmt: skip
    (tmp_path / "a.json").write_text(json.dumps(profile))
    (tmp_path / "b.json").write_text(
        json.dumps({**profile, "worker_threads": {"build": {"calls": 4, "seconds": 1.5}}})
    )
    text = "\n".join(_phases_section(tmp_path))
    assert text.count("| model forward | 2.0 | 66.7% | 1.0 | 2.0 |") == 2
    assert text.count("On worker threads") == 1 and "`build` 1.5 s (4 calls)" in text


def test_results_carry_no_machine_paths():
    argv = ["--out", "/a/b/res", "--sources", "attention,captured:/x/y/cap.pt", "--readme=/q/README.md"]
    assert results_io.portable_argv(argv) == [
        "--out", "res", "--sources", "attention,captured:cap.pt", "--readme=README.md",
    ]  # fmt: skip


def test_work_models():
    assert measure.nlist_for(4096) * 39 <= 4096
    assert measure.nlist_for(2**20) == 4096
    assert measure.resolve_index("IVF{nlist},Flat", 65536) == "IVF1024,Flat"
    assert measure.search_knob("IVF64,PQ10") == "nprobe" and measure.search_knob("HNSW32") == "efSearch"
    assert measure.search_knob("Flat") is None and measure.search_knob(None) is None
    assert measure.code_bytes("IVF64,PQ25", 100) == 25 and measure.code_bytes("SQ8", 100) == 100
    assert measure.code_bytes("Flat", 100) == 400 and measure.code_bytes(None, 100) == 200
    assert measure.fraction_scanned("IVF1024,Flat", 2**20, 128, 32, None) == pytest.approx(1 / 32)
    assert 0 < measure.fraction_scanned("HNSW32", 2**20, 128, None, 256) < 0.1
    work = measure.search_work(
        "Flat", n_keys=1000, head_dim=10, heads=2, queries=3, k=5, nprobe=None, ef=None, index_active=True
    )
    assert work["search_flop"] == 2 * 10 * 1000 * 3 * 2
    t = measure.time_call(lambda: None, budget_s=0.01)
    assert t.runs >= 3 and t.best <= t.median


def test_with_search_params_changes_the_knob_without_retraining():
    import knn_memory

    keys = torch.randn(1, 1, 4096, 16)
    mem = knn_memory.create_backend("faiss", num_heads=1, head_dim=16, index="IVF32,Flat", nprobe=1, top_k=8)
    mem.add(keys, keys)
    trainings = mem.head_index(0, 0).trainings
    other = scaling_group.with_search_params(mem, {"nprobe": 32})
    assert other is mem and other.config()["nprobe"] == 32
    assert other.head_index(0, 0).trainings == trainings
    q = torch.randn(1, 1, 8, 16)
    exact = knn_memory.create_backend("faiss", num_heads=1, head_dim=16, index="Flat", top_k=8)
    exact.add(keys, keys)
    assert torch.equal(other.search(q).ids.sort(-1).values, exact.search(q).ids.sort(-1).values)


def test_backend_check_measures_both_figures():
    from benchmarks import backend_check

    flat = backend_check.flat_check(n_keys=4096, heads=1, queries=64, k=16, dim=32, ceiling_n=256, rounds=2)
    assert flat["index_gflops"] > 0 and flat["backend_gflops"] > 0 and flat["fp32_matmul_gflops"] > 0
    assert flat["index_ratio_best_vs_best"] == pytest.approx(
        flat["index_gflops"] / flat["fp32_matmul_gflops"]
    )
    paired = [
        2 * 64 * 4096 * 32 / t / 1e9 / g
        for t, g in zip(flat["index_search_s_rounds"], flat["fp32_matmul_gflops_rounds"], strict=True)
    ]
    assert flat["index_ratio"] == pytest.approx(sum(paired) / 2)  # the median of two rounds
    assert flat["index_meets_target"] == (flat["index_ratio"] >= 0.6)
    assert flat["index_1thread_gflops"] > 0
    g = backend_check.grouping_check(memory=2048, heads=2, queries=64, local=16, dim=16, grouping=(1, 32))
    assert g["search_calls"] == 4
    assert g["largest_scores_elements"] == g["bound_elements"] == 1 * 32 * 2048
    assert g["scores_within_bound"] and g["allocation_within_bound"]


def test_capture_tool_on_a_tiny_checkpoint(tmp_path, fast_ceilings):
    from benchmarks import capture, sources

    out = tmp_path / "tiny.pt"
    assert (
        capture.main([str(TINY_CHECKPOINT), "--tokens", "256", "--max-queries", "64", "--out", str(out)]) == 0
    )
    data = sources.load_capture(str(out))
    config = json.loads((TINY_CHECKPOINT / "config.json").read_text())
    L, H = len(config["mem_layers"]), config["num_attention_heads"]
    d = config["hidden_size"] // H
    window = config["max_position_embeddings"]
    assert data["keys"].shape == (L, H, 256 - window, d)  # every window but the last is in memory
    assert data["queries"].shape == (L, H, 64, d)
    assert int(data["query_memory_size"][-1]) == 256 - window
    assert data["checkpoint"] == "tiny"
    mem = sources.load_memory(f"captured:{out}", num_heads=L * H, head_dim=d, n_keys=128, n_queries=32)
    assert mem.keys.shape == (1, L * H, 128, d) and mem.queries.shape == (1, L * H, 32, d)
    with pytest.raises(sources.SourceUnavailable):
        sources.load_memory(f"captured:{out}", num_heads=1, head_dim=d, n_keys=10**6, n_queries=1)
    # and a scaling point on it
    rc = scaling.main(
        [
            "--sources", f"captured:{out}", "--sizes", "128", "--heads", "2", "--dims", str(d), "--k", "8",
            "--queries", "32", "--indexes", "Flat", "--out", str(tmp_path / "res"), "--no-progress", "--no-plots",
        ]
    )  # fmt: skip
    assert rc == 0
    (row,) = points(tmp_path / "res" / "scaling.jsonl")
    assert row["status"] == "ok" and row["source"] == "captured (tiny)"


def test_capture_around_a_top_k_backend_records_each_query_once(tmp_path, fast_ceilings):
    """The model searches through ``search_for_attention``; the recorder must see those calls, once each."""
    from benchmarks import capture, sources

    runs = {}
    for backend in ("exact", "faiss:Flat"):
        out = tmp_path / f"{backend.replace(':', '_')}.pt"
        args = [str(TINY_CHECKPOINT), "--tokens", "256", "--max-queries", "128", "--out", str(out)]
        assert capture.main([*args, "--backend", backend, "--top-k", "256"]) == 0
        runs[backend] = sources.load_capture(str(out))
    exact, flat = runs["exact"], runs["faiss:Flat"]
    assert flat["queries"].shape == exact["queries"].shape and flat["queries"].shape[2] > 0
    # the memory size each kept query saw: a query recorded twice would repeat a window's sizes
    assert torch.equal(flat["query_memory_size"], exact["query_memory_size"])
    # Flat with k >= the memory (256 > 224 keys) is exact attention: the same queries, to float tolerance
    torch.testing.assert_close(flat["queries"], exact["queries"], atol=1e-4, rtol=1e-4)


def test_end_to_end_on_a_tiny_model(tmp_path):
    from benchmarks import end_to_end

    rc = end_to_end.main(
        ["--contexts", "1k", "--decode", "2", "--backends", "exact;faiss:Flat", "--no-warmup",
         "--out", str(tmp_path), "--no-progress"]
    )  # fmt: skip
    assert rc == 0
    rows = results_io.read_rows(tmp_path / "end_to_end.jsonl")
    assert [r["backend"] for r in rows] == ["exact", "faiss:Flat"]
    for r in rows:
        assert r["status"] == "ok" and r["prefill_tokens_per_s"] > 0 and r["decode_ms_per_token"] > 0
        assert r["memory_entries"] > 0 and r["peak_rss_mib"] > 0
    assert end_to_end.parse_backend("faiss:IVF256,Flat:nprobe=32")["mem_index_params"] == {"nprobe": 32}
    assert end_to_end.parse_backend("faiss")["mem_backend"] == "faiss"  # Flat, the backend's default
    with pytest.raises(ValueError, match="--backends 'dense'"):
        end_to_end.parse_backend("dense")


def test_sharded_benchmark_one_against_two_ranks(tmp_path):
    """knn-memory-sharded: the same answer on 1 and 2 ranks, the memory split between the ranks, and the bytes
    sent per (query, head) equal to the formula."""
    from benchmarks import sharded

    argv = ["--length", "512", "--ranks", "1,2", "--queries", "16", "--repeats", "1", "--out", str(tmp_path)]
    assert sharded.main(argv) == 0
    rows = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    one, two = rows
    assert (one["world_size"], two["world_size"]) == (1, 2)
    assert one["correct"] and two["correct"]  # union top-k over 2 ranks attends to more entries than 1 rank
    assert len(two["bytes_per_rank"]) == 2 and all(b > 0 for b in two["bytes_per_rank"])
    assert (
        two["sent_bytes_per_query_head"]
        == two["formula_bytes_per_query_head"]
        == 4 + 4 * (two["head_dim"] + 1)
    )
    assert one["sent_bytes_prefill"] == 0 and two["sent_bytes_prefill"] > 0
    assert sharded.main(["--backend", "faiss:auto", "--out", str(tmp_path)]) == 2


def test_sharded_projection_follows_the_formula():
    from benchmarks.sharded import MODEL_3B, projection

    rows = {(r["mode"], r["tokens"]): r for r in projection([2**20], 8, 1e9)}
    pairs = 2**20 * MODEL_3B["memory_layers"] * MODEL_3B["heads"]
    union, glob = rows[("union", 2**20)], rows[("global", 2**20)]
    assert union["payload_bytes_per_rank"] == pairs * (4 + 4 * 101)
    assert union["wire_bytes_per_rank"] == pytest.approx(pairs * 408 * 2 * 7 / 8)
    assert glob["payload_bytes_per_rank"] == pairs * (408 + 4 * 128)
    assert glob["wire_bytes_per_rank"] == pytest.approx(pairs * (408 * 2 * 7 / 8 + 512 * 7))
    assert union["collectives"] == 512 * 3 * 2 and glob["collectives"] == 512 * 3 * 3
    assert union["seconds"]["gloo all-reduce on this machine (measured)"] == pytest.approx(
        union["wire_bytes_per_rank"] / 1e9
    )


def test_sharded_benchmark_synthetic_fill(tmp_path):
    """--fill synthetic: no model; the same entries split between 2 ranks, each window on one rank,
    and the bytes sent per (query, head) equal to the formula."""
    from benchmarks import sharded

    argv = ["--fill", "synthetic", "--backend", "sharded:exact", "--length", "1000", "--ranks", "1,2"]
    argv += ["--queries", "8", "--repeats", "1", "--out", str(tmp_path)]
    assert sharded.main(argv) == 0
    one, two = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert one["fill"] == two["fill"] == "synthetic:attention"
    assert one["memory_entries"] == two["memory_entries"] == 1000
    assert one["prefill_seconds"] is None and one["correct"] is None
    entry = 2 * 4 * 32 * 2  # keys and values, 4 heads x head_dim 32, bf16
    assert one["bytes_per_rank"][0] >= 2 * 1000 * entry  # both memory layers
    # 15 windows of 64 tokens and one of 40, in turn: 8 x 64 = 512 entries on rank 0, 7 x 64 + 40 on rank 1
    assert two["bytes_per_rank"][0] >= 2 * 512 * entry and two["bytes_per_rank"][1] >= 2 * 488 * entry
    assert max(two["bytes_per_rank"]) < one["bytes_per_rank"][0]
    assert two["sent_bytes_per_query_head"] == two["formula_bytes_per_query_head"] == 4 + 4 * 33
    assert "synthetic:attention" in (tmp_path / "summary.md").read_text()
    assert sharded.main(["--fill", "random", "--out", str(tmp_path)]) == 2


@pytest.mark.parametrize("one_call_per_row", [True, False])
def test_phase_profile_accounts_for_every_search_path(monkeypatch, one_call_per_row):
    """The phase profile of a short prompt past the "auto" index's exact phase: the phases add up to the
    wall time, and the list scan is timed and counted whether a row's heads go to C in one call
    (``indexes.batched``) or one call each."""
    from benchmarks import phases
    from indexes import batched, native

    monkeypatch.setattr(phases, "matmul_gflops", lambda *a, **k: 100.0)
    monkeypatch.setattr(phases, "read_bandwidth_gbs", lambda *a, **k: 10.0)
    if not one_call_per_row:  # one C call per (row, head), as for indexes that cannot go together
        monkeypatch.setattr(batched, "_compiled", lambda indexes: None)
    result = phases.run(2048, "faiss:auto:exact_until=256", 8, None, 1, 0, 2)
    seconds = {row["phase"]: row["seconds"] for row in result["phases"]}
    assert sum(seconds.values()) == pytest.approx(result["prefill_seconds"], rel=1e-6)
    assert seconds["search: list scan"] > 0
    # the compiled lists rank inside the scan's own call; the Python lists rank first, with torch
    assert (seconds["search: list ranking"] > 0) == (not native.available())
    assert seconds["search: exact phase"] > 0  # before the first build: all heads in one selection
    assert seconds["value gather"] > 0 and result["calls"]["gather"] > 0  # the values weighted in place
    assert result["calls"]["search.scan"] > 0 and result["calls"]["index.bounded_add"] > 0
    assert result["scan"]["queries"] > 0 and result["scan"]["keys_scanned"] > 0
    assert result["lists_per_head"] > 0
    # the add's floor: its bytes at the bandwidth, and assigning each key to a list at the matmul rate
    work = result["work"]
    assert work["index.bounded_add"] >= 2 * 32 * 16 * 2 * 4 * 256  # >= 256 keys, 16 lists, 8 heads
    floor = {row["phase"]: row["floor_seconds"] for row in result["phases"]}["key add"]
    assert floor == pytest.approx(work["backend.add"] / 10e9 + work["index.bounded_add"] / 100e9)


def test_phase_profile_times_rebuilds_side_by_side_once(monkeypatch):
    """With ``workers=2`` a row's rebuilds run on worker threads: their time counts once, as index builds
    (the wall time of the row's rebuilds), and the phases still add up to the wall time."""
    from benchmarks import phases
    from indexes import batched, native

    if native.split_threads(2) < 2:
        pytest.skip("the library cannot split work over threads here")
    monkeypatch.setattr(phases, "matmul_gflops", lambda *a, **k: 100.0)
    monkeypatch.setattr(phases, "read_bandwidth_gbs", lambda *a, **k: 10.0)
    widths = []
    real_fan_out = batched.fan_out
    monkeypatch.setattr(
        batched, "fan_out", lambda fn, items, w: widths.append(w) or real_fan_out(fn, items, w)
    )
    result = phases.run(2048, "faiss:auto:exact_until=256:workers=2", 8, None, 1, 0, 0)
    seconds = {row["phase"]: row["seconds"] for row in result["phases"]}
    assert widths and set(widths) == {2}  # the rebuilds did run side by side
    assert sum(seconds.values()) == pytest.approx(result["prefill_seconds"], rel=1e-6)
    assert 0 < seconds["index builds"] < result["prefill_seconds"]
    assert seconds["model forward"] > 0
    builds = next(row for row in result["phases"] if row["phase"] == "index builds")
    assert builds["floor_seconds"] > 0  # the work of the rebuilds on worker threads is counted
    # the rebuilds on worker threads are listed apart, with their calls and their own seconds
    apart = result["worker_threads"]["build"]
    assert apart["calls"] >= 2 and apart["seconds"] > 0
    assert result["calls"]["build"] >= 1  # the row's rebuilds, timed once on the main thread
