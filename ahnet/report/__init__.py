"""The per-type comparison report: report.json (stable keys), report.md and a self-contained report.html.

Input: ``results = {model_name: {"detection": <ahnet.evaluate.froc.evaluate_detection dict>,
"segmentation": <ahnet.evaluate.segmetrics.aggregate_seg dict or None>}}`` (all models on the same test scans).

Winners: on each type the best model is the one with the highest per-type CPM (point estimate). Models whose
CPM is within ``tie_tol`` (1e-9) of the best are tied: all of them are listed as winners of that type and each
one's ``wins`` count includes it (``wins_outright`` counts only types won alone). A type with no nodules (or no
model with a defined CPM on it) has no winner and counts for nobody. ``margin`` = best CPM minus the best CPM of
the models not among the winners (None when there is no such model). The same rule gives the overall winner.
Note that winners are point estimates; the intervals in the tables say whether a difference is resolved.

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
