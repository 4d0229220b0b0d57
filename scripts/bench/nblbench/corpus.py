"""The benchmarks' text: the built-in C4 sample split as nbl-onnx splits it.

Documents 0-199 calibrate, documents 200-299 are held out for evaluation, as in ``nbl-onnx`` without
``--data``. The source is ``data/c4_demo.json.gz`` (the sample nbl-onnx embeds; identical to
``shared/data/c4_demo.json``, sha256 in data/README.md), or any JSON array of documents.

    python3 -m nblbench.corpus OUT_DIR [--source FILE]   # writes OUT_DIR/{calibration,evaluation}.json
"""

from __future__ import annotations

import argparse
import gzip
import json
import sys
from pathlib import Path

from nblbench.common import REPO

SOURCE = REPO / "data" / "c4_demo.json.gz"
CALIBRATION = slice(0, 200)
EVALUATION = slice(200, 300)


def documents(source: Path | str = SOURCE) -> list:
    """The documents of a JSON array file, gzipped (``.gz``) or not."""
    source = Path(source)
    opener = gzip.open if source.suffix == ".gz" else open
    with opener(source, "rt", encoding="utf-8") as f:
        return json.load(f)


def split(out_dir: Path | str, source: Path | str = SOURCE) -> tuple[Path, Path]:
    """Writes ``calibration.json`` (documents 0-199) and ``evaluation.json`` (200-299) into ``out_dir``;
    returns their paths."""
    docs = documents(source)
    if len(docs) < EVALUATION.stop:
        raise SystemExit(f"error: {source} holds {len(docs)} documents; the split needs {EVALUATION.stop}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = out_dir / "calibration.json", out_dir / "evaluation.json"
    for path, part in zip(paths, (CALIBRATION, EVALUATION)):
        path.write_text(json.dumps(docs[part]))
    return paths


def main(argv: list[str] | None = None) -> int:
    """Command line: split the sample into OUT_DIR."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--source", type=Path, default=SOURCE, help=f"JSON array of documents (default {SOURCE})")
    args = parser.parse_args(argv)
    for path in split(args.out_dir, args.source):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
