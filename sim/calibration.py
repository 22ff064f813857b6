"""Measured cost tables: load, validate, write and interpolate a calibration table.

A calibration table is a CSV with one row per measured point (written by
``wicore profile``, see ``docs/calibration.md``) and a ``<table>.meta.json``
next to it (torch version, time of measurement, device, grid, notes)::

    op, model, dtype, device_name, batch, tokens, context, nbytes, seconds, p10_s, p90_s, samples

``seconds`` is the median of ``samples`` timings, ``p10_s`` / ``p90_s`` the
10th / 90th percentiles; an optional ``mean_s`` column (written by profiles
since it was added) holds their mean. A table is read at one statistic
(``statistic``): ``median`` (the default: ``seconds``) or ``mean`` (``mean_s``
where a row has it, else its median; sums of skewed step times follow the
mean, but the mean of a few timings moves with one stray slow sample). Rows with an empty ``model`` are hardware-wide (copies,
disk reads): they match every model; an empty ``dtype`` matches every dtype.

Lookup (``CalibrationTable.lookup``) interpolates piecewise-linearly along the
op's axes (``OP_AXES``): exact at measured points, linear between them;
above the measured range it extrapolates linearly from the last two points
(slope clamped at >= 0: a cost never shrinks with size), below it holds the
value of the smallest point (a forward is not cheaper than its launch-bound
floor). Two-axis ops (decode: batch x context; prefill: tokens x context) are
interpolated row by row, then linearly between rows: a row measured at the
same x points as the densest row (the reference) is its own curve (so a full
grid is exactly bilinear); a sparser row (prefill at context > 0) is the
reference curve plus an offset that is piecewise-linear in x over the row's
own points and constant beyond them.
An op/model/dtype the table lacks gives ``(nan, "roofline")``: the caller uses
its roofline.

No torch and no simpy here: the simulator, the report and the profiler share it.
"""

from __future__ import annotations

import bisect
import csv
import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from wicore.errors import ConfigError
from wicore.paths import REPO_ROOT, config_path_candidates

COLUMNS = ("op", "model", "dtype", "device_name", "batch", "tokens", "context", "nbytes", "seconds",
           "p10_s", "p90_s", "samples")
COORDS = ("batch", "tokens", "context", "nbytes")
_INT_COLUMNS = ("batch", "tokens", "context", "nbytes", "samples")
_FLOAT_COLUMNS = ("seconds", "p10_s", "p90_s")
OPTIONAL_COLUMNS = ("mean_s",)  # read when present; rows without it use their median
STATISTICS = ("mean", "median")

# axes of the known ops, primary (x) first; an op not listed uses the coordinates that vary in its rows
OP_AXES: dict[str, tuple[str, ...]] = {
    "decode_forward": ("batch", "context"),
    "decode_forward_mass": ("batch", "context"),
    "prefill_forward": ("tokens", "context"),
    "decode_step": ("batch", "context"),
    "decode_step_mass": ("batch", "context"),
    "prefill_step": ("tokens", "context"),
    "prefill_step_pair": ("tokens", "context"),
    "prefill_step_many": ("tokens", "context"),
    "sample": ("batch",),
    "step_overhead": ("batch",),
    "admit_overhead": ("batch",),
    "engine_overhead": ("batch",),
    "attn_decode": ("context", "batch"),
    "attn_prefill": ("tokens", "context"),
    "h2d_pinned": ("nbytes",),
    "h2d_pageable": ("nbytes",),
    "d2h_pinned": ("nbytes",),
    "d2d": ("nbytes",),
    "p2p": ("nbytes",),
    "disk_read": ("nbytes",),
}
for _name in ("gemm_qkv", "gemm_o", "gemm_gate_up", "gemm_down", "gemm_lm_head"):
    OP_AXES[_name] = ("tokens",)

MEASURED, INTERPOLATED, EXTRAPOLATED, ROOFLINE = "measured", "interpolated", "extrapolated", "roofline"
_KINDS = (MEASURED, INTERPOLATED, EXTRAPOLATED)


