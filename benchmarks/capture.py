"""``knn-memory-capture``: record a LongLLaMA checkpoint's memory-layer keys, values and queries on a text.

    python -m benchmarks.capture CHECKPOINT_DIR [--text FILE] [--tokens 32768] [--out capture.pt]
    python -m benchmarks.capture            # the embedded trained model

The model runs with a recording memory backend (registered as ``"capture"`` for the exact dense
memory, i.e. upstream LongLLaMA, and as ``"capture:<name>"`` around any other backend, e.g.
``--backend faiss:auto`` for captures too long for dense attention) that also keeps what the memory
layers hand to it, which is exactly what a kNN index would see:

* every key and value added to memory, **un-rotated** (LongLLaMA's memory keys sit at position 0), in
  token order, padding excluded;
* the most recent ``--max-queries`` **rotated** queries that searched memory, with the memory size each
  one saw.

The text is fed one window (``max_position_embeddings`` tokens) per call, carrying the cache, so memory
grows by one window per call, as in generation. Any checkpoint directory that
``LongLlamaForCausalLM.from_pretrained`` loads works (LongLLaMA-3B included, given the RAM: its keys
and values take 2 x 3 x 32 x 100 x 4 bytes = 77 kB per token in float32). The tokenizer is the
checkpoint's ``tokenizer.model``; a checkpoint without one gets byte-level ids (``byte % vocab_size``).
Without ``--text``, a passkey document of the embedded model's training distribution is generated.

The output (a ``torch.save`` dict, format ``knn-memory-capture/1``) is read by
``benchmarks.sources`` as source ``captured:<file>``: keys/values ``[layers, heads, N, d]``, queries
``[layers, heads, Q, d]``.
"""

from __future__ import annotations

import random
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch

import knn_memory
from benchmarks.sources import CAPTURE_FORMAT
from knn_memory import ExactBackend, register_backend
from knn_memory.cli import BadArguments, OneLineParser, check_writable_file, error_exit
from longllama.cli_args import parse_backend, uses_top_k

CAPTURE_BACKEND = "capture"
DEFAULT_DIR = Path(__file__).parent / "results" / "captures"


