"""MONAI is a peer, not a dependency: no module of the package's stages before the benchmarks (base to serve) nor
weights_transfer imports monai or ahnet.bench, read from the source with ast (imports inside functions included).
Only the benchmarks (ahnet/bench), the GPU acceptance run (ahnet/gpucheck) and their two commands do."""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _package_of(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts if path.name == "__init__.py" else parts[:-1])


def _imports(source: str, package: str) -> set:
    """Absolute names of every module `source` (a module of `package`) imports, relative imports resolved."""
    names = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[:len(parts) - node.level + 1] + ([base] if base else []))
            names.add(base)
            names.update(f"{base}.{a.name}" for a in node.names)
    return names


def _forbidden(name: str) -> bool:
    return name.split(".")[0] == "monai" or name == "ahnet.bench" or name.startswith("ahnet.bench.")


def test_core_never_imports_monai_or_the_bench():
    allowed = [ROOT / "ahnet" / "bench", ROOT / "ahnet" / "gpucheck"]
    commands = {ROOT / "ahnet" / "commands" / "bench.py", ROOT / "ahnet" / "commands" / "gpucheck.py",
                ROOT / "ahnet" / "bench" / "__main__.py", ROOT / "ahnet" / "gpucheck" / "__main__.py"}
    core = [p for p in (ROOT / "ahnet").rglob("*.py") if not any(a in p.parents for a in allowed)
            and p not in commands] + list((ROOT / "weights_transfer").rglob("*.py"))
    assert len(core) > 20
    bad = {str(p.relative_to(ROOT)): sorted(filter(_forbidden, _imports(p.read_text(), _package_of(p))))
           for p in core}
    assert not {k: v for k, v in bad.items() if v}


def test_the_check_sees_relative_and_lazy_imports():
    source = "def f():\n    from ..bench import monai_port\n    import monai.networks\n"
    names = _imports(source, "ahnet.nets")
    assert {"ahnet.bench", "ahnet.bench.monai_port", "monai.networks"} <= names
    assert all(map(_forbidden, ["ahnet.bench.monai_port", "monai.networks"]))
    assert _package_of(ROOT / "ahnet" / "nets" / "mcgcn.py") == "ahnet.nets"
