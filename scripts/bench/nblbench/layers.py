"""Layer lists read from nbl-onnx's JSON, printed as ``--layer-ids`` takes them (``3,7,12``).

    python3 -m nblbench.layers ranked ANALYSIS.json --take K [--skip 0]   # the ranking's first K, without --skip
    python3 -m nblbench.layers selected REPORT.json                      # the layers a rewrite chose, in its order
"""

from __future__ import annotations

import argparse
import sys

from nblbench.common import load_json


def ranked(analysis: dict, take: int, skip: tuple[int, ...] = ()) -> list[int]:
    """The first ``take`` layers of an ``analyze --json`` ranking (``order``), leaving out ``skip``."""
    return [layer for layer in analysis["order"] if layer not in skip][:take]


def selected(report: dict) -> list[int]:
    """The layers a rewrite report (``<stem>.nbl.json``) selected, in the order chosen."""
    return list(report["selected"])


def ids(layers: list[int]) -> str:
    """Layers as ``--layer-ids`` takes them."""
    return ",".join(map(str, layers))


def main(argv: list[str] | None = None) -> int:
    """Command line: print a layer list."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("ranked", help="the first K layers of an analysis' ranking")
    p.add_argument("analysis")
    p.add_argument("--take", type=int, required=True)
    p.add_argument("--skip", type=int, action="append", default=[], help="a layer to leave out (repeatable)")
    p = sub.add_parser("selected", help="the layers a rewrite report selected")
    p.add_argument("report")
    args = parser.parse_args(argv)
    if args.command == "ranked":
        print(ids(ranked(load_json(args.analysis), args.take, tuple(args.skip))))
    else:
        print(ids(selected(load_json(args.report))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