class Recorder:
    """Mixin for a memory backend: records its inputs (batch row 0), added keys/values and searched queries."""

    #: most recent queries kept per head (set by :func:`capture`)
    max_queries: int = 4096

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self._rec_keys: list[torch.Tensor] = []  # [H, n, d] float32 chunks
        self._rec_values: list[torch.Tensor] = []
        self._rec_queries: list[list[torch.Tensor]] = [[] for _ in range(self.num_heads)]  # per head [q, d]
        self._rec_seen: list[list[torch.Tensor]] = [
            [] for _ in range(self.num_heads)
        ]  # memory size per query
        self._rec_inside = False  # in a search call (whose nested call to the other form records nothing)

    def add(self, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor | None = None) -> None:
        super().add(keys, values, mask)
        k, v = keys[0].detach().float(), values[0].detach().float()  # [H, n, d]
        if mask is not None:
            keep = mask[0].to(k.device)
            k, v = k[:, keep], v[:, keep]
        if k.shape[1]:
            self._rec_keys.append(k.cpu().clone())
            self._rec_values.append(v.cpu().clone())

    def search(self, queries: torch.Tensor, k: int | None = None, heads: slice | None = None):
        return self._recorded_call(super().search, queries, k, heads)

    def search_for_attention(self, queries: torch.Tensor, k: int | None = None, heads: slice | None = None):
        # the model's entry point; one backend's form may call the other: the outermost call records
        return self._recorded_call(super().search_for_attention, queries, k, heads)

    def _recorded_call(self, call, queries: torch.Tensor, k: int | None, heads: slice | None):
        if self._rec_inside:
            return call(queries, k, heads)
        self._rec_inside = True
        try:
            hits = call(queries, k, heads)
        finally:
            self._rec_inside = False
        self._record_queries(queries, heads)
        return hits

    def _record_queries(self, queries: torch.Tensor, heads: slice | None) -> None:
        """Keeps batch row 0 of ``queries`` [B, h, q, d] (heads ``heads``) with the memory size they saw."""
        start = 0 if heads is None else (heads.start or 0)
        seen = int(self.lengths[0])
        q = queries[0].detach().float().cpu()  # [h, q, d]
        for j in range(q.shape[0]):
            per_head, sizes = self._rec_queries[start + j], self._rec_seen[start + j]
            per_head.append(q[j].clone())
            sizes.append(torch.full((q.shape[1],), seen, dtype=torch.int64))
            while len(per_head) > 1 and sum(t.shape[0] for t in per_head[1:]) >= self.max_queries:
                per_head.pop(0)
                sizes.pop(0)

    def recorded(self) -> dict[str, torch.Tensor]:
        """keys/values [H, N, d], queries [H, Q, d] (the last Q, the same for every head), sizes [Q]."""
        d = self.head_dim
        keys = torch.cat(self._rec_keys, dim=1) if self._rec_keys else torch.empty(self.num_heads, 0, d)
        values = torch.cat(self._rec_values, dim=1) if self._rec_values else torch.empty(self.num_heads, 0, d)
        counts = [sum(t.shape[0] for t in per_head) for per_head in self._rec_queries]
        n_q = min([self.max_queries, *counts])
        if n_q == 0:
            return {
                "keys": keys,
                "values": values,
                "queries": torch.empty(self.num_heads, 0, d),
                "seen": None,
            }
        queries = torch.stack([torch.cat(per_head)[-n_q:] for per_head in self._rec_queries])
        seen = torch.cat(self._rec_seen[0])[-n_q:]
        return {"keys": keys, "values": values, "queries": queries, "seen": seen}


@register_backend(CAPTURE_BACKEND)
class CaptureBackend(Recorder, ExactBackend):
    """Exact dense memory that records its inputs."""


def recording_backend(name: str) -> str:
    """The registry name of a recording backend around backend ``name`` (registered on first use)."""
    if name == "exact":
        return CAPTURE_BACKEND
    recorded = f"{CAPTURE_BACKEND}-{name}"
    if recorded not in knn_memory.available_backends():
        base = knn_memory.backend_class(name)
        register_backend(recorded)(type(f"Capture{base.__name__}", (Recorder, base), {}))
    return recorded


def embedded_checkpoint() -> Path:
    """The trained model shipped inside the ``longllama`` package."""
    from longllama import embedded_model_path

    return embedded_model_path()


def default_text(n_tokens: int, seed: int = 0, chars_per_token: int = 6) -> tuple[str, str]:
    """A passkey document of the embedded model's training distribution, of about ``chars_per_token *
    n_tokens`` characters."""
    from longllama.training_data import make_document

    doc = make_document(random.Random(seed), n_chars=chars_per_token * n_tokens, kind="passkey")
    return doc.text, "generated passkey document"


def ensure_embedded_capture(n_keys: int = 65536, progress: bool = True, make: bool = True) -> Path | None:
    """The capture of the embedded model (``results/captures/embedded.pt``), made on first use (unless
    ``make`` is False) with enough tokens for ``n_keys`` memory keys per head; None when it is not made
    yet and ``make`` is False."""
    out = DEFAULT_DIR / "embedded.pt"
    if out.is_file():
        return out
    if not make:
        return None
    checkpoint = embedded_checkpoint()
    print(f"capturing the embedded model's keys and queries ({n_keys} tokens) -> {out.name}", file=sys.stderr)
    from transformers import AutoConfig

    window = AutoConfig.from_pretrained(checkpoint).max_position_embeddings
    return capture(checkpoint, out, n_tokens=n_keys + window, progress=progress)


