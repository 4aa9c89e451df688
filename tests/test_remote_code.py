"""A saved checkpoint loads through transformers' Auto classes with ``trust_remote_code=True`` in an
interpreter that never imported ``longllama``: ``config.json``'s ``auto_map`` names the one-import module
``longllama_remote.py`` that ``save_pretrained`` writes beside the weights."""

from __future__ import annotations

import json
import os
import runpy
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import longllama
from longllama import LongLlamaForCausalLM, embedded_model_path, load_tokenizer
from longllama.configuration import REMOTE_AUTO_MAP, REMOTE_CODE_FILE

PACKAGED_MODULE = Path(longllama.__file__).with_name(REMOTE_CODE_FILE)
PROMPT = (
    "The pass key is 4711. Remember it. 4711 is the pass key. " * 6 + "What is the pass key? The pass key is"
)

# Runs in a fresh interpreter: argv = saved dir, output file. Loads only through transformers.
CHILD = r"""
import sys
import torch
torch.set_num_threads(1)
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer, pipeline

path, out = sys.argv[1], sys.argv[2]
assert "longllama" not in sys.modules
config = AutoConfig.from_pretrained(path, trust_remote_code=True)
model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True).eval()
base = AutoModel.from_pretrained(path, trust_remote_code=True).eval()
tokenizer = AutoTokenizer.from_pretrained(path)
ids = tokenizer(sys.argv[3], return_tensors="pt").input_ids
with torch.no_grad():
    logits = model(ids, last_context_length=32).logits
    hidden = base(ids, last_context_length=32).last_hidden_state
generator = pipeline("text-generation", model=path, trust_remote_code=True, tokenizer=tokenizer)
text = generator(sys.argv[3], max_new_tokens=8, do_sample=False, return_full_text=False)[0]["generated_text"]
model.save_pretrained(path + "-resaved")  # after a remote-code load: still the one-import module
torch.save(
    {
        "config": type(config).__module__ + "." + type(config).__name__,
        "model": type(model).__module__ + "." + type(model).__name__,
        "base": type(base).__module__ + "." + type(base).__name__,
        "ids": ids,
        "logits": logits,
        "hidden": hidden,
        "text": text,
    },
    out,
)
"""


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> Path:
    """The embedded model and its tokenizer, saved with save_pretrained."""
    path = tmp_path_factory.mktemp("remote") / "model"
    LongLlamaForCausalLM.from_pretrained(embedded_model_path()).save_pretrained(path)
    load_tokenizer(embedded_model_path()).save_pretrained(path)
    return path


def test_save_pretrained_writes_the_auto_map_and_the_module(saved, tmp_path):
    assert json.loads((saved / "config.json").read_text())["auto_map"] == REMOTE_AUTO_MAP
    assert (saved / REMOTE_CODE_FILE).read_text() == PACKAGED_MODULE.read_text()
    assert not list(saved.glob("modeling*.py")) and not list(saved.glob("configuration*.py"))
    # a config that came with another implementation's auto_map (as upstream checkpoints do) gets ours
    from tiny import tiny_config

    config = tiny_config()
    config.auto_map = {"AutoConfig": "configuration_longllama.LongLlamaConfig", "AutoTokenizer": ["x", None]}
    config.save_pretrained(tmp_path)
    written = json.loads((tmp_path / "config.json").read_text())["auto_map"]
    assert written == {**REMOTE_AUTO_MAP, "AutoTokenizer": ["x", None]}
    assert (tmp_path / REMOTE_CODE_FILE).is_file()


def test_the_embedded_model_ships_the_module():
    path = embedded_model_path()
    assert json.loads((path / "config.json").read_text())["auto_map"] == REMOTE_AUTO_MAP
    assert (path / REMOTE_CODE_FILE).read_text() == PACKAGED_MODULE.read_text()


@torch.no_grad()
def test_auto_classes_load_without_importing_the_library(saved, tmp_path):
    out = tmp_path / "child.pt"
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules"), "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(
        [sys.executable, "-c", CHILD, str(saved), str(out), PROMPT],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    child = torch.load(out, weights_only=True)
    # the Auto classes resolved to the installed library's own classes
    assert child["config"] == "longllama.configuration.LongLlamaConfig"
    assert child["model"] == "longllama.modeling.LongLlamaForCausalLM"
    assert child["base"] == "longllama.modeling.LongLlamaModel"

    model = LongLlamaForCausalLM.from_pretrained(saved).eval()
    tokenizer = load_tokenizer(saved)
    ids = tokenizer(PROMPT, return_tensors="pt").input_ids
    assert torch.equal(child["ids"], ids)
    assert ids.shape[1] > 2 * model.config.max_position_embeddings  # memory is used
    out_lib = model(ids, last_context_length=32, output_hidden_states=True)
    torch.testing.assert_close(child["logits"], out_lib.logits, rtol=0, atol=0)
    torch.testing.assert_close(child["hidden"], out_lib.hidden_states[-1], rtol=0, atol=0)
    generated = model.generate(ids, max_new_tokens=8, do_sample=False)
    assert child["text"] == tokenizer.decode(generated[0, ids.shape[1] :], skip_special_tokens=True)

    resaved = Path(str(saved) + "-resaved")
    assert json.loads((resaved / "config.json").read_text())["auto_map"] == REMOTE_AUTO_MAP
    assert sorted(p.name for p in resaved.glob("*.py")) == [REMOTE_CODE_FILE]


def test_the_module_names_the_package_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "longllama", None)  # as if the library were not installed
    with pytest.raises(ImportError, match=r"pip install knn-memory"):
        runpy.run_path(str(PACKAGED_MODULE))
