#!/usr/bin/env python3
"""Zero or redraw the large random tensors of a model made by `scripts/models/make_synthetic.py`.

    synthetic_weights.py hollow DIR   # zero every external tensor of >= 2^20 elements, in place
    synthetic_weights.py fill DIR     # draw them again: N(0, 0.02^2), seeded by tensor order

A hollowed data file is mostly zeros and compresses to almost nothing, so the model can travel to a
machine that cannot download it; `fill` there gives the same values as `fill` here (NumPy's PCG64 from
fixed seeds). Small tensors (norm weights, rotary caches, biases) are never touched. Needs numpy and onnx.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import onnx
from onnx import helper

LARGE = 1 << 20
STD = 0.02


def large_tensors(model_dir: Path):
    """(name, file, offset, element count, numpy dtype) of each large external initializer, in graph order."""
    model = onnx.load(model_dir / "model.onnx", load_external_data=False)
    for init in model.graph.initializer:
        if init.data_location != onnx.TensorProto.EXTERNAL:
            continue
        info = {e.key: e.value for e in init.external_data}
        count = int(np.prod(init.dims)) if init.dims else 1
        if count < LARGE:
            continue
        dtype = helper.tensor_dtype_to_np_dtype(init.data_type)
        if dtype not in (np.float16, np.float32):
            sys.exit(f"error: {init.name} is {dtype}; only float tensors are redrawn")
        yield init.name, model_dir / info["location"], int(info.get("offset", 0)), count, dtype


def main() -> int:
    if len(sys.argv) != 3 or sys.argv[1] not in ("hollow", "fill"):
        sys.exit(__doc__)
    mode, model_dir = sys.argv[1], Path(sys.argv[2])
    total = 0
    for seed, (name, path, offset, count, dtype) in enumerate(large_tensors(model_dir)):
        with open(path, "r+b") as f:
            f.seek(offset)
            if mode == "hollow":
                chunk = np.zeros(min(count, 1 << 24), dtype=dtype)
                left = count
                while left:
                    n = min(left, chunk.size)
                    f.write(chunk[:n].tobytes())
                    left -= n
            else:
                rng = np.random.default_rng(seed)
                left = count
                while left:
                    n = min(left, 1 << 24)
                    f.write((rng.standard_normal(n, dtype=np.float32) * STD).astype(dtype).tobytes())
                    left -= n
        total += count
    print(f"{mode}: {total / 1e9:.2f} G elements in {model_dir}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
