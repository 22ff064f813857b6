"""Hydra callbacks: the sweep summary after a multirun."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

log = logging.getLogger("wicore")


class SweepSummary(Callback):
    """After ``-m``: one table + plots over every job of the sweep (failed ones listed)."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        from wicore.sweep import summarize_sweep
        sweep_dir = Path(config.hydra.sweep.dir)
        if not sweep_dir.exists():
            return
        path = summarize_sweep(sweep_dir)
        log.info("sweep summary: %s", path)
