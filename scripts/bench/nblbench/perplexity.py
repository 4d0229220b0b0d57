"""Does ``nbl-onnx eval`` measure the perplexity PyTorch measures? (``scripts/models/check-perplexity.sh``)

    python3 -m nblbench.perplexity TORCH_JSON ONNX_JSON [--tolerance 0.005]

TORCH_JSON is the last line ``scripts/models/pytorch_perplexity.py`` prints, ONNX_JSON the output of
``nbl-onnx eval --json`` on the same pre-tokenised blocks. Prints both and exits 1 when they differ by more
than the relative tolerance.
"""

from __future__ import annotations

import argparse
import json
import sys


def compare(torch: dict, onnx: dict) -> tuple[float, float, float]:
    """PyTorch's perplexity, nbl-onnx's (its first model's) and their relative difference."""
    a, b = torch["perplexity"], onnx["models"][0]["ppl"]
    return a, b, b / a - 1


def main(argv: list[str] | None = None) -> int:
    """Command line: print the comparison; exit 1 beyond the tolerance."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("torch", help="pytorch_perplexity.py's JSON line")
    parser.add_argument("onnx", help="nbl-onnx eval --json output")
    parser.add_argument("--tolerance", type=float, default=0.005, help="relative (default 0.005: 0.5%%)")
    args = parser.parse_args(argv)
    torch, onnx = json.loads(args.torch), json.loads(args.onnx)
    a, b, rel = compare(torch, onnx)
    print(f"{torch['blocks']} blocks of {torch['seq_len']} tokens: PyTorch {a:.4f}, nbl-onnx eval {b:.4f} "
          f"({rel * 100:+.2e}%)")
    return 0 if abs(rel) <= args.tolerance else 1


if __name__ == "__main__":
    sys.exit(main())
