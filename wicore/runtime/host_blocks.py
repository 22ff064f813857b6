"""Host blocks of streamed decoder layers (``wicore.runtime.offload``): where each tensor of a layer lies
in its block in the host format, how the block is encoded (float casts, Q8_0, Q4_1-like int4), and
page-locked host allocation (an exact-size ``cudaHostRegister``, else ``pin_memory``).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch
from torch import Tensor

from wicore.memory.formats import FORMATS
from wicore.model.quant import quantize_torch
from wicore.model.transformer import DTYPES

QUANT = ("int8", "int4")  # host formats stored group-wise quantized (convert mode)
ALIGN = 16  # byte alignment of every tensor inside a block (vectorised kernels need 16)
PAGE = 4096
GROUP = FORMATS["int8"].group_size
assert FORMATS["int4"].group_size == GROUP
CAN_REGISTER = [True]  # cleared after the first failed cudaHostRegister (then pin_memory)


def align(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


def view_of(flat: Tensor, offset: int, nbytes: int, dtype: torch.dtype, shape: tuple[int, ...]) -> Tensor:
    return flat[offset:offset + nbytes].view(dtype).view(shape)


@dataclass(frozen=True)
class Entry:
    """One parameter of a streamed layer: its place in the host block / device slot (data, and the group
    scales and minima when quantized) and in the compute buffer."""

    name: str  # parameter name inside the layer, e.g. "mlp.up_proj.weight"
    shape: tuple[int, ...]
    dtype: torch.dtype  # compute (model) dtype
    host_dtype: torch.dtype | None  # None: quantized (``quant``)
    offset: int  # data bytes in the host block / slot
    nbytes: int
    scale_offset: int = 0  # group scales (fp16)
    scale_nbytes: int = 0
    out_offset: int = 0  # position in the compute buffer (convert mode)
    quant: str = ""  # "int8" (Q8_0) | "int4" (Q4_1-like: + fp16 group minima at zero_offset) | "" (float)
    zero_offset: int = 0

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def suffix(self) -> str:
        """Name suffix of the data tensor in a store file."""
        return {"int8": ".q8", "int4": ".q4"}.get(self.quant, "")

    def encode(self, src: Tensor) -> dict[str, tuple[int, Tensor]]:
        """The stored tensors of ``src``: name suffix -> (offset in the block, contiguous tensor)."""
        if not self.quant:
            assert self.host_dtype is not None
            return {"": (self.offset, src.to(self.host_dtype).contiguous())}
        q, g = quantize_torch(src, FORMATS[self.quant]), self.numel // GROUP
        out = {self.suffix: (self.offset, q.data.view(g, -1)), ".scale": (self.scale_offset, q.scales)}
        if q.zeros is not None:
            out[".min"] = (self.zero_offset, q.zeros)
        return out

    def relocate(self, name: str, offsets: dict[str, tuple[int, int]]) -> Entry:
        """This entry at the offsets of a store file's data section (``name``: the full parameter name)."""
        if not self.quant:
            return replace(self, offset=offsets[name][0])
        zero = offsets[name + ".min"][0] if self.quant == "int4" else 0
        return replace(self, offset=offsets[name + self.suffix][0], scale_offset=offsets[name + ".scale"][0],
                       zero_offset=zero)


def layout(params: Sequence[tuple[str, Tensor]], host_format: str) -> tuple[list[Entry], int, int]:
    """Entries, host block bytes and compute-buffer bytes of one layer."""
    entries, off, out = [], 0, 0
    for name, p in params:
        n, shape = p.numel(), tuple(int(s) for s in p.shape)
        q = host_format if host_format in QUANT and p.dim() >= 2 and n % GROUP == 0 else ""
        if q:
            nb, sb = n * FORMATS[q].bits // 8, (n // GROUP) * 2
            zero = off + align(nb) + align(sb) if q == "int4" else 0
            entries.append(Entry(name, shape, p.dtype, None, off, nb, off + align(nb), sb, out, q, zero))
            off += align(nb) + align(sb) * (2 if q == "int4" else 1)
        else:
            hdt = p.dtype if host_format in ("auto", *QUANT) else DTYPES[host_format]
            nb = n * hdt.itemsize
            entries.append(Entry(name, shape, p.dtype, hdt, off, nb, out_offset=out))
            off += align(nb)
        out += align(n * p.element_size())
    return entries, off, out


def host_block(nbytes: int, pin: str) -> tuple[Tensor, int, str]:
    """(block, registered pointer or 0, how it was pinned) of ``nbytes`` host bytes."""
    if pin == "none":
        return torch.empty(nbytes, dtype=torch.uint8), 0, "none"
    if pin == "register" or (pin == "auto" and CAN_REGISTER[0]):
        try:
            raw = torch.zeros(nbytes + PAGE, dtype=torch.uint8)  # zeros: fault the pages in (threaded)
            off = (-raw.data_ptr()) % PAGE
            block = raw[off:off + nbytes]
            err = torch.cuda.cudart().cudaHostRegister(block.data_ptr(), nbytes, 0)
            if int(err) != 0:
                raise RuntimeError(f"cudaHostRegister failed: {err}")
            return block, block.data_ptr(), "cudaHostRegister"
        except Exception:  # noqa: BLE001 - fall back to torch's pinned allocator
            CAN_REGISTER[0] = False
            with contextlib.suppress(Exception):  # a failed runtime call stays the "last error": clear it
                torch.cuda.cudart().cudaGetLastError()
            if pin == "register":
                raise
    return torch.empty(nbytes, dtype=torch.uint8, pin_memory=True), 0, "pin_memory"


def unregister(blocks: list[tuple[Tensor, int]]) -> None:
    for _, ptr in blocks:
        with contextlib.suppress(Exception):  # at interpreter exit CUDA may be gone already
            torch.cuda.cudart().cudaHostUnregister(ptr)
    blocks.clear()
