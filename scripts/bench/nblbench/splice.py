"""The one writer of generated text in the docs: a named block between marker comments.

A generated block in a Markdown file reads::

    <!-- BEGIN generated: NAME -->
    ...text written by a benchmark script...
    <!-- END generated: NAME -->

:func:`splice` replaces the text between the markers and leaves everything else in the file as it is, so
that prose written by hand around a generated table survives a rerun. Benchmarks write into
``docs/results/<topic>.md`` (:func:`results_page`), never into README.md.

    python3 -m nblbench.splice DOC NAME [FILE]     # the block's text from FILE, or from stdin
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from nblbench.common import RESULTS

BEGIN = "<!-- BEGIN generated: {name} -->"
END = "<!-- END generated: {name} -->"


def block(name: str, text: str) -> str:
    """The block ``name`` holding ``text``, markers included, without a final newline."""
    return "\n".join([BEGIN.format(name=name), text.strip("\n"), END.format(name=name)])


def splice(doc: Path | str, name: str, text: str) -> Path:
    """Puts ``text`` between the markers of block ``name`` in the Markdown file ``doc``.

    The rest of the file is kept byte for byte. Where the file has no such block, one is appended at its
    end (the file is created if missing) and a note says so on stderr: move it where it belongs once. A
    begin marker without its end marker, or a block given twice, is an error. The file is replaced
    atomically. Returns the path.
    """
    doc = Path(doc)
    begin, end = BEGIN.format(name=name), END.format(name=name)
    text_before = doc.read_text() if doc.exists() else ""
    count = text_before.count(begin)
    if count > 1 or text_before.count(end) != count:
        raise SystemExit(f"error: {doc}: block {name!r} must have exactly one {begin!r} and one {end!r}")
    if count == 1:
        head, rest = text_before.split(begin, 1)
        tail = rest.split(end, 1)[1]
        text_after = head + block(name, text) + tail
    else:
        separator = "" if not text_before or text_before.endswith("\n\n") else (
            "\n" if text_before.endswith("\n") else "\n\n")
        text_after = text_before + separator + block(name, text) + "\n"
        print(f"note: {doc} had no generated block {name!r}; appended it at the end", file=sys.stderr)
    doc.parent.mkdir(parents=True, exist_ok=True)
    tmp = doc.with_name(f".{doc.name}.tmp")
    tmp.write_text(text_after)
    os.replace(tmp, doc)
    return doc


def results_page(topic: str) -> Path:
    """The result page of a topic: ``docs/results/<topic>.md``."""
    return RESULTS / f"{topic}.md"


def publish(out: Path, topic: str, block_name: str, text: str) -> None:
    """A device check's result written to ``out``: its table goes into block ``block_name`` of the
    topic's results page when ``out`` is in bench/; a trial run written elsewhere leaves the docs
    alone. Says which on stdout."""
    from nblbench.common import BENCH

    if out.resolve().parent == BENCH.resolve():
        splice(results_page(topic), block_name, text)
        print(f"wrote {out} and {results_page(topic)}")
    else:
        print(f"wrote {out} (outside {BENCH}: {results_page(topic)} left as it is)")


def main(argv: list[str] | None = None) -> int:
    """Command line: splice FILE (or stdin) into DOC as block NAME."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("doc", type=Path, help="the Markdown file")
    parser.add_argument("name", help="the block's name")
    parser.add_argument("file", nargs="?", type=Path, help="the block's text (default: stdin)")
    args = parser.parse_args(argv)
    text = args.file.read_text() if args.file else sys.stdin.read()
    splice(args.doc, args.name, text)
    print(f"wrote block {args.name!r} of {args.doc}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
