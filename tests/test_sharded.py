"""The ``"sharded"`` backend over 2 gloo ranks (spawned here, a few seconds each), against one process.

Each rank is ``tests/shard_worker.py``; the references are single-process memories built here from the
same inputs.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import knn_memory
from knn_memory.process_group import free_port, local_rank_env
from tests import shard_worker as sw
from tests.tiny import tiny_model

ROOT = Path(__file__).resolve().parents[1]


def run_ranks(scenario: str, out: Path, world_size: int = 2, timeout: float = 240, env: dict | None = None):
    """Start ``world_size`` ranks of the worker; return their exit codes and wall time."""
    port = free_port()
    procs = []
    start = time.monotonic()
    for rank in range(world_size):
        rank_env = {**os.environ, **local_rank_env(rank, world_size, port), **(env or {})}
        procs.append(
            subprocess.Popen(
                [sys.executable, "-m", "tests.shard_worker", scenario, str(out)],
                cwd=ROOT,
                env=rank_env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    codes, errors = [], []
    for p in procs:
        try:
            _, err = p.communicate(timeout=max(1.0, timeout - (time.monotonic() - start)))
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise AssertionError(f"scenario {scenario!r}: ranks still running after {timeout} s") from None
        codes.append(p.returncode)
        errors.append(err)
    return codes, errors, time.monotonic() - start


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("sharded")
    codes, errors, _ = run_ranks("main", out)
    assert codes == [0, 0], "\n".join(e[-3000:] for e in errors)
    return out, [torch.load(out / f"main-rank{r}.pt", weights_only=False) for r in range(2)]


def reference(kind: str):
    name, options = sw.MEMORIES[kind]
    mem = sw.build(name, **options)
    for keys, values, mask in sw.windows(5):
        mem.add(keys, values, mask)
    return mem


def both(results, key):
    a, b = results[0][key], results[1][key]
    return a, b


@pytest.mark.parametrize("kind", ["exact", "global"])
def test_sharded_equals_one_process(ranks, kind):
    """Sharded exact equals exact, and global Flat equals faiss:Flat, on both ranks, through beam-search
    reorders, rollback and truncation (5 windows: the ranks hold 3 and 2)."""
    _, results = ranks
    ref = reference(kind)
    want = sw.attend(ref)
    for r in range(2):
        torch.testing.assert_close(results[r][f"{kind}/attention"], want, rtol=1e-5, atol=1e-5)
        assert torch.equal(results[r][f"{kind}/lengths"], ref.lengths)
    ref.reorder(torch.tensor([1, 0, 1]))
    g = torch.Generator().manual_seed(7)
    ref.add(torch.randn(3, sw.H, sw.N, sw.D, generator=g), torch.randn(3, sw.H, sw.N, sw.D, generator=g))
    want = sw.attend(ref, seed=2)
    ref.truncate(torch.tensor([7, 20, 3]))
    cut = sw.attend(ref, seed=2)
    for r in range(2):
        torch.testing.assert_close(results[r][f"{kind}/reordered"], want, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(results[r][f"{kind}/rolled_back"], want, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(results[r][f"{kind}/truncated"], cut, rtol=1e-5, atol=1e-5)
        assert results[r][f"{kind}/truncated_lengths"].tolist() == [7, 20, 3]
    assert not torch.allclose(want, cut)  # the truncation changed what is attended to


def test_union_is_a_superset_of_the_global_top_k(ranks):
    _, results = ranks
    ref = reference("union")
    q, _, _ = sw.queries(1)
    exact_top = ref.search(q).scores  # [B, H, q, K]
    union = torch.cat([results[0]["union/scores"], results[1]["union/scores"]], dim=-1)  # 2K per query
    assert torch.equal(union.topk(sw.K, dim=-1).values, exact_top)
    # and attends to more than the global top-k: it differs from the global result
    assert not torch.allclose(results[0]["union/attention"], results[0]["global/attention"])


def test_global_mode_keeps_exactly_k_entries_over_the_ranks(ranks):
    _, results = ranks
    kept = sum((results[r]["global/scores"] > -torch.inf).sum(-1) for r in range(2))
    assert bool((kept == sw.K).all())


def test_communication_bytes_follow_the_formula(ranks):
    """Per attention call: 4 bytes (max) + 4 (d + 1) (outputs, sums) per (row, head, query), plus 4 k in
    global mode: independent of the memory size."""
    _, results = ranks
    rows = sw.B * sw.H * 5
    for kind, gather in (("exact", 0), ("global", 4 * sw.K), ("union", 0)):
        sent = results[0][f"{kind}/sent"]
        assert sent.get("all_reduce_max", 0) == 4 * rows
        assert sent.get("all_reduce_sum", 0) == 4 * (sw.D + 1) * rows
        assert sent.get("all_gather", 0) == gather * rows


def test_uneven_and_empty_shards(ranks):
    _, results = ranks
    ref = sw.build("exact")
    keys, values, mask = sw.windows(5)[0]
    ref.add(keys, values, mask)
    for r in range(2):
        torch.testing.assert_close(results[r]["empty_shard/attention"], sw.attend(ref), rtol=1e-5, atol=1e-5)
    nbytes = results[0]["empty_shard/nbytes"]
    assert nbytes[0] > 0 and nbytes[1] == 0
    uneven = results[0]["exact/nbytes"]
    assert uneven[0] > uneven[1] > 0  # 3 windows against 2
    assert results[0]["exact/nbytes"] == results[1]["exact/nbytes"]


def test_save_load_in_the_same_group_and_refused_with_another_world_size(ranks):
    out, results = ranks
    for r in range(2):
        torch.testing.assert_close(results[r]["saved/loaded_attention"], results[r]["saved/attention"])
    assert (out / "saved" / "rank-0-of-2").is_dir() and (out / "saved" / "manifest").is_dir()
    with pytest.raises(ValueError, match="was saved by 2 ranks, but this group has 1"):
        knn_memory.load_backend(out / "saved")


@pytest.mark.parametrize("label", list(sw.MODEL_SETTINGS))
def test_the_model_with_a_sharded_memory(ranks, label):
    """A left-padded batch and greedy generate() under 2 ranks give one process's answers."""
    _, results = ranks
    plain = {
        "exact": {"mem_backend": "exact"},
        "global": {"mem_backend": "faiss", "mem_index": "Flat", "mem_top_k": sw.K},
    }
    model = tiny_model(seed=3, **plain[label])
    ids, attention_mask = sw.model_inputs()
    with torch.no_grad():
        logits = model(ids, attention_mask=attention_mask).logits
        generated = model.generate(ids[:1, 4:], max_new_tokens=6, do_sample=False)
    for r in range(2):
        got = results[r]["model"][label]
        real = attention_mask.bool()
        torch.testing.assert_close(got["logits"][real], logits[real], rtol=1e-5, atol=1e-5)
        assert torch.equal(got["generated"], generated)
        torch.testing.assert_close(got["loaded_next"], got["live_next"])


