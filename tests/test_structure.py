"""The shape of the code, read with ``ast``: every module's stage and imports, file and function sizes, and the
on-disk layout spelled in ahnet.paths only.

Stages, in order (README.md "Where things live" states the same map): a module may import its own stage and
earlier ones, never a later one.

    base      ahnet (package), atomic, paths, precision, checkpoint, cli
    data      ahnet.data.*, folds
    nets      ahnet.nets.*
    train     config, losses, ahnet.train.*
    infer     ahnet.infer.*
    evaluate  froc, segmetrics, ahnet.evaluate (the package: the library)
    report    report
    cli       predict, pipeline, experiment, bench, rescore, ahnet.evaluate.cli / __main__, export, serve.*,
              client, weights_transfer
"""
import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
STAGES = ("base", "data", "nets", "train", "infer", "evaluate", "report", "cli")
# module name or package prefix -> stage; the longest matching entry wins
STAGE_OF = {
    "ahnet": "base", "ahnet.atomic": "base", "ahnet.paths": "base", "ahnet.precision": "base",
    "ahnet.checkpoint": "base", "ahnet.cli": "base",
    "ahnet.data": "data", "ahnet.folds": "data",
    "ahnet.nets": "nets",
    "ahnet.config": "train", "ahnet.losses": "train", "ahnet.train": "train",
    "ahnet.infer": "infer",
    "ahnet.froc": "evaluate", "ahnet.segmetrics": "evaluate", "ahnet.evaluate": "evaluate",
    "ahnet.report": "report",
    "ahnet.predict": "cli", "ahnet.pipeline": "cli", "ahnet.experiment": "cli", "ahnet.bench": "cli",
    "ahnet.rescore": "cli",
    "ahnet.evaluate.cli": "cli", "ahnet.evaluate.__main__": "cli", "ahnet.export": "cli", "ahnet.serve": "cli",
    "ahnet.client": "cli", "weights_transfer": "cli",
    "ahnet.train.cli": "cli", "ahnet.train.__main__": "cli",
}
MAX_FILE_LINES, MAX_FUNCTION_LINES = 600, 80
# Functions allowed over MAX_FUNCTION_LINES, each with the reason its docstring gives: none today.
LONG_FUNCTIONS: dict = {}
LAYOUT_WORDS = ("best.pt", "last.pt", "annotations.csv", "data/cache")


def _modules():
    """{dotted module name: path} of every module of ahnet and weights_transfer."""
    out = {}
    for pkg in ("ahnet", "weights_transfer"):
        for p in sorted((ROOT / pkg).rglob("*.py")):
            parts = list(p.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = p
    return out


MODULES = _modules()


def _stage(module: str) -> str:
    best = max((k for k in STAGE_OF if module == k or module.startswith(k + ".")), key=len, default=None)
    assert best is not None, f"{module} has no stage; add it to STAGE_OF (and to the README map)"
    return STAGE_OF[best]


def _imports(module: str, path: Path) -> list[str]:
    """The project modules ``module`` imports anywhere in its file (function-level imports included)."""
    is_pkg = path.name == "__init__.py"
    here = module.split(".") if is_pkg else module.split(".")[:-1]
    out = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = here[: len(here) - (node.level - 1)] if node.level else []
            target = ".".join(base + ([node.module] if node.module else []))
            for a in node.names:
                sub = f"{target}.{a.name}"
                out.append(sub if sub in MODULES else target)
    return [m for m in out if m.split(".")[0] in ("ahnet", "weights_transfer")]


def test_every_module_has_a_stage():
    for m in MODULES:
        assert _stage(m) in STAGES


@pytest.mark.parametrize("module", sorted(MODULES))
def test_no_module_imports_a_later_stage(module):
    own = STAGES.index(_stage(module))
    later = [(m, _stage(m)) for m in _imports(module, MODULES[module]) if STAGES.index(_stage(m)) > own]
    assert not later, f"{module} ({_stage(module)}) imports later stages: {later}"


def test_the_package_never_imports_the_transfer_command():
    offenders = [m for m in MODULES if m.startswith("ahnet")
                 and any(i.startswith("weights_transfer") for i in _imports(m, MODULES[m]))]
    assert not offenders


def test_stage_map_is_the_readme_map():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme.split("## Where things live", 1)[1].split("\n## ", 1)[0]
    rows = [r for r in section.splitlines() if r.startswith("| `")]
    stated = {}
    for r in rows:
        cells = [c.strip() for c in r.strip("|").split("|")]
        for name in cells[0].replace("`", "").split(","):
            stated[name.strip()] = cells[1]
    assert stated == STAGE_OF


def _sizes():
    for module, path in MODULES.items():
        rel = path.relative_to(ROOT).as_posix()
        text = path.read_text(encoding="utf-8")
        yield rel, text, ast.parse(text)


def test_no_file_over_600_lines():
    big = [(rel, len(text.splitlines())) for rel, text, _ in _sizes() if len(text.splitlines()) > MAX_FILE_LINES]
    assert not big


def test_no_function_over_80_lines_unless_its_docstring_says_why():
    long = {}
    for rel, _, tree in _sizes():
        for f in ast.walk(tree):
            if not isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            if f.end_lineno - f.lineno + 1 > MAX_FUNCTION_LINES:
                long[f"{rel}:{f.name}"] = ast.get_docstring(f) or ""
    assert set(long) == set(LONG_FUNCTIONS), long.keys()
    for name, why in LONG_FUNCTIONS.items():
        assert why in long[name], f"{name}: its docstring must say why it is long ({why!r})"


def _code_strings(tree):
    """String constants of a module that are not docstrings."""
    docs = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                docs.add(id(first.value))
    return [n.value for n in ast.walk(tree)
            if isinstance(n, ast.Constant) and isinstance(n.value, str) and id(n) not in docs]


def test_the_layout_is_spelled_in_ahnet_paths_only():
    exempt = {"ahnet/paths.py"}
    found = []
    for module, path in MODULES.items():
        rel = path.relative_to(ROOT).as_posix()
        if rel in exempt:
            continue
        for s in _code_strings(ast.parse(path.read_text(encoding="utf-8"))):
            found += [(rel, w) for w in LAYOUT_WORDS if w in s]
    run_sh = (ROOT / "run.sh").read_text(encoding="utf-8")
    found += [("run.sh", w) for w in LAYOUT_WORDS if w in run_sh]
    assert not found
