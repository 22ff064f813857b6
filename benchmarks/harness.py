"""Plumbing shared by the GPU benchmark scripts: logging with elapsed time, sections
whose failure is recorded instead of stopping the run, result lookup and formatting,
token-agreement statistics, device sync and memory release."""

from __future__ import annotations

import contextlib
import gc
import json
import time
import traceback
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch


class Harness:
    def __init__(self, name: str) -> None:
        self.name = name
        self.t0 = time.perf_counter()

    def restart(self) -> None:
        self.t0 = time.perf_counter()

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def log(self, msg: str) -> None:
        print(f"[{self.name} {self.elapsed():7.1f}s] {msg}", flush=True)

    @contextlib.contextmanager
    def section(self, results: dict[str, Any], name: str) -> Iterator[dict[str, Any]]:
        """Run one benchmark section; an exception is recorded as ``results[name]["error"]``."""
        out: dict[str, Any] = results.setdefault(name, {})
        self.log(f"== {name}")
        t0 = time.perf_counter()
        try:
            yield out
        except Exception as exc:  # noqa: BLE001 - a failing section must not stop the others
            out["error"] = f"{type(exc).__name__}: {exc}"
            out["traceback"] = traceback.format_exc()
            self.log(f"{name} FAILED: {out['error']}")
        out["section_s"] = round(time.perf_counter() - t0, 2)


def lookup(results: dict[str, Any], path: str) -> Any:
    """``results["a"]["b"]`` for path "a.b"; "error: ..." if a section on the way failed, None if absent."""
    node: Any = results
    for key in path.split("."):
        if isinstance(node, dict) and "error" in node and key not in node:
            return f"error: {str(node['error'])[:80]}"
        if not isinstance(node, dict) or key not in node:
            return None
        node = node[key]
    return node


def fmt(value: Any, digits: int = 3) -> str:
    if isinstance(value, bool) or value is None:
        return str(value)
    if isinstance(value, float):
        if value != value:  # nan
            return "nan"
        return f"{value:.{digits}g}" if abs(value) < 1e-3 or abs(value) >= 1e6 else f"{value:,.{digits}f}"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, dict) and "matching" in value:
        return f"{value['matching']}/{value['compared']} (common prefix {value['prefix']})"
    return str(value)


def match_stats(ours: list[int], ref: list[int], n: int | None = None) -> dict[str, int]:
    """Compare the first ``n`` tokens (all when None): agreeing positions and the common prefix."""
    a, b = (ours, ref) if n is None else (ours[:n], ref[:n])
    m = min(len(a), len(b))
    prefix = next((i for i in range(m) if a[i] != b[i]), m)
    return {"compared": m, "matching": sum(1 for i in range(m) if a[i] == b[i]), "prefix": prefix}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free_memory(device: torch.device) -> None:
    """Give GPU memory and cached pinned host memory back (pin_memory blocks stay cached otherwise)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        empty_host = (getattr(getattr(torch, "accelerator", None), "empty_host_cache", None)
                      or getattr(torch._C, "_host_emptyCache", None))
        with contextlib.suppress(Exception):
            empty_host()  # type: ignore[misc]


def markdown_table(rows: list[tuple[str, str]]) -> str:
    return "\n".join(["| metric | value |", "|---|---|", *(f"| {k} | {v} |" for k, v in rows)]) + "\n"


def write_results(results: dict[str, Any], out_dir: Path, table: str) -> None:
    """``results.json`` (keys starting with "_" left out) and ``table.md`` in ``out_dir``."""

    def clean(node: Any) -> Any:
        if isinstance(node, dict):
            return {k: clean(v) for k, v in node.items() if not k.startswith("_")}
        return [clean(v) for v in node] if isinstance(node, list | tuple) else node

    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "results.json").write_text(json.dumps(clean(results), indent=2, default=str) + "\n")
    (out_dir / "table.md").write_text(table)
