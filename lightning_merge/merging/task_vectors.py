"""Task-vector merges: task arithmetic, TIES and DARE. Each reads the pre-trained ``base`` model
(a shared input) and works on task vectors ``τ_i = θ_i − θ_0``; the coefficients are scales ``λ_i ≥ 0``
used as given (not normalized), one per model (a shared scale ``λ`` is ``λ_i = λ`` for all ``i``).

Everything here is element-wise within a piece, plus one global pass for TIES' top-k thresholds,
so a streamed merge equals an in-memory one bit for bit.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from jsonargparse.typing import restricted_number_type

from lightning_merge.merging.base import BASE, SCALE, MergeMethod, Piece
from lightning_merge.merging.dare_hash import (
    dare_bits,
    dare_keep_int64,
    dare_kept,
    dare_key,
    dare_rescale,
    dare_threshold,
    pack_drops,
    unpack_kept,
)
from lightning_merge.merging.formulas import Workspace

Percent = restricted_number_type("Percent", float, [(">", 0), ("<=", 100)], join="and")
DropRate = restricted_number_type("DropRate", float, [(">=", 0), ("<", 1)], join="and")

_HI_BINS, _LO_BINS = 1 << 15, 1 << 16  # float32 bits of |τ| ≥ 0: 15 high bits (sign is 0), 16 low bits


def fused_merge(thetas: list[torch.Tensor], base: torch.Tensor, scales: torch.Tensor,
                dare_keys: torch.Tensor | None = None, start: int = 0, keep_from: int = 0,
                rescale: float = 1.0, thresholds: torch.Tensor | None = None) -> torch.Tensor:
    """The merge of one piece as one expression, the same arithmetic as the eager path, for
    ``torch.compile`` to fuse into a single loop: task vectors (DARE'd, the mask hashed in the loop
    from ``dare_keys``, one per model, and the piece's ``start``; kept where the hash is at least
    ``keep_from``), then task arithmetic, or with
    ``thresholds`` TIES' trim, elect and disjoint mean."""
    vectors = [theta - base for theta in thetas]
    if dare_keys is not None:
        vectors = [tau * dare_keep_int64(start, base.numel(), dare_keys[i], keep_from, base.device) * rescale
                   for i, tau in enumerate(vectors)]
    if thresholds is None:
        merged = base
        for i, tau in enumerate(vectors):
            merged = merged + tau * scales[i]
        return merged
    weighted = [torch.where(tau.abs() >= thresholds[i], tau, 0.0) * scales[i] for i, tau in enumerate(vectors)]
    total = weighted[0]
    for w in weighted[1:]:
        total = total + w
    elected = torch.sign(total)
    merged, count = torch.zeros_like(base), torch.zeros_like(base)
    for w in weighted:
        agree = (w * elected) > 0
        merged = merged + torch.where(agree, w, 0.0)
        count = count + agree.to(base.dtype)
    return base + merged / count.clamp(min=1)


_COMPILED: dict[str, object] = {}


def compiled_merge():
    """:func:`fused_merge` compiled by ``torch.compile`` (once per process, on first use)."""
    if "merge" not in _COMPILED:
        _COMPILED["merge"] = torch.compile(fused_merge, dynamic=True)
    return _COMPILED["merge"]


def _count(mask: torch.Tensor) -> int:
    """How many entries of a bool tensor are set (summed as bytes: ``bool.sum()`` converts to int64 first)."""
    return int(mask.view(torch.uint8).sum(dtype=torch.int32))


def _top_bin(hist: torch.Tensor, rank: int) -> tuple[int, int]:
    """The bin holding the ``rank``-th largest element (1-based) of a histogram in ascending bin order,
    and that element's rank within the bin."""
    from_top = torch.flip(hist, [0]).cumsum(0)
    j = int(torch.searchsorted(from_top, torch.tensor([rank], dtype=from_top.dtype))[0])
    above = int(from_top[j - 1]) if j > 0 else 0
    return len(hist) - 1 - j, rank - above


