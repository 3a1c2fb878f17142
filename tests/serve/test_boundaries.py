"""The serving dependencies stay optional: no core module imports pytriton, tritonclient, onnx or onnxruntime."""
import ast
import subprocess
import sys

import pytest

from .conftest import ROOT

pytestmark = pytest.mark.serve

SERVING_DEPS = ("pytriton", "tritonclient", "onnx", "onnxruntime", "onnxscript")
SERVING_MODULES = {"ahnet/export.py", "ahnet/client.py", "ahnet/bench/load.py"}   # load: the server under load


def test_no_core_module_names_a_serving_dependency():
    offenders = []
    for f in sorted((ROOT / "ahnet").rglob("*.py")):
        rel = f.relative_to(ROOT).as_posix()
        if rel in SERVING_MODULES or rel.startswith("ahnet/serve/"):
            continue
        for node in ast.walk(ast.parse(f.read_text(encoding="utf-8"))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            offenders += [(rel, n) for n in names if n.split(".")[0] in SERVING_DEPS]
    assert not offenders


def test_core_imports_leave_the_serving_dependencies_unloaded():
    code = ("import sys, ahnet.commands.predict, ahnet.train, ahnet.evaluate, ahnet.infer, ahnet.commands.pipeline, ahnet.bench, "
            "ahnet.serve.export, ahnet.serve.client, ahnet.serve.store, ahnet.serve.process, ahnet.bench.serving, "
            "ahnet.bench.load, ahnet.serve.backend, ahnet.serve.server\n"
            f"print(sorted(m for m in sys.modules if m.split('.')[0] in {SERVING_DEPS!r}))")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == "[]"
