"""The batch sizes CUDA-graph decode pads to (no torch here: the calibrated simulator costs a decode at the
bucket the runtime would run, ``sim.calibrated_cost``)."""

from __future__ import annotations

from wicore.errors import ConfigError


def default_buckets(max_rows: int) -> tuple[int, ...]:
    """1, 2, 4, 8, ... below ``max_rows``, then ``max_rows`` itself."""
    if max_rows < 1:
        raise ConfigError(f"GraphDecode: needs at least one real KV slot besides the scratch slot, got {max_rows}")
    out, b = [], 1
    while b < max_rows:
        out.append(b)
        b *= 2
    out.append(max_rows)
    return tuple(out)
