"""Remote-code entry of a LongLLaMA checkpoint saved by the knn-memory library.

``save_pretrained`` writes a copy of this file beside the weights, and ``config.json``'s ``auto_map``
points transformers' ``AutoConfig``, ``AutoModel`` and ``AutoModelForCausalLM`` at it, so that

    AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)

works without importing the library first. It holds no model code: it imports the classes of the
installed library, which must be installed (``pip install knn-memory``).
"""

try:
    from longllama import LongLlamaConfig, LongLlamaForCausalLM, LongLlamaModel
except ModuleNotFoundError as err:
    if err.name != "longllama":
        raise
    raise ImportError(
        "this LongLLaMA checkpoint is loaded by the knn-memory library, which is not installed: "
        "pip install knn-memory"
    ) from err

__all__ = ["LongLlamaConfig", "LongLlamaForCausalLM", "LongLlamaModel"]
