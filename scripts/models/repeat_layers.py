#!/usr/bin/env python3
"""Grow a GenAI-builder decoder to more layers by repeating one of its middle layers.

    repeat_layers.py SRC DST --layers 32

A model with Llama-3-8B's full depth needs 32 layers of weights, which the builder would have to hold
in memory to export (more than this machine has), and which nothing here needs to differ: speed and
memory at scale depend on shapes. This script takes a short export (at least 3 layers, from
`scripts/models/make_synthetic.py --layers 3`), keeps its layer 0, repeats its layer 1 as layers 1..N-2 and
its last layer as layer N-1, with the names the builder would give them (`/model/layers.{i}/...`,
`model.layers.{i}....`, `past_key_values.{i}.key`, `present.{i}.value`), and points every repeated
layer's weights at the source layer's bytes in the data file. The data file is hard-linked (copied
where that fails), so DST costs almost no disk; a tool that copies the model writes the full size.

SRC may be a shell (`synthetic_weights.py shell`: no data file); DST then is one too.

The graph must be the builder's: one node name prefix per layer, `/model/layers.{i}/`. Needs onnx.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
from pathlib import Path

import onnx

LAYER_NODE = re.compile(r"/model/layers\.(\d+)/")
# Every per-layer name the builder writes: node and tensor paths, weights, KV inputs and outputs.
LAYER_NAME = re.compile(r"(/model/layers\.|model\.layers\.|past_key_values\.|present\.)(\d+)([./])")


def renumber(name: str, mapping: dict[int, int]) -> str:
    return LAYER_NAME.sub(lambda m: f"{m[1]}{mapping.get(int(m[2]), int(m[2]))}{m[3]}", name)


def renamed_node(node: onnx.NodeProto, mapping: dict[int, int]) -> onnx.NodeProto:
    new = onnx.NodeProto()
    new.CopyFrom(node)
    new.name = renumber(node.name, mapping)
    new.input[:] = [renumber(n, mapping) for n in node.input]
    new.output[:] = [renumber(n, mapping) for n in node.output]
    return new


def layer_of(name: str) -> int | None:
    m = LAYER_NAME.search(name)
    return int(m[2]) if m else None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("src", type=Path, help="a GenAI export with at least 3 layers")
    parser.add_argument("dst", type=Path)
    parser.add_argument("--layers", type=int, required=True)
    args = parser.parse_args()
    if args.dst.exists():
        sys.exit(f"error: {args.dst} exists; remove it first")
    model = onnx.load(args.src / "model.onnx", load_external_data=False)
    graph = model.graph
    # Decoder layers are those with a KV cache; the builder numbers the final norm as one more.
    source_layers = sum(1 for v in graph.input if re.fullmatch(r"past_key_values\.\d+\.key", v.name))
    if source_layers < 3 or args.layers < source_layers:
        sys.exit(f"error: {args.src} has {source_layers} layers; need at least 3, and --layers at least that")
    last, total = source_layers - 1, args.layers
    # Which source layer each new layer copies: 0 stays, the last stays last, 1 fills the middle.
    copies = [0] + [1] * (total - 2) + [last]

    def for_layer(i: int) -> dict[int, int]:
        """Names in source layer copies[i] (and its predecessor's outputs it reads) for layer i."""
        src = copies[i]
        return {src: i, src - 1: i - 1} if src > 0 else {}

    before, after, by_layer = [], [], {}
    for node in graph.node:
        m = LAYER_NODE.search(node.name)
        if m and int(m[1]) < source_layers:
            by_layer.setdefault(int(m[1]), []).append(node)
        elif by_layer:
            after.append(node)
        else:
            before.append(node)
    nodes = list(before)
    for i in range(total):
        nodes += [renamed_node(n, for_layer(i)) for n in by_layer[copies[i]]]
    final = {last: total - 1, source_layers: total}
    nodes += [renamed_node(n, final) for n in after]

    inits, source_inits = [], {}
    for t in graph.initializer:
        layer = layer_of(t.name)
        if layer is None or layer == source_layers:
            t.name = renumber(t.name, final)
            inits.append(t)
        else:
            source_inits.setdefault(layer, []).append(t)
    for i in range(total):
        for t in source_inits.get(copies[i], []):
            new = onnx.TensorProto()
            new.CopyFrom(t)
            new.name = renumber(t.name, {copies[i]: i})
            inits.append(new)

    def kv_list(values):
        """Graph inputs or outputs: the layer-free ones, then each KV kind for every layer."""
        plain = [v for v in values if layer_of(v.name) is None]
        kinds = {}
        for v in values:
            if (layer := layer_of(v.name)) is not None and layer == 1:
                kinds.setdefault(renumber(v.name, {1: -1}), v)
        out = list(plain)
        for template in kinds.values():
            for i in range(total):
                new = onnx.ValueInfoProto()
                new.CopyFrom(template)
                new.name = renumber(template.name, {1: i})
                out.append(new)
        return out

    new_inputs, new_outputs = kv_list(graph.input), kv_list(graph.output)
    del graph.node[:]
    graph.node.extend(nodes)
    del graph.initializer[:]
    graph.initializer.extend(inits)
    del graph.input[:]
    graph.input.extend(new_inputs)
    del graph.output[:]
    graph.output.extend(new_outputs)
    del graph.value_info[:]

    args.dst.mkdir(parents=True)
    onnx.save(model, args.dst / "model.onnx")
    data_files = {e.value for t in inits for e in t.external_data if e.key == "location"}
    for name in data_files:
        if not (args.src / name).exists():
            continue  # a shell (synthetic_weights.py shell): fill makes the data where it runs
        try:
            os.link(args.src / name, args.dst / name)
        except OSError:
            shutil.copy(args.src / name, args.dst / name)
    for path in args.src.iterdir():
        if path.name in data_files or path.name == "model.onnx" or not path.is_file():
            continue
        if path.name in ("genai_config.json", "config.json"):
            config = json.loads(path.read_text())
            section = config["model"]["decoder"] if path.name == "genai_config.json" else config
            section["num_hidden_layers"] = total
            path = args.dst / path.name
            path.write_text(json.dumps(config, indent=4) + "\n")
        else:
            shutil.copy(path, args.dst / path.name)
    print(f"wrote {args.dst}: {total} layers from {source_layers} (layer 1 repeated)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
