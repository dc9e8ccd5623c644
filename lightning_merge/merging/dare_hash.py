"""DARE's drops (Yu et al., ICML 2024, §4.1): which task-vector entries are kept, from a hash of
(seed, model, tensor name, element index), so that every path — in memory, streamed, compiled — draws
the same drops whatever slices it reads, and one seed reproduces a run."""

from __future__ import annotations

import zlib

import torch

_M32 = 0xFFFFFFFF


def _signed32(value: int) -> int:
    value &= _M32
    return value - (1 << 32) if value >= 1 << 31 else value


_DARE_BITS = 24  # the hash's top 24 bits decide: a drop rate rounded down to a multiple of 2⁻²⁴
_INDEX: list[torch.Tensor] = [torch.arange(0, dtype=torch.int32)]


def _index(n: int) -> torch.Tensor:
    """``arange(n)`` in int32, kept between calls (an int32 ``arange`` costs more than the add that offsets it)."""
    if _INDEX[0].numel() < n:
        _INDEX[0] = torch.arange(n, dtype=torch.int32)
    return _INDEX[0][:n]


def dare_threshold(drop_rate: float) -> int:
    """Entries whose 24-bit hash is at least this are kept: ``⌊p · 2²⁴⌋`` of the ``2²⁴`` values drop."""
    return int(drop_rate * 2**_DARE_BITS)


