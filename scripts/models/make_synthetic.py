#!/usr/bin/env python3
"""Build a random-weight decoder with a real model's shapes, exported by the ONNX Runtime GenAI builder.

Speed and memory at scale depend on shapes, not on trained weights, and real checkpoints cannot be
downloaded here. This script writes a Hugging Face Llama checkpoint with the shapes of a known model and
random weights, exports it with the GenAI builder (default `-p fp16 -e cuda`, the format deployed on
NVIDIA GPUs), and copies the fixtures' tokenizer (512 tokens; every id is valid in a larger vocabulary).

Run it with the GenAI virtualenv's interpreter (see `scripts/fixtures/make-fixtures.py`):

    /root/.cache/nbl-fixtures/genai/bin/python scripts/models/make_synthetic.py --shape llama-3.2-1b --out DIR

The model's large tensors are random, so they need not travel: `scripts/models/synthetic_weights.py hollow DIR`
zeroes them in place (the data file then compresses to almost nothing) and `fill DIR` draws them again,
the same values from the same seed, on the machine that runs the model.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

# Shapes from the models' published config.json files.
SHAPES = {
    "llama-3.2-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                         num_key_value_heads=8, head_dim=64, vocab_size=128256, tie_word_embeddings=True,
                         rope_theta=500000.0),
    "llama-3-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=8, head_dim=128, vocab_size=128256, tie_word_embeddings=False,
                       rope_theta=500000.0),
}
TOKENIZER_FROM = Path(__file__).resolve().parents[2] / "fixtures" / "llama-genai-fp16-cuda"
TOKENIZER_FILES = ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="llama-3.2-1b")
    parser.add_argument("--layers", type=int, help="override the number of decoder layers")
    parser.add_argument("--context", type=int, default=4096, help="max_position_embeddings (default 4096)")
    parser.add_argument("--precision", default="fp16", choices=["fp16", "fp32", "int4"])
    parser.add_argument("--provider", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    shape = dict(SHAPES[args.shape])
    if args.layers:
        shape["num_hidden_layers"] = args.layers
    config = LlamaConfig(**shape, max_position_embeddings=args.context, bos_token_id=0, eos_token_id=0,
                         pad_token_id=1, rms_norm_eps=1e-5, initializer_range=0.02)
    if args.out.exists():
        sys.exit(f"error: {args.out} exists; remove it first")
    with tempfile.TemporaryDirectory(dir=args.out.parent) as work:
        hf_dir = Path(work) / "hf"
        torch.manual_seed(0)
        with torch.device("cpu"):
            model = LlamaForCausalLM(config).to(torch.float16)
        model.save_pretrained(hf_dir)
        del model
        for name in TOKENIZER_FILES:
            shutil.copy(TOKENIZER_FROM / name, hf_dir / name)
        built = Path(work) / "onnx"
        cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(hf_dir), "-o", str(built),
               "-p", args.precision, "-e", args.provider, "-c", str(Path(work) / "cache")]
        print("$", " ".join(cmd), flush=True)
        subprocess.run(cmd, check=True)
        for name in TOKENIZER_FILES + ["config.json"]:
            shutil.copy(hf_dir / name, built / name)
        (built / "synthetic.json").write_text(json.dumps(
            {"shape": args.shape, "config": shape, "context": args.context, "precision": args.precision,
             "provider": args.provider}, indent=2) + "\n")
        shutil.move(built, args.out)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
