"""Checkpoints: LLaMA weight names, upstream-style pytorch_model.bin, safetensors round trip, Auto classes."""

from __future__ import annotations

import json

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from longllama import LongLlamaConfig, LongLlamaForCausalLM, LongLlamaModel

LLAMA_LAYER_WEIGHTS = {
    "self_attn.q_proj.weight",
    "self_attn.k_proj.weight",
    "self_attn.v_proj.weight",
    "self_attn.o_proj.weight",
    "mlp.gate_proj.weight",
    "mlp.up_proj.weight",
    "mlp.down_proj.weight",
    "input_layernorm.weight",
    "post_attention_layernorm.weight",
}


def logits_of(model, ids):
    with torch.no_grad():
        return model(ids, last_context_length=8).logits


def test_weight_names_are_llamas(longllama_config):
    config = longllama_config()
    names = set(LongLlamaForCausalLM(config).state_dict())
    expected = {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"}
    expected |= {
        f"model.layers.{i}.{w}" for i in range(config.num_hidden_layers) for w in LLAMA_LAYER_WEIGHTS
    }
    assert names == expected


def write_upstream_checkpoint(model: LongLlamaForCausalLM, path) -> None:
    """A checkpoint directory as upstream (transformers 4.30) wrote it: config.json + pytorch_model.bin.

    The state dict carries the per-layer ``rotary_emb.inv_freq`` buffers of the v1.1 files (in bf16, as the
    checkpoint's dtype) and the config upstream's keys only.
    """
    config = model.config
    head_dim = config.hidden_size // config.num_attention_heads
    state = {k: v.clone() for k, v in model.state_dict().items()}
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, head_dim, 2).float() / head_dim))
    garbage = inv_freq.to(torch.bfloat16) * 3.0  # never used: RoPE is recomputed from the config
    for i in range(config.num_hidden_layers):
        state[f"model.layers.{i}.self_attn.rotary_emb.inv_freq"] = garbage
    path.mkdir()
    torch.save(state, path / "pytorch_model.bin")
    upstream_config = {
        "architectures": ["LongLlamaForCausalLM"],
        "model_type": "longllama",
        "auto_map": {
            "AutoConfig": "configuration_longllama.LongLlamaConfig",
            "AutoModelForCausalLM": "modeling_longllama.LongLlamaForCausalLM",
        },
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": 0,
        "hidden_act": "silu",
        "hidden_size": config.hidden_size,
        "initializer_range": 0.02,
        "intermediate_size": config.intermediate_size,
        "max_position_embeddings": config.max_position_embeddings,
        "mem_attention_grouping": None,
        "mem_dtype": "bfloat16",
        "mem_layers": config.mem_layers,
        "mem_positionals": True,
        "num_attention_heads": config.num_attention_heads,
        "num_hidden_layers": config.num_hidden_layers,
        "rms_norm_eps": 1e-6,
        "tie_word_embeddings": False,
        "torch_dtype": "float32",
        "transformers_version": "4.30.0",
        "use_cache": True,
        "vocab_size": config.vocab_size,
    }
    (path / "config.json").write_text(json.dumps(upstream_config))


def test_upstream_bin_checkpoint_with_inv_freq_loads(longllama_config, tmp_path):
    torch.manual_seed(0)
    model = LongLlamaForCausalLM(longllama_config(mem_dtype="bfloat16", last_context_length=1024)).eval()
    write_upstream_checkpoint(model, tmp_path / "ckpt")

    loaded, info = LongLlamaForCausalLM.from_pretrained(tmp_path / "ckpt", output_loading_info=True)
    assert not info["missing_keys"] and not info["mismatched_keys"]
    assert not info["unexpected_keys"]  # the inv_freq tensors are ignored silently
    assert not any("inv_freq" in k for k in loaded.state_dict())
    for name, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], value), name
    assert loaded.config.last_context_length == 1024  # absent from the file: upstream's default
    assert loaded.config.mem_backend == "exact"
    ids = torch.randint(3, 64, (1, 40))
    torch.testing.assert_close(logits_of(loaded.eval(), ids), logits_of(model, ids), rtol=0, atol=0)
    # the upstream config.json names its remote code in auto_map; the registered local classes are used
    assert isinstance(AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt"), LongLlamaForCausalLM)


def test_save_pretrained_round_trip_safetensors(longllama_config, tmp_path):
    torch.manual_seed(1)
    config = longllama_config(mem_attention_grouping=(1, 4), mem_layers=[0, 2])
    model = LongLlamaForCausalLM(config).eval()
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file()
    loaded = LongLlamaForCausalLM.from_pretrained(tmp_path).eval()
    assert loaded.config.mem_attention_grouping == (1, 4)
    assert loaded.config.mem_layers == [0, 2]
    ids = torch.randint(3, 64, (2, 40))
    torch.testing.assert_close(logits_of(loaded, ids), logits_of(model, ids), rtol=0, atol=0)


def test_auto_classes_load_longllama(longllama_config, tmp_path):
    torch.manual_seed(2)
    model = LongLlamaForCausalLM(longllama_config()).eval()
    model.save_pretrained(tmp_path)
    assert isinstance(AutoConfig.from_pretrained(tmp_path), LongLlamaConfig)
    auto = AutoModelForCausalLM.from_pretrained(tmp_path, mem_top_k=4).eval()
    assert isinstance(auto, LongLlamaForCausalLM)
    assert auto.config.mem_top_k == 4
    ids = torch.randint(3, 64, (1, 8))  # one window, no memory involved: top-k is irrelevant
    torch.testing.assert_close(logits_of(auto, ids), logits_of(model, ids), rtol=0, atol=0)


def test_bare_model_loads_from_causal_lm_checkpoint(longllama_config, tmp_path):
    torch.manual_seed(3)
    model = LongLlamaForCausalLM(longllama_config()).eval()
    model.save_pretrained(tmp_path)
    bare = LongLlamaModel.from_pretrained(tmp_path).eval()
    ids = torch.randint(3, 64, (1, 30))
    with torch.no_grad():
        hidden = bare(ids, last_context_length=8).last_hidden_state
        torch.testing.assert_close(model.lm_head(hidden), logits_of(model, ids), rtol=0, atol=0)
