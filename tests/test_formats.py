"""Group-wise quantization formats: sizes, error bounds, numpy/torch byte equality."""

from __future__ import annotations

import numpy as np
import pytest

from wicore.errors import ConfigError
from wicore.memory.formats import FORMATS, QTensor, dequantize, format_from_name, quantize

SHAPES = [(1,), (31,), (32,), (33,), (3, 7), (5, 64), (2, 3, 17), (4096,)]


def _normal(shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def _rel_rms(x: np.ndarray, y: np.ndarray) -> float:
    return float(np.linalg.norm(y - x) / np.linalg.norm(x))


@pytest.mark.parametrize("name", sorted(FORMATS))
@pytest.mark.parametrize("shape", SHAPES)
def test_nbytes_matches_formula_and_storage(name: str, shape: tuple[int, ...]) -> None:
    fmt = FORMATS[name]
    n = int(np.prod(shape))
    groups = -(-n // 32)
    expected = {"fp32": 4 * n, "fp16": 2 * n, "bf16": 2 * n, "int8": 34 * groups, "int4": 20 * groups}[name]
    assert fmt.nbytes(n) == expected
    q = quantize(_normal(shape), fmt)
    assert q.nbytes == expected
    assert len(q.to_bytes()) == expected
    assert dequantize(q).shape == shape
    assert dequantize(q).dtype == np.float32


def test_int_formats_metadata() -> None:
    assert (FORMATS["int8"].group_size, FORMATS["int8"].scale_bytes) == (32, 2)
    assert FORMATS["int4"].bytes_per_element == pytest.approx(0.625)
    q = quantize(_normal((64,)), FORMATS["int4"])
    assert q.data.dtype == np.uint8 and q.data.size == 32  # two values per byte
    assert q.scales.dtype == np.float16 and q.zeros is not None and q.zeros.dtype == np.float16


def test_int8_error_at_most_half_a_step_per_group() -> None:
    x = _normal((257, 32), seed=1) * np.float32(3.0)
    q = quantize(x, FORMATS["int8"])
    err = np.abs(dequantize(q) - x).reshape(-1, 32).max(axis=1)
    step = q.scales.astype(np.float32)
    assert np.all(err <= step / 2 * (1 + 1e-5) + 1e-7)
    assert _rel_rms(x, dequantize(q)) < 0.01


def test_int4_error_bounds() -> None:
    x = _normal((1 << 16,), seed=2)
    q = quantize(x, FORMATS["int4"])
    y = dequantize(q)
    assert _rel_rms(x, y) < 0.10
    assert q.zeros is not None
    step = q.scales.astype(np.float32)
    g = x.reshape(-1, 32)
    min_shift = np.abs(q.zeros.astype(np.float32) - g.min(axis=1))  # fp16 rounding of the group minimum
    err = np.abs(y - x).reshape(-1, 32).max(axis=1)
    assert np.all(err <= step / 2 * (1 + 1e-5) + min_shift + 1e-7)


@pytest.mark.parametrize(("name", "bound"), [("fp32", 0.0), ("fp16", 1e-3), ("bf16", 5e-3)])
def test_float_casts(name: str, bound: float) -> None:
    x = _normal((1000,), seed=3)
    y = dequantize(quantize(x, FORMATS[name]))
    assert _rel_rms(x, y) <= bound
    if name == "bf16":  # bf16 keeps the top 16 bits of float32 (after rounding)
        assert np.all((y.view(np.uint32) & 0xFFFF) == 0)


def test_rounding_is_half_to_even() -> None:
    x = np.zeros(32, np.float32)
    x[:5] = [127.0, 0.5, 1.5, 2.5, -2.5]  # scale is exactly 1.0
    q = quantize(x, FORMATS["int8"])
    assert q.scales[0] == np.float16(1.0)
    assert q.data[:5].tolist() == [127, 0, 2, 2, -2]


def test_bytes_roundtrip() -> None:
    for name, fmt in FORMATS.items():
        x = _normal((3, 50), seed=4)
        q = quantize(x, fmt)
        back = QTensor.from_bytes(q.to_bytes(), q.shape, fmt)
        assert np.array_equal(dequantize(back), dequantize(q)), name
    with pytest.raises(ValueError, match="expected"):
        QTensor.from_bytes(b"\x00" * 3, (4,), FORMATS["int8"])


def test_unknown_format_is_config_error() -> None:
    with pytest.raises(ConfigError, match=r"memory\.tiers\.nvme\.format: unknown format 'q3'"):
        format_from_name("q3", field="memory.tiers.nvme.format")
    assert format_from_name("int4") is FORMATS["int4"]


def test_non_finite_rejected() -> None:
    with pytest.raises(ValueError, match="non-finite"):
        quantize(np.array([1.0, np.nan], np.float32), FORMATS["int8"])


@pytest.mark.parametrize("name", sorted(FORMATS))
@pytest.mark.parametrize("shape", [(33,), (5, 64), (2, 3, 17), (0,)])
def test_numpy_and_torch_produce_identical_bytes(name: str, shape: tuple[int, ...]) -> None:
    torch = pytest.importorskip("torch")
    from wicore.model.quant import dequantize_torch, quantize_torch

    x = _normal(shape, seed=5) * np.float32(7.0)
    if x.size:
        x.reshape(-1)[0] = 2.5  # an exact tie for the int8 rounding in some groups
    fmt = FORMATS[name]
    qn, qt = quantize(x, fmt), quantize_torch(torch.from_numpy(x.copy()), fmt)
    assert qt.to_bytes() == qn.to_bytes()
    tn = qt.to_numpy()
    assert np.array_equal(tn.data, qn.data) and np.array_equal(tn.scales, qn.scales)
    assert np.array_equal(dequantize_torch(qt).numpy(), dequantize(qn))
