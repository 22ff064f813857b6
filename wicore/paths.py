"""Where a file named in a config is looked for: one rule for every such field (calibration tables,
routing signal and quality tables): an absolute path as given (``~`` expanded), a relative one first
against the repository root, then against the working directory."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent


def config_path_candidates(value: str | Path, roots: Sequence[Path] | None = None) -> list[Path]:
    """The places ``value`` may name, in the order they are tried (``roots``: default repo root, cwd)."""
    p = Path(value).expanduser()
    if p.is_absolute():
        return [p]
    return [r / p for r in (roots if roots is not None else (REPO_ROOT, Path.cwd()))]


def resolve_config_path(value: str | Path) -> Path:
    """The first candidate that is a file, else the last one tried (for the caller's "not found" error)."""
    candidates = config_path_candidates(value)
    return next((c for c in candidates if c.is_file()), candidates[-1])
