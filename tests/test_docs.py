"""The README quotes only figures that paper_notes/results.md holds (issue 25: the README had quoted numbers two
runs old that no note recorded), and paper_notes/ stands alone (no pointer outside the repository)."""
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FIGURE = re.compile(r"(?<![\w.])[-+]?\d+\.\d+(?![\w.])")      # 0.746, +0.110, 11.1; not 2.13.0 or v1.2.3


def _section(text: str, title: str) -> str:
    assert f"\n## {title}\n" in text, f"README.md has no section '## {title}'"
    return text.split(f"\n## {title}\n", 1)[1].split("\n## ", 1)[0]


def figures(text: str) -> set:
    """The decimal figures of ``text``, signs dropped."""
    return {f.lstrip("+-") for f in FIGURE.findall(text)}


def test_figures_finds_what_a_reader_reads_as_results():
    assert figures("CPM 0.746 [0.705, 0.792], paired -0.056; 12.5 min; torch==2.13.0; v1.2.3") == \
        {"0.746", "0.705", "0.792", "0.056", "12.5"}


def test_the_readme_headline_and_demo_quote_only_what_results_md_holds():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    results = figures((ROOT / "paper_notes" / "results.md").read_text(encoding="utf-8"))
    quoted = figures(_section(readme, "Where it stands") + _section(readme, "Two commands"))
    assert quoted, "the README's headline quotes no figure"
    assert not quoted - results, f"README figures not in paper_notes/results.md: {sorted(quoted - results)}"


def test_paper_notes_never_point_outside_the_repository():
    outside = [p.name for p in (ROOT / "paper_notes").glob("*.md")
               if re.search(r"\.\./shared|/work/|shared/design", p.read_text(encoding="utf-8"))]
    assert not outside


def test_the_evidence_kept_in_git_reads_as_candidates_and_is_listed(tmp_path):
    """paper_notes/evidence/ keeps runs' candidates (gzipped CSVs under runs/' names) so that a comparison can be
    paired again after runs/ is gone: each file parses as the candidates an evaluation writes, covers every
    scan's rows with probabilities in [0, 1], and each experiment folder is listed in the folder's README."""
    import gzip

    from ahnet.data.io import read_candidates_csv

    root = ROOT / "paper_notes" / "evidence"
    kept = sorted(root.glob("*/*/candidates/*.csv.gz"))
    assert kept, "paper_notes/evidence/ keeps no candidates"
    listed = (root / "README.md").read_text(encoding="utf-8")
    for experiment in {p.relative_to(root).parts[0] for p in kept}:
        assert f"| `{experiment}` |" in listed, f"{experiment} is not listed in paper_notes/evidence/README.md"
    for p in kept:
        text = gzip.decompress(p.read_bytes()).decode("utf-8")
        assert text.startswith("seriesuid,coordX,coordY,coordZ,probability"), p
        tmp = tmp_path / "_".join(p.relative_to(root).parts)[:-3]
        tmp.write_text(text, encoding="utf-8")
        rows = read_candidates_csv(tmp)
        assert rows and all(0.0 <= r["probability"] <= 1.0 for r in rows), p
