"""The per-type comparison report: report.json (stable keys), report.md and a self-contained report.html.

Input: ``results = {model_name: {"detection": ..., "segmentation": ...}}`` and who wins a type: ``summary``'s
docstring (ahnet.report.summary), the one place that states it.

Optional inputs of ``build_report`` add sections: ``comparisons`` (ahnet.evaluate.froc.paired_bootstrap over the same
models: the paper's claims with paired intervals, a type won only where the interval excludes 0; module
``claims``), ``runs`` ({model: run folder}: learning curves from each log.csv; module ``curves``), ``gallery``
(ahnet.evaluate.gallery_crops: crops of hits, misses and false positives; module ``gallery``) and ``candidates``
(the candidate rule, one line). Every model's "found" entry says how many nodules it finds at 1 FP/scan.

Modules: ``summary`` (winners, the numbers), ``document`` (JSON, Markdown, HTML with figures), ``claims``,
``curves``, ``gallery``.
"""
from ahnet.report.document import build_report
from ahnet.report.summary import TIE_TOL, ReportInputError, pick_winners, summarize

__all__ = ["build_report", "summarize", "pick_winners", "ReportInputError", "TIE_TOL"]
