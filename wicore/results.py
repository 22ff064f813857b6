"""Loaders for result folders: the one way notebooks and reports read runs.

A *run folder* is what ``experiments/run.py`` writes (``summary.json``,
``requests/steps/tiers.parquet``, ``config.yaml``, ``placement.json``, maybe
``blocks.parquet`` / ``kv_pages.parquet``) or a failed job's ``error.txt``.
Its overrides come from ``.hydra/overrides.yaml`` (a list of ``key=value``,
as Hydra writes it; the validation runner writes the same file).

* ``load_run(folder) -> Run``: one folder; tables are read when first used.
* ``load_runs(root) -> list[Run]``: every run folder under ``root``.
* ``runs_frame(runs)``: one row per run, overrides and summary figures as columns.
* ``pareto_front(df, x, y)``: the rows not dominated under (min x, max y).
* ``tier_timeline(tiers)``: memory per tier as step segments (GiB and share).

Pure pandas / json / yaml: no plotting, no simulator, no torch.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml

from wicore.metrics import REQUEST_COLUMNS, STEP_COLUMNS, TIER_COLUMNS

GIB = 2**30
MARKERS = ("summary.json", "error.txt")  # a folder holding either is a run folder


def natural_key(name: str) -> list[Any]:
    """Sort key that orders 'job2' before 'job10'."""
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name)]


def parse_value(v: Any) -> Any:
    """'4' -> 4, '2.5' -> 2.5, anything else unchanged (override values are strings)."""
    for cast in (int, float):
        try:
            return cast(v)
        except (TypeError, ValueError):
            pass
    return v


def read_overrides(folder: Path) -> dict[str, str]:
    """``key -> value`` from ``folder/.hydra/overrides.yaml`` ({} when absent or unreadable).
    A leading ``+``, ``++`` or ``~`` of a key is dropped."""
    path = Path(folder) / ".hydra" / "overrides.yaml"
    if not path.is_file():
        return {}
    try:
        items = yaml.safe_load(path.read_text(encoding="utf-8")) or []
    except yaml.YAMLError:
        return {}
    out: dict[str, str] = {}
    for item in items if isinstance(items, list) else []:
        key, sep, val = str(item).partition("=")
        if sep:
            out[key.lstrip("+~")] = val
    return out


def write_overrides(folder: Path, overrides: list[str]) -> None:
    """Write ``folder/.hydra/overrides.yaml`` the way Hydra does (for runs started in-process)."""
    d = Path(folder) / ".hydra"
    d.mkdir(parents=True, exist_ok=True)
    (d / "overrides.yaml").write_text(yaml.safe_dump(list(overrides), default_flow_style=False),
                                      encoding="utf-8")


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None
    except (OSError, ValueError):
        return None


def _table(path: Path, columns: list[str] | None) -> pd.DataFrame:
    if path.is_file():
        return pd.read_parquet(path)
    return pd.DataFrame(columns=columns or [])


@dataclass
class Run:
    """One result folder. ``summary`` is ``summary.json`` ({} for a failed run); ``error`` the first
    line of ``error.txt`` ("" when none); ``config`` the resolved ``config.yaml`` ({} when absent);
    ``meta`` the ``validation.json`` a validation run adds ({} otherwise)."""

    path: Path
    summary: dict[str, Any]
    overrides: dict[str, str]
    config: dict[str, Any] = field(default_factory=dict)
    error: str = ""
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def ok(self) -> bool:
        """Finished with a summary and no error."""
        return bool(self.summary) and not self.error

    @property
    def backend(self) -> str:
        run = self.summary.get("run") or {}
        if run.get("backend"):
            return str(run["backend"])
        return str((self.config.get("backend") or {}).get("name", ""))

    @property
    def end_time(self) -> float:
        """The last time any table records (s): the end of the run's clock."""
        ends = [float(df[c].max()) for df, c in ((self.steps, "end"), (self.requests, "finish_time"),
                                                  (self.tiers, "time")) if len(df)]
        ends = [e for e in ends if math.isfinite(e)]
        return max(ends, default=0.0)

    def metric(self, key: str) -> float:
        """A scalar of ``summary.json`` as float (NaN when missing or not a number)."""
        v = self.summary.get(key)
        try:
            return float(v) if v is not None else float("nan")
        except (TypeError, ValueError):
            return float("nan")

    @cached_property
    def requests(self) -> pd.DataFrame:
        return _table(self.path / "requests.parquet", REQUEST_COLUMNS)

    @cached_property
    def steps(self) -> pd.DataFrame:
        return _table(self.path / "steps.parquet", STEP_COLUMNS)

    @cached_property
    def tiers(self) -> pd.DataFrame:
        return _table(self.path / "tiers.parquet", TIER_COLUMNS)

    @cached_property
    def blocks(self) -> pd.DataFrame:
        """Weight-block residency changes (memory=hmt runs only; empty otherwise)."""
        return _table(self.path / "blocks.parquet", None)

    @cached_property
    def kv_pages(self) -> pd.DataFrame:
        """KV-page tier changes (memory.kv.tiering runs only; empty otherwise)."""
        return _table(self.path / "kv_pages.parquet", None)

    @cached_property
    def placement(self) -> dict[str, Any]:
        p = _read_json(self.path / "placement.json")
        return p if isinstance(p, dict) else {}