def tokenize(checkpoint: Path, text: str, vocab_size: int, n_tokens: int | None) -> tuple[torch.Tensor, str]:
    """[1, n] token ids of ``text`` with the checkpoint's tokenizer (byte-level ids without one)."""
    if (checkpoint / "tokenizer.model").is_file():
        from longllama import load_tokenizer

        ids = load_tokenizer(checkpoint)(text)["input_ids"]
        how = "checkpoint tokenizer"
    else:
        ids = [b % vocab_size for b in text.encode("utf-8")]
        how = f"byte-level ids (no tokenizer.model; byte % {vocab_size})"
    if n_tokens is not None:
        if len(ids) < n_tokens:
            raise ValueError(f"the text has {len(ids)} tokens, fewer than --tokens {n_tokens}")
        ids = ids[:n_tokens]
    return torch.tensor([ids], dtype=torch.long), how


@torch.no_grad()
def capture(
    checkpoint: str | Path,
    out: str | Path,
    *,
    text: str | None = None,
    text_name: str | None = None,
    n_tokens: int | None = 8192,
    max_queries: int = 4096,
    store_dtype: torch.dtype = torch.float32,
    seed: int = 0,
    progress: bool = True,
    backend: str = "exact",
    index: str | None = None,
    top_k: int | None = None,
    index_params: dict | None = None,
) -> Path:
    """Run ``checkpoint`` over a text window by window and save its memory layers' keys and queries.

    Args:
        checkpoint: a LongLLaMA checkpoint directory.
        out: the ``.pt`` file to write.
        text: the text (default: a generated passkey document of about ``n_tokens`` tokens).
        n_tokens: cut the tokenized text to this many tokens (None: all of it).
        max_queries: most recent queries kept per head.
        store_dtype: dtype of the saved tensors (float32, or bfloat16/float16 to halve the file).
        backend, index, top_k, index_params: the memory the model runs with while recording (default: exact dense
            memory; a top-k backend such as ``"faiss"`` with ``index="auto"`` makes long captures
            affordable, and its queries are then those of a model running with that memory).

    Returns:
        The path written.
    """
    from longllama import LongLlamaForCausalLM

    checkpoint = Path(checkpoint)
    Recorder.max_queries = max_queries
    model = LongLlamaForCausalLM.from_pretrained(
        checkpoint,
        torch_dtype=torch.float32,
        mem_backend=recording_backend(backend),
        mem_index=index,
        mem_index_params=index_params,
        mem_top_k=top_k,
    ).eval()
    config = model.config
    if not config.mem_layers:
        raise ValueError(f"checkpoint {checkpoint.name} has no memory layers (mem_layers is empty)")
    if text is None:
        for chars_per_token in (6, 12, 24):  # a generated text long enough for n_tokens
            text, text_name = default_text(n_tokens or 8192, seed, chars_per_token)
            try:
                ids, how = tokenize(checkpoint, text, config.vocab_size, n_tokens)
                break
            except ValueError:
                if chars_per_token == 24:
                    raise
    else:
        ids, how = tokenize(checkpoint, text, config.vocab_size, n_tokens)
    window = config.max_position_embeddings
    cache = None
    t0 = time.perf_counter()
    steps = range(0, ids.shape[1], window)
    if progress:
        from tqdm import tqdm

        steps = tqdm(steps, desc="capture", unit="window", file=sys.stderr)
    for begin in steps:
        out_step = model(ids[:, begin : begin + window], cache=cache, use_cache=True, logits_to_keep=1)
        cache = out_step.cache
    layers = list(cache.memory_layers)
    recs = [cache.memory(layer).recorded() for layer in layers]
    if any(r["keys"].shape[1] == 0 for r in recs):
        raise ValueError(
            f"the text ({ids.shape[1]} tokens) fills no memory: it needs more than one window ({window} tokens)"
        )
    n_q = min(r["queries"].shape[1] for r in recs)
    data = {
        "format": CAPTURE_FORMAT,
        "checkpoint": checkpoint.name,
        "layers": layers,
        "num_heads": config.num_attention_heads,
        "head_dim": config.hidden_size // config.num_attention_heads,
        "window": window,
        "tokens": int(ids.shape[1]),
        "text": text_name or "text",
        "tokenization": how,
        "keys": torch.stack([r["keys"] for r in recs]).to(store_dtype),  # [L, H, N, d] un-rotated
        "values": torch.stack([r["values"] for r in recs]).to(store_dtype),
        "queries": torch.stack([r["queries"][:, -n_q:] for r in recs]).to(
            store_dtype
        ),  # [L, H, Q, d] rotated
        "query_memory_size": recs[0]["seen"][-n_q:] if recs[0]["seen"] is not None else None,
        "seconds": time.perf_counter() - t0,
        "memory_backend": backend if index is None else f"{backend}:{index}",
        "torch": str(torch.__version__),
        "knn_memory_backends": knn_memory.available_backends(),
    }
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(out.suffix + ".tmp")
    torch.save(data, tmp)
    tmp.replace(out)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    p = OneLineParser(prog="knn-memory-capture", description=__doc__.split("\n\n")[0])
    p.add_argument(
        "checkpoint", nargs="?", default=None, help="checkpoint directory (default: the embedded model)"
    )
    p.add_argument("--text", default=None, help="a UTF-8 text file (default: a generated passkey document)")
    p.add_argument(
        "--tokens", type=int, default=None, help="tokens to feed (default: 8192, or all of --text)"
    )
    p.add_argument("--max-queries", type=int, default=4096, help="most recent queries kept per head")
    p.add_argument("--store-dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--out", default=None, help="output .pt (default: results/captures/<checkpoint>.pt)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--backend",
        default="exact",
        help="memory the model runs with while recording: exact (dense, default) or NAME[:SPEC], e.g. faiss:auto",
    )
    p.add_argument(
        "--top-k", type=int, default=32, help="entries per query for a top-k --backend (default 32)"
    )
    try:
        args = p.parse_args(argv)
        checkpoint = Path(args.checkpoint) if args.checkpoint else embedded_checkpoint()
        if checkpoint is None:
            raise ValueError("no checkpoint given and the longllama package ships no embedded model yet")
        if not (checkpoint / "config.json").is_file():
            raise ValueError(f"{checkpoint.name}: not a checkpoint directory (no config.json)")
        if args.tokens is not None and args.tokens < 2:
            raise ValueError(f"--tokens must be >= 2, got {args.tokens}")
        if args.max_queries < 1:
            raise ValueError(f"--max-queries must be >= 1, got {args.max_queries}")
        fields = parse_backend(args.backend)
        text = name = None
        if args.text:
            text, name = Path(args.text).read_text(encoding="utf-8"), Path(args.text).name
        n_tokens = args.tokens if (args.tokens or not args.text) else None
        default_name = "embedded" if not args.checkpoint else checkpoint.name
        out = Path(args.out) if args.out else DEFAULT_DIR / f"{default_name}.pt"
        check_writable_file(out, "--out")  # before the model runs, not after
        path = capture(
            checkpoint,
            out,
            text=text,
            text_name=name,
            n_tokens=n_tokens or 8192,
            max_queries=args.max_queries,
            store_dtype=getattr(torch, args.store_dtype),
            seed=args.seed,
            backend=fields["mem_backend"],
            index=fields.get("mem_index"),
            top_k=args.top_k if uses_top_k(fields) else None,
            index_params=fields.get("mem_index_params"),
        )
    except (BadArguments, ValueError, OSError) as err:
        return error_exit("knn-memory-capture", err)
    data = torch.load(path, weights_only=True)
    L, H, N, d = data["keys"].shape
    print(
        f"captured {data['tokens']} tokens of {data['checkpoint']}: {L} memory layers x {H} heads, {N} keys "
        f"and {data['queries'].shape[2]} queries per head, head_dim {d} -> {path.name} "
        f"(use as --sources captured:{path})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
