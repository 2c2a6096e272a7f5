"""Time the real-model path end to end on a random-weights model of a real shape (no download).

A model of the chosen shape is initialised with random weights, saved in the Hugging Face format
with the zoo's tokenizer, loaded through :func:`madlib.models.hub.load_model` (device and precision
chosen automatically) and run through :func:`madlib.features.activations.extract` on quirky prompts with
the activations streamed to disk; prints load time, prompts per second, the batch size picked
and peak accelerator memory.

    python benchmarks/real_model_extraction.py                       # tiny shape, seconds on CPU
    python benchmarks/real_model_extraction.py --shape llama-3.1-8b --n 4000 --layers 1 4 7 10 13 16 19 22 25 28 31
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from madlib.data import datasets as qdata
from madlib.features.activations import extract
from madlib.models.hub import auto_batch_size, default_device, load_model
from madlib.models.tokenizer import hf_tokenizer

SHAPES = {
    "tiny": dict(arch="llama", hidden_size=64, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=1024),
    "gpt2-small": dict(arch="gpt2", n_embd=768, n_layer=12, n_head=12, vocab_size=50257, n_positions=1024, n_ctx=1024),
    "llama-3.1-8b": dict(arch="llama", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                         num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0, max_position_embeddings=131072,
                         rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                           original_max_position_embeddings=8192)),
}  # fmt: skip


def save_random_model(shape: str, path: Path) -> None:
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    kw = dict(SHAPES[shape])
    arch = kw.pop("arch")
    tok = hf_tokenizer()
    ids = dict(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    device = "cuda" if torch.cuda.is_available() else "cpu"  # initialising 8B weights on CPU takes minutes
    with torch.device(device):
        torch.manual_seed(0)
        model = GPT2LMHeadModel(GPT2Config(**kw, **ids)) if arch == "gpt2" else LlamaForCausalLM(LlamaConfig(**kw, **ids))
    model.to(torch.bfloat16 if device == "cuda" else torch.float32).save_pretrained(path)
    tok.save_pretrained(path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=list(SHAPES), default="tiny")
    ap.add_argument("--n", type=int, default=400, help="prompts")
    ap.add_argument("--layers", type=int, nargs="+", default=[1, 2, 3])
    ap.add_argument("--batch-size", default="auto")
    ap.add_argument("--workdir", default=None, help="where the model and the activations go (default: a temporary folder)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        tmp = Path(tmp)
        t0 = time.time()
        save_random_model(args.shape, tmp / "model")
        t1 = time.time()
        model = load_model(str(tmp / "model"))
        t2 = time.time()
        prompts = qdata.quirky_dataset("hemisphere", n=max(4, args.n // 2), seed=1)["prompt"].tolist()[: args.n]
        longest = max(len(model.to_tokens(p)[0]) for p in prompts)
        bs = auto_batch_size(model, longest) if args.batch_size == "auto" else int(args.batch_size)
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        ex = extract(model, prompts, args.layers, batch_size=bs, out_dir=tmp / "acts", desc=args.shape)
        t3 = time.time()
        peak = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else float("nan")
        size = sum(f.stat().st_size for f in (tmp / "acts").iterdir()) / 2**20
        print(
            f"shape={args.shape} device={default_device()} dtype={model.cfg.dtype} layers={len(args.layers)} prompts={len(ex)} "
            f"longest={longest} tokens batch_size={bs}\n"
            f"save {t1 - t0:.1f}s  load+convert {t2 - t1:.1f}s  extract {t3 - t2:.1f}s ({len(ex) / (t3 - t2):.1f} prompts/s)  "
            f"peak GPU memory {peak:.1f} GiB  activations on disk {size:.1f} MiB"
        )


if __name__ == "__main__":
    main()