def load_run(folder: Path | str) -> Run:
    """Read one run folder (``summary.json`` or ``error.txt`` must be there)."""
    folder = Path(folder)
    if not any((folder / m).is_file() for m in MARKERS):
        raise FileNotFoundError(f"{folder}: neither summary.json nor error.txt; not a run folder")
    summary = _read_json(folder / "summary.json")
    err = ""
    if (folder / "error.txt").is_file():
        text = (folder / "error.txt").read_text(encoding="utf-8", errors="replace").strip()
        err = text.splitlines()[0] if text else "(error.txt is empty)"
    if (folder / "summary.json").is_file() and not isinstance(summary, dict):
        err = err or "unreadable summary.json"
    config: Any = None
    if (folder / "config.yaml").is_file():
        try:
            config = yaml.safe_load((folder / "config.yaml").read_text(encoding="utf-8"))
        except yaml.YAMLError:
            config = None
    meta = _read_json(folder / "validation.json")
    return Run(folder, summary if isinstance(summary, dict) else {}, read_overrides(folder),
               config if isinstance(config, dict) else {}, err, meta if isinstance(meta, dict) else {})


def load_runs(root: Path | str) -> list[Run]:
    """Every run folder at or under ``root`` (hidden folders skipped), in natural path order."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: no such results directory")
    found = {p.parent for m in MARKERS for p in root.rglob(m)
             if not any(part.startswith(".") for part in p.parent.relative_to(root).parts)}
    return [load_run(p) for p in sorted(found, key=lambda p: natural_key(str(p.relative_to(root))))]


def flatten_summary(summary: dict[str, Any]) -> dict[str, Any]:
    """Numbers of ``summary.json`` as floats; nested dicts (``run``, ``bounds``, ``memory``) as
    ``outer.inner`` columns of their scalars."""
    row: dict[str, Any] = {}
    for k, v in summary.items():
        if isinstance(v, int | float) and not isinstance(v, bool):
            row[k] = float(v)
        elif isinstance(v, dict):
            for sub, x in v.items():
                if isinstance(x, str | int | float | bool) or x is None:
                    row[f"{k}.{sub}"] = x
    return row


def runs_frame(runs: list[Run] | Path | str, root: Path | str | None = None) -> pd.DataFrame:
    """One row per run: ``run`` (path relative to ``root``), ``backend``, ``status`` (ok / failed),
    ``error``, every override (values parsed to numbers where they are), then the summary figures."""
    if not isinstance(runs, list):
        root = root if root is not None else runs
        runs = load_runs(runs)
    fixed = ("run", "backend", "status", "error")  # an override of the same name (backend=torch) says no more
    rows, keys = [], []
    for r in runs:
        ov = {k: parse_value(v) for k, v in r.overrides.items() if k not in fixed}
        keys += [k for k in ov if k not in keys]
        name = str(r.path.relative_to(root)) if root is not None else r.name
        rows.append({**flatten_summary(r.summary), **ov, "run": name, "backend": r.backend,
                     "status": "ok" if r.ok else "failed", "error": r.error})
    df = pd.DataFrame(rows)
    if df.empty:
        df = pd.DataFrame(columns=["run", "backend", "status", "error"])
    else:
        front = ["run", "backend", *keys, "status", "error"]
        df = df[front + [c for c in df.columns if c not in front]]
    df.attrs["override_keys"] = keys
    return df


def varying_keys(df: pd.DataFrame) -> list[str]:
    """The override columns of a ``runs_frame`` whose value differs between runs (the swept axes)."""
    keys = df.attrs.get("override_keys") or []
    return [k for k in keys if k in df and df[k].astype(str).nunique(dropna=False) > 1]


def pareto_indices(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Indices of the points not dominated under (min x, max y), in increasing x."""
    order = np.lexsort((-y, x))
    best = -np.inf
    keep = []
    for i in order:
        if y[i] > best:
            keep.append(i)
            best = y[i]
    return np.array(keep, dtype=int)