def dare_bits(name: str, start: int, stop: int, model: int, seed: int,
              scratch: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """The DARE hash of entries ``[start, stop)`` of tensor ``name`` of model ``model``: the top 24 bits
    (an int32 in ``[0, 2²⁴)``) of a 32-bit hash of (seed, model, name, element index). It depends on
    nothing else — not on how a merge slices the tensor — so every path draws the same drops.

    The hash is unsigned 32-bit arithmetic (``x ^= x >> 16; x *= 0x7FEB352D; x ^= x >> 15;
    x *= 0x846CA68B; x ^= x >> 16`` on ``index ^ key``), computed in int32 (multiplication wraps to the
    same bits; right shifts are masked to be logical). ``scratch``: two int32 tensors of at least
    ``stop − start`` elements (the result is a view of the first)."""
    n = stop - start
    if stop > 2**31 - 1:
        raise ValueError(f"DARE: tensor {name!r} has more than 2³¹ elements")
    key = _signed32(dare_key(name, model, seed))
    x, y = scratch if scratch is not None else (torch.empty(n, dtype=torch.int32), torch.empty(n, dtype=torch.int32))
    x, y = x[:n], y[:n]
    torch.add(_index(n), start, out=x).bitwise_xor_(key)
    for shift, multiplier in ((16, 0x7FEB352D), (15, 0x846CA68B)):
        torch.bitwise_right_shift(x, shift, out=y)
        x.bitwise_xor_(y.bitwise_and_((1 << (32 - shift)) - 1)).mul_(_signed32(multiplier))
    torch.bitwise_right_shift(x, 16, out=y)
    x.bitwise_xor_(y.bitwise_and_(0xFFFF))
    return x.bitwise_right_shift_(32 - _DARE_BITS).bitwise_and_((1 << _DARE_BITS) - 1)


def dare_keep(name: str, start: int, stop: int, model: int, seed: int, drop_rate: float) -> torch.Tensor:
    """Which entries ``[start, stop)`` DARE keeps (probability ``1 − p``), as a bool tensor."""
    return dare_bits(name, start, stop, model, seed) >= dare_threshold(drop_rate)


def dare_kept(bits: torch.Tensor, drop_rate: float, out: torch.Tensor) -> torch.Tensor:
    """1.0 where DARE keeps an entry, 0.0 where it drops it, from :func:`dare_bits`, in float arithmetic
    only (on CPU a bool mask in float arithmetic is first copied to a float tensor): ``clamp(bits −
    threshold + 1, 0, 1)`` is exact below 2²⁵. The kept entries are rescaled by :func:`dare_rescale`."""
    out = out[:bits.numel()]
    out.copy_(bits)
    return out.sub_(dare_threshold(drop_rate) - 1).clamp_(0, 1)


def dare_rescale(drop_rate: float) -> float:
    """DARE's ``1/(1 − p)`` for the entries it keeps (Yu et al., ICML 2024, §4.1, eq. 2)."""
    return 1.0 / (1.0 - drop_rate)


def _mulmod32(x: torch.Tensor, c: int) -> torch.Tensor:
    """``x · c mod 2³²`` for ``0 ≤ x < 2³²`` in int64 without overflow (16-bit halves of ``c``)."""
    return (x * (c & 0xFFFF) + (((x * (c >> 16)) & 0xFFFF) << 16)) & _M32


def dare_keep_int64(start: int, n: int, key: torch.Tensor, threshold: int, device=None) -> torch.Tensor:
    """:func:`dare_bits`' hash in int64 arithmetic that never overflows (for compiled code, where a
    wrapping int32 multiply is undefined), compared with :func:`dare_threshold`; the same bits."""
    x = ((torch.arange(n, dtype=torch.int64, device=device) + start) ^ key) & _M32
    x = _mulmod32(x ^ (x >> 16), 0x7FEB352D)
    x = _mulmod32(x ^ (x >> 15), 0x846CA68B)
    return ((x ^ (x >> 16)) >> (32 - _DARE_BITS)) >= threshold


def dare_key(name: str, model: int, seed: int) -> int:
    return (seed * 0x9E3779B1 + (model + 1) * 0x85EBCA77 + zlib.crc32(name.encode())) & _M32


# A piece's drops, kept between merges (a coefficient search merges the same models once per λ): one bit
# per entry in 8 planes, byte j holding the bits of entries j, j + m, …, j + 7m (m = ⌈n / 8⌉), so that
# packing and unpacking are a few whole-buffer operations.
_PLANES = torch.arange(8, dtype=torch.uint8).view(8, 1)
_PLANE_BITS = (1 << torch.arange(8, dtype=torch.int32)).view(8, 1)


def pack_drops(buffer: torch.Tensor, n: int, drop_rate: float, out: torch.Tensor,
               scratch: torch.Tensor) -> torch.Tensor:
    """Which of ``n`` entries DARE keeps, from :func:`dare_bits`' values in ``buffer[:n]`` (an int32
    buffer of at least ``8m`` elements, ``m = ⌈n / 8⌉``; its tail is overwritten), as ``m`` planar bytes
    written to ``out`` (uint8). ``scratch``: int32, at least ``8m``. Integer arithmetic on whole planes:
    ``(threshold − 1 − bits) >> 31`` is −1 exactly where an entry is kept."""
    m = -(-n // 8)
    padded = buffer[:8 * m]
    padded[n:].fill_(-1)  # beyond the piece: never kept
    kept = torch.sub(dare_threshold(drop_rate) - 1, padded, out=scratch[:8 * m]).bitwise_right_shift_(31)
    weighted = kept.view(8, m).bitwise_and_(_PLANE_BITS.to(buffer.device))
    return out[:m].copy_(weighted.sum(0, dtype=torch.int32))


def unpack_kept(packed: torch.Tensor, n: int, out: torch.Tensor, planes: torch.Tensor) -> torch.Tensor:
    """:func:`dare_kept`'s values (1.0 kept, 0.0 dropped) from :func:`pack_drops`' bytes, the same bits;
    ``planes``: a uint8 buffer of at least ``8 ⌈n / 8⌉`` elements."""
    m = packed.numel()
    planes = planes[:8 * m].view(8, m)
    torch.bitwise_right_shift(packed.unsqueeze(0), _PLANES.to(packed.device), out=planes).bitwise_and_(1)
    return out[:n].copy_(planes.view(-1)[:n])
