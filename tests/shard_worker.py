"""One rank of the sharded-memory tests: ``python -m tests.shard_worker SCENARIO OUT`` under RANK/WORLD_SIZE.

``tests/test_sharded.py`` starts two of these (gloo on CPU) and compares what each rank writes to
``OUT/<scenario>-rank<r>.pt`` with single-process memories built from the same :func:`windows` in the
test process. The inputs are generated from seeds, so every rank (and the test) sees the same ones.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import torch

B, H, D, N = 2, 3, 8, 6  # rows, heads, head_dim, tokens per window
K = 4


def windows(count: int, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """``count`` windows of (keys, values, mask) [B, H, N, D] / [B, N]; row 1 is left-padded in window 0."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for w in range(count):
        keys = torch.randn(B, H, N, D, generator=g)
        values = torch.randn(B, H, N, D, generator=g)
        mask = torch.ones(B, N, dtype=torch.bool)
        if w == 0:
            mask[1, :4] = False
        out.append((keys, values, mask))
    return out


def queries(seed: int = 1, q: int = 5, batch: int = B) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Queries and a local window: [batch, H, q, D] each."""
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(batch, H, q, D, generator=g) for _ in range(3))


def build(name: str, **options):
    import knn_memory

    return knn_memory.create_backend(
        name, num_heads=H, head_dim=D, batch_size=B, mem_dtype="float32", **options
    )


#: the memories the scenarios build: (backend, options), on every rank and as the single-process reference
MEMORIES = {
    "exact": ("exact", {}),
    "global": ("faiss", {"index": "Flat", "top_k": K}),
    "union": ("faiss", {"index": "Flat", "top_k": K}),
}


def sharded(kind: str, **extra):
    inner, options = MEMORIES[kind]
    mode = "union" if kind == "union" else "global"
    return build("sharded", inner=inner, mode=mode, timeout=30.0, **options, **extra)


def attend(memory, seed: int = 1) -> torch.Tensor:
    from knn_memory import memory_attention

    q, lk, lv = queries(seed, batch=memory.batch_size)
    return memory_attention(q, lk, lv, memory=memory)


def main_scenarios(out: Path, rank: int) -> dict:
    import knn_memory

    results: dict = {}
    data = windows(5)
    for kind in MEMORIES:
        mem = sharded(kind)
        for keys, values, mask in data:  # 5 windows: ranks hold 3 and 2 (uneven)
            mem.add(keys, values, mask)
        before = dict(mem.group.sent_bytes)
        results[f"{kind}/attention"] = attend(mem)
        results[f"{kind}/sent"] = {k: v - before.get(k, 0) for k, v in mem.group.sent_bytes.items()}
        q, _, _ = queries(1)
        hits = mem.search(q)
        results[f"{kind}/scores"] = hits.scores
        results[f"{kind}/lengths"] = mem.lengths
        results[f"{kind}/nbytes"] = mem.nbytes_per_rank()
        # beam search: reorder rows (one repeated), add a window, attend
        mem.reorder(torch.tensor([1, 0, 1]))
        g = torch.Generator().manual_seed(7)
        mem.add(torch.randn(3, H, N, D, generator=g), torch.randn(3, H, N, D, generator=g))
        results[f"{kind}/reordered"] = attend(mem, seed=2)
        # checkpoint, add, rollback; truncate
        cp = mem.checkpoint()
        mem.add(torch.randn(3, H, N, D, generator=g) * 5, torch.randn(3, H, N, D, generator=g))
        mem.rollback(cp)
        results[f"{kind}/rolled_back"] = attend(mem, seed=2)
        mem.truncate(torch.tensor([7, 20, 3]))
        results[f"{kind}/truncated"] = attend(mem, seed=2)
        results[f"{kind}/truncated_lengths"] = mem.lengths
    # an empty shard: one window, held by rank 0 only
    mem = sharded("exact")
    keys, values, mask = data[0]
    mem.add(keys, values, mask)
    results["empty_shard/attention"] = attend(mem)
    results["empty_shard/nbytes"] = mem.nbytes_per_rank()
    # save on both ranks, load back in the same group
    mem = sharded("global")
    for keys, values, mask in data:
        mem.add(keys, values, mask)
    mem.save(out / "saved")
    loaded = knn_memory.load_backend(out / "saved")
    results["saved/attention"] = attend(mem)
    results["saved/loaded_attention"] = attend(loaded)
    results["model"] = model_scenario(out)
    return results


def model_scenario(out_dir: Path) -> dict:
    """The tiny model with sharded memories: a left-padded batch, then greedy generation."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from tests.tiny import tiny_model

    out = {}
    for label, settings in MODEL_SETTINGS.items():
        model = tiny_model(seed=3, **settings)
        ids, attention_mask = model_inputs()
        with torch.no_grad():
            res = model(ids, attention_mask=attention_mask)
            generated = model.generate(ids[:1, 4:], max_new_tokens=6, do_sample=False)
            # the whole cache saved by every rank (one part each) and loaded back answers as the live one
            model.save_memory(res.cache, out_dir / f"model-{label}")
            loaded = model.load_memory(out_dir / f"model-{label}")
            follow = ids[:, :9]
            live_next = model(follow, past_key_values=res.cache).logits
            loaded_next = model(follow, past_key_values=loaded).logits
        out[label] = {
            "logits": res.logits,
            "generated": generated,
            "live_next": live_next,
            "loaded_next": loaded_next,
        }
    return out


MODEL_SETTINGS = {
    "exact": {"mem_backend": "sharded", "mem_index_params": {"inner": "exact"}},
    "global": {
        "mem_backend": "sharded",
        "mem_index": "Flat",
        "mem_top_k": K,
        "mem_index_params": {"inner": "faiss", "mode": "global"},
    },
}


def model_inputs() -> tuple[torch.Tensor, torch.Tensor]:
    """Two rows of 70 tokens, the first left-padded by 4 (several windows of the tiny model's 16)."""
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(1, 64, (2, 70), generator=g)
    attention_mask = torch.ones(2, 70, dtype=torch.long)
    attention_mask[0, :4] = 0
    return ids, attention_mask


def mismatch_scenario(rank: int) -> dict:
    try:
        build("sharded", inner="faiss", index="Flat" if rank == 0 else "HNSW8", top_k=K, timeout=30.0)
    except ValueError as err:
        return {"error": str(err)}
    return {"error": None}


def fault_scenario(rank: int, how: str) -> dict:
    from knn_memory.process_group import ShardGroupError

    timeout = float(os.environ.get("SHARD_TIMEOUT", "4"))
    mem = build("sharded", timeout=timeout)
    for keys, values, mask in windows(2):
        mem.add(keys, values, mask)
    if rank == 1:
        if how == "die":
            os._exit(3)  # no goodbye: the peer's socket just closes
        time.sleep(3 * timeout)  # hang past the timeout: never reach the collective in time
        os._exit(4)
    start = time.monotonic()
    try:
        attend(mem)
    except ShardGroupError as err:
        return {"error": str(err), "seconds": time.monotonic() - start}
    return {"error": None, "seconds": time.monotonic() - start}


def main() -> None:
    scenario, out = sys.argv[1], Path(sys.argv[2])
    rank = int(os.environ["RANK"])
    torch.manual_seed(0)
    if scenario == "main":
        result = main_scenarios(out, rank)
    elif scenario == "mismatch":
        result = mismatch_scenario(rank)
    else:
        result = fault_scenario(rank, scenario)
    torch.save(result, out / f"{scenario}-rank{rank}.pt")


if __name__ == "__main__":
    main()
