"""Generate golden outputs of the upstream LongLLaMA implementation for the parity test.

This script is run by hand, in a separate environment that holds the *upstream* code and its pinned
dependencies; it is not part of the library and is never imported by the tests. Its outputs are:

* ``tiny/``       a tiny random LongLLaMA checkpoint written by upstream's ``save_pretrained``;
* ``goldens.pt``  one ``torch.save``-d plain dict with, for every case, the inputs needed to replay the case
                  and the upstream outputs (logits, greedy tokens/scores, memory and local-cache lengths).

The format of ``goldens.pt`` is documented in ``README.md`` next to this file.

Usage (environment set up as described in README.md)::

    python tests/data/upstream/make_goldens.py /path/to/long_llama/src            # (re)generate
    python tests/data/upstream/make_goldens.py /path/to/long_llama/src --verify   # re-run and compare

``src`` is upstream's ``src/`` folder (``configuration_longllama.py``, ``modeling_longllama.py``,
``longllama_utils.py``). It has no ``__init__.py`` and uses relative imports, so it is imported here as a
synthetic package named ``upstream_longllama``.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import types
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent

SEED = 3
# A larger init than LLaMA's 0.02 gives peaked attention and well separated logits: memory then changes the
# outputs by far more than the parity tolerance, and greedy decoding has clear (non-tie) argmax margins.
INITIALIZER_RANGE = 0.1
TINY_CONFIG = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=4,
    num_attention_heads=4,
    max_position_embeddings=32,
    initializer_range=INITIALIZER_RANGE,
    rms_norm_eps=1e-6,
    rope_theta=10000.0,
    mem_layers=[1, 2],
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)
PAD_ID = 0
BOS_ID = 1
FP32_MEM = {"mem_dtype": "float32"}


def import_upstream(src: Path) -> tuple[types.ModuleType, types.ModuleType]:
    """Import upstream's configuration and modeling modules from ``src`` as package ``upstream_longllama``."""
    if not (src / "modeling_longllama.py").is_file():
        raise SystemExit(f"{src} does not look like upstream's src/ folder (no modeling_longllama.py)")
    pkg = types.ModuleType("upstream_longllama")
    pkg.__path__ = [str(src)]
    sys.modules["upstream_longllama"] = pkg
    configuration = importlib.import_module("upstream_longllama.configuration_longllama")
    modeling = importlib.import_module("upstream_longllama.modeling_longllama")
    return configuration, modeling


def random_ids(gen: torch.Generator, batch: int, length: int, vocab: int, bos: bool = True) -> torch.Tensor:
    """Token ids in [3, vocab) (no pad/bos/eos), shape [batch, length]; with ``bos`` the first one is BOS."""
    ids = torch.randint(3, vocab, (batch, length), generator=gen)
    if bos:
        ids[:, 0] = BOS_ID
    return ids


