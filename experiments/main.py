"""Hydra entry point: ``python run_experiment.py <overrides>`` (``-m`` for sweeps).

A bad config stops the run with one line naming the field (exit status 2);
in a sweep the failing job writes ``error.txt`` in its folder and the other
jobs go on.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from wicore.errors import ConfigError

CONF_DIR = str(Path(__file__).resolve().parent.parent / "conf")
log = logging.getLogger("wicore")


def task(cfg: DictConfig) -> float | None:
    out = Path(HydraConfig.get().runtime.output_dir)
    multirun = HydraConfig.get().mode == RunMode.MULTIRUN
    try:
        bar = bool(cfg.progress) and not multirun
        if cfg.backend.name == "torch":
            from experiments.run_torch import run_torch
            summary = run_torch(cfg, out, progress_bar=bar)
        else:
            from experiments.run import run_sim
            summary = run_sim(cfg, out, progress_bar=bar)
    except ConfigError as e:
        (out / "error.txt").write_text(f"{e}\n")
        if multirun:
            log.error("job failed: %s", e)
            return None
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    s = summary
    log.info("%s | %s | %s: %.1f output tokens/s, TTFT p50 %.0f ms, TPOT p50 %.0f ms, %d/%d finished "
             "(%s %d requests in %.1f s wall)", s["run"]["hardware"], s["run"]["model"],
             s["run"]["batching"], s["output_tokens_per_s"], s["ttft_p50"] * 1e3, s["tpot_p50"] * 1e3,
             s["finished"], s["requests"], "simulated" if s["run"]["backend"] == "sim" else "ran",
             s["requests"], s["run"]["wall_s"])
    log.info("results in %s (report.md)", out)
    return float(s["output_tokens_per_s"])


def job_dirname(overrides: str, limit: int = 120) -> str:
    """A sweep job's folder name from its overrides, cut to ``limit`` characters (file systems allow 255)
    with a short hash of the whole so names stay unique; the full overrides are in .hydra/overrides.yaml."""
    if len(overrides) <= limit:
        return overrides
    import hashlib

    return f"{overrides[:limit]}...{hashlib.sha1(overrides.encode()).hexdigest()[:8]}"


if not OmegaConf.has_resolver("wicore_dirname"):
    OmegaConf.register_new_resolver("wicore_dirname", job_dirname)


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="config")
def main(cfg: DictConfig) -> float | None:
    return task(cfg)
