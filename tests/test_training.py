"""FoT training: crossbatch plans, the parallel-windows forward, a few training steps, resuming."""

from __future__ import annotations

import json
import random

import pytest
import torch

from longllama import LongLlamaForCausalLM
from longllama.crossbatch import make_plan, parse_mix
from longllama.training import TrainConfig, crossbatch_logits, make_batch, train
from longllama.training_data import EVAL_FILLER, encode_document, make_document


def test_parse_mix():
    assert parse_mix("all:0") == [(None, 0)]
    assert parse_mix("0:0,1:1,2:1,3:0") == [(0, 0), (1, 1), (2, 1), (3, 0)]
    with pytest.raises(ValueError, match="positives:negatives"):
        parse_mix("1-1")


def test_plan_positives_and_negatives():
    rows = [(j, w) for j in range(3) for w in range(3)]
    plan = make_plan(rows, [(None, 0)], random.Random(0))
    for r, (j, w) in enumerate(rows):
        src = [s for s in plan.sources[r].tolist() if s >= 0]
        assert sorted(src) == [rows.index((j, v)) for v in range(w)]  # all earlier windows, same doc
    plan = make_plan(rows, [(1, 2)], random.Random(0))
    for r, (j, w) in enumerate(rows):
        src = [s for s in plan.sources[r].tolist() if s >= 0]
        same = [s for s in src if rows[s][0] == j]
        other = [s for s in src if rows[s][0] != j]
        assert same == ([rows.index((j, w - 1))] if w else [])  # only the previous window
        assert len(other) == 2  # negatives from other documents
    with pytest.raises(ValueError, match="mix"):
        make_plan(rows, [(-1, 0)], random.Random(0))


def test_crossbatch_forward_equals_sequential_memory(longllama_config):
    """All windows in parallel under the plan == windows one after another through dense memory."""
    torch.manual_seed(0)
    model = LongLlamaForCausalLM(longllama_config(mem_layers=[1, 2])).eval()
    W = model.config.max_position_embeddings
    n = 3 * W + 5
    ids = torch.randint(3, 64, (1, n))
    with torch.no_grad():
        ref = model(ids, use_cache=False, last_context_length=5).logits[0]
    x = torch.zeros(4, W, dtype=torch.long)
    real = torch.zeros(4, W, dtype=torch.bool)
    for w in range(4):
        seg = ids[0, w * W : (w + 1) * W]
        x[w, : len(seg)], real[w, : len(seg)] = seg, True
    plan = make_plan([(0, w) for w in range(4)], [(None, 0)], random.Random(0))
    with torch.no_grad():
        got = crossbatch_logits(model, x, real, plan).reshape(-1, ref.shape[-1])[:n]
    assert (got - ref).abs().max().item() < 1e-5


def test_crossbatch_gradients_reach_earlier_windows(longllama_config):
    torch.manual_seed(0)
    model = LongLlamaForCausalLM(longllama_config())
    W = model.config.max_position_embeddings
    x = torch.randint(3, 64, (2, W))
    real = torch.ones(2, W, dtype=torch.bool)
    plan = make_plan([(0, 0), (0, 1)], [(None, 0)], random.Random(0))
    captured = {}

    def keep(module, args, output):
        output.retain_grad()
        captured["embeddings"] = output

    model.model.embed_tokens.register_forward_hook(keep)
    logits = crossbatch_logits(model, x, real, plan)
    logits[1].sum().backward()  # window 1 only; window 0 can influence it only through memory
    inputs = captured["embeddings"]
    assert inputs.grad[0].abs().sum() > 0


def test_documents_end_with_their_answer(tmp_path):
    from longllama import load_tokenizer
    from longllama.tokenizer_training import train_tokenizer

    tok = load_tokenizer(train_tokenizer(tmp_path / "tok", n_docs=300))
    rng = random.Random(0)
    encode = lambda s: tok(s, add_special_tokens=False).input_ids  # noqa: E731
    kinds = set()
    for _ in range(20):
        doc = make_document(rng, 600)
        assert EVAL_FILLER not in doc.text  # the evaluation filler is never trained on verbatim
        out = encode_document(doc, encode, tok.bos_token_id)
        assert out is not None
        ids, mask = out
        kinds.add(doc.kind)
        assert ids[0] == tok.bos_token_id
        assert [i for i, m in zip(ids, mask, strict=True) if m] == encode(doc.answer)
        assert all(tok.convert_ids_to_tokens(i) in {"▁", *"0123456789"} for i in encode(doc.answer))
    assert kinds == {"passkey", "kv"}


def _tiny_run(**overrides) -> TrainConfig:
    fields = dict(
        vocab_size=512,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        window=32,
        mem_layers=[1],
        windows_per_doc=6,
        docs_per_batch=4,
        min_doc_tokens=64,
        tokenizer_docs=200,
        steps=12,
        lr=1e-2,
        warmup=2,
        threads=1,
        save_every=6,
    )
    fields.update(overrides)
    return TrainConfig(**fields)