def left_pad(ids: torch.Tensor, pads: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad row ``i`` of ``ids`` with ``pads[i]`` pad tokens, dropping the row's tail to keep the width.

    Returns (input_ids, attention_mask) with the mask 1 on real tokens and 0 on pads.
    """
    out = ids.clone()
    mask = torch.ones_like(ids)
    for row, n in enumerate(pads):
        if n:
            out[row, n:] = ids[row, : ids.shape[1] - n]
            out[row, :n] = PAD_ID
            mask[row, :n] = 0
    return out, mask


def cache_lengths(past: Any, num_layers: int) -> tuple[list[int], list[int]]:
    """Per-layer (memory lengths, local-cache lengths) from upstream's tuple of 6-tuples.

    Each layer is (local_k, local_v, local_pos, mem_k, mem_v, mem_mask); absent parts are [B, 0, 0, 0].
    """
    if past is None:
        return [0] * num_layers, [0] * num_layers
    mem = [int(layer[3].shape[-2]) for layer in past]
    local = [int(layer[0].shape[-2]) for layer in past]
    return mem, local


# --------------------------------------------------------------------------------------------- cases
# A case is a dict: "config_overrides" (kwargs for from_pretrained) and "calls", a list of call specs.
# A forward call spec: method="forward", input_ids, attention_mask (or None), kwargs (passed to forward),
# use_past (pass the previous call's past_key_values). A generate call spec: method="generate", input_ids,
# attention_mask (or None), kwargs (passed to generate).


def build_cases(vocab: int) -> dict[str, dict[str, Any]]:
    gen = torch.Generator().manual_seed(SEED)
    long_ids = random_ids(gen, 1, 100, vocab)  # 100 tokens: windows 32 + 32 + 24 + last 12 (lcl=12)

    def fwd(ids, mask=None, use_past=False, **kwargs):
        return {
            "method": "forward",
            "input_ids": ids,
            "attention_mask": mask,
            "use_past": use_past,
            "kwargs": kwargs,
        }

    def multiwindow(overrides, **kwargs):
        kwargs.setdefault("last_context_length", 12)
        return {"config_overrides": overrides, "calls": [fwd(long_ids, **kwargs)]}

    cases: dict[str, dict[str, Any]] = {}
    cases["multiwindow"] = multiwindow(dict(FP32_MEM))
    cases["grouping"] = multiwindow({**FP32_MEM, "mem_attention_grouping": (2, 5)})
    cases["torch_attention"] = multiwindow({**FP32_MEM, "torch_attention": True})
    cases["no_positionals"] = multiwindow({**FP32_MEM, "mem_positionals": False})
    cases["no_mem_layers"] = multiwindow({**FP32_MEM, "mem_layers": []})
    cases["bf16_mem"] = multiwindow({"mem_dtype": "bfloat16"})
    cases["use_cache_false"] = multiwindow(dict(FP32_MEM), use_cache=False)

    # Left padding: row 1 has 13 pads (the first window is partly padding); in `leftpad_full_window` row 1
    # has 40 pads, so its whole first window (32 tokens) is padding and only masked entries enter memory.
    two_rows = random_ids(gen, 2, 100, vocab)
    ids, mask = left_pad(two_rows, [0, 13])
    cases["leftpad"] = {"config_overrides": dict(FP32_MEM), "calls": [fwd(ids, mask, last_context_length=12)]}
    ids, mask = left_pad(two_rows, [0, 40])
    cases["leftpad_full_window"] = {
        "config_overrides": dict(FP32_MEM),
        "calls": [fwd(ids, mask, last_context_length=12)],
    }

    # Continuation: 70 tokens (memory 58, local 12), then 50 more with the returned cache. The second call is
    # split into 32 + 6 + 12 with the local cache present, so the overflow flush happens twice.
    first, second = long_ids[:, :70], random_ids(gen, 1, 50, vocab, bos=False)
    cases["continuation"] = {
        "config_overrides": dict(FP32_MEM),
        "calls": [
            fwd(first, last_context_length=12),
            fwd(second, use_past=True, last_context_length=12),
        ],
    }

    # last_context_length (40) larger than the window (32): the final window is 40 tokens long and the local
    # cache exceeds max_cache; the next call (20 tokens) flushes all of it into memory.
    cases["long_last_context"] = {
        "config_overrides": dict(FP32_MEM),
        "calls": [
            fwd(long_ids, last_context_length=40),
            fwd(random_ids(gen, 1, 20, vocab, bos=False), use_past=True, last_context_length=40),
        ],
    }

    # Greedy generation: a 70-token prompt (memory 58, local 12), 30 new tokens; the local cache overflows at
    # the 22nd generated token (12 + 21 > 32) and its 32 entries are flushed into memory.
    gen_kwargs = dict(max_new_tokens=30, num_beams=1, do_sample=False, last_context_length=12)
    prompt = long_ids[:, :70]
    cases["generate"] = {
        "config_overrides": dict(FP32_MEM),
        "calls": [
            {"method": "generate", "input_ids": prompt, "attention_mask": None, "kwargs": dict(gen_kwargs)},
        ],
    }
    batch_prompt, batch_mask = left_pad(random_ids(gen, 2, 70, vocab), [0, 9])
    cases["generate_leftpad"] = {
        "config_overrides": dict(FP32_MEM),
        "calls": [
            {
                "method": "generate",
                "input_ids": batch_prompt,
                "attention_mask": batch_mask,
                "kwargs": dict(gen_kwargs),
            },
        ],
    }
    return cases


# --------------------------------------------------------------------------------------------- running


def load_model(modeling, ckpt: Path, overrides: dict[str, Any]):
    model = modeling.LongLlamaForCausalLM.from_pretrained(str(ckpt), torch_dtype=torch.float32, **overrides)
    model.eval()
    return model


def no_eos_generation_config(model):
    """A generation config without EOS, so that greedy search always emits max_new_tokens tokens.

    With transformers 4.33 passing eos_token_id=None to generate() is not enough: greedy_search falls back to
    model.generation_config.eos_token_id, so the config itself is replaced.
    """
    from transformers import GenerationConfig

    return GenerationConfig(bos_token_id=model.config.bos_token_id, pad_token_id=model.config.pad_token_id)


@torch.no_grad()
def run_case(modeling, ckpt: Path, case: dict[str, Any]) -> list[dict[str, Any]]:
    """Run one case with upstream and return, per call, the recorded outputs."""
    model = load_model(modeling, ckpt, case["config_overrides"])
    num_layers = model.config.num_hidden_layers
    results = []
    past = None
    for call in case["calls"]:
        ids, mask = call["input_ids"], call["attention_mask"]
        if call["method"] == "forward":
            out = model(
                ids, attention_mask=mask, past_key_values=past if call["use_past"] else None, **call["kwargs"]
            )
            past = out.past_key_values
            mem, local = cache_lengths(past, num_layers)
            real = mask.bool() if mask is not None else torch.ones_like(ids, dtype=torch.bool)
            results.append(
                {
                    "logits": out.logits.float().clone(),
                    "real_mask": real,
                    "mem_lengths": mem,
                    "local_lengths": local,
                }
            )
        elif call["method"] == "generate":
            model.generation_config = no_eos_generation_config(model)
            step_mem, step_local = [], []

            def hook(_module, _args, output, step_mem=step_mem, step_local=step_local):
                m, loc = cache_lengths(output.past_key_values, num_layers)
                step_mem.append(m)
                step_local.append(loc)

            handle = model.register_forward_hook(hook)
            try:
                out = model.generate(
                    ids,
                    attention_mask=mask,
                    output_scores=True,
                    return_dict_in_generate=True,
                    **call["kwargs"],
                )
            finally:
                handle.remove()
            scores = torch.stack([s.float() for s in out.scores])  # [steps, B, V]
            results.append(
                {
                    "sequences": out.sequences.clone(),
                    "scores": scores.clone(),
                    "step_mem_lengths": step_mem,
                    "step_local_lengths": step_local,
                    "mem_lengths": step_mem[-1],
                    "local_lengths": step_local[-1],
                }
            )
        else:
            raise ValueError(call["method"])
    return results


def min_greedy_margin(scores: torch.Tensor) -> float:
    """Smallest gap between the best and second-best score over all steps and rows."""
    top2 = scores.topk(2, dim=-1).values
    return float((top2[..., 0] - top2[..., 1]).min())


def make_checkpoint(configuration, modeling, ckpt: Path) -> None:
    torch.manual_seed(SEED)
    config = configuration.LongLlamaConfig(**TINY_CONFIG)
    model = modeling.LongLlamaForCausalLM(config).to(torch.float32)
    ckpt.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(ckpt))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("src", type=Path, help="upstream long_llama src/ folder")
    parser.add_argument("--out", type=Path, default=HERE, help="output folder (default: next to this script)")
    parser.add_argument(
        "--commit",
        default="unknown",
        help="upstream commit the src/ folder was exported from (recorded in goldens.pt)",
    )
    parser.add_argument(
        "--verify",
        action="store_true",
        help="re-run every case against the existing goldens.pt and tiny/; write nothing",
    )
    args = parser.parse_args(argv)

    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)
    import transformers

    configuration, modeling = import_upstream(args.src.resolve())
    ckpt = args.out / "tiny"
    goldens_path = args.out / "goldens.pt"

    if args.verify:
        goldens = torch.load(goldens_path, weights_only=True)
        worst = 0.0
        for name, case in goldens["cases"].items():
            for call, ref in zip(run_case(modeling, ckpt, case), case["calls"], strict=True):
                for key, value in call.items():
                    if isinstance(value, torch.Tensor):
                        diff = float((value.double() - ref[key].double()).abs().max()) if value.numel() else 0
                        worst = max(worst, diff)
                        if diff != 0.0:
                            print(f"{name}: {key} differs by {diff:.3g}")
                    elif value != ref[key]:
                        print(f"{name}: {key} differs: {value} != {ref[key]}")
                        worst = float("inf")
            print(f"{name}: re-run done")
        print(f"largest difference over all cases: {worst}")
        return 0 if worst == 0.0 else 1

    make_checkpoint(configuration, modeling, ckpt)
    cases = build_cases(TINY_CONFIG["vocab_size"])
    for name, case in cases.items():
        for call, result in zip(case["calls"], run_case(modeling, ckpt, case), strict=True):
            call.update(result)
            if "scores" in result:
                print(f"{name}: min greedy margin {min_greedy_margin(result['scores']):.4f}")
        print(f"{name}: mem_lengths per call {[c['mem_lengths'] for c in case['calls']]}")

    goldens = {
        "meta": {
            "upstream_repo": "github.com/CStanKonrad/long_llama",
            "upstream_commit": args.commit,
            "transformers_version": str(transformers.__version__),
            "torch_version": str(torch.__version__),
            "command": "python tests/data/upstream/make_goldens.py <long_llama>/src",
            "checkpoint": "tiny",
            "tiny_config": dict(TINY_CONFIG),
            "seed": SEED,
            "num_layers": TINY_CONFIG["num_hidden_layers"],
            "mem_layers": list(TINY_CONFIG["mem_layers"]),
        },
        "cases": cases,
    }
    torch.save(goldens, goldens_path)
    torch.load(goldens_path, weights_only=True)  # plain data only: loadable without trusting pickled classes
    print(f"wrote {goldens_path} ({goldens_path.stat().st_size / 1e6:.2f} MB) and {ckpt}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