class _Curve:
    """Piecewise-linear y(x) over sorted points; ``__call__`` returns (y, kind index 0/1/2)."""

    __slots__ = ("xs", "ys")

    def __init__(self, points: Iterable[tuple[float, float]]) -> None:
        pts = sorted(points)
        self.xs = [float(x) for x, _ in pts]
        self.ys = [float(y) for _, y in pts]

    def __call__(self, x: float) -> tuple[float, int]:
        xs, ys = self.xs, self.ys
        i = bisect.bisect_left(xs, x)
        if i < len(xs) and xs[i] == x:
            return ys[i], 0
        if i == 0:
            return ys[0], 2
        if i == len(xs):
            if len(xs) == 1:
                return ys[-1], 2
            slope = max(0.0, (ys[-1] - ys[-2]) / (xs[-1] - xs[-2]))
            return ys[-1] + slope * (x - xs[-1]), 2
        x0, x1 = xs[i - 1], xs[i]
        w = (x - x0) / (x1 - x0)
        return ys[i - 1] + w * (ys[i] - ys[i - 1]), 1

    def offset(self, x: float) -> tuple[float, int]:
        """Like ``__call__`` but held constant outside the points (per-row offsets)."""
        xs = self.xs
        if x < xs[0]:
            return self.ys[0], 2
        if x > xs[-1]:
            return self.ys[-1], 2
        return self(x)


class _Surface:
    """Two-axis interpolation: rows along ``y``, each row = reference row + piecewise-linear offset."""

    __slots__ = ("ref", "rows", "row_y")

    def __init__(self, points: Sequence[tuple[float, float, float]]) -> None:
        by_y: dict[float, list[tuple[float, float]]] = {}
        for x, y, v in points:
            by_y.setdefault(float(y), []).append((float(x), float(v)))
        ref_y = max(by_y, key=lambda y: (len(by_y[y]), -y))  # the densest row (ties: the smallest y)
        self.ref = _Curve(by_y[ref_y])
        self.row_y = sorted(by_y)
        # a row measured at the reference's x points is its own curve; a sparser one is an offset
        self.rows: list[tuple[bool, _Curve]] = []
        for y in self.row_y:
            own = _Curve(by_y[y])
            if own.xs == self.ref.xs:
                self.rows.append((True, own))
            else:
                self.rows.append((False, _Curve((x, v - self.ref(x)[0]) for x, v in by_y[y])))

    def _row(self, j: int, x: float) -> tuple[float, int]:
        own, row = self.rows[j]
        if own:
            return row(x)
        base, kind = self.ref(x)
        off, k2 = row.offset(x)
        if k2 == 0:  # a measured point of this row: exact
            return base + off, 0
        return base + off, max(kind, k2, 1)

    def __call__(self, x: float, y: float) -> tuple[float, int]:
        ys = self.row_y
        j = bisect.bisect_left(ys, y)
        if j < len(ys) and ys[j] == y:
            return self._row(j, x)
        if j == 0:
            v, k = self._row(0, x)
            return v, 2
        if j == len(ys):
            v1, _ = self._row(len(ys) - 1, x)
            if len(ys) == 1:
                return v1, 2
            v0, _ = self._row(len(ys) - 2, x)
            slope = max(0.0, (v1 - v0) / (ys[-1] - ys[-2]))
            return v1 + slope * (y - ys[-1]), 2
        v0, k0 = self._row(j - 1, x)
        v1, k1 = self._row(j, x)
        w = (y - ys[j - 1]) / (ys[j] - ys[j - 1])
        return v0 + w * (v1 - v0), max(k0, k1, 1)


@dataclass(frozen=True)
class _Entry:
    axes: tuple[str, ...]
    fn: _Curve | _Surface
    rows: int


def _finite(v: Any) -> bool:
    return isinstance(v, int | float) and math.isfinite(v)