def pareto_front(df: pd.DataFrame, x: str, y: str) -> pd.DataFrame:
    """Rows of ``df`` on the Pareto front of (min ``x``, max ``y``), sorted by ``x``; rows with a
    missing x or y are left out. E.g. ``pareto_front(runs, "ttft_p50", "output_tokens_per_s")``."""
    xs = pd.to_numeric(df[x], errors="coerce").to_numpy(dtype=float)
    ys = pd.to_numeric(df[y], errors="coerce").to_numpy(dtype=float)
    good = np.flatnonzero(np.isfinite(xs) & np.isfinite(ys))
    if not len(good):
        return df.iloc[0:0]
    keep = pareto_indices(xs[good], ys[good])
    return df.iloc[good[keep]]


def tier_timeline(tiers: pd.DataFrame, end: float | None = None) -> pd.DataFrame:
    """Memory per tier as step segments: one row per (replica, tier, change) with ``start``, ``stop``
    (the next change, or ``end``), ``used_gib``, ``capacity_gib`` and ``share`` (used / capacity).
    ``tiers`` stores a row only when a tier's use changes, so each row holds until the next."""
    cols = ["replica", "tier", "start", "stop", "used_gib", "capacity_gib", "share"]
    if tiers.empty:
        return pd.DataFrame(columns=cols)
    stop_at = float(tiers["time"].max()) if end is None else max(float(end), float(tiers["time"].max()))
    parts = []
    for (rep, tier), g in tiers.groupby(["replica", "tier"], sort=True):
        g = g.sort_values("time", kind="stable")
        t = g["time"].to_numpy(dtype=float)
        cap = g["capacity_bytes"].to_numpy(dtype=float)
        used = g["used_bytes"].to_numpy(dtype=float)
        parts.append(pd.DataFrame({
            "replica": rep, "tier": str(tier), "start": t, "stop": np.append(t[1:], stop_at),
            "used_gib": used / GIB, "capacity_gib": cap / GIB,
            "share": np.divide(used, cap, out=np.full_like(used, np.nan), where=cap > 0)}))
    return pd.concat(parts, ignore_index=True)[cols]


def peak_tier_bytes(tiers: pd.DataFrame) -> dict[str, float]:
    """Peak used bytes per tier name (the largest over replicas)."""
    if tiers.empty:
        return {}
    return {str(k): float(v) for k, v in tiers.groupby("tier")["used_bytes"].max().items()}


def latest(root: Path | str) -> Path:
    """The newest (by name: Hydra folders are timestamped) run or sweep folder directly under ``root``."""
    root = Path(root)
    dirs = sorted((p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")),
                  key=lambda p: natural_key(p.name)) if root.is_dir() else []
    if not dirs:
        raise FileNotFoundError(f"{root}: no result folders yet")
    return dirs[-1]
