"""The parts of ``benchmarks/bench_pipeline.py``, one concern a module (the script is the entry point).

* ``common``: the program name, ``BenchError``, the dtype sizes and the stage routes.
* ``reference``: SVD-XT's shape, its FLOP anchors, GPU peaks and the published figures.
* ``cli``: the command-line options and their per-mode defaults.
* ``models``: the full SVD-XT architecture with random weights, and the components a run uses.
* ``accounting``: the bytes crossing each stage boundary, and the FLOPs (linear rule, meta-device count).
* ``machine``: the CPU or GPU and the library versions, for the record.
* ``timing``: the warm-up and measured runs, and the figures they give.
* ``report``: the printed report.

Imported with ``benchmarks/`` on ``sys.path`` (as ``bench_pipeline.py`` sets it up): the modules
import ``bench_text_to_video`` (a sibling of this package) and ``pipelines`` (the repository root)
by their top-level names. No torch import at module level: ``--boundaries`` stays light.
"""
