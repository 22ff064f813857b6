"""Workloads: arrival processes and request-length distributions (all seeded).

* open loop: ``poisson`` (exponential gaps at ``rate`` req/s) and ``gamma``
  (gaps with coefficient of variation ``cv``: bursty for cv > 1);
* closed loop: ``concurrency`` users, each sends a request, waits for it to
  finish, thinks for an exponential time with mean ``think_time_s``, repeats;
* ``trace``: replay a CSV or JSONL file with columns
  ``arrival_time, prompt_tokens, output_tokens[, priority]``.

Lengths come from ``fixed``, ``uniform`` (inclusive), ``lognormal``
(``median``, ``sigma``, clipped to ``[min, max]``) or ``empirical`` (a file with
one length per line, or a list of ``values``, sampled with replacement).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from wicore.errors import ConfigError
from wicore.types import Request

KINDS = ("closed_loop", "poisson", "gamma", "trace")
DISTS = ("fixed", "uniform", "lognormal", "empirical")


@dataclass(frozen=True)
class LengthDist:
    kind: str = "fixed"
    value: int = 128  # fixed
    low: int = 1  # uniform
    high: int = 256
    median: float = 128.0  # lognormal
    sigma: float = 0.5
    min: int = 1  # clip (lognormal, empirical)
    max: int = 4096
    values: tuple[int, ...] = ()  # empirical
    path: str = ""  # empirical from file

    def check(self, where: str) -> None:
        if self.kind not in DISTS:
            raise ConfigError(f"{where}.kind: unknown '{self.kind}', use one of {DISTS}")
        if self.kind == "fixed" and self.value <= 0:
            raise ConfigError(f"{where}.value: must be > 0, got {self.value}")
        if self.kind == "uniform" and not 0 < self.low <= self.high:
            raise ConfigError(f"{where}: need 0 < low <= high, got low={self.low} high={self.high}")
        if self.kind == "lognormal" and (self.median <= 0 or self.sigma < 0 or not 0 < self.min <= self.max):
            raise ConfigError(f"{where}: need median > 0, sigma >= 0, 0 < min <= max")
        if self.kind == "empirical" and not (self.values or self.path):
            raise ConfigError(f"{where}: empirical lengths need 'values' or 'path'")

    def upper_bound(self) -> int:
        """Largest length this distribution can produce."""
        if self.kind == "fixed":
            return self.value
        if self.kind == "uniform":
            return self.high
        if self.kind == "lognormal":
            return self.max
        return max(self._empirical())

    def _empirical(self) -> list[int]:
        if self.values:
            return [int(v) for v in self.values]
        p = Path(self.path)
        if not p.exists():
            raise ConfigError(f"workload lengths: file {self.path} not found")
        return [int(x) for x in p.read_text().split()]

    def sample(self, n: int, rng: np.random.Generator) -> np.ndarray:
        if self.kind == "fixed":
            return np.full(n, self.value, dtype=np.int64)
        if self.kind == "uniform":
            return rng.integers(self.low, self.high + 1, size=n)
        if self.kind == "lognormal":
            x = rng.lognormal(np.log(self.median), self.sigma, size=n)
            return np.clip(np.rint(x), self.min, self.max).astype(np.int64)
        vals = np.asarray(self._empirical(), dtype=np.int64)
        return np.clip(rng.choice(vals, size=n, replace=True), self.min, self.max)


@dataclass(frozen=True)
class WorkloadConfig:
    kind: str = "closed_loop"
    num_requests: int = 1000
    concurrency: int = 32  # closed loop: number of users
    think_time_s: float = 0.0  # closed loop: mean think time between a user's requests
    rate: float = 1.0  # open loop: requests per second
    cv: float = 1.0  # gamma: coefficient of variation of the gaps
    prompt: LengthDist = field(default_factory=LengthDist)
    output: LengthDist = field(default_factory=LengthDist)
    priority_levels: int = 1  # priorities drawn uniformly from 0..levels-1
    deadline_s: float | None = None  # per-request deadline after arrival (None: none)
    trace_path: str = ""
    seed: int = 0

    @classmethod
    def from_config(cls, cfg: dict[str, Any]) -> WorkloadConfig:
        data = {k: v for k, v in cfg.items() if k != "_target_"}
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"workload: unknown field(s) {unknown}; known fields are {sorted(known)}")
        for key in ("prompt", "output"):
            if key in data:
                d = dict(data[key])
                bad = sorted(set(d) - set(LengthDist.__dataclass_fields__))
                if bad:
                    raise ConfigError(f"workload.{key}: unknown field(s) {bad}")
                if "values" in d:
                    d["values"] = tuple(d["values"] or ())
                data[key] = LengthDist(**d)
        wl = cls(**data)
        wl.check()
        return wl

    def check(self) -> None:
        if self.kind not in KINDS:
            raise ConfigError(f"workload.kind: unknown '{self.kind}', use one of {KINDS}")
        if self.num_requests <= 0:
            raise ConfigError(f"workload.num_requests: must be > 0, got {self.num_requests}")
        if self.kind in ("poisson", "gamma") and not self.rate > 0:
            raise ConfigError(f"workload.rate: must be > 0 requests/s, got {self.rate}")
        if self.kind == "gamma" and not self.cv > 0:
            raise ConfigError(f"workload.cv: must be > 0, got {self.cv}")
        if self.kind == "closed_loop" and self.concurrency <= 0:
            raise ConfigError(f"workload.concurrency: must be > 0, got {self.concurrency}")
        if self.think_time_s < 0:
            raise ConfigError(f"workload.think_time_s: must be >= 0, got {self.think_time_s}")
        if self.deadline_s is not None and self.deadline_s <= 0:
            raise ConfigError(f"workload.deadline_s: must be > 0 or null, got {self.deadline_s}")
        if self.priority_levels < 1:
            raise ConfigError(f"workload.priority_levels: must be >= 1, got {self.priority_levels}")
        if self.kind == "trace" and not Path(self.trace_path).exists():
            raise ConfigError(f"workload.trace_path: file '{self.trace_path}' not found")
        if self.kind != "trace":
            self.prompt.check("workload.prompt")
            self.output.check("workload.output")


class Workload:
    """Pre-samples every request so a run is reproducible from the seed alone."""

    def __init__(self, cfg: WorkloadConfig) -> None:
        self.cfg = cfg
        rng = np.random.default_rng(cfg.seed)
        if cfg.kind == "trace":
            rows = load_trace(Path(cfg.trace_path))
            self.arrivals = np.array([r["arrival_time"] for r in rows], dtype=float)
            self.prompts = np.array([r["prompt_tokens"] for r in rows], dtype=np.int64)
            self.outputs = np.array([r["output_tokens"] for r in rows], dtype=np.int64)
            self.priorities = np.array([r.get("priority", 0) for r in rows], dtype=np.int64)
            self.n = len(rows)
        else:
            n = self.n = cfg.num_requests
            self.prompts = cfg.prompt.sample(n, rng)
            self.outputs = cfg.output.sample(n, rng)
            self.priorities = rng.integers(0, cfg.priority_levels, size=n)
            if cfg.kind == "poisson":
                gaps = rng.exponential(1.0 / cfg.rate, size=n)
            elif cfg.kind == "gamma":
                shape = 1.0 / cfg.cv**2
                gaps = rng.gamma(shape, 1.0 / (cfg.rate * shape), size=n)
            else:
                gaps = np.zeros(n)
            self.arrivals = np.cumsum(gaps)
        self.think = rng.exponential(cfg.think_time_s, size=self.n) if cfg.think_time_s > 0 else None

    @property
    def closed_loop(self) -> bool:
        return self.cfg.kind == "closed_loop"

    def request(self, i: int, arrival_time: float, user: int | None = None) -> Request:
        return Request(i, float(arrival_time), int(self.prompts[i]), int(self.outputs[i]),
                       int(self.priorities[i]), self.cfg.deadline_s, user)

    def think_time(self, i: int) -> float:
        return 0.0 if self.think is None else float(self.think[i])

    def max_total_tokens(self) -> int:
        return int((self.prompts + self.outputs).max())


def load_trace(path: Path) -> list[dict[str, Any]]:
    """Read a request trace (CSV with a header, or JSON lines), sorted by arrival."""
    need = ("arrival_time", "prompt_tokens", "output_tokens")
    if path.suffix in (".jsonl", ".json"):
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    else:
        import csv
        with path.open() as f:
            rows = list(csv.DictReader(f))
    out = []
    for i, r in enumerate(rows):
        missing = [k for k in need if k not in r]
        if missing:
            raise ConfigError(f"workload.trace_path: row {i + 1} of {path} lacks {missing}")
        out.append({"arrival_time": float(r["arrival_time"]), "prompt_tokens": int(r["prompt_tokens"]),
                    "output_tokens": int(r["output_tokens"]), "priority": int(r.get("priority") or 0)})
    if not out:
        raise ConfigError(f"workload.trace_path: {path} has no requests")
    out.sort(key=lambda r: r["arrival_time"])
    return out
