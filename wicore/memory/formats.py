"""Storage formats of a memory tier, with real group-wise quantization.

``FORMATS`` maps a name to a ``Format``: the bits per value, the group size and
the bytes of per-group metadata. ``Format.nbytes(n)`` is the exact stored size of
``n`` values (the last group is zero-padded to a whole group).

* ``fp32`` / ``fp16`` / ``bf16``: plain casts (round to nearest even), no metadata.
* ``int8`` (like ggml Q8_0): groups of 32, symmetric, one fp16 scale per group,
  ``d = fp16(max|x| / 127)``, ``q = clip(round(x / d), -127, 127)`` (int8), ``x' = q d``.
  34 bytes per 32 values.
* ``int4`` (like ggml Q4_1): groups of 32, asymmetric, fp16 scale ``d`` and fp16 min
  ``m`` per group, ``d = fp16((max - m) / 15)``, ``q = clip(round((x - m) / d), 0, 15)``,
  ``x' = q d + m``; two values per byte (element ``2i`` in the low nibble, ``2i+1`` in
  the high nibble). 20 bytes per 32 values.

Rounding is half-to-even and every intermediate is float32, so the numpy
(``quantize``) and torch (``wicore.model.quant.quantize_torch``) paths produce identical bytes.
Measured on 2**20 standard-normal float32 values (numpy, seed 0), relative RMS
error ``||x' - x|| / ||x||`` (max abs error): fp32 0; fp16 2.1e-4 (1.9e-3);
bf16 1.7e-3 (1.6e-2); int8 5.4e-3 (1.9e-2); int4 7.8e-2 (0.25). The tests bound
int8 by half a quantization step per group and int4 by 10% relative RMS;
``benchmarks/trace_replay.py`` measures and prints them again.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from wicore.errors import ConfigError


@dataclass(frozen=True)
class Format:
    name: str
    bits: int
    group_size: int  # 0: no groups (plain floats)
    scale_bytes: int  # metadata bytes per group (scale, plus min when asymmetric)

    def num_groups(self, num_elements: int) -> int:
        return -(-num_elements // self.group_size) if self.group_size else 0

    def nbytes(self, num_elements: int) -> int:
        """Exact stored bytes of ``num_elements`` values, metadata included."""
        if num_elements < 0:
            raise ValueError(f"num_elements must be >= 0, got {num_elements}")
        if not self.group_size:
            return -(-num_elements * self.bits // 8)
        groups = self.num_groups(num_elements)
        return groups * (self.group_size * self.bits // 8 + self.scale_bytes)

    @property
    def bytes_per_element(self) -> float:
        """Average stored bytes per value for whole groups (0.625 for int4)."""
        if not self.group_size:
            return self.bits / 8
        return self.nbytes(self.group_size) / self.group_size


FORMATS: dict[str, Format] = {
    "fp32": Format("fp32", 32, 0, 0),
    "fp16": Format("fp16", 16, 0, 0),
    "bf16": Format("bf16", 16, 0, 0),
    "int8": Format("int8", 8, 32, 2),
    "int4": Format("int4", 4, 32, 4),
}


def format_from_name(name: str, field: str = "memory.tiers.<tier>.format") -> Format:
    fmt = FORMATS.get(name)
    if fmt is None:
        raise ConfigError(f"{field}: unknown format {name!r}; use one of {sorted(FORMATS)}")
    return fmt


@dataclass(frozen=True)
class QTensor:
    """A stored tensor: packed ``data`` (uint8, or int8 for int8), fp16 ``scales``
    (empty for float formats), fp16 ``zeros`` (the group minima, int4 only)."""

    data: np.ndarray
    scales: np.ndarray
    zeros: np.ndarray | None
    shape: tuple[int, ...]
    fmt: Format

    @property
    def nbytes(self) -> int:
        return int(self.data.nbytes + self.scales.nbytes + (0 if self.zeros is None else self.zeros.nbytes))

    def to_bytes(self) -> bytes:
        """Raw little-endian bytes: data, then scales, then zeros (``nbytes`` long)."""
        parts = [self.data, self.scales] + ([] if self.zeros is None else [self.zeros])
        return b"".join(np.ascontiguousarray(p).astype(p.dtype.newbyteorder("<")).tobytes() for p in parts)

    @classmethod
    def from_bytes(cls, buf: bytes, shape: tuple[int, ...], fmt: Format) -> QTensor:
        n = int(np.prod(shape))
        if len(buf) != fmt.nbytes(n):
            raise ValueError(f"{fmt.name}: expected {fmt.nbytes(n)} bytes for shape {shape}, got {len(buf)}")
        if not fmt.group_size:
            return cls(np.frombuffer(buf, np.uint8).copy(), np.zeros(0, np.float16), None, shape, fmt)
        g = fmt.num_groups(n)
        data_len = g * fmt.group_size * fmt.bits // 8
        data = np.frombuffer(buf[:data_len], np.int8 if fmt.name == "int8" else np.uint8).copy()
        scales = np.frombuffer(buf[data_len:data_len + 2 * g], "<f2").astype(np.float16)
        zeros = np.frombuffer(buf[data_len + 2 * g:], "<f2").astype(np.float16) if fmt.name == "int4" else None
        return cls(data, scales, zeros, shape, fmt)


def _groups(x: np.ndarray, fmt: Format) -> np.ndarray:
    flat = np.asarray(x, dtype=np.float32).reshape(-1)
    if not np.all(np.isfinite(flat)):
        raise ValueError(f"{fmt.name}: cannot quantize non-finite values")
    pad = fmt.num_groups(flat.size) * fmt.group_size - flat.size
    return np.concatenate([flat, np.zeros(pad, np.float32)]).reshape(-1, fmt.group_size)


def _bf16_bits(x: np.ndarray) -> np.ndarray:
    u = x.view(np.uint32).astype(np.uint64)
    r = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)
    return np.where(np.isnan(x), np.uint16(0x7FC0), r)


def quantize(x: np.ndarray, fmt: Format) -> QTensor:
    """Store ``x`` in ``fmt`` (numpy)."""
    shape = tuple(int(s) for s in np.shape(x))
    if not fmt.group_size:
        flat = np.ascontiguousarray(np.asarray(x, dtype=np.float32).reshape(-1))
        raw = {"fp32": flat, "fp16": flat.astype("<f2"), "bf16": _bf16_bits(flat).astype("<u2")}[fmt.name]
        return QTensor(raw.view(np.uint8).copy(), np.zeros(0, np.float16), None, shape, fmt)
    g = _groups(x, fmt)
    if fmt.name == "int8":
        scale = (np.abs(g).max(axis=1) / np.float32(127)).astype(np.float16)
        d = scale.astype(np.float32)[:, None]
        q = np.round(np.divide(g, d, out=np.zeros_like(g), where=d > 0))
        return QTensor(np.clip(q, -127, 127).astype(np.int8).reshape(-1), scale, None, shape, fmt)
    lo16 = g.min(axis=1).astype(np.float16)
    lo = lo16.astype(np.float32)[:, None]
    scale = ((g.max(axis=1) - lo[:, 0]) / np.float32(15)).astype(np.float16)
    d = scale.astype(np.float32)[:, None]
    q = np.clip(np.round(np.divide(g - lo, d, out=np.zeros_like(g), where=d > 0)), 0, 15).astype(np.uint8)
    q = q.reshape(-1)
    return QTensor((q[0::2] | (q[1::2] << 4)).astype(np.uint8), scale, lo16, shape, fmt)


def dequantize(q: QTensor) -> np.ndarray:
    """Back to float32, in ``q.shape``."""
    fmt, n = q.fmt, int(np.prod(q.shape))
    if not fmt.group_size:
        if fmt.name == "fp32":
            return q.data.view("<f4").astype(np.float32).reshape(q.shape)
        if fmt.name == "fp16":
            return q.data.view("<f2").astype(np.float32).reshape(q.shape)
        bits = q.data.view("<u2").astype(np.uint32) << 16
        return bits.view(np.float32).reshape(q.shape)
    d = q.scales.astype(np.float32)[:, None]
    if fmt.name == "int8":
        vals = q.data.astype(np.float32).reshape(-1, fmt.group_size) * d
    else:
        assert q.zeros is not None
        nib = np.empty(q.data.size * 2, np.uint8)
        nib[0::2], nib[1::2] = q.data & 0x0F, q.data >> 4
        vals = nib.astype(np.float32).reshape(-1, fmt.group_size) * d + q.zeros.astype(np.float32)[:, None]
    return vals.reshape(-1)[:n].reshape(q.shape)
