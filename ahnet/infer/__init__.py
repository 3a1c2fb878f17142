"""Inference, a stage of its own: trained runs -> an ensemble -> probabilities of a volume -> candidates.

The API (shapes: arrays (z, y, x); tensors (N, C, D, H, W); world coordinates LPS mm (x, y, z)):

- ``load_ensemble(runs, device="cpu", allow_mixed=False) -> Ensemble``: run folders, checkpoint files or
  cross-validations (ahnet.paths.resolve_checkpoints), each model rebuilt through the registry, eval mode.
- ``predict_volume(ens, image01, window=None, overlap=0.5, sw_batch=8, tta=False, amp="auto",
  channels_last=False) -> (z, y, x) float32`` probabilities for a (z, y, x) image scaled to [0, 1]; 3D models by
  sliding windows, 2D models slice by slice; the mean over the ensemble.
- ``window_for(shape, multiple, patch=None, window=None) -> (D, H, W)``: the one window rule (``Ensemble.window``).
- ``WindowSettings(window=None, overlap=0.5, sw_batch=8)``: those settings together, range-checked, with the
  command-line options that make them (``add_window_arguments``, ``WindowSettings.from_arguments``).
- ``extract_candidates(prob, geometry, rule=None, ...) -> LUNA16 rows`` (world mm) from a probability map by a
  ``CandidateRule`` (default ``DEFAULT_RULE``: local maxima, NMS in mm, merging, sub-voxel centres).
- The drivers under them, on tensors: ``sliding_window_predict``, ``slicewise_predict`` (``windows``).

Modules: ``ensemble`` (loading, the window rule, predict_volume), ``windows`` (the drivers), ``candidates``,
``spacing`` (scans predicted at the training pixel spacing, maps brought back to their grid).
"""
from ahnet.infer.candidates import (DEFAULT_RULE, CandidateInputError, CandidateRule, add_candidate_arguments, candidate_rule,
                         extract_candidates, find_peaks, rule_from_arguments, voxel_to_world, world_to_voxel)
from ahnet.infer.ensemble import DEFAULT_WINDOW, Ensemble, Member, load_ensemble, load_member, predict_volume, window_for
from ahnet.infer.windows import (FLIPS, InferenceInputError, WindowSettings, add_window_arguments, gaussian_importance,
                                 input_multiple, slicewise_predict, sliding_window_predict, window_starts)

__all__ = ["load_ensemble", "load_member", "Ensemble", "Member", "predict_volume", "window_for", "DEFAULT_WINDOW",
           "extract_candidates", "find_peaks", "voxel_to_world", "world_to_voxel", "CandidateInputError",
           "CandidateRule", "DEFAULT_RULE", "candidate_rule", "add_candidate_arguments", "rule_from_arguments",
           "sliding_window_predict", "slicewise_predict", "window_starts", "gaussian_importance", "input_multiple",
           "InferenceInputError", "FLIPS", "WindowSettings", "add_window_arguments"]
