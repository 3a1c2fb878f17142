"""The shape of the code, read with ``ast``: one folder per stage, every module's imports, file and function sizes,
and the on-disk layout spelled in ahnet.paths only.

Stages, in order (README.md "Where things live" states the same map): a module may import its own stage and
earlier ones, never a later one. A stage is a folder (the base modules sit at the top of the package); nothing in a
folder belongs to another stage, so the rule holds for files and for folders alike.

    base      ahnet (package), atomic, paths, precision, checkpoint, failures
    data      ahnet.data       (readers, checks, cache, sampling, folds, the phantom)
    nets      ahnet.nets
    train     ahnet.train      (config, losses, the loop)
    infer     ahnet.infer      (ensembles, windows, candidates, the second stage applied, whole scans)
    evaluate  ahnet.evaluate   (froc, segmetrics, the evaluation library, validation)
    report    ahnet.report
    serve     ahnet.serve      (export, the Triton server, the client library)
    bench     ahnet.bench      (benchmarks against MONAI, the serving benchmark)
    gpucheck  ahnet.gpucheck   (the GPU acceptance run)
    commands  ahnet.commands, weights_transfer   (every command line)
    entry     four-line modules where people type a command (``python -m ahnet.train`` -> ahnet.commands.train)
"""
import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
STAGES = ("base", "data", "nets", "train", "infer", "evaluate", "report", "serve", "bench", "gpucheck", "commands",
          "entry")
# module name or package prefix -> stage; the longest matching entry wins. Folders map whole; the top level of the
# package holds the base modules and entry modules only.
STAGE_OF = {
    "ahnet": "base", "ahnet.atomic": "base", "ahnet.paths": "base", "ahnet.precision": "base",
    "ahnet.checkpoint": "base", "ahnet.failures": "base",
    "ahnet.data": "data", "ahnet.nets": "nets", "ahnet.train": "train", "ahnet.infer": "infer",
    "ahnet.evaluate": "evaluate", "ahnet.report": "report", "ahnet.serve": "serve", "ahnet.bench": "bench",
    "ahnet.gpucheck": "gpucheck", "ahnet.commands": "commands", "weights_transfer": "commands",
    "ahnet.predict": "entry", "ahnet.experiment": "entry", "ahnet.pipeline": "entry", "ahnet.rescore": "entry",
    "ahnet.export": "entry", "ahnet.client": "entry", "ahnet.thickness": "entry", "ahnet.lever": "entry",
    "ahnet.train.__main__": "entry",
    "ahnet.evaluate.__main__": "entry", "ahnet.serve.__main__": "entry", "ahnet.bench.__main__": "entry",
    "ahnet.gpucheck.__main__": "entry", "ahnet.data.phantom.__main__": "entry",
}
ENTRY_TEXT = re.compile(r'"""``python -m (?P<entry>[\w.]+)``: runs the command ahnet\.commands\.(?P<cmd>\w+) \(an entry point '
                        r'kept where people type it\)\."""\nimport sys\n\nfrom ahnet\.commands\.(?P=cmd) import main\n\n'
                        r'if __name__ == "__main__":\n    sys\.exit\(main\(\)\)\n\Z')
MAX_FILE_LINES, MAX_FUNCTION_LINES = 600, 80
# Functions allowed over MAX_FUNCTION_LINES, each with the reason its docstring gives: none today.
LONG_FUNCTIONS: dict = {}
LAYOUT_WORDS = ("best.pt", "last.pt", "annotations.csv", "data/cache", "rescorer.pt", "rescorer.json",
                "report.html", "report.json", "report.md", "candidates.csv", "_prob.nii.gz", "_mask.nii.gz",
                "_overview.png", "_seg.dcm", "_sr.dcm")


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


def _room(module: str) -> str:
    """The top folder a module lives in: "ahnet" for the package's top level, "ahnet/data" for anything under
    ahnet/data (ahnet/data/phantom included), "weights_transfer"."""
    return "/".join(MODULES[module].relative_to(ROOT).parent.parts[:2])


def test_every_folder_is_one_stage():
    """Every module of a folder has the folder's stage (entry modules aside), and the top level of the package
    holds base modules only (with the entry modules)."""
    stages_of_room = {}
    for m in MODULES:
        if _stage(m) != "entry":
            stages_of_room.setdefault(_room(m), set()).add(_stage(m))
    assert {room: s for room, s in stages_of_room.items() if len(s) > 1} == {}
    assert stages_of_room["ahnet"] == {"base"}


@pytest.mark.parametrize("module", sorted(m for m in MODULES if _stage(m) == "entry"))
def test_entry_modules_only_call_their_command(module):
    text = MODULES[module].read_text(encoding="utf-8")
    found = ENTRY_TEXT.match(text)
    assert found, f"{module} must be the four-line entry module (see ahnet/predict.py)"
    want = module[:-len(".__main__")] if module.endswith(".__main__") else module
    assert found["entry"] == want


def test_nothing_imports_an_entry_module():
    offenders = [(m, i) for m in MODULES for i in _imports(m, MODULES[m]) if _stage(i) == "entry" and i != m]
    assert not offenders


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


def test_no_test_file_over_600_lines():
    """The tests keep the same size rule: a long table moves its helpers out (tests/_drill.py)."""
    big = {p.relative_to(ROOT).as_posix(): n for p in sorted((ROOT / "tests").rglob("*.py"))
           if (n := len(p.read_text(encoding="utf-8").splitlines())) > MAX_FILE_LINES}
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


def test_the_evaluation_store_digests_exactly_the_stages_evaluate_may_import():
    """ahnet.evaluate.store keys stored evaluations by the source of the folders evaluate may import (and the
    top-level base modules); that list is this file's stage order up to evaluate, each stage its own folder."""
    from ahnet.evaluate.store import EVALUATION_SOURCES
    allowed = STAGES[1:STAGES.index("evaluate") + 1]
    assert EVALUATION_SOURCES == allowed
    assert all(STAGE_OF[f"ahnet.{s}"] == s for s in allowed)
