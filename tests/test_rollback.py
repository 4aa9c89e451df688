"""Many questions against one prefill: truncating memories, checkpoints and rollbacks."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import GenerationConfig

import knn_memory
from indexes import ChunkedTensor, GrowthPolicy, StreamingIndex

D, H = 16, 2
AUTO_POLICY = {"exact_until": 256, "max_nprobe": 64}  # past its exact phase early; searches end certain


def keys(n: int, seed: int = 0, d: int = D) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=gen).to(torch.bfloat16).float()


def entries(n: int, seed: int = 0, batch: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    k = torch.randn(batch, H, n, D, generator=gen)
    return k, torch.randn(batch, H, n, D, generator=gen)


def same_hits(a: knn_memory.MemoryHits, b: knn_memory.MemoryHits) -> None:
    assert torch.equal(a.ids, b.ids)
    torch.testing.assert_close(a.scores, b.scores, rtol=0, atol=0)
    torch.testing.assert_close(a.values, b.values, rtol=0, atol=0)


# ---------------------------------------------------------------------------------------- ChunkedTensor
@pytest.mark.parametrize("n", [11, 9, 8, 6, 2, 0])
def test_chunked_truncate_keeps_the_first_entries_and_appends_after_them(n):
    x = torch.randn(2, 20, 3)
    store = ChunkedTensor((2,), 3, torch.float32, "cpu", chunk=8, first=2)
    store.append(x[:, :11])
    first_chunk = store.chunks[0].data_ptr()
    store.truncate(n)
    assert store.length == n and torch.equal(store.full(), x[:, :n])
    if n:
        assert store.chunks[0].data_ptr() == first_chunk  # kept, not copied
    store.append(x[:, n:])
    assert torch.equal(store.full(), x)


def test_chunked_truncate_rejects_bad_lengths():
    store = ChunkedTensor((), 3, torch.float32, "cpu", chunk=8)
    store.append(torch.randn(5, 3))
    with pytest.raises(
        ValueError, match=r"n \(the entries to keep\) must be an int >= 0, got 6 \(expected 0 <= .* <= 5\)"
    ):
        store.truncate(6)
    with pytest.raises(TypeError, match=r"n \(the entries to keep\) must be an int >= 0, got float"):
        store.truncate(2.0)


def test_chunked_mark_restores_after_appends_and_reorders():
    x = torch.randn(2, 12, 3)
    store = ChunkedTensor((2,), 3, torch.float32, "cpu", chunk=4, first=4)
    store.append(x[:, :6])
    mark = store.mark()
    store.append(x[:, 6:])
    store.index_select_lead(torch.tensor([1, 1, 0]))
    store.restore(mark)
    assert store.lead == (2,) and torch.equal(store.full(), x[:, :6])


# ---------------------------------------------------------------------------------------- StreamingIndex
INDEXES = [
    ("Flat", {}),
    ("IVF16,Flat", {"nprobe": 4, "min_train_points": 200}),
    ("PCA8,IVF8,Flat", {"nprobe": 2, "min_train_points": 200}),
    ("IVF8,PQ4", {"nprobe": 2, "min_train_points": 200}),
    ("SQ8", {"min_train_points": 100}),
    ("auto", {"policy": GrowthPolicy(**AUTO_POLICY)}),
]


def build(spec: str, options: dict, x: torch.Tensor, step: int = 250) -> StreamingIndex:
    index = StreamingIndex(D, spec, store_dtype=torch.bfloat16, **options)
    for start in range(0, x.shape[0], step):
        index.add(x[start : start + step])
    return index


@pytest.mark.parametrize(("spec", "options"), INDEXES)
def test_index_truncate_searches_like_an_index_of_the_first_keys(spec, options):
    x, q = keys(1500), keys(30, seed=1)
    index, only_first = build(spec, options, x), build(spec, options, x[:1000])
    assert index.can_truncate
    index.truncate(1000)
    assert index.ntotal == 1000 and index.trained_at <= 1000
    assert torch.equal(index.keys(), x[:1000]) or index.has_store is False
    s, i = index.search(q, 10)
    s0, i0 = only_first.search(q, 10)
    assert torch.equal(i, i0) and torch.equal(s, s0)


@pytest.mark.parametrize(("spec", "options"), INDEXES)
def test_index_rollback_is_exact_even_across_a_rebuild(spec, options):
    x, q = keys(4000), keys(30, seed=1)
    index, only_first = build(spec, options, x[:1000]), build(spec, options, x[:1000])
    mark = index.mark()
    trainings = index.trainings
    for start in range(1000, 4000, 250):  # 4x: IVF retrains, "auto" rebuilds
        index.add(x[start : start + 250])
    if spec in ("IVF16,Flat", "auto"):
        assert index.trainings > trainings  # the case that needs the marked index back
    for _ in range(2):  # one mark, several rollbacks
        index.rollback(mark)
        assert (index.ntotal, index.trained_at, index.trainings) == (
            only_first.ntotal, only_first.trained_at, only_first.trainings,
        )  # fmt: skip
        s, i = index.search(q, 10)
        s0, i0 = only_first.search(q, 10)
        assert torch.equal(i, i0) and torch.equal(s, s0)
        index.add(x[1000:1500])
        only_first_more = build(spec, options, x[:1500])
        assert torch.equal(index.search(q, 10)[1], only_first_more.search(q, 10)[1])


def test_hnsw_cannot_truncate_and_says_so():
    index = build("HNSW8", {}, keys(600))
    assert not index.can_truncate
    with pytest.raises(ValueError, match=r"'HNSW8'.*cannot remove keys"):
        index.truncate(300)
    assert index.ntotal == 600  # unchanged
    index.truncate(600)  # nothing to remove: fine
    with pytest.raises(ValueError, match=r"n must be in \[0, 600\]"):
        index.truncate(601)


# ---------------------------------------------------------------------------------------- backends
BACKENDS = [
    ("exact", {}),
    ("exact", {"top_k": 8}),
    ("faiss", {"index": "Flat", "top_k": 8}),
    ("faiss", {"index": "IVF8,Flat", "top_k": 8, "nprobe": 2, "min_train_points": 100}),
    ("faiss", {"index": "auto", "top_k": 8, **AUTO_POLICY}),
]


def backend(name: str, options: dict, batch: int = 2) -> knn_memory.MemoryBackend:
    return knn_memory.create_backend(
        name, num_heads=H, head_dim=D, batch_size=batch, mem_dtype="float32", workers=1, **options
    ) if name == "faiss" else knn_memory.create_backend(
        name, num_heads=H, head_dim=D, batch_size=batch, mem_dtype="float32", **options
    )  # fmt: skip


def fill(
    mem: knn_memory.MemoryBackend, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, step: int = 100
):
    for start in range(0, k.shape[2], step):
        stop = start + step
        mem.add(k[:, :, start:stop], v[:, :, start:stop], mask[:, start:stop])


@pytest.mark.parametrize(("name", "options"), BACKENDS)
def test_backend_truncate_searches_like_a_memory_of_the_first_entries(name, options):
    k, v = entries(700, batch=2)
    mask = torch.ones(2, 700, dtype=torch.bool)
    mask[1, 50:80] = False  # padding in row 1: its real entries are counted, not its columns
    q = torch.randn(2, H, 5, D)
    if "nprobe" in options:  # an IVF trained on more keys keeps its training: compare exhaustive searches
        options = {**options, "nprobe": 8}
    mem = backend(name, options)
    fill(mem, k, v, mask)
    lengths = torch.tensor([400, 500])
    mem.truncate(lengths)
    assert torch.equal(mem.lengths, lengths)
    # the same real entries, each row fed alone
    for b in range(2):
        real = mask[b].nonzero().squeeze(1)[: int(lengths[b])]
        alone = backend(name, options, batch=1)
        fill(alone, k[b : b + 1, :, real], v[b : b + 1, :, real], torch.ones(1, len(real), dtype=torch.bool))
        hits, ref = mem.search(q), alone.search(q[b : b + 1])
        if options.get("top_k") is None:  # dense: compare the attention each gives
            assert torch.equal(hits.ids[b][hits.ids[b] >= 0], ref.ids[0][ref.ids[0] >= 0])
            assert torch.equal(hits.scores[b][hits.ids[b] >= 0], ref.scores[0][ref.ids[0] >= 0])
        else:
            assert torch.equal(hits.ids[b], ref.ids[0])
            torch.testing.assert_close(hits.scores[b], ref.scores[0], rtol=0, atol=0)
            torch.testing.assert_close(hits.values[b], ref.values[0], rtol=0, atol=0)


@pytest.mark.parametrize(("name", "options"), BACKENDS[:3])
def test_backend_truncate_checks_its_lengths(name, options):
    mem = backend(name, options)
    k, v = entries(30, batch=2)
    mem.add(k, v)
    with pytest.raises(
        ValueError, match=r"lengths must lie in \[0, current length\].*\[31, 31\].*\[30, 30\]"
    ):
        mem.truncate(31)
    with pytest.raises(ValueError, match="lengths must lie"):
        mem.truncate(torch.tensor([-1, 3]))
    with pytest.raises(ValueError, match=r"\[B=2\] tensor, got shape \[3\]"):
        mem.truncate(torch.tensor([1, 2, 3]))
    with pytest.raises(TypeError, match=r"integer entry counts, got dtype torch\.float32"):
        mem.truncate(torch.tensor([1.0, 2.0]))
    with pytest.raises(TypeError, match="lengths must be an int or a \\[B\\] int64 tensor, got str"):
        mem.truncate("3")
    assert mem.lengths.tolist() == [30, 30]
    mem.truncate(0)
    assert mem.is_empty


@pytest.mark.parametrize(("name", "options"), [*BACKENDS, ("faiss", {"index": "HNSW8", "top_k": 8})], ids=str)
def test_backend_rollback_undoes_adds_reorders_and_resets(name, options):
    k, v = entries(900, batch=2)
    mask = torch.ones(2, 900, dtype=torch.bool)
    mask[0, 10:20] = False
    q = torch.randn(2, H, 5, D)
    mem = backend(name, options)
    fill(mem, k[:, :, :400], v[:, :, :400], mask[:, :400])
    pristine = copy.deepcopy(mem)
    token = mem.checkpoint()
    for round_ in range(3):
        fill(mem, k[:, :, 400:], v[:, :, 400:], mask[:, 400:])
        if round_ == 1:
            mem.reorder(torch.tensor([1, 1, 0]))  # beam search
            mem.add(*entries(5, seed=3, batch=3))
        if round_ == 2:
            mem.reset(rows=[0])
        mem.rollback(token)
        assert mem.batch_size == 2 and torch.equal(mem.lengths, pristine.lengths)
        same_hits(mem.search(q), pristine.search(q))
    other = backend(name, options)
    with pytest.raises(ValueError, match="checkpoint was taken of another memory"):
        other.rollback(token)
    with pytest.raises(TypeError, match="checkpoint must be a MemoryCheckpoint"):
        mem.rollback(pristine.lengths)


def test_hnsw_memory_refuses_truncate_and_rolls_back_through_a_copy():
    mem = backend("faiss", {"index": "HNSW8", "top_k": 8})
    k, v = entries(300, batch=2)
    mem.add(k[:, :, :200], v[:, :, :200])
    with pytest.raises(ValueError, match=r"'HNSW8'.*cannot be truncated.*checkpoint"):
        mem.truncate(100)
    assert mem.lengths.tolist() == [200, 200]  # nothing changed
    token = mem.checkpoint()
    saved = token.state[0][0][0][1]
    assert token.state[0][0][0][0] is None and isinstance(saved, StreamingIndex)  # the fallback: a copy
    mem.add(k[:, :, 200:], v[:, :, 200:])
    mem.rollback(token)
    assert mem.lengths.tolist() == [200, 200] and mem.head_index(0, 0) is not saved


def test_exact_truncate_to_checkpoint_keeps_chunks_in_place():
    mem = backend("exact", {})
    k, v = entries(300, batch=2)
    mem.add(k[:, :, :200], v[:, :, :200])
    ptrs = [c.data_ptr() for c in mem._keys.chunks + mem._values.chunks]
    mem.add(k[:, :, 200:], v[:, :, 200:])
    mem.truncate(200)
    assert [c.data_ptr() for c in mem._keys.chunks + mem._values.chunks] == ptrs
    assert mem.entries == 200


# ---------------------------------------------------------------------------------------- the model
MODEL_BACKENDS = [
    ("exact", {}),
    ("faiss", {"mem_index": "Flat", "mem_top_k": 64}),
    ("faiss", {"mem_index": "auto", "mem_top_k": 64, "mem_index_params": {"exact_until": 256}}),
    ("faiss", {"mem_index": "HNSW16", "mem_top_k": 64}),  # cannot remove keys: rolled back through a copy
]
QUESTIONS = [
    "\nThe pass key is",
    "\nWhat is the pass key? Tell me the pass key. I will quiz you about the important information there. "
    "The pass key is",
    "\nThe grass is green. What is the pass key? The pass key is",
]
NEW_TOKENS = 24


@pytest.fixture(scope="module")
def document():
    from longllama import embedded_model_path, load_tokenizer
    from longllama.passkey import make_prompt

    tokenizer = load_tokenizer(embedded_model_path())
    questions = [tokenizer(q, add_special_tokens=False, return_tensors="pt").input_ids for q in QUESTIONS]
    return make_prompt(tokenizer, 2048, seed=0).input_ids, questions


def memory_chunk_pointers(cache) -> list[int]:
    out = []
    for layer in cache.memory_layers:
        mem = cache.memory(layer)
        if isinstance(mem, knn_memory.ExactBackend):
            chunks = mem._keys.chunks + mem._values.chunks
        else:
            chunks = [c for v in mem._values for c in v.chunks]
            chunks += [c for row in mem._rows for ix in row for c in ix._store.chunks]
        out += [c.data_ptr() for c in chunks]
    return out


@pytest.mark.parametrize(
    ("name", "options"), MODEL_BACKENDS, ids=["exact", "faiss-Flat", "faiss-auto", "faiss-HNSW"]
)
@torch.no_grad()
def test_many_questions_against_one_prefill(document, name, options):
    from longllama import LongLlamaForCausalLM, embedded_model_path

    torch.set_num_threads(1)
    doc, questions = document
    model = LongLlamaForCausalLM.from_pretrained(embedded_model_path(), mem_backend=name, **options).eval()
    model.generation_config = GenerationConfig(bos_token_id=1, pad_token_id=0)  # no EOS: all tokens come
    cache = model(doc).cache
    pristine = copy.deepcopy(cache)
    prefilled = cache.memory_lengths()
    pointers = memory_chunk_pointers(cache) if options.get("mem_index") in (None, "Flat") else None
    trainings = None
    if options.get("mem_index") == "auto":
        trainings = cache.memory(cache.memory_layers[0]).head_index(0, 0).trainings
    grew, rebuilt = False, False

    def ask(ids, cache):
        return model.generate(
            ids, cache=cache, max_new_tokens=NEW_TOKENS, do_sample=False,
            output_scores=True, return_dict_in_generate=True,
        )  # fmt: skip

    token = cache.checkpoint()
    for i, question in enumerate(questions):
        ids = torch.cat([doc, question], dim=1)
        reference = ask(ids, copy.deepcopy(pristine))
        if i == 0:
            with cache.question():
                out = ask(ids, cache)
        else:
            out = ask(ids, cache)
            grew |= cache.memory_lengths() != prefilled
            if trainings is not None:
                rebuilt |= cache.memory(cache.memory_layers[0]).head_index(0, 0).trainings != trainings
            cache.rollback(token)
        assert torch.equal(out.sequences, reference.sequences)
        torch.testing.assert_close(torch.stack(out.scores), torch.stack(reference.scores), rtol=0, atol=1e-5)
        assert cache.memory_lengths() == prefilled and cache.seen_tokens == pristine.seen_tokens
        assert torch.equal(cache.positions, pristine.positions)
        for layer, layer0 in zip(cache.layers, pristine.layers, strict=True):
            assert torch.equal(layer.keys, layer0.keys) and torch.equal(layer.values, layer0.values)
        if pointers is not None:  # rolled back in place: the memory was not copied
            assert memory_chunk_pointers(cache) == pointers
    assert grew  # the questions did reach memory (the local cache overflowed), so rollback had work to do
    if trainings is not None:
        assert rebuilt  # and the auto index was rebuilt during a question: the marked one came back
    # without the rollback, the next question would see the previous one
    ask(torch.cat([doc, questions[1]], dim=1), cache)
    stale = ask(torch.cat([doc, questions[1], questions[2]], dim=1), cache)
    fresh = ask(torch.cat([doc, questions[2]], dim=1), copy.deepcopy(pristine))
    assert not torch.equal(torch.stack(stale.scores), torch.stack(fresh.scores))


def test_cache_rollback_to_before_the_first_call_and_bad_tokens(longllama_config):
    from longllama import LongLlamaCache, LongLlamaForCausalLM

    torch.manual_seed(0)
    model = LongLlamaForCausalLM(longllama_config()).eval()
    ids = torch.randint(3, 64, (1, 40))
    cache = LongLlamaCache(model.config)
    with torch.no_grad(), cache.question():
        model(ids, cache=cache)
        assert cache.seen_tokens == 40 and cache.memory(1) is not None
    assert cache.seen_tokens == 0 and cache.memory(1) is None and cache.batch_size == -1
    with torch.no_grad():
        model(ids, cache=cache)  # builds its memory again
    assert cache.memory_lengths()[1] > 0
    with pytest.raises(TypeError, match="checkpoint must be a CacheCheckpoint"):
        cache.rollback(None)
    with pytest.raises(ValueError, match="another LongLlamaCache"):
        cache.rollback(LongLlamaCache(model.config).checkpoint())
