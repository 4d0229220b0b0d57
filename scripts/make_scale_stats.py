#!/usr/bin/env python3
"""Write a statistics file of a given size without calibrating: `layers` layers at hidden size `d`,
in nbl-onnx's format (version 2: packed upper triangles for sxx and syy), streamed tensor by tensor so
that it never needs the file's size in memory.

    make_scale_stats.py OUT --hidden 4096 --layers 32
    make_scale_stats.py OUT --inspect model.inspect.json   # for that model: `nbl-onnx inspect --json`

The moments are those of a layer whose input has covariance I + 0.1·J/d (J the all-ones matrix:
every entry nonzero, so nothing is sparse) and output y = 0.5 x + noise; only their size and the
work they cause matter. Needs numpy.
"""

import argparse
import json
import struct

import numpy as np


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out")
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--inspect", help="`nbl-onnx inspect --json` of a model: its hidden size, layers and "
                        "fingerprint, so that `rewrite` accepts the file for that model")
    args = parser.parse_args()
    fingerprint = "synthetic"
    layers = [{"layer": i, "x": f"x{i}", "y": f"y{i}"} for i in range(args.layers)]
    if args.inspect:
        with open(args.inspect) as f:
            inspected = json.load(f)
        fingerprint, args.hidden = inspected["fingerprint"], inspected["hidden_size"]
        layers = [{"layer": l["layer"], "x": l["x"], "y": l["y"]} for l in inspected["layers"]]
        args.layers = len(layers)
    d, n = args.hidden, 1_000_000
    packed = d * (d + 1) // 2
    shapes = {"count": [1], "mean_x": [d], "mean_y": [d], "sxx": [packed], "syx": [d, d], "syy": [packed],
              "cos_sum": [1]}
    names, offset, header = [], 0, {}
    for layer in (l["layer"] for l in layers):
        for key, shape in shapes.items():
            name = f"layers.{layer}.{key}"
            size = 8 * int(np.prod(shape))
            header[name] = {"dtype": "F64", "shape": shape, "data_offsets": [offset, offset + size]}
            names.append((name, key))
            offset += size
    data = [{"files": ["synthetic"], "seq_len": 2048, "blocks": n // 2048, "shard": [0, 1], "engine": "none"}]
    header["__metadata__"] = {
        "format": "nbl-onnx-stats", "version": "2", "model_fingerprint": fingerprint, "hidden_size": str(d),
        "tokens": str(n), "layers": json.dumps(layers), "data": json.dumps(data),
    }
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)

    # Row i of an upper triangle: (i, i..d). Σxx = n (I + 0.1 J/d), Σyx = 0.5 Σxx, Σyy = 0.25 Σxx + 0.1 n I.
    def packed_rows(diagonal: float, everywhere: float):
        for i in range(d):
            row = np.full(d - i, everywhere)
            row[0] += diagonal
            yield row

    with open(args.out, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        off = 0.1 * n / d
        for _, key in names:
            if key == "count":
                f.write(np.array([n], dtype="<f8").tobytes())
            elif key in ("mean_x", "mean_y"):
                f.write(np.zeros(d, dtype="<f8").tobytes())
            elif key == "cos_sum":
                f.write(np.array([0.9 * n], dtype="<f8").tobytes())
            elif key == "sxx":
                for row in packed_rows(n, off):
                    f.write(row.astype("<f8").tobytes())
            elif key == "syy":
                for row in packed_rows(0.25 * n + 0.1 * n, 0.25 * off):
                    f.write(row.astype("<f8").tobytes())
            elif key == "syx":
                for i in range(d):
                    row = np.full(d, 0.5 * off)
                    row[i] += 0.5 * n
                    f.write(row.astype("<f8").tobytes())
    print(json.dumps({"path": args.out, "hidden_size": d, "layers": args.layers, "bytes": 8 + len(raw) + offset}))


if __name__ == "__main__":
    main()
