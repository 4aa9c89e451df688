"""The embedded default: a small LongLLaMA trained with FoT, shipped inside the package.

    from longllama import LongLlamaForCausalLM, embedded_model_path, load_tokenizer
    model = LongLlamaForCausalLM.from_pretrained(embedded_model_path())
    tokenizer = load_tokenizer(embedded_model_path())

Its model card (``MODEL_CARD.md`` in the same directory) records how it was trained.
"""

from __future__ import annotations

from pathlib import Path

EMBEDDED_DIR = Path(__file__).resolve().parent / "embedded" / "tiny-fot"


def embedded_model_path() -> Path:
    """Directory of the embedded model (config, safetensors weights, tokenizer, model card)."""
    if not (EMBEDDED_DIR / "config.json").is_file():
        raise FileNotFoundError(
            f"the embedded model is missing from {EMBEDDED_DIR} (a source checkout without it can rebuild it "
            "with the command in longllama/embedded/README.md)"
        )
    return EMBEDDED_DIR