NEAR_ROWS = 8  # a piece is screened as this many rows: each column a group of entries far apart


def _screen(magnitude: torch.Tensor, lo: float, hi: float, scratch: torch.Tensor) -> tuple[int, list[torch.Tensor]]:
    """How many entries of ``magnitude`` exceed ``hi``, and a few slices that hold every entry in
    ``[lo, hi]`` (with others, each of them ``< lo`` or negative: ``[c >= lo]`` picks the bracket out).
    Float arithmetic only (a comparison into a bool tensor costs several float passes on CPU):
    ``hardshrink`` keeps the entries above ``hi``, which are then negated in ``magnitude`` (overwritten)
    and counted through their signs. A bracket holds well under 1% of the entries, so the piece is viewed
    as ``NEAR_ROWS`` rows and only the columns whose largest remaining entry reaches ``lo`` are gathered."""
    above = torch.hardshrink(magnitude, hi, out=scratch)
    rest = magnitude.sub_(above, alpha=2)  # x − 2x = −x above hi (exact), x elsewhere
    count = int(above.sign_().sum())
    n = rest.numel()
    whole = n - n % NEAR_ROWS
    rows = rest[:whole].view(NEAR_ROWS, -1)
    hit = rows.amax(0) >= lo
    # copies: the workspace holding ``magnitude`` is overwritten by the next piece
    return count, [rows.index_select(1, hit.nonzero().squeeze(1)).reshape(-1), rest[whole:].clone()]


def _positive(lo: float) -> float:
    """The bracket's low end for the screen: at least the least positive float32 (zeros are counted apart)."""
    return max(lo, math.ldexp(1.0, -149))


def _in_bracket(screened: list[torch.Tensor], lo: float) -> torch.Tensor:
    """The entries of :func:`_screen`'s slices that are in the bracket: those ``≥ lo``."""
    candidates = torch.cat(screened)
    return candidates[candidates >= lo]