def test_one_process_sharded_memory_equals_its_inner_backend():
    """World size 1 (no torchrun): the partial-state merge gives the one-softmax numbers."""
    for kind in ("exact", "global"):
        ref = reference(kind)
        mem = sw.sharded(kind)
        for keys, values, mask in sw.windows(5):
            mem.add(keys, values, mask)
        assert mem.world_size == 1
        torch.testing.assert_close(sw.attend(mem), sw.attend(ref), rtol=2e-6, atol=2e-6)


def test_mismatched_configs_are_refused_at_setup(tmp_path):
    codes, errors, _ = run_ranks("mismatch", tmp_path)
    assert codes == [0, 0], "\n".join(errors)
    for r in range(2):
        error = torch.load(tmp_path / f"mismatch-rank{r}.pt")["error"]
        assert error is not None and "builds another memory" in error and "index" in error


@pytest.mark.parametrize("how", ["die", "hang"])
def test_a_dead_or_hung_rank_ends_the_other_with_a_clear_error(tmp_path, how):
    codes, errors, _ = run_ranks(how, tmp_path, timeout=120, env={"SHARD_TIMEOUT": "4"})
    assert codes[0] == 0, errors[0][-3000:]
    result = torch.load(tmp_path / f"{how}-rank0.pt")
    assert result["error"] is not None and "failed on rank 0" in result["error"]
    assert result["seconds"] < 30  # bounded by the 4 s timeout, never a hang
    if how == "hang":
        assert result["seconds"] >= 3  # it waited for the timeout, then gave up
    assert codes[1] == (3 if how == "die" else 4)