def test_documents_that_cannot_fit_are_refused(tmp_path):
    from longllama import load_tokenizer
    from longllama.tokenizer_training import train_tokenizer

    tok = load_tokenizer(train_tokenizer(tmp_path / "tok", n_docs=300))
    with pytest.raises(ValueError, match="do not fit"):
        make_batch(_tiny_run(window=16, windows_per_doc=2, min_doc_tokens=16), tok, 0)


def test_batches_are_a_function_of_the_step(tmp_path):
    from longllama import load_tokenizer
    from longllama.tokenizer_training import train_tokenizer

    tok = load_tokenizer(train_tokenizer(tmp_path / "tok", n_docs=300))
    cfg = _tiny_run()
    a, b = make_batch(cfg, tok, 3), make_batch(cfg, tok, 3)
    assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.plan.sources, b.plan.sources)
    other = make_batch(cfg, tok, 4).input_ids
    assert other.shape != a.input_ids.shape or not torch.equal(other, a.input_ids)
    assert a.input_ids.shape[1] == cfg.window
    assert bool(a.answer.any())


def test_training_loss_falls_and_resume_is_exact(tmp_path):
    cfg = _tiny_run()
    model_dir = train(cfg, tmp_path / "full", progress=False)
    log = [json.loads(line) for line in (tmp_path / "full" / "log.jsonl").read_text().splitlines()]
    assert len(log) == cfg.steps
    first = sum(m["loss"] for m in log[:3]) / 3
    last = sum(m["loss"] for m in log[-3:]) / 3
    assert last < first - 0.5, (first, last)
    model = LongLlamaForCausalLM.from_pretrained(model_dir)
    assert model.config.max_position_embeddings == cfg.window

    # a run interrupted after its step-6 checkpoint and resumed ends exactly where the uninterrupted one did
    import longllama.training as training

    stop_dir = tmp_path / "stopped"
    real_batch = training.make_batch

    class Stop(Exception):
        pass

    def interrupt(cfg_, tok_, step):
        if step == 6:
            raise Stop
        return real_batch(cfg_, tok_, step)

    training.make_batch = interrupt
    try:
        with pytest.raises(Stop):
            train(cfg, stop_dir, progress=False)
    finally:
        training.make_batch = real_batch
    assert torch.load(stop_dir / "checkpoint.pt", weights_only=True)["step"] == 6
    train(cfg, stop_dir, resume=True, progress=False)
    resumed = [json.loads(line) for line in (stop_dir / "log.jsonl").read_text().splitlines()]
    assert [m["loss"] for m in resumed] == pytest.approx([m["loss"] for m in log], rel=1e-5)


def test_training_can_continue_from_a_trained_model(tmp_path):
    cfg = _tiny_run(steps=2)
    source = train(cfg, tmp_path / "first", progress=False)
    # no steps: the exported model is the source model, tokenizer included
    same = train(_tiny_run(steps=2, init_from=str(source)), tmp_path / "copy", progress=False, stop_after=0)
    a = LongLlamaForCausalLM.from_pretrained(source).state_dict()
    b = LongLlamaForCausalLM.from_pretrained(same).state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (same / "tokenizer.model").read_bytes() == (source / "tokenizer.model").read_bytes()
    # a continued run starts from the trained weights: its first loss is the source run's last one's level
    train(_tiny_run(steps=2, init_from=str(source)), tmp_path / "more", progress=False)
    first = [json.loads(line)["loss"] for line in (tmp_path / "first" / "log.jsonl").read_text().splitlines()]
    more = [json.loads(line)["loss"] for line in (tmp_path / "more" / "log.jsonl").read_text().splitlines()]
    assert more[0] < first[0]
    with pytest.raises(ValueError, match=r"another shape: hidden_size: 32 \(the run asks for 64\)"):
        train(_tiny_run(hidden_size=64, init_from=str(source)), tmp_path / "bad", progress=False)
    with pytest.raises(ValueError, match=r"config\.json and tokenizer\.model"):
        train(_tiny_run(init_from=str(tmp_path)), tmp_path / "bad2", progress=False)


def test_training_continues_from_a_directory_with_a_save_pretrained_tokenizer(tmp_path):
    from longllama import load_tokenizer

    source = train(_tiny_run(steps=2), tmp_path / "first", progress=False)
    converted = tmp_path / "converted"
    LongLlamaForCausalLM.from_pretrained(source).save_pretrained(converted)
    load_tokenizer(source).save_pretrained(converted)
    (converted / "tokenizer.model").unlink(missing_ok=True)
    same = train(
        _tiny_run(steps=2, init_from=str(converted)), tmp_path / "copy", progress=False, stop_after=0
    )
    assert not (same / "tokenizer.model").exists() and (same / "tokenizer.json").is_file()
    text = "The pass key is 71432. " + EVAL_FILLER
    assert load_tokenizer(same)(text).input_ids == load_tokenizer(source)(text).input_ids
    a = LongLlamaForCausalLM.from_pretrained(source).state_dict()
    b = LongLlamaForCausalLM.from_pretrained(same).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
