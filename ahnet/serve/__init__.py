"""Serving a trained ensemble with NVIDIA Triton (through PyTriton): the optional ``serve`` extra.

Modules: ``adapter`` (the one place that uses the in-process inference API), ``store`` (an exported model folder
and the runners of its files), ``server`` (``python -m ahnet.serve``: the Triton server), ``bench`` (the serving
benchmark). The export is ``python -m ahnet.export`` and the client ``python -m ahnet.client``. Only ``server``,
``bench``, the client and the export import pytriton / tritonclient / onnx / onnxruntime; the package's core
never imports this package.
"""
