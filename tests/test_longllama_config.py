"""LongLlamaConfig: upstream fields and defaults, the memory-backend fields, and validation."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from transformers import AutoConfig

from longllama import LongLlamaConfig, LongLlamaForCausalLM

# upstream's LongLlamaConfig.__init__ defaults (configuration_longllama.py)
UPSTREAM_DEFAULTS = {
    "vocab_size": 32000,
    "hidden_size": 4096,
    "intermediate_size": 11008,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "hidden_act": "silu",
    "max_position_embeddings": 2048,
    "initializer_range": 0.02,
    "rms_norm_eps": 1e-6,
    "use_cache": True,
    "pad_token_id": 0,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "tie_word_embeddings": False,
    "rope_theta": 10000.0,
    "rope_scaling": None,
    "last_context_length": 1024,
    "mem_layers": [],
    "mem_positionals": True,
    "mem_dtype": "bfloat16",
    "mem_attention_grouping": None,
    "torch_attention": False,
    "gradient_checkpoint_every_ith": 1,
}


def test_defaults_are_upstreams():
    config = LongLlamaConfig()
    for name, value in UPSTREAM_DEFAULTS.items():
        assert getattr(config, name) == value, name
    assert config.model_type == "longllama"
    assert (config.mem_backend, config.mem_top_k, config.mem_index) == ("exact", None, None)
    assert config.mem_index_params is None and config.mem_device is None


def test_fields_normalised():
    config = LongLlamaConfig(
        num_hidden_layers=4,
        mem_dtype=torch.float16,
        mem_attention_grouping=[4, 128],
        mem_device=torch.device("cpu"),
    )
    assert config.mem_dtype == "float16"
    assert config.mem_attention_grouping == (4, 128)
    assert config.mem_device == "cpu"


def test_json_round_trip(tmp_path):
    config = LongLlamaConfig(
        num_hidden_layers=4,
        mem_layers=[1, 3],
        mem_attention_grouping=(2, 64),
        mem_backend="faiss",
        mem_index="HNSW32",
        mem_top_k=16,
        mem_index_params={"efSearch": 32},
        last_context_length=512,
    )
    config.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["model_type"] == "longllama"
    loaded = AutoConfig.from_pretrained(tmp_path)
    assert isinstance(loaded, LongLlamaConfig)
    for name in ("mem_layers", "mem_attention_grouping", "mem_backend", "mem_index", "mem_top_k"):
        assert getattr(loaded, name) == getattr(config, name), name
    assert loaded.mem_index_params == {"efSearch": 32}
    assert loaded.last_context_length == 512


BAD_FIELDS = [
    ("mem_layers", [0, 4], ValueError),
    ("mem_layers", [-1], ValueError),
    ("mem_layers", "1,2", TypeError),
    ("mem_backend", "no-such-backend", ValueError),
    ("mem_top_k", 0, ValueError),
    ("mem_top_k", -3, ValueError),
    ("mem_top_k", 2.5, TypeError),
    ("mem_attention_grouping", (4,), ValueError),
    ("mem_attention_grouping", (0, 128), ValueError),
    ("mem_attention_grouping", (4, -1), ValueError),
    ("mem_attention_grouping", 4, ValueError),
    ("last_context_length", 0, ValueError),
    ("last_context_length", -5, ValueError),
    ("mem_dtype", "float8", ValueError),
    ("mem_positionals", "yes", TypeError),
    ("torch_attention", 1, TypeError),
    ("gradient_checkpoint_every_ith", 0, ValueError),
    ("mem_index", 32, TypeError),
    ("mem_index_params", ["nprobe", 4], TypeError),
    ("mem_device", "not-a-device", ValueError),
    ("rope_scaling", {"type": "linear", "factor": 2.0}, ValueError),
    ("max_position_embeddings", 0, ValueError),
]


@pytest.mark.parametrize(("name", "value", "error"), BAD_FIELDS)
def test_bad_field_fails_at_construction_naming_it(name, value, error):
    with pytest.raises(error, match=name):
        LongLlamaConfig(num_hidden_layers=4, **{name: value})


@pytest.mark.parametrize(("name", "value", "error"), BAD_FIELDS)
def test_bad_field_fails_at_load_naming_it(longllama_config, tmp_path, name, value, error):
    LongLlamaForCausalLM(longllama_config(num_hidden_layers=4)).save_pretrained(tmp_path)
    with pytest.raises(error, match=name):
        LongLlamaForCausalLM.from_pretrained(tmp_path, **{name: value})


def test_bad_field_fails_on_assignment():
    config = LongLlamaConfig(num_hidden_layers=4)
    with pytest.raises(ValueError, match="mem_top_k"):
        config.mem_top_k = 0
    with pytest.raises(ValueError, match="mem_backend"):
        config.mem_backend = "dense"


def test_hidden_size_must_split_into_heads():
    with pytest.raises(ValueError, match="num_attention_heads"):
        LongLlamaConfig(hidden_size=30, num_attention_heads=4)


def test_bad_index_fails_at_model_construction(longllama_config):
    # "exact" takes no Faiss index: detected when the model builds a backend from the config
    config = longllama_config(mem_backend="exact", mem_index="HNSW32")
    with pytest.raises(ValueError, match="mem_index"):
        LongLlamaForCausalLM(config)


def test_last_context_length_larger_than_window_is_accepted_with_a_warning():
    with pytest.warns(UserWarning, match="last_context_length"):
        config = LongLlamaConfig(max_position_embeddings=32, last_context_length=40)
    assert config.last_context_length == 40
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        LongLlamaConfig(max_position_embeddings=32, last_context_length=32)


def test_memory_fields_accepted_by_from_pretrained(longllama_config, tmp_path):
    LongLlamaForCausalLM(longllama_config()).save_pretrained(tmp_path)
    model = LongLlamaForCausalLM.from_pretrained(
        tmp_path, mem_backend="faiss", mem_index="HNSW32", mem_top_k=64, mem_index_params={"efSearch": 16}
    )
    assert (model.config.mem_backend, model.config.mem_index, model.config.mem_top_k) == (
        "faiss",
        "HNSW32",
        64,
    )
    assert model.config.mem_index_params == {"efSearch": 16}
