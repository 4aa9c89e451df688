"""The passkey tasks of ``longllama/lm_eval_tasks`` run in lm-evaluation-harness on the embedded model."""

from __future__ import annotations

import json

import pytest

from longllama import LongLlamaForCausalLM, embedded_model_path, load_tokenizer
from longllama.lm_eval_tasks import TASKS_DIR, main, passkey_dataset, score_generation

lm_eval = pytest.importorskip("lm_eval")
huggingface = pytest.importorskip("lm_eval.models.huggingface")  # needs the hf extra (accelerate)


@pytest.fixture(scope="module")
def model_and_tokenizer():
    model = LongLlamaForCausalLM.from_pretrained(embedded_model_path()).eval()
    return model, load_tokenizer(embedded_model_path())


def test_passkey_tasks_through_simple_evaluate(model_and_tokenizer):
    from lm_eval.tasks import TaskManager

    model, tokenizer = model_and_tokenizer
    lm = huggingface.HFLM(pretrained=model, tokenizer=tokenizer, max_length=2048, batch_size=1)
    tasks = TaskManager(include_path=str(TASKS_DIR), metadata={"lengths": [1024], "num_samples": 4})
    out = lm_eval.simple_evaluate(
        model=lm,
        tasks=["longllama_passkey", "longllama_passkey_loglikelihood"],
        task_manager=tasks,
        log_samples=True,
    )
    generated = out["results"]["longllama_passkey"]
    scored = out["results"]["longllama_passkey_loglikelihood"]
    assert generated["exact_match,none"] >= 0.75, generated
    assert scored["acc,none"] >= 0.75, scored
    samples = out["samples"]["longllama_passkey"]
    assert len(samples) == 4
    assert {s["doc"]["seed"] for s in samples} == {0, 1, 2, 3}
    assert all(1000 <= s["doc"]["n_tokens"] <= 1050 for s in samples)
    # what was scored is the answer after the whole prompt, with its leading space
    for s in out["samples"]["longllama_passkey_loglikelihood"]:
        context, continuation = s["arguments"][0]
        assert continuation == " " + s["doc"]["answer"] and context == s["doc"]["input"]


def test_hflm_reads_the_window_as_max_length(model_and_tokenizer):
    # why the recipe passes max_length: lm-eval would cut every prompt to max_position_embeddings
    model, tokenizer = model_and_tokenizer
    lm = huggingface.HFLM(pretrained=model, tokenizer=tokenizer, batch_size=1)
    assert lm.max_length == model.config.max_position_embeddings == 64


def test_prompts_that_lm_eval_would_cut_are_refused():
    path = str(embedded_model_path())
    with pytest.raises(ValueError, match=r"max_length=64 .*max_position_embeddings.*need 10[0-9][0-9]"):
        passkey_dataset(pretrained=path, lengths=[1024], num_samples=1)
    with pytest.raises(ValueError, match=r"max_length=512 .*--model_args"):
        passkey_dataset(pretrained=path, max_length=512, lengths=[1024], num_samples=1)
    dataset = passkey_dataset(pretrained=path, max_length=2048, lengths=[1024, 256], num_samples=2)["test"]
    assert dataset["length"] == [1024, 1024, 256, 256] and dataset["seed"] == [0, 1, 0, 1]
    tokenizer = load_tokenizer(path)
    for doc in dataset:
        ids = tokenizer(doc["input"]).input_ids
        assert len(ids) == doc["n_tokens"] and ids[0] == tokenizer.bos_token_id
        assert doc["input"].endswith("The pass key is") and f" {doc['answer']}. " in doc["input"]


def test_score_generation():
    doc = {"answer": "1689"}
    assert score_generation(doc, [" 1689. Remember"]) == {"exact_match": 1.0, "number_match": 1.0}
    assert score_generation(doc, ["16899."]) == {"exact_match": 1.0, "number_match": 0.0}
    assert score_generation(doc, ["1698"]) == {"exact_match": 0.0, "number_match": 0.0}
    assert score_generation(doc, [""]) == {"exact_match": 0.0, "number_match": 0.0}


def test_entry_point_prints_the_include_path_and_writes_documents(tmp_path, capsys):
    assert main([]) == 0
    folder = capsys.readouterr().out.strip()
    assert folder == str(TASKS_DIR)
    assert {p.name for p in TASKS_DIR.glob("passkey/*.yaml")} == {
        "longllama_passkey.yaml",
        "longllama_passkey_loglikelihood.yaml",
    }
    out = tmp_path / "docs.jsonl"
    assert main(["--jsonl", str(out), "--lengths", "128", "--num-samples", "3"]) == 0
    docs = [json.loads(line) for line in out.read_text().splitlines()]
    assert [d["seed"] for d in docs] == [0, 1, 2] and len({d["answer"] for d in docs}) == 3
    with pytest.raises(SystemExit):
        main(["--jsonl", str(out), "--lengths", "12"])


def test_lm_eval_command_line_loads_the_model_through_its_auto_map(tmp_path):
    """``lm_eval --model hf`` in a fresh interpreter that never imports the library itself: the
    checkpoint's ``auto_map`` and ``trust_remote_code=True`` load it."""
    import subprocess
    import sys

    args = f"pretrained={embedded_model_path()},trust_remote_code=True,max_length=2048,dtype=float32"
    cmd = [
        sys.executable, "-m", "lm_eval", "--model", "hf", "--model_args", args,
        "--include_path", str(TASKS_DIR), "--tasks", "longllama_passkey", "--batch_size", "1",
        "--metadata", json.dumps({"lengths": [512], "num_samples": 2}), "--output_path", str(tmp_path / "out"),
    ]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env={
        **__import__("os").environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"
    })  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    results = [json.loads(p.read_text()) for p in (tmp_path / "out").rglob("results_*.json")]
    assert len(results) == 1
    assert results[0]["results"]["longllama_passkey"]["exact_match,none"] == 1.0
    assert results[0]["config"]["model"] == "hf"
