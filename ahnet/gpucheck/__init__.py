"""The GPU proof of the CUDA path, prepared as one command: ``bash run.sh gpu-check [--out DIR] [--tiny]``
(``python -m ahnet.gpucheck``), within about 5 minutes on one data-centre GPU.

(a) the CUDA-marked tests (tests/test_cuda.py: fp16 autocast + GradScaler with skipped non-finite steps, bf16,
    channels-last 3D, exact resume under --deterministic, 2 GPUs with DDP where present);
(b) the benchmark against MONAI's AHNet at the paper's size (ResNet50, 32 x 128 x 128, batch 2, fp16 AMP on
    both sides, median of 10 steps): step time, peak GPU memory, and a 128 x 512 x 512 volume through
    sliding-window inference, through ahnet.bench's workers; the goals of issue 14 judged on them;
(c) AH-Net trained for a fixed number of minutes on synthetic cases, and its learning curve.

Everything goes to --out (default gpu_check/): gpu_check.json, gpu_check.md, cuda_tests.log, cuda_tests.xml,
learning_curve.csv, learning_curve.png. It never needs a network: it runs on the machine's own Python, and a
missing optional module (MONAI) comes from the wheels carried in .whl/ (``bash run.sh gpu-wheels`` downloads
them beforehand). ``--tiny`` runs the same code on a CPU at toy sizes (the CUDA tests as a CPU rehearsal), which
is how the test suite keeps it from rotting.

Modules: ``cli`` (options and the run), ``env`` (modules and wheels, the machine), ``parts`` (the tests and the
benchmark), ``training`` (the timed training), ``synth`` (the synthetic cases), ``report`` (JSON and Markdown).
"""

__all__: list = []
