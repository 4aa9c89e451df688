"""Loading LongLLaMA's tokenizer: a SentencePiece ``tokenizer.model`` through transformers'
``LlamaTokenizer``, or a directory written by ``tokenizer.save_pretrained`` through ``AutoTokenizer``."""

from __future__ import annotations

import os
import shutil
import tempfile

import sentencepiece
from transformers import AutoTokenizer, LlamaTokenizer, PreTrainedTokenizerBase

# what transformers' save_pretrained writes instead of the SentencePiece model (tokenizers' format)
SAVED_TOKENIZER_FILE = "tokenizer.json"


def load_tokenizer(path: str | os.PathLike, **kwargs) -> PreTrainedTokenizerBase:
    """LongLLaMA's tokenizer, adding BOS as LongLLaMA expects.

    Args:
        path: a ``tokenizer.model`` file, a directory holding one (e.g. an upstream checkpoint directory),
            or a directory written by ``tokenizer.save_pretrained`` (``tokenizer.json``, no
            ``tokenizer.model``), which is loaded with ``AutoTokenizer``.
        **kwargs: passed to ``LlamaTokenizer`` / ``AutoTokenizer`` (``add_bos_token`` defaults to True,
            ``add_eos_token`` to False, and for a SentencePiece model ``legacy`` to True as in the tokenizer
            LongLLaMA was trained with). A model without a padding piece pads with ``<unk>`` (id 0 in
            LLaMA's tokenizer, LongLLaMA's ``pad_token_id``).

    Raises:
        FileNotFoundError: ``path`` is neither a SentencePiece model nor a directory holding
            ``tokenizer.model`` or ``tokenizer.json``.
        ValueError: the file is not a SentencePiece model (truncated, corrupt or another format).
        TypeError: ``path`` is not a path.
    """
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a str or os.PathLike, got {type(path).__name__}")
    path = os.fspath(path)
    kwargs.setdefault("add_bos_token", True)
    kwargs.setdefault("add_eos_token", False)
    vocab_file = os.path.join(path, "tokenizer.model") if os.path.isdir(path) else path
    if os.path.isdir(path) and not os.path.isfile(vocab_file):
        if not os.path.isfile(os.path.join(path, SAVED_TOKENIZER_FILE)):
            raise FileNotFoundError(
                f"no tokenizer in directory {path!r}: expected a SentencePiece tokenizer.model or a "
                f"{SAVED_TOKENIZER_FILE} written by tokenizer.save_pretrained"
            )
        return _with_padding(AutoTokenizer.from_pretrained(path, **kwargs))
    if not os.path.isfile(vocab_file):
        raise FileNotFoundError(f"no SentencePiece model at {vocab_file!r} (path={path!r})")
    try:  # transformers would fall back to other formats and fail with an unrelated message
        sentencepiece.SentencePieceProcessor(model_file=vocab_file)
    except (RuntimeError, OSError) as err:
        reason = str(err).strip().splitlines()[-1] if str(err).strip() else type(err).__name__
        raise ValueError(f"{vocab_file!r} is not a SentencePiece model ({reason})") from None
    kwargs.setdefault("legacy", True)
    # Constructing LlamaTokenizer(vocab_file=...) directly gives a tokenizer that encodes nothing in
    # transformers 5.x; from_pretrained on a directory holding tokenizer.model converts it properly.
    if os.path.basename(vocab_file) == "tokenizer.model":
        tokenizer = LlamaTokenizer.from_pretrained(os.path.dirname(vocab_file) or ".", **kwargs)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            shutil.copyfile(vocab_file, os.path.join(tmp, "tokenizer.model"))
            tokenizer = LlamaTokenizer.from_pretrained(tmp, **kwargs)
    return _with_padding(tokenizer)


def _with_padding(tokenizer: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    if tokenizer.pad_token is None and tokenizer.unk_token is not None:
        # LLaMA's SentencePiece model has no padding piece; LongLLaMA's config pads with id 0 (<unk>)
        tokenizer.pad_token = tokenizer.unk_token
    return tokenizer
