"""Serving a trained ensemble with NVIDIA Triton (through PyTriton): the optional ``serve`` extra. Command lines on
top of the inference stage: export, server and client use ahnet.infer's ensemble, window rule and sliding-window
driver and ahnet.commands.predict's inputs and outputs, never copies of them.

Modules: ``store`` (an exported model folder and the runners of its files), ``server`` (``python -m ahnet.serve``:
the Triton server), ``process`` (that server as a child process on free ports, always stopped), ``bench`` (the
serving benchmark, ``python -m ahnet.bench --serving``). The export is ``python -m ahnet.export`` and the client
``python -m ahnet.client``. Only ``server``, ``bench``, the client and the export import pytriton / tritonclient /
onnx / onnxruntime, each inside the function that needs it; the package's core never imports this package.
"""