def _parse(path: Path, line: int, col: str, text: str) -> float:
    try:
        value = float(text) if col in _FLOAT_COLUMNS + OPTIONAL_COLUMNS else int(float(text or 0))
    except ValueError:
        raise ConfigError(f"calibration table {path}: line {line}, column '{col}': '{text}' is not a number; "
                          "re-run `wicore profile` or fix the value") from None
    if not math.isfinite(value) or value < 0:
        raise ConfigError(f"calibration table {path}: line {line}, column '{col}': {text} must be a finite "
                          "number >= 0")
    return value


class CalibrationTable:
    """Measured op timings with interpolation (see the module docstring)."""

    def __init__(self, rows: list[dict[str, Any]], path: Path | None = None,
                 meta: dict[str, Any] | None = None, statistic: str = "median") -> None:
        if statistic not in STATISTICS:
            raise ConfigError(f"calibration statistic '{statistic}': use one of {list(STATISTICS)}")
        self.path = path
        self.meta = meta or {}
        self.rows = rows
        self.statistic = statistic
        col = "mean_s" if statistic == "mean" else "seconds"

        def value(r: dict[str, Any]) -> float:
            v = r.get(col)
            return float(v) if v is not None and v == v and v > 0 else float(r["seconds"])

        groups: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
        for r in rows:
            groups.setdefault((r["op"], r["model"], r["dtype"]), []).append(r)
        self._entries: dict[tuple[str, str, str], _Entry] = {}
        where = f"calibration table {path}" if path else "calibration table"
        for key, grp in groups.items():
            op = key[0]
            axes = OP_AXES.get(op) or tuple(c for c in COORDS if len({r[c] for r in grp}) > 1) or ("batch",)
            if len(axes) > 2:
                raise ConfigError(f"{where}: op '{op}' varies along {list(axes)}; at most two axes are "
                                  "supported: add it to sim.calibration.OP_AXES or split it into ops")
            seen: set[tuple[float, ...]] = set()
            for r in grp:
                point = tuple(float(r[a]) for a in axes)
                if point in seen:
                    raise ConfigError(f"{where}: op '{op}' model '{key[1]}' dtype '{key[2]}' has two rows at "
                                      f"{dict(zip(axes, point))}; keep one")
                seen.add(point)
            fn: _Curve | _Surface
            if len(axes) == 1:
                fn = _Curve((float(r[axes[0]]), value(r)) for r in grp)
            else:
                fn = _Surface([(float(r[axes[0]]), float(r[axes[1]]), value(r)) for r in grp])
            self._entries[key] = _Entry(axes, fn, len(grp))

    # ----- files ------------------------------------------------------------------------
    @classmethod
    def load(cls, path: str | Path, statistic: str = "median") -> CalibrationTable:
        """Read and validate ``path`` (and ``<path>.meta.json`` when present); lookups return ``statistic``."""
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"calibration table {p}: file not found; run `wicore profile --out {p}` or fix "
                              "backend.calibration / hardware.calibration")
        with p.open(newline="") as fh:
            reader = csv.DictReader(fh)
            header = reader.fieldnames or []
            for col in COLUMNS:
                if col not in header:
                    raise ConfigError(f"calibration table {p}: missing column '{col}' (columns are "
                                      f"{list(COLUMNS)}; see docs/calibration.md)")
            rows: list[dict[str, Any]] = []
            for n, raw in enumerate(reader, start=2):
                if not (raw.get("op") or "").strip():
                    raise ConfigError(f"calibration table {p}: line {n}, column 'op' is empty")
                row: dict[str, Any] = {c: (raw.get(c) or "").strip() for c in ("op", "model", "dtype",
                                                                             "device_name")}
                for col in _INT_COLUMNS + _FLOAT_COLUMNS:
                    row[col] = _parse(p, n, col, (raw.get(col) or "").strip())
                for col in OPTIONAL_COLUMNS:
                    text = (raw.get(col) or "").strip()
                    row[col] = _parse(p, n, col, text) if text else math.nan
                if row["seconds"] <= 0:
                    raise ConfigError(f"calibration table {p}: line {n}, column 'seconds' must be > 0")
                rows.append(row)
        if not rows:
            raise ConfigError(f"calibration table {p}: no rows; re-run `wicore profile`")
        meta_path = meta_path_for(p)
        meta: dict[str, Any] = {}
        if meta_path.is_file():
            try:
                meta = json.loads(meta_path.read_text())
            except json.JSONDecodeError as e:
                raise ConfigError(f"calibration meta {meta_path}: not valid JSON ({e})") from None
        return cls(rows, p, meta, statistic)

    @staticmethod
    def write(path: str | Path, rows: Iterable[dict[str, Any]], meta: dict[str, Any]) -> Path:
        """Write rows (dicts with ``COLUMNS``, and ``mean_s`` when any row has it) as CSV and ``meta`` as
        ``<path>.meta.json``."""
        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        rows = list(rows)
        cols = list(COLUMNS) + [c for c in OPTIONAL_COLUMNS if any(_finite(r.get(c)) for r in rows)]
        floats = _FLOAT_COLUMNS + OPTIONAL_COLUMNS
        with p.open("w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=cols, extrasaction="ignore", lineterminator="\n")
            w.writeheader()
            for r in rows:
                w.writerow({c: (f"{r[c]:.6g}" if c in floats and _finite(r.get(c)) else
                                "" if c in OPTIONAL_COLUMNS else r.get(c, "")) for c in cols})
        meta_path_for(p).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
        return p

    # ----- queries ------------------------------------------------------------------------
    def _entry(self, op: str, model: str, dtype: str) -> _Entry | None:
        e = self._entries
        return e.get((op, model, dtype)) or e.get((op, "", dtype)) or e.get((op, "", ""))

    def has(self, op: str, model: str = "", dtype: str = "") -> bool:
        return self._entry(op, model, dtype) is not None

    def ops(self) -> list[str]:
        return sorted({k[0] for k in self._entries})

    def models(self) -> list[tuple[str, str]]:
        """(model, dtype) pairs that have model-specific rows."""
        return sorted({(k[1], k[2]) for k in self._entries if k[1]})

    def lookup(self, op: str, model: str = "", dtype: str = "", **coords: float) -> tuple[float, str]:
        """Seconds of ``op`` for ``model`` in ``dtype`` at ``coords`` (the op's axes, e.g. batch=4,
        context=100) and where the number came from: "measured" (a measured point), "interpolated",
        "extrapolated", or "roofline" (no rows: seconds is nan and the caller uses its roofline)."""
        entry = self._entry(op, model, dtype)
        if entry is None:
            return math.nan, ROOFLINE
        missing = [a for a in entry.axes if a not in coords]
        if missing:
            raise TypeError(f"lookup({op!r}): give the coordinate(s) {missing}")
        fn = entry.fn
        if isinstance(fn, _Curve):
            value, kind = fn(float(coords[entry.axes[0]]))
        else:
            value, kind = fn(float(coords[entry.axes[0]]), float(coords[entry.axes[1]]))
        return max(value, 0.0), _KINDS[kind]

    def bandwidth_gbps(self, op: str, nbytes: float | None = None) -> float:
        """Achieved bandwidth of copy op ``op`` (GB/s) at ``nbytes`` (None: the largest measured size);
        nan when the table has no such rows."""
        entry = self._entry(op, "", "")
        if entry is None or not isinstance(entry.fn, _Curve):
            return math.nan
        n = float(nbytes) if nbytes is not None else entry.fn.xs[-1]
        seconds, _ = self.lookup(op, nbytes=n)
        return n / seconds / 1e9 if seconds > 0 else math.nan

    def meta_for(self, model: str, dtype: str) -> dict[str, Any]:
        """The meta, with the ``RUN_SHAPE_KEYS`` of the input table that held ``model`` in ``dtype`` when this
        table was merged from several (``merge_tables``)."""
        for entry in self.meta.get("merged_from") or ():
            if [model, dtype] in entry.get("models", ()):
                return {**self.meta, **{k: entry.get(k) for k in RUN_SHAPE_KEYS}}
        return self.meta

    def describe(self) -> dict[str, Any]:
        return {"path": str(self.path) if self.path else None, "rows": len(self.rows),
                "device_name": self.meta.get("device_name") or sorted({r["device_name"] for r in self.rows}),
                "measured_at": self.meta.get("measured_at"), "torch_version": self.meta.get("torch_version"),
                "statistic": self.statistic}


# meta keys that say how a model's rows were measured (and so how the simulator reads them): a merged table
# keeps them per input in ``merged_from``, and ``CalibrationTable.meta_for`` returns a model's own
RUN_SHAPE_KEYS = ("cuda_graphs", "prefill_graph_buckets", "max_len", "page_tokens", "gpu_budget_gib", "pp")


def merge_tables(inputs: Sequence[str | Path], out: str | Path) -> Path:
    """One table from several (e.g. one profile per model and dtype): rows concatenated; the meta of the first
    input, with ``merged_from`` listing every input and its ``RUN_SHAPE_KEYS``, and each of those keys at the
    top level only where every input agrees. Refused when two inputs have rows of one (op, model, dtype) at one
    point, or when one (model, dtype) comes from two inputs measured differently."""
    if not inputs:
        raise ConfigError("merge tables: give at least one input table")
    tables = [CalibrationTable.load(p) for p in inputs]
    rows = [r for t in tables for r in t.rows]
    CalibrationTable(rows)  # validates: two rows at one point of one op, model and dtype are refused
    meta = dict(tables[0].meta)
    entries = []
    shape_of: dict[tuple[str, str], tuple[Any, ...]] = {}
    for t in tables:
        shape = {k: t.meta.get(k) for k in RUN_SHAPE_KEYS}
        for model in t.models():
            seen = shape_of.setdefault(model, tuple(shape.values()))
            if seen != tuple(shape.values()):
                raise ConfigError(f"merge tables: {model[0]} {model[1]} comes from two tables measured differently "
                                  f"({dict(zip(RUN_SHAPE_KEYS, seen))} vs {shape}); merge only one of them")
        entries.append({"path": str(t.path), "models": [list(m) for m in t.models()],
                        "measured_at": t.meta.get("measured_at"), "rows": len(t.rows), **shape})
    for key in RUN_SHAPE_KEYS:
        if len({json.dumps(e[key]) for e in entries}) > 1:
            meta.pop(key, None)  # per model: see merged_from
    meta["merged_from"] = entries
    return CalibrationTable.write(out, rows, meta)


def meta_path_for(table: Path) -> Path:
    return table.with_name(table.name + ".meta.json")


def find_table(value: str, field: str, roots: Sequence[Path]) -> Path:
    """Resolve a configured table path: absolute as given, relative against each of ``roots`` in
    order (the repository root first, then the working directory); ConfigError naming ``field``."""
    candidates = config_path_candidates(value, roots)
    for c in candidates:
        if c.is_file():
            return c.resolve()
    tried = ", ".join(str(c) for c in candidates)
    raise ConfigError(f"{field}: calibration table '{value}' not found (tried {tried}); give an absolute "
                      "path or one relative to the repository root, or run `wicore profile --out <path>`")


def configured_table(backend_value: str | None, hardware_value: str | None,
                     statistic: str = "median") -> CalibrationTable | None:
    """The table a run uses: ``backend.calibration`` when set, else ``hardware.calibration`` (the
    hardware profile's own table), else None (roofline). Relative paths: repository root, then cwd.
    ``statistic``: ``backend.calibration_statistic`` (mean | median)."""
    if backend_value:
        value, field = str(backend_value), "backend.calibration"
    elif hardware_value:
        value, field = str(hardware_value), "hardware.calibration"
    else:
        return None
    if statistic not in STATISTICS:
        raise ConfigError(f"backend.calibration_statistic: '{statistic}' is not one of {list(STATISTICS)}")
    return CalibrationTable.load(find_table(value, field, [REPO_ROOT, Path.cwd()]), statistic)