class _TaskVectorMerge(MergeMethod):
    """What task arithmetic, TIES and DARE share: task vectors from ``base``, DARE's drop and rescale
    (``drop_rate > 0``), TIES' trim, elect and disjoint mean (``top_k`` given), or their plain sum."""

    shared_inputs = (BASE,)
    coefficients = SCALE

    def __init__(self, name: str, top_k: float | None = None, per_tensor: bool = False, drop_rate: float = 0.0,
                 seed: int = 0, compile: bool = False) -> None:
        if top_k is not None and not 0 < top_k <= 100:
            raise ValueError(f"{type(self).__name__}(top_k={top_k}): a percentage in (0, 100]")
        if not 0 <= drop_rate < 1:
            raise ValueError(f"{type(self).__name__}(drop_rate={drop_rate}): a probability in [0, 1)")
        super().__init__(name)
        self.top_k, self.per_tensor, self.drop_rate, self.seed = top_k, per_tensor, drop_rate, seed
        self.compile = compile
        self.thresholds: dict[tuple[int, str | None], float] = {}
        self._work = Workspace()
        self._drops: dict[tuple, torch.Tensor] = {}  # (seed, p, model, name, start, stop) -> packed drops
        self._seen: set[tuple] = set()
        self._slabs: list[list] = []  # [uint8 buffer, bytes used]
        self._drop_bytes = 0

    def task_vectors(self, piece: Piece) -> list[torch.Tensor]:
        """``τ_i`` of the piece in workspace buffers (overwritten by the next piece), DARE'd if asked."""
        base, n, device = piece.shared[BASE], piece.stop - piece.start, piece.shared[BASE].device
        vectors = []
        for i, theta in enumerate(piece.thetas):
            tau = torch.sub(theta, base, out=self._work.get(f"tau{i}", n, device=device))
            if self.drop_rate > 0:  # DARE (Yu et al., ICML 2024, §4.1): drop with probability p, rescale by 1/(1 − p)
                tau.mul_(self._kept(piece, i)).mul_(dare_rescale(self.drop_rate))
            vectors.append(tau)
        return vectors

    #: bytes of drops kept between merges (one bit per entry and model); beyond it they are hashed anew
    DROP_CACHE_BYTES = 1 << 28
    DROP_SLAB_BYTES = 1 << 23  # kept drops live in slabs this large: no long-lived small blocks on the heap

    def _kept(self, piece: Piece, model: int) -> torch.Tensor:
        """Which of model ``model``'s entries of the piece DARE keeps (1.0) or drops (0.0). Hashed; from
        the second time a piece is asked for (a second λ, or TIES' passes) its drops are kept, one bit per
        entry, and unpacked after that. The hash depends only on seed, model, name and index (all in the
        key, with ``p``), so kept drops never go stale; a single merge of each piece (a streamed merge)
        keeps nothing."""
        n, device = piece.stop - piece.start, piece.shared[BASE].device
        out = self._work.get("keep", n, device=device)
        key = (self.seed, self.drop_rate, model, piece.name, piece.start, piece.stop)
        packed = self._drops.get(key)
        if packed is not None:
            return unpack_kept(packed, n, out, self._work.get("planes", n + 8, torch.uint8, device))
        x, y = self._work.get("x", n + 8, torch.int32), self._work.get("y", n + 8, torch.int32)
        bits = dare_bits(piece.name, piece.start, piece.stop, model, self.seed, scratch=(x, y))
        kept = dare_kept(bits.to(device), self.drop_rate, out)
        if key in self._seen and self._drop_bytes + n // 8 + 1 <= self.DROP_CACHE_BYTES:
            m = -(-n // 8)  # packed on the CPU, where the hash is; kept where the merge runs
            slab = self._slab_bytes(m) if device.type == "cpu" else torch.empty(m, dtype=torch.uint8)
            self._drops[key] = pack_drops(x, n, self.drop_rate, slab, y).to(device)
            self._drop_bytes += self._drops[key].numel()
        self._seen.add(key)
        return kept

    def _slab_bytes(self, m: int) -> torch.Tensor:
        if not self._slabs or self._slabs[-1][1] + m > self._slabs[-1][0].numel():
            self._slabs.append([torch.empty(max(m, self.DROP_SLAB_BYTES), dtype=torch.uint8), 0])
        slab = self._slabs[-1]
        slab[1] += m
        return slab[0][slab[1] - m:slab[1]]

    def _compiled_merge(self, piece: Piece, coefficients) -> torch.Tensor:
        device = piece.shared[BASE].device
        keys = None
        if self.drop_rate > 0:
            keys = torch.tensor([dare_key(piece.name, i, self.seed) for i in range(len(piece.thetas))], device=device)
        thresholds = None
        if self.top_k is not None:
            key = piece.name if self.per_tensor else None
            thresholds = torch.tensor([self.thresholds[(i, key)] for i in range(len(piece.thetas))], device=device)
        return compiled_merge()([t.float() for t in piece.thetas], piece.shared[BASE].float(),
                                torch.tensor(list(coefficients), dtype=torch.float32, device=device), keys,
                                piece.start, dare_threshold(self.drop_rate), dare_rescale(self.drop_rate), thresholds)

    # -- TIES' trim: the magnitude of the top_k-th percent largest |τ| entry of each model ----------
    #: every SAMPLE_STRIDE-th entry of each piece (a prime, so rows of any usual width are sampled
    #: across their columns) brackets the threshold before the counting pass
    SAMPLE_STRIDE = 251
    #: half-width of the bracket in standard deviations of the sample's rank
    BRACKET_SIGMAS = 6.0
    #: screened entries held before those outside the bracket are dropped: comparing each piece's few
    #: costs mostly per-call overhead, and holding all until the end would hold several % of a model
    SCREENED_ENTRIES = 1 << 21

    def prepare(self, pieces, num_models) -> None:
        """The exact ``top_k``-th percent largest ``|τ_i|`` of each model (or tensor): a strided sample
        of ``|τ_i|`` brackets it, one pass counts the entries above the bracket and gathers the few
        inside it, and the threshold is read off those exactly. Should the sample miss (the bracket
        does not hold the rank), two passes over the float bits (a 2¹⁵- then a 2¹⁶-bin histogram) find it."""
        self.thresholds = {}
        if self.top_k is None:
            return
        samples: dict[tuple[int, str | None], list[torch.Tensor]] = {}
        counts: dict[tuple[int, str | None], int] = {}
        for piece in pieces():  # pass 1: a strided sample
            for i, tau in enumerate(self._sampled(piece)):
                key = (i, piece.name if self.per_tensor else None)
                samples.setdefault(key, []).append(tau)
                counts[key] = counts.get(key, 0) + piece.stop - piece.start
        keeps = {key: math.ceil(self.top_k / 100 * n) for key, n in counts.items()}
        brackets = {key: self._bracket(torch.cat(samples[key]), keeps[key] / counts[key])
                    for key in counts if 0 < keeps[key] < counts[key]}
        self.thresholds = {key: 0.0 for key in counts if key not in brackets}  # keep everything
        if not brackets:
            return
        above, inside_count = dict.fromkeys(brackets, 0), dict.fromkeys(brackets, 0)
        inside: dict[tuple[int, str | None], list[torch.Tensor]] = {key: [] for key in brackets}
        for piece in pieces():  # pass 2: how many above the bracket, and the entries inside it
            n, device = piece.stop - piece.start, piece.shared[BASE].device
            scratch = self._work.get("scratch", n, device=device)
            for i, tau in enumerate(self.task_vectors(piece)):
                key = (i, piece.name if self.per_tensor else None)
                if key not in brackets:
                    continue
                lo, hi = brackets[key]
                magnitude = tau.abs_()
                if lo == hi:  # one value fills the bracket (DARE's zeros): counting is enough
                    above[key] += _count(magnitude > hi)
                    inside_count[key] += _count(magnitude == lo)
                    continue
                if lo == 0:  # zeros in the bracket (τ_i = 0 where a model kept θ_0) are counted, not gathered
                    inside_count[key] += _count(magnitude == 0)
                count, screened = _screen(magnitude, _positive(lo), hi, scratch)
                above[key] += count
                inside[key].extend(screened)
                if sum(t.numel() for t in inside[key]) > self.SCREENED_ENTRIES:
                    inside[key] = [_in_bracket(inside[key], _positive(lo))]
        missed = {}
        for key, (lo, _) in brackets.items():
            rank = keeps[key] - above[key]  # of the threshold among the entries in [lo, hi]
            candidates = _in_bracket(inside[key], _positive(lo)) if inside[key] else torch.empty(0)
            if 0 < rank <= candidates.numel():
                self.thresholds[key] = float(torch.topk(candidates, rank, sorted=False).values.min())
            elif 0 < rank <= candidates.numel() + inside_count[key]:  # among the entries equal to lo
                self.thresholds[key] = lo
            else:
                missed[key] = keeps[key]
        if missed:
            self.thresholds.update(self._histogram_thresholds(pieces, missed))

    def _sampled(self, piece: Piece) -> list[torch.Tensor]:
        stride = self.SAMPLE_STRIDE
        if self.drop_rate > 0:  # DARE'd vectors: the sample must see the same drops
            return [tau[::stride].abs() for tau in self.task_vectors(piece)]
        base = piece.shared[BASE][::stride]
        return [(theta[::stride] - base).abs_() for theta in piece.thetas]

    def _bracket(self, sample: torch.Tensor, share: float) -> tuple[float, float]:
        """``[lo, hi]`` that holds the entry of rank ``share · n`` from the top with near certainty: the
        sample's order statistics ``BRACKET_SIGMAS`` binomial standard deviations either side of it."""
        m = sample.numel()
        spread = self.BRACKET_SIGMAS * math.sqrt(m * share * (1 - share)) + 2
        top_rank = share * m  # 1-based rank from the top within the sample
        lo_rank, hi_rank = math.ceil(top_rank + spread), math.floor(top_rank - spread)
        top = torch.topk(sample, min(lo_rank, m), sorted=False).values  # hi_rank ≤ lo_rank: both in it
        lo = float(top.min()) if lo_rank <= m else 0.0
        hi = float(torch.kthvalue(top, top.numel() - hi_rank + 1).values) if hi_rank >= 1 else math.inf
        return lo, hi

    def _histogram_thresholds(self, pieces, keeps: dict) -> dict:
        hi: dict[tuple[int, str | None], torch.Tensor] = {}
        for piece in pieces():  # how many entries in each of the 2¹⁵ top bins of |τ|'s float bits
            for i, tau in enumerate(self.task_vectors(piece)):
                key = (i, piece.name if self.per_tensor else None)
                if key in keeps:
                    bits = tau.abs_().view(torch.int32)
                    hi[key] = hi.get(key, 0) + torch.bincount(bits >> 16, minlength=_HI_BINS)
        wanted = {key: _top_bin(hi[key], keep) for key, keep in keeps.items()}
        lo: dict[tuple[int, str | None], torch.Tensor] = {}
        for piece in pieces():  # within the bin that holds the threshold, the 2¹⁶ low bits
            for i, tau in enumerate(self.task_vectors(piece)):
                key = (i, piece.name if self.per_tensor else None)
                if key not in wanted:
                    continue
                bits = tau.abs_().view(torch.int32)
                inside = bits[(bits >> 16) == wanted[key][0]]
                lo[key] = lo.get(key, 0) + torch.bincount(inside & 0xFFFF, minlength=_LO_BINS)
        thresholds = {}
        for key, (top, rank) in wanted.items():
            low, _ = _top_bin(lo[key], rank)
            thresholds[key] = float(torch.tensor([(top << 16) | low], dtype=torch.int32).view(torch.float32))
        return thresholds

    def merge(self, piece: Piece, coefficients, target, out) -> None:
        if self.compile:
            out.copy_(self._compiled_merge(piece, coefficients))
            return
        base = piece.shared[BASE]
        if self.top_k is None:  # task arithmetic: θ_0 + Σ λ_i τ_i (DARE'd: Σ λ_i/(1 − p) · kept_i · τ_i)
            tau = self._work.get("tau0", len(out), device=out.device)
            total = base  # the first term is added to θ_0 on its way into out: no copy of θ_0 first
            for i, (lam, theta) in enumerate(zip(coefficients, piece.thetas)):
                if not lam:
                    continue
                torch.sub(theta, base, out=tau)
                if self.drop_rate > 0:  # the drop and both scales in one pass
                    torch.addcmul(total, tau, self._kept(piece, i), value=lam * dare_rescale(self.drop_rate), out=out)
                else:
                    torch.add(total, tau, alpha=lam, out=out)
                total = out
            if total is base:  # every λ_i = 0
                out.copy_(base)
            return
        vectors = self.task_vectors(piece)
        # TIES: trim to the top-k% magnitudes, elect the sign of Σ λ_i τ̂_i, mean over the agreeing entries.
        # Float arithmetic only: on CPU a bool mask in float arithmetic is first copied to a float tensor.
        # Each pass over the piece costs about as much as any other, so the first model's terms are
        # written where the sums start instead of into zeroed buffers.
        n, device = len(out), out.device
        elected, scratch = self._work.get("elected", n, device=device), self._work.get("scratch", n, device=device)
        count = self._work.get("count", n, device=device)
        for i, (lam, tau) in enumerate(zip(coefficients, vectors)):
            threshold = self.thresholds[(i, piece.name if self.per_tensor else None)]
            torch.hardshrink(tau, _below(threshold), out=tau).mul_(lam)  # λ_i τ̂_i: |τ_i| ≥ threshold kept
        torch.add(vectors[0], vectors[1], out=elected)
        for tau in vectors[2:]:
            elected.add_(tau)
        elected.sign_()  # γ
        # λ_i τ̂_i · γ > 0 where the entry agrees: its magnitude, else 0 after relu
        merged = torch.mul(vectors[0], elected, out=out).relu_()  # out holds the sum until the last step
        torch.sign(merged, out=count)
        for tau in vectors[1:]:
            agreeing = torch.mul(tau, elected, out=scratch).relu_()
            merged.add_(agreeing)
            count.add_(agreeing.sign_())
        # Σ over agreeing λ_i τ̂_i = γ Σ |λ_i τ̂_i| (a sum of same-signed terms, negated exactly)
        torch.addcdiv(base, merged.mul_(elected), count.clamp_(min=1), out=out)


def _below(threshold: float) -> float:
    """The largest float32 below ``threshold``: ``hardshrink(τ, it)`` keeps exactly ``|τ| ≥ threshold``."""
    value = torch.tensor(threshold, dtype=torch.float32)
    return float(torch.nextafter(value, torch.tensor(-math.inf)))


class TaskArithmetic(_TaskVectorMerge):
    """Task arithmetic (Ilharco et al., ICLR 2023, *Editing Models with Task Arithmetic*, §2, eq. 1):
    ``θ = θ_0 + λ Σ_i τ_i`` with ``τ_i = θ_i − θ_0``; per-model scales ``λ_i`` generalize the shared ``λ``.
    Needs ``base``: the pre-trained model the fine-tuned ones started from."""

    def __init__(self, name: str = "task_arithmetic") -> None:
        super().__init__(name)


class TiesMerging(_TaskVectorMerge):
    """TIES-Merging (Yadav et al., NeurIPS 2023, §3, Algorithm 1): (1) trim each task vector to its
    ``top_k`` percent largest magnitudes (over the whole body, as in the paper; ``per_tensor`` per
    tensor), (2) elect each entry's sign ``γ = sgn(Σ_i λ_i τ̂_i)`` (the larger total mass), (3) average
    ``λ_i τ̂_i`` over the models that agree with ``γ`` (the disjoint mean), ``θ = θ_0 + τ_m``. With one
    shared scale this is the paper's ``θ_0 + λ τ_m``. Entries tied with the k-th largest magnitude are
    all kept. Needs ``base``. ``compile: true`` fuses each piece's merge into one loop with
    ``torch.compile`` (:func:`fused_merge`; needs a C++ compiler, compiles once in about 10–20 s, then
    about 2× faster per λ on CPU); streamed and in-memory merges run the same code, so they stay equal."""

    def __init__(self, top_k: Percent = 20.0, per_tensor: bool = False, compile: bool = False,
                 name: str = "ties") -> None:
        super().__init__(name, top_k=top_k, per_tensor=per_tensor, compile=compile)


class DareMerge(_TaskVectorMerge):
    """DARE (Yu et al., ICML 2024, *Language Models are Super Mario*, §4.1, eq. 2): drop each task-vector
    entry with probability ``drop_rate`` and rescale the rest by ``1/(1 − drop_rate)``, then combine with
    ``task_arithmetic`` or ``ties`` (TIES' ``top_k`` and ``per_tensor``). Seeded: the same ``seed`` drops
    the same entries in every run and path. Needs ``base``. ``compile``: as for :class:`TiesMerging`."""

    def __init__(self, drop_rate: DropRate = 0.9, seed: int = 0,
                 combine: Literal["task_arithmetic", "ties"] = "task_arithmetic", top_k: Percent = 20.0,
                 per_tensor: bool = False, compile: bool = False, name: str | None = None) -> None:
        ties = combine == "ties"
        super().__init__(name or ("dare_ties" if ties else "dare"), top_k=top_k if ties else None,
                         per_tensor=per_tensor, drop_rate=drop_rate, seed=seed, compile=compile)