def test_sharded_options_are_checked():
    with pytest.raises(ValueError, match="mode must be one of"):
        sw.build("sharded", mode="all")
    with pytest.raises(ValueError, match="not 'sharded'"):
        sw.build("sharded", inner="sharded")
    with pytest.raises(ValueError, match="unknown memory backend 'nope'"):
        sw.build("sharded", inner="nope")
    with pytest.raises(ValueError, match="timeout"):
        sw.build("sharded", timeout=0)
    from longllama.cli_args import parse_backend

    assert parse_backend("sharded:faiss:auto:mode=global") == {
        "mem_backend": "sharded",
        "mem_index": "auto",
        "mem_index_params": {"inner": "faiss", "mode": "global"},
    }
    assert parse_backend("sharded") == {"mem_backend": "sharded", "mem_index_params": {"inner": "exact"}}
    with pytest.raises(ValueError, match="cannot hold sharded"):
        parse_backend("sharded:sharded")


def test_memory_attention_with_a_one_process_sharded_memory_is_used_by_the_model():
    model = tiny_model(seed=3, mem_backend="sharded", mem_index_params={"inner": "exact"})
    ids, attention_mask = sw.model_inputs()
    ref = tiny_model(seed=3, mem_backend="exact")
    with torch.no_grad():
        a = model(ids, attention_mask=attention_mask)
        b = ref(ids, attention_mask=attention_mask)
    assert type(a.cache.memory(1)).__name__ == "ShardedBackend"
    real = attention_mask.bool()
    torch.testing.assert_close(a.logits[real], b.logits[real], rtol=2e-6, atol=2e-6)


def test_a_model_cache_saved_by_ranks_loads_on_as_many_only(ranks):
    out, _ = ranks
    for label in sw.MODEL_SETTINGS:
        saved = out / f"model-{label}"
        assert (
            (saved / "rank-0-of-2").is_dir()
            and (saved / "rank-1-of-2").is_dir()
            and (saved / "manifest").is_dir()
        )
        model = tiny_model(seed=3, **sw.MODEL_SETTINGS[label])
        with pytest.raises(ValueError, match="saved by 2 ranks, but this group has 1"):
            model.load_memory(saved)


def test_passkey_cli_under_torchrun_answers_as_one_process(tmp_path):
    """``torchrun --nproc-per-node 2 -m longllama.passkey_cli --backend sharded:...``: one table (rank 0),
    one results file, and the answers and p(ans) of the same index in one process."""
    common = ["--lengths", "1k", "--seeds", "1", "--top-k", "8", "--threads", "1", "--no-progress"]
    torchrun = Path(sys.executable).with_name("torchrun")
    cmd = [
        str(torchrun),
        "--nproc-per-node",
        "2",
        "--master-port",
        str(free_port()),
        "-m",
        "longllama.passkey_cli",
    ]
    two = subprocess.run(
        [*cmd, *common, "--backend", "sharded:faiss:Flat:mode=global", "--out", str(tmp_path / "two")],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert two.returncode == 0, two.stderr[-3000:]
    assert two.stdout.count("sharded:faiss:Flat/top8/mode=global") == 1  # the table, printed once
    one = subprocess.run(
        [
            sys.executable,
            "-m",
            "longllama.passkey_cli",
            *common,
            "--backend",
            "faiss:Flat",
            "--out",
            str(tmp_path / "one"),
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
    )
    assert one.returncode == 0, one.stderr[-3000:]
    rows = {}
    for name in ("one", "two"):
        lines = (tmp_path / name / "results.jsonl").read_text().splitlines()
        assert len(lines) == 1  # rank 1 wrote nothing
        rows[name] = json.loads(lines[0])
    assert rows["two"]["output"] == rows["one"]["output"] and rows["two"]["correct"]
    assert abs(rows["two"]["answer_prob"] - rows["one"]["answer_prob"]) < 1e-5


def test_search_knobs_reach_the_slice():
    mem = sw.build("sharded", inner="faiss", index="IVF4,Flat", top_k=2)
    mem.set_search_params(nprobe=3)
    assert mem.shard.index_options["nprobe"] == 3 and mem.config()["nprobe"] == 3
    with pytest.raises(ValueError, match="has no search knobs"):
        sw.build("sharded").set_search_params(nprobe=3)
