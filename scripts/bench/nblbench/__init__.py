"""nblbench: the Python side of the benchmark scripts.

The shell scripts under ``scripts/bench/`` (and ``scripts/gpu-check.sh``, ``scripts/models/check-perplexity.sh``)
run ``nbl-onnx`` and leave its JSON outputs in a work folder; the modules here read those outputs, write the
raw results to ``bench/*.json`` and the generated tables into ``docs/results/<topic>.md`` (through
:mod:`nblbench.splice`, the one writer of generated text). One module per benchmark, each runnable as
``python3 -m nblbench.<module> ...`` with ``scripts/bench`` on ``PYTHONPATH`` (``use_nblbench`` in
``scripts/lib.sh`` sets it). Standard library only, Python 3.9+.

Modules:

* :mod:`nblbench.common`: repository paths and small helpers (JSON, sizes on disk, number formats);
* :mod:`nblbench.splice`: generated blocks between marker comments in a Markdown file;
* :mod:`nblbench.corpus`: the C4 sample split into calibration and evaluation documents;
* :mod:`nblbench.layers`: layer lists read from ``analyze --json`` and rewrite reports;
* :mod:`nblbench.smollm2`, :mod:`nblbench.selection`, :mod:`nblbench.fp16`, :mod:`nblbench.int4`,
  :mod:`nblbench.scale`, :mod:`nblbench.memory`, :mod:`nblbench.gpu`: one benchmark each;
* :mod:`nblbench.perplexity`: the comparison of ``nbl-onnx eval`` with PyTorch's perplexity.
"""
