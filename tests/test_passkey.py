"""Passkey retrieval: prompts, the embedded model answering one, and the CLI end to end."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from longllama import LongLlamaForCausalLM, embedded_model_path, load_tokenizer
from longllama.cli_args import parse_backend
from longllama.passkey import NEEDLE, QUESTION, make_prompt, prompt_text, run_passkey
from longllama.passkey_cli import main, parse_length
from longllama.training_data import EVAL_FILLER, TASK


@pytest.fixture(scope="module")
def embedded():
    torch.set_num_threads(1)
    path = embedded_model_path()
    return LongLlamaForCausalLM.from_pretrained(path).eval(), load_tokenizer(path)


def test_prompt_is_upstreams():
    text, key = prompt_text(500, seed=7, depth=0.5)
    lines = text.split("\n")
    assert lines[0] == TASK and lines[2] == NEEDLE.format(key=key) and lines[4] == QUESTION
    assert 1 <= key < 50000
    assert len(lines[1]) + len(lines[3]) == 500 and len(lines[1]) == 250
    assert lines[1] == (" ".join([EVAL_FILLER] * 10))[:250]
    assert prompt_text(500, seed=7)[1] == key  # the key depends on the seed only
    assert prompt_text(500, seed=8)[1] != key


def test_prompt_length_in_tokens(embedded):
    _, tok = embedded
    for n in (256, 2048):
        p = make_prompt(tok, n, seed=1)
        assert abs(p.n_tokens - n) <= max(2, n // 500)
        assert p.input_ids.shape == (1, p.n_tokens)
        assert tok.decode(p.answer_ids).strip() == str(p.key)
    with pytest.raises(ValueError, match="n_tokens"):
        make_prompt(tok, 10, seed=1)


def test_embedded_model_answers_a_passkey(embedded):
    model, tok = embedded
    assert model.config.mem_layers and model.config.max_position_embeddings < 1024
    correct = 0
    for seed in range(3):
        prompt = make_prompt(tok, 1024, seed=seed)  # 16 windows: the needle is only reachable through memory
        correct += run_passkey(model, tok, prompt, label="exact").correct
    assert correct == 3


def test_memory_is_what_answers(embedded):
    """Without memory layers the needle is out of reach: the model must fail."""
    model, tok = embedded
    saved = model.config.mem_layers
    no_memory = LongLlamaForCausalLM.from_pretrained(embedded_model_path(), mem_layers=[]).eval()
    prompt = make_prompt(tok, 1024, seed=0, depth=0.1)
    assert not run_passkey(no_memory, tok, prompt).correct
    assert model.config.mem_layers == saved


def test_cli_end_to_end(tmp_path, capsys):
    out = tmp_path / "pk"
    rc = main(
        ["--lengths", "256,512", "--seeds", "2", "--backend", "exact", "--backend", "faiss:Flat", "--top-k", "16",
         "--threads", "1", "--out", str(out), "--no-progress"]
    )  # fmt: skip
    assert rc == 0
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert len(rows) == 2 * 2 * 2
    assert {r["backend"] for r in rows} == {"exact (dense)", "faiss:Flat/top16"}
    summary = json.loads((out / "summary.json").read_text())["summary"]
    assert {(r["backend"], r["length"]) for r in summary} == {
        (b, n) for b in ("exact (dense)", "faiss:Flat/top16") for n in (256, 512)
    }
    assert (out / "passkey.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "acc %" in capsys.readouterr().out
    # resuming skips every finished run
    assert main(["--lengths", "256,512", "--seeds", "2", "--backend", "exact", "--backend", "faiss:Flat",
                 "--top-k", "16", "--out", str(out), "--resume", "--no-progress"]) == 0  # fmt: skip
    assert len((out / "results.jsonl").read_text().splitlines()) == 8


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--lengths", "12"], "below 64"),
        (["--lengths", "abc"], "token count"),
        (["--backend", "bogus"], "exact"),
        (["--backend", "faiss:NotAnIndex"], "NotAnIndex"),
        (["--depths", "1.5"], "depths"),
        (["--seeds", "0"], "seeds"),
        (["--model", "/nonexistent/dir"], "config.json"),
        (["--lengths", ""], "at least one length"),
        (["--lengths", " , "], "at least one length"),
        (["--threads", "-1"], "--threads must be >= 1, got -1"),
        (["--threads", "0"], "--threads must be >= 1, got 0"),
        (["--seed-offset", "-2"], "--seed-offset must be >= 0"),
        (["--tokenizer", "/nonexistent/tok.model"], "does not exist"),
        (["--summarize-only"], "results.jsonl to summarize"),
    ],
)
def test_cli_bad_arguments(argv, message, tmp_path, capsys):
    assert main([*argv, "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]


def test_cli_refuses_an_out_that_is_a_file(tmp_path, capsys):
    target = tmp_path / "file"
    target.write_text("x")
    assert main(["--lengths", "256", "--out", str(target)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not a directory" in err[0]


@pytest.mark.parametrize("content", ["{not json\n", '{"backend": "exact"}\n', "[1, 2]\n"])
def test_cli_refuses_a_corrupt_results_file(tmp_path, capsys, content):
    (tmp_path / "results.jsonl").write_text(content)
    for extra in (["--resume"], ["--summarize-only"]):
        assert main(["--lengths", "256", "--out", str(tmp_path), *extra]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "line 1 is not a passkey result" in err[0]


def test_cli_depth_sweep_and_summarize_only(tmp_path, capsys):
    out = tmp_path / "pk"
    argv = ["--lengths", "256", "--seeds", "2", "--depths", "0,1", "--backend", "exact", "--threads", "1",
            "--out", str(out), "--no-progress"]  # fmt: skip
    assert main(argv) == 0
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert sorted((r["seed"], r["depth"]) for r in rows) == [(0, 0.0), (0, 1.0), (1, 0.0), (1, 1.0)]
    report = json.loads((out / "summary.json").read_text())
    assert [(r["depth"], r["runs"]) for r in report["by_depth"]] == [(0.0, 2), (1.0, 2)]
    for r in report["by_depth"]:
        want = sum(x["correct"] for x in rows if x["depth"] == r["depth"]) / 2
        assert r["accuracy"] == want
    assert (out / "passkey_depth.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    first = capsys.readouterr().out
    assert "By needle depth" in first
    # merging another run's lines and summarizing again counts them, without running anything
    extra = dict(rows[0], seed=7)
    with open(out / "results.jsonl", "a") as f:
        f.write(json.dumps(extra) + "\n")
    (out / "passkey.png").unlink()
    assert main(["--out", str(out), "--summarize-only"]) == 0
    report = json.loads((out / "summary.json").read_text())
    assert report["summary"][0]["runs"] == 5 and (out / "passkey.png").is_file()
    # random-depth runs, once there are some, are what the length table counts
    with open(out / "results.jsonl", "a") as f:
        f.write(json.dumps(dict(rows[0], seed=9, depth=None)) + "\n")
    assert main(["--out", str(out), "--summarize-only"]) == 0
    report = json.loads((out / "summary.json").read_text())
    assert [r["runs"] for r in report["summary"]] == [1] and len(report["by_depth"]) == 2


def test_parsers():
    assert parse_length("4k") == 4096 and parse_length("1m") == 1 << 20 and parse_length("1500") == 1500
    assert parse_length("10m") == 10 << 20 and parse_length("10M") == 10 << 20
    assert parse_backend("faiss:auto") == {"mem_backend": "faiss", "mem_index": "auto"}
    assert parse_backend("faiss:IVF64,Flat") == {"mem_backend": "faiss", "mem_index": "IVF64,Flat"}
    assert parse_backend("faiss:auto:max_nprobe=8") == {
        "mem_backend": "faiss",
        "mem_index": "auto",
        "mem_index_params": {"max_nprobe": 8},
    }
    assert parse_backend("exact") == {"mem_backend": "exact"}
    with pytest.raises(ValueError, match=r"'exact' backend takes no ':<spec>'"):
        parse_backend("exact:Flat")
    with pytest.raises(ValueError, match=r"unknown memory backend 'dense'"):
        parse_backend("dense")
    with pytest.raises(ValueError, match=r"nothing after ':'"):
        parse_backend("faiss:")


def test_run_progress_counts_every_token_read(embedded, monkeypatch):
    import tqdm as tqdm_module

    model, tok = embedded
    bars = []
    real = tqdm_module.tqdm

    class Recording(real):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **{**kwargs, "disable": False})
            bars.append(self)

    monkeypatch.setattr(tqdm_module, "tqdm", Recording)
    prompt = make_prompt(tok, 512, seed=3)
    plain = run_passkey(model, tok, prompt, label="exact")
    shown = run_passkey(model, tok, prompt, label="exact", progress=True)
    assert shown.output == plain.output
    assert len(bars) == 1 and bars[0].total == prompt.n_tokens + len(prompt.answer_ids)
    # every prefill window and every generated token but the last (it is never fed back) was counted
    assert bars[0].n == prompt.n_tokens + len(prompt.answer_ids) - 1
    assert not model.model.layers[0]._forward_hooks  # the hook is gone


def test_answer_probability_follows_the_greedy_output():
    from longllama.passkey import answer_probability

    def step(probs):
        return torch.tensor(probs).log()[None]  # [1, V] logits whose softmax is ``probs``

    logits = (step([0.1, 0.7, 0.2]), step([0.6, 0.3, 0.1]), step([0.2, 0.2, 0.6]))
    # right all along: the lowest of the right tokens' probabilities
    assert answer_probability(logits, [1, 0, 2], [1, 0, 2]) == pytest.approx(0.6)
    # wrong at the second step: that step's probability of the right token, nothing after it
    assert answer_probability(logits, [1, 0, 2], [1, 1, 0]) == pytest.approx(0.3)
    assert answer_probability(logits, [1, 0, 2], [2, 0, 2]) == pytest.approx(0.2)


def test_results_record_the_answer_probability_and_old_files_still_load(embedded, tmp_path):
    from longllama.passkey_cli import read_results

    model, tok = embedded
    r = run_passkey(model, tok, make_prompt(tok, 512, seed=0), label="exact")
    assert r.correct and 0.5 < r.answer_prob <= 1.0
    old = {k: v for k, v in json.loads(json.dumps(r.__dict__)).items() if k != "answer_prob"}
    (tmp_path / "results.jsonl").write_text(json.dumps(old) + "\n")
    assert read_results(tmp_path / "results.jsonl")[0].answer_prob is None


def test_results_record_the_decode_speed(embedded, monkeypatch):
    """One forward call per generated token after the prefill; the rate is steps over their span."""
    from longllama import passkey

    model, tok = embedded
    prompt = make_prompt(tok, 512, seed=1)
    calls = []
    real = passkey._decode_rate
    monkeypatch.setattr(passkey, "_decode_rate", lambda ends: calls.append(list(ends)) or real(ends))
    r = run_passkey(model, tok, prompt, label="exact")
    (ends,) = calls
    assert len(ends) == len(prompt.answer_ids) >= 2  # the prefill, then a step per further answer token
    assert r.decode_tokens_per_second == pytest.approx((len(ends) - 1) / (ends[-1] - ends[0]))
    assert r.decode_tokens_per_second > 0
    assert passkey._decode_rate([1.0, 1.5, 2.0]) == pytest.approx(2.0)
    assert passkey._decode_rate([1.0]) is None and passkey._decode_rate([]) is None
    row = passkey.summarize([r, dataclasses.replace(r, decode_tokens_per_second=None)])[0]
    assert row["decode_tokens_per_second"] == pytest.approx(r.decode_tokens_per_second)


def test_plot_of_runs_all_correct(tmp_path):
    """A Wilson interval's upper end can sit a rounding error below an accuracy of 1 (6 runs of 6 give
    0.9999999999999999): the plot must still draw it."""
    from longllama.passkey import PasskeyResult, summarize
    from longllama.passkey_cli import plot

    runs = [
        PasskeyResult("auto", 1 << 20, 1 << 20, s, None, 7, "7", "7", True, 1.0, 1 << 30, 0.99)
        for s in range(6)
    ]
    rows = summarize(runs)
    assert rows[0]["accuracy"] == 1.0 and rows[0]["ci95"][1] < 1.0
    plot(rows, tmp_path / "p.png")
    assert (tmp_path / "p.png").stat().st_size > 0


def test_peak_rss_sees_a_rise_inside_the_block():
    from longllama.tools.peak_rss import PeakRSS

    with PeakRSS(interval_s=0.001) as rss:
        block = bytearray(64 * 2**20)
        block[::4096] = b"x" * len(block[::4096])  # touch every page so it is resident
        del block
    assert rss.peak_bytes >= rss.start_bytes > 0 and rss.peak == rss.peak_bytes
    assert rss.delta_bytes == rss.peak_bytes - rss.start_bytes
    for bad in (0, -1.0, float("nan"), "0.1"):
        with pytest.raises(ValueError, match="interval_s"):
            PeakRSS(interval_s=bad)


def _auto_model():
    return LongLlamaForCausalLM.from_pretrained(
        embedded_model_path(), mem_backend="faiss", mem_index="auto", mem_top_k=16,
        mem_index_params={"exact_until": 256},
    ).eval()  # fmt: skip


def test_checkpointed_run_equals_one_run_and_resumes_where_it_stopped(embedded, tmp_path, monkeypatch):
    from longllama.passkey import PrefillCheckpoints

    _, tok = embedded
    model = _auto_model()
    prompt = make_prompt(tok, 2048, seed=5)
    plain = run_passkey(model, tok, prompt)
    # an uninterrupted checkpointed run: the same answer, probability and all; its folder is gone after
    ckpt = PrefillCheckpoints(tmp_path / "ck", 300)  # rounded down to 256 (4 windows of 64)
    same = run_passkey(model, tok, prompt, checkpoints=ckpt)
    assert (same.output, same.answer_prob, same.correct) == (plain.output, plain.answer_prob, plain.correct)
    assert not ckpt.folder(prompt).exists()
    # stopped after the second save: the folder says how far it got
    saves, reads = [], []
    real_save, real_read = PrefillCheckpoints.save, PrefillCheckpoints.read

    def save_then_die(self, model, prompt, cache, done, seconds, peak):
        real_save(self, model, prompt, cache, done, seconds, peak)
        saves.append(done)
        if len(saves) == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(PrefillCheckpoints, "save", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        run_passkey(model, tok, prompt, checkpoints=ckpt)
    assert saves == [256, 512]
    progress = json.loads((ckpt.folder(prompt) / "progress.json").read_text())
    assert progress["tokens"] == 512 and progress["seconds"] > 0 and progress["peak_rss_bytes"] > 0
    # the next run reads only what is left, and gives the same result
    monkeypatch.setattr(PrefillCheckpoints, "save", real_save)

    def counted_read(model, input_ids, begin, end, cache):
        reads.append((begin, end))
        return real_read(model, input_ids, begin, end, cache)

    monkeypatch.setattr(PrefillCheckpoints, "read", staticmethod(counted_read))
    resumed = run_passkey(model, tok, prompt, checkpoints=ckpt)
    assert reads[0][0] == 512 and all(e % 64 == 0 for _, e in reads)
    assert (resumed.output, resumed.answer_prob) == (plain.output, plain.answer_prob)
    assert resumed.seconds >= progress["seconds"] and resumed.peak_rss_bytes >= progress["peak_rss_bytes"]
    assert not ckpt.folder(prompt).exists()


def test_checkpoint_stops_and_refusals(embedded, tmp_path):
    from longllama.passkey import PrefillCheckpoints

    model, tok = embedded
    config = model.config  # window 64, last_context_length 32
    ck = PrefillCheckpoints(tmp_path, 200)  # pieces of 192 tokens
    # 1000 tokens: one call would send 0..968 to memory in windows of 64 from the start; whole windows
    # up to 960 are read in pieces, the rest (a 8-token window and the final 32) by generate()
    assert ck.stops(config, 1000, 32, 0) == [192, 384, 576, 768, 960]
    assert ck.stops(config, 1000, 32, 768) == [960]
    assert ck.stops(config, 1000, 32, 960) == []
    assert PrefillCheckpoints(tmp_path, 10).stops(config, 200, 32, 0) == [64, 128]  # at least a window
    with pytest.raises(ValueError, match="window_alignment"):
        ck.stops(_with(config, window_alignment="end"), 1000, 32, 0)
    for bad in (0, -5, 1.5, True):
        with pytest.raises(ValueError, match="checkpoint interval"):
            PrefillCheckpoints(tmp_path, bad)
    # a folder of another prompt is refused, not silently continued
    prompt, other = make_prompt(tok, 512, seed=1), make_prompt(tok, 512, seed=2)
    ck.name = "x"
    ck.folder(prompt).mkdir(parents=True)
    (ck.folder(prompt) / "progress.json").write_text(
        json.dumps({"tokens": 64, "seconds": 1.0, "peak_rss_bytes": 1,
                    "prompt": {"n_tokens": other.n_tokens, "seed": 2, "key": other.key, "depth": None}})
    )  # fmt: skip
    with pytest.raises(ValueError, match="another prompt"):
        ck.resume(model, prompt)
    # without resume a run starts afresh and removes what was there
    fresh = PrefillCheckpoints(tmp_path, 200, resume=False)
    fresh.name = "x"
    assert fresh.resume(model, prompt)[0] == 0 and not fresh.folder(prompt).exists()


def _with(config, **changes):
    new = type(config).from_dict(config.to_dict())
    for k, v in changes.items():
        setattr(new, k, v)
    return new


def test_cli_checkpoints(tmp_path, capsys):
    out = tmp_path / "pk"
    argv = ["--lengths", "1k", "--seeds", "1", "--backend", "faiss:Flat", "--top-k", "16", "--threads", "1",
            "--out", str(out), "--no-progress", "--checkpoint-every", "256"]  # fmt: skip
    assert main(argv) == 0
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert len(rows) == 1 and rows[0]["correct"]
    assert list((out / "checkpoints").iterdir()) == []  # nothing left once the run is done
    assert main([*argv[:-1], "abc", "--resume"]) == 2
    assert "token count" in capsys.readouterr().err
