#!/usr/bin/env python3
"""Zero, strip or redraw the large random tensors of a model made by `scripts/models/make_synthetic.py`.

    synthetic_weights.py hollow DIR     # zero every external tensor of >= 2^20 elements, in place
    synthetic_weights.py shell DIR OUT  # OUT: the graph and small tensors alone, no data file
    synthetic_weights.py fill DIR       # draw them again, creating the data file where it is missing

A hollowed data file is mostly zeros and compresses to almost nothing; a shell leaves the data file out
altogether (its small tensors, norm weights and rotary caches, move into model.onnx), so an 8B-shaped
model travels as a few megabytes. `fill` on the machine that runs the model gives the same values as
`fill` here (NumPy's PCG64, seeded by the order of the distinct tensors):
- float weights: N(0, 0.02^2);
- packed 4-bit weights (uint8, `MatMulNBits`): uniform bytes, i.e. uniform 4-bit values;
- their block scales (`*_scales`): 0.02 / 4.61, so that the dequantised weights, (q - 8) * scale with
  q uniform in 0..15, have the float weights' spread.
Tensors that share bytes (`scripts/models/repeat_layers.py` points repeated layers at one copy) are
drawn once. Small tensors are never touched. Needs numpy and onnx.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

LARGE = 1 << 20
STD = 0.02
# The standard deviation of q - 8 for q uniform in 0..15.
NIBBLE_STD = float(np.sqrt((16 * 16 - 1) / 12))


def external(init: onnx.TensorProto) -> dict[str, str] | None:
    if init.data_location != onnx.TensorProto.EXTERNAL:
        return None
    return {e.key: e.value for e in init.external_data}


def element_count(init: onnx.TensorProto) -> int:
    return int(np.prod(init.dims)) if init.dims else 1


def large_tensors(model_dir: Path):
    """(name, file, offset, element count, numpy dtype) of each distinct large external initializer,
    in graph order."""
    model = onnx.load(model_dir / "model.onnx", load_external_data=False)
    seen = set()
    for init in model.graph.initializer:
        info = external(init)
        count = element_count(init)
        if info is None or count < LARGE:
            continue
        where = (info["location"], int(info.get("offset", 0)))
        if where in seen:
            continue
        seen.add(where)
        dtype = helper.tensor_dtype_to_np_dtype(init.data_type)
        if dtype not in (np.float16, np.float32, np.uint8):
            sys.exit(f"error: {init.name} is {dtype}; only float and packed 4-bit tensors are redrawn")
        yield init.name, model_dir / info["location"], where[1], count, dtype


def draw(rng: np.random.Generator, name: str, n: int, dtype) -> bytes:
    if dtype == np.uint8:
        return rng.integers(0, 256, n, dtype=np.uint8).tobytes()
    if name.endswith("_scales"):
        return np.full(n, STD / NIBBLE_STD, dtype=dtype).tobytes()
    return (rng.standard_normal(n, dtype=np.float32) * STD).astype(dtype).tobytes()


def shell(src: Path, out: Path) -> None:
    """OUT: SRC's graph with every small tensor inline and the large ones still external, pointing
    into a data file OUT does not have (`fill` makes it), and SRC's other files."""
    if out.exists():
        sys.exit(f"error: {out} exists; remove it first")
    model = onnx.load(src / "model.onnx", load_external_data=False)
    data_files = set()
    for init in model.graph.initializer:
        info = external(init)
        if info is None:
            continue
        if element_count(init) >= LARGE:
            data_files.add(info["location"])
            continue
        with open(src / info["location"], "rb") as f:
            f.seek(int(info.get("offset", 0)))
            raw = f.read(int(info["length"]))
        del init.external_data[:]
        init.data_location = onnx.TensorProto.DEFAULT
        init.raw_data = raw
        numpy_helper.to_array(init)  # the bytes fit the tensor's type and shape
    out.mkdir(parents=True)
    onnx.save(model, out / "model.onnx")
    for path in src.iterdir():
        if path.is_file() and path.name != "model.onnx" and path.name not in data_files:
            shutil.copy(path, out / path.name)
    size = (out / "model.onnx").stat().st_size
    print(f"shell: {out} ({size / 1e6:.1f} MB; {', '.join(sorted(data_files))} left for fill)")


def main() -> int:
    if len(sys.argv) == 4 and sys.argv[1] == "shell":
        shell(Path(sys.argv[2]), Path(sys.argv[3]))
        return 0
    if len(sys.argv) != 3 or sys.argv[1] not in ("hollow", "fill"):
        sys.exit(__doc__)
    mode, model_dir = sys.argv[1], Path(sys.argv[2])
    tensors = list(large_tensors(model_dir))
    if mode == "fill":
        # A shell has no data file: make each one as long as its tensors reach.
        ends: dict[Path, int] = {}
        model = onnx.load(model_dir / "model.onnx", load_external_data=False)
        for init in model.graph.initializer:
            if (info := external(init)) is not None:
                path = model_dir / info["location"]
                ends[path] = max(ends.get(path, 0), int(info.get("offset", 0)) + int(info["length"]))
        for path, end in ends.items():
            if not path.exists():
                with open(path, "wb") as f:
                    f.truncate(end)
    total = 0
    for seed, (name, path, offset, count, dtype) in enumerate(tensors):
        with open(path, "r+b") as f:
            f.seek(offset)
            rng = np.random.default_rng(seed)
            left = count
            while left:
                n = min(left, 1 << 24)
                f.write(np.zeros(n, dtype=dtype).tobytes() if mode == "hollow" else draw(rng, name, n, dtype))
                left -= n
        total += count
    print(f"{mode}: {total / 1e9:.2f} G elements in {model_dir}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
