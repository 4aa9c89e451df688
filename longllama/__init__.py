"""LongLLaMA (Focused Transformer) with a pluggable kNN memory.

    from longllama import LongLlamaForCausalLM
    model = LongLlamaForCausalLM.from_pretrained(path, mem_backend="faiss", mem_index="HNSW32", mem_top_k=64)
    out = model(input_ids, last_context_length=1024)             # out.past_key_values: a LongLlamaCache
    ids = model.generate(input_ids, max_new_tokens=32, last_context_length=1792)

Importing the package registers ``model_type="longllama"`` with ``AutoConfig`` and
``AutoModelForCausalLM``.
"""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from longllama.cache import LongLlamaCache
from longllama.configuration import LongLlamaConfig
from longllama.embedded import embedded_model_path
from longllama.modeling import LongLlamaForCausalLM, LongLlamaModel, LongLlamaPreTrainedModel
from longllama.tokenizer import load_tokenizer
from longllama.windows import split_windows

AutoConfig.register(LongLlamaConfig.model_type, LongLlamaConfig, exist_ok=True)
AutoModel.register(LongLlamaConfig, LongLlamaModel, exist_ok=True)
AutoModelForCausalLM.register(LongLlamaConfig, LongLlamaForCausalLM, exist_ok=True)

__all__ = [
    "LongLlamaCache",
    "LongLlamaConfig",
    "LongLlamaForCausalLM",
    "LongLlamaModel",
    "LongLlamaPreTrainedModel",
    "embedded_model_path",
    "load_tokenizer",
    "split_windows",
]
