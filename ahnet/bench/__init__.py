"""Benchmarks of this project's AHNet3d against MONAI's AHNet, side by side on one machine, and the MONAI-only
helpers that serve the comparison (the slice-last layout conversion and the weight port).

``python -m ahnet.bench [--patch D H W] [--batch B] [--full-volume] ...`` (``bash run.sh bench``).

Every measurement runs in a fresh Python subprocess (``--worker``), so the peak memory of one implementation
never includes the other's: on CUDA ``torch.cuda.max_memory_allocated``; on the CPU the process peak RSS
(``VmHWM``; ``ru_maxrss`` where there is no /proc), reported raw and above the RSS right after the imports
(the latter, "model + optimiser + activations", is what the ratios use). Times are medians of ``--repeats`` steps
after ``--warmup`` steps; the minimum is kept too (on a shared machine it is the less noisy figure). MONAI gets
its own layout: inputs are converted with ``to_monai_layout`` outside the timed region.

Rows: parameters; forward (eval, no grad) and training step (train mode, BCE-with-logits, backward, Adam
step) for the paper configuration (ResNet50, 4 pyramid levels) per upsampling mode, fp32 and AMP where the
device has it (CUDA float16 with a GradScaler; CPU bfloat16 where the CPU computes it natively); the same for
this project's levers (``--levers``: channels_last, checkpoint=decoder|encoder|all, compile), with MONAI given the
levers that apply to any module (channels_last, compile) so each ratio compares like with like; sliding-window
inference of a whole volume (ours: ``ahnet.infer.sliding_window_predict``; MONAI:
``monai.inferers.sliding_window_inference``; same window, overlap, window batch, blending, dtype and layout);
the 2D-stage (MC-GCN ResNet50) slices per second; the data pipeline's patches per second from an HDF5 cache
of synthetic cases against what a training step consumes. Output: a table with ratios (ours / MONAI) and
``bench_results/bench-<time>.json``. Our levers that are on by default (the depth guard's mode, the fused
BN-ReLU-conv units, the z-pooling) can be switched back one at a time (``--levers channels_last+fused=off``...):
each measured alone.

Two sections instead of that comparison: ``--preset cpu --data DATASET.json`` (``preset``: where a preset's
training step goes, its validation, each lever alone, the depth guard per conv call) and ``--scans`` (``scans``:
whole scans through both stages against MONAI's ``sliding_window_inference``, and a long scan's peak memory).

Modules: ``ahnet.commands.bench`` (options, the run), ``plan`` (what is measured), ``workers``, ``data_worker``,
``preset`` and ``scans`` (the measurements, one process each), ``measure`` (timing and peak memory), ``report`` (the table), ``layout`` and
``monai_port`` (MONAI's slice-last layout, and loading a MONAI AHNet state dict into AHNet3d), ``gpucheck`` (the
GPU proof, ``bash run.sh gpu-check``: the CUDA tests, these workers at the paper's size, a timed training run).
MONAI itself is imported only inside the workers and the tests; the rest of the package never imports this one.
"""

from ahnet.bench.plan import build_plan, lever_name, parse_infer_levers, parse_levers, peer_levers
from ahnet.bench.report import format_table, summarise
from ahnet.bench.workers import prepare_model, run_worker

__all__ = ["build_plan", "format_table", "lever_name", "parse_infer_levers",
           "parse_levers", "peer_levers", "prepare_model", "run_worker", "summarise"]
