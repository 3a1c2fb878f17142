"""Serving a trained ensemble with NVIDIA Triton (through PyTriton): the optional ``serve`` extra. Command lines on
top of the inference stage: export, server and client use ahnet.infer's ensemble, window rule and sliding-window
driver and ahnet.commands.predict's inputs and outputs, never copies of them.

Modules: ``store`` (an exported model folder and the runners of its files), ``export`` (the library of
``python -m ahnet.export``), ``server`` (``python -m ahnet.serve``: the model repository and the Triton server),
``backend`` (the served models, run by tritonserver's Python stubs), ``process`` (that server as a child process on
free ports, always stopped), ``client`` (the library of ``python -m ahnet.client``). The serving benchmarks are in
ahnet.bench (``serving``, ``load``). pytriton / tritonclient / onnx / onnxruntime are imported only inside the
functions that need them; the package's core never imports this package.
"""
