"""The sizes CUDA graphs pad to (no torch here: the calibrated simulator costs a step at the size the
runtime would run, ``sim.calibrated_cost``).

* decode batch sizes (``GraphDecode``): 1, 2, 4, 8, ... then the number of real KV slots;
* prefill chunk lengths (``GraphPrefill``): 16, 32, 48, 64, 96, 128, 192, ... (powers of two and 1.5x
  powers of two from 16), then the largest length itself, so a chunk pads by at most half again its size
  (a third of the padded work) above 32 tokens.
"""

from __future__ import annotations

from collections.abc import Sequence

from wicore.errors import ConfigError

PREFILL_MIN_BUCKET = 16


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


def prefill_buckets(max_tokens: int) -> tuple[int, ...]:
    """16, 32, 48, 64, 96, 128, 192, 256, ... below ``max_tokens``, then ``max_tokens`` itself."""
    if max_tokens < 1:
        raise ConfigError(f"GraphPrefill: the longest prefill chunk must be >= 1 token, got {max_tokens}")
    out: list[int] = []
    b = PREFILL_MIN_BUCKET
    while b < max_tokens:
        out.append(b)
        half = b + b // 2
        if b >= 32 and half < max_tokens:
            out.append(half)
        b *= 2
    out.append(max_tokens)
    return tuple(out)


def bucket_of(size: int, buckets: Sequence[int]) -> int | None:
    """The smallest bucket >= ``size`` (None: larger than every bucket)."""
    for b in buckets:
        if b >= size:
            return b
    return None
