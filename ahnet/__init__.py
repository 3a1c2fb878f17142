"""AH-Net: 3D Anisotropic Hybrid Network for lung nodules in thick-slice chest CT.

Conventions: tensors are (N, C, D, H, W) with D the slice axis; arrays are (z, y, x); spacing is
(sz, sy, sx) in mm; world coordinates are LPS millimetres (the LUNA16 / SimpleITK convention).
"""
__version__ = "0.1.0"


def code_commit() -> dict | None:
    """The commit of this code: {"commit": full hash, "short": short hash, "dirty": tracked files changed}, or
    None outside a git checkout (an installed wheel). The one reader of git for every record of what code ran."""
    import subprocess
    from pathlib import Path

    def git(*args):
        return subprocess.run(["git", "-C", str(Path(__file__).resolve().parents[1]), *args], capture_output=True,
                              text=True, timeout=30)
    try:
        sha = git("rev-parse", "HEAD")
        if sha.returncode != 0:
            return None
        full = sha.stdout.strip()
        short = git("rev-parse", "--short", "HEAD").stdout.strip() or full[:7]
        dirty = bool(git("status", "--porcelain", "--untracked-files=no").stdout.strip())
    except (OSError, subprocess.SubprocessError):
        return None
    return {"commit": full, "short": short, "dirty": dirty}


def commit_label(with_changes: bool = True) -> str:
    """The short hash of this code ("unknown" outside a checkout), with "+changes" where tracked files differ."""
    c = code_commit()
    if c is None:
        return "unknown"
    return c["short"] + ("+changes" if with_changes and c["dirty"] else "")
