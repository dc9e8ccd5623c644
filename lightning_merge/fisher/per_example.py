"""Per-example squared gradients for a whole batch, rebuilt from layer inputs and output gradients.

The square in the Fisher (NeurIPS paper eq. 2) is *per example*; squaring the gradient of a
batch-summed loss is a different, wrong quantity. Looping over examples is exact but slow, and
``torch.func.vmap`` was slower still on CPU. Instead, forward hooks keep each layer's input and
output; parameters are frozen (so autograd skips the weight-gradient GEMMs); ``autograd.grad`` is
taken with respect to the layer *outputs*; each example's parameter gradient is then rebuilt:

* ``nn.Linear`` (and layers a backbone declares as transposed linears, GPT-2's ``Conv1D``, whose
  weight is ``(in, out)``): ``G_b = Σ_t g_bt ⊗ x_bt`` (one batched product, or on CPU one product per example
  over the rows where ``g_b`` is not zero: :mod:`~lightning_merge.fisher.zero_rows`), bias ``Σ_t g_bt``;
  with one row per example (an MLP, a pooler, a head, or a last layer where only [CLS] carries
  gradient) ``G_b`` is rank one and ``Σ_b G_b∘G_b = (g∘g)ᵀ(x∘x)``, a single product;
* ``nn.LayerNorm``: ``Σ_t g_bt ⊙ x̂_bt`` with ``x̂`` the normalized input, bias ``Σ_t g_bt``;
* ``nn.Embedding``: an ``index_add`` per (example, token id) pair;
* ``nn.Conv2d`` patch embeddings (stride = kernel): a Linear over unfolded patches;
* parameters a backbone says are added to a module's output (``added_parameters``: a ViT's
  ``pos_embed`` and ``cls_token`` before ``pos_drop``): the gradient at that output.

Inputs that are broadcast over the batch (BERT's default ``(1, T)`` position ids) are expanded to
``(B, ...)`` in the hook, so every captured gradient is an example's own. A parameter that no rule
covers is an error, never a silent zero.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from lightning_merge.backbones.mask_sites import AddedParameter
from lightning_merge.fisher.zero_rows import active_prefix_lengths, freeze


class _Site:
    """One place in the model whose per-example parameter gradients we can rebuild."""

    def __init__(self, module: nn.Module, params: dict[str, str]) -> None:
        self.module, self.params = module, params  # params: local attribute -> full parameter name
        self.workspace = _Workspace()  # the engine gives all its sites one shared workspace
        self.clear()

    def record(self, inputs: torch.Tensor, output: torch.Tensor, batch_size: int) -> torch.Tensor:
        if self.output is not None:
            raise RuntimeError(f"{type(self.module).__name__} ran twice in one forward; shared modules are "
                               "not supported by the per-example Fisher")
        if output.shape[0] != batch_size and output.shape[0] == 1:
            output = output.expand(batch_size, *output.shape[1:])  # broadcast → per-example gradients
            inputs = inputs.expand(batch_size, *inputs.shape[1:]) if inputs is not None else None
        if not output.requires_grad:
            output.requires_grad_()  # a leaf: everything upstream is frozen
        self.input, self.output = (None if inputs is None else inputs.detach()), output
        return output

    def clear(self) -> None:
        self.input = self.output = None

    def accumulate(self, grad: torch.Tensor, sums: dict[str, torch.Tensor]) -> None:
        """Add Σ_b (per-example gradient)² of this site's parameters to ``sums``, in place."""
        raise NotImplementedError



class _Workspace:
    """One scratch buffer shared by all sites (they run one after another) and reused across batches
    and directions: fresh large allocations (page faults) cost more than the arithmetic here."""

    def __init__(self) -> None:
        self.buffer: torch.Tensor | None = None

    def get(self, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
        n = _numel(shape)
        b = self.buffer
        if b is None or b.numel() < n or b.dtype != like.dtype or b.device != like.device:
            b = self.buffer = torch.empty(n, dtype=like.dtype, device=like.device)
        return b[:n].view(shape)

    def release(self) -> None:
        self.buffer = None


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _add_bias(params: dict[str, str], g: torch.Tensor, sums: dict[str, torch.Tensor]) -> None:
    """Bias gradient of example b is Σ_t g_bt (g is (B, T, out))."""
    if "bias" in params:
        sums[params["bias"]].add_(g.sum(1).square_().sum(0))


class _LinearSite(_Site):
    #: the weight is stored ``(in, out)`` (GPT-2's ``Conv1D``: ``y = x W + b``), not ``(out, in)``
    transposed = False

    def accumulate(self, grad, sums):
        x, g = self.input, grad
        x = x.reshape(x.shape[0], -1, x.shape[-1]).to(g.dtype)
        g = g.reshape(g.shape[0], -1, g.shape[-1])
        if "weight" in self.params:  # else a tie accumulates it (see _TiedEmbeddingLinear)
            target = sums[self.params["weight"]]
            lengths = active_prefix_lengths(g)
            # G_b = Σ_t a_btᵀ ⊗ c_bt in the weight's own layout: (g, x) for (out, in), (x, g) for (in, out)
            a, c = (x, g) if self.transposed else (g, x)
            if g.shape[1] == 1 or (lengths is not None and max(lengths) <= 1):
                # One row per example (no sequence, or only [CLS] carries gradient): G_b = a_b c_bᵀ is
                # rank one, so Σ_b G_b∘G_b = (a∘a)ᵀ(c∘c): one GEMM, no (B, out, in) tensor.
                target.add_(torch.mm(a[:, 0].square().T, c[:, 0].square()))
            elif lengths is None:
                per_example = self.workspace.get((g.shape[0], a.shape[-1], c.shape[-1]), g)
                torch.bmm(a.transpose(1, 2), c, out=per_example)
                target.add_(per_example.square_().sum(0))
            else:
                per_example = self.workspace.get((a.shape[-1], c.shape[-1]), g)
                for b, length in enumerate(lengths):
                    if length:
                        torch.mm(a[b, :length].T, c[b, :length], out=per_example)
                        target.addcmul_(per_example, per_example)
        _add_bias(self.params, g, sums)


class _TransposedLinearSite(_LinearSite):
    transposed = True


class _LayerNormSite(_Site):
    def clear(self) -> None:
        super().clear()
        self.normalized = None

    def accumulate(self, grad, sums):
        g = grad.reshape(grad.shape[0], -1, grad.shape[-1])
        if self.normalized is None:  # once per batch, shared by every direction
            x = self.input
            self.normalized = F.layer_norm(x, x.shape[-1:], eps=self.module.eps).reshape(g.shape)
        normalized = self.normalized.to(g.dtype)
        if "weight" in self.params:
            sums[self.params["weight"]].add_((g * normalized).sum(1).square_().sum(0))
        _add_bias(self.params, g, sums)


class _EmbeddingSite(_Site):
    def accumulate(self, grad, sums):
        if "weight" not in self.params:  # tied: accumulated by _TiedEmbeddingLinear
            return
        m = self.module
        ids = self.input.reshape(self.input.shape[0], -1)
        g = grad.reshape(ids.shape[0], ids.shape[1], -1)
        if m.padding_idx is not None:
            g = g.masked_fill((ids == m.padding_idx).unsqueeze(-1), 0)  # autograd gives that row no gradient
        rows = m.num_embeddings
        # One gradient row per (example, token id) pair: a token repeated within an example adds up
        # before squaring, as in that example's own gradient.
        keys = (torch.arange(ids.shape[0], device=ids.device)[:, None] * rows + ids).reshape(-1)
        unique, inverse = torch.unique(keys, return_inverse=True)
        per_pair = torch.zeros(unique.numel(), g.shape[-1], dtype=g.dtype, device=g.device)
        per_pair.index_add_(0, inverse, g.reshape(-1, g.shape[-1]))
        target = sums[self.params["weight"]]
        target.index_add_(0, unique % rows, per_pair.square_().to(target.dtype))


class _PatchConvSite(_Site):
    def accumulate(self, grad, sums):
        m = self.module
        patches = F.unfold(self.input, m.kernel_size, stride=m.stride).to(grad.dtype)  # (B, C·k·k, L)
        g = grad.reshape(grad.shape[0], grad.shape[1], -1)  # (B, D, L)
        per_example = torch.bmm(g, patches.transpose(1, 2))  # (B, D, C·k·k)
        weight = sums[self.params["weight"]]
        weight.add_(per_example.square_().sum(0).reshape(weight.shape))
        if "bias" in self.params:
            sums[self.params["bias"]].add_(g.sum(-1).square_().sum(0))


class _AddedParameterSite(_Site):
    """Parameters added to this module's output: an example's gradient of one is the output gradient at
    the positions it was added to (``tokens``: parameter name -> leading positions, ``None`` for all)."""

    def __init__(self, module: nn.Module, added: Sequence[AddedParameter]) -> None:
        super().__init__(module, {a.parameter: a.parameter for a in added})
        self.tokens = {a.parameter: a.tokens for a in added}

    def accumulate(self, grad, sums):
        for name, tokens in self.tokens.items():
            g = grad if tokens is None else grad[:, :tokens]
            sums[name].add_(g.square().sum(0, keepdim=True).reshape(sums[name].shape))


class _TiedEmbeddingLinear:
    """A weight used both as an embedding table and as a linear layer (a masked-LM decoder tied to the
    word embeddings). An example's gradient is the sum of both uses, squared only after summing:
    ``G_b = Σ_t g_bt x_btᵀ`` from the decoder plus, in row ``id``, the embedding-output gradients of
    the example's tokens with that id. Examples go through in chunks to bound the ``(V, H)`` temporaries."""

    CHUNK_BYTES = 1 << 28

    def __init__(self, name: str, embedding: _EmbeddingSite, linear: _LinearSite) -> None:
        self.name, self.embedding, self.linear = name, embedding, linear

    def accumulate(self, grads: dict, sums: dict[str, torch.Tensor]) -> None:
        g_lin, g_emb = grads.get(self.linear), grads.get(self.embedding)
        if g_lin is None and g_emb is None:
            return
        target = sums[self.name]
        rows, width = target.shape
        like = g_lin if g_lin is not None else g_emb
        batch = like.shape[0]
        if g_lin is not None:
            x = self.linear.input.reshape(batch, -1, width).to(g_lin.dtype)
            g_lin = g_lin.reshape(batch, -1, rows)
        if g_emb is not None:
            ids = self.embedding.input.reshape(batch, -1)
            g_emb = g_emb.reshape(batch, ids.shape[1], width)
            if self.embedding.module.padding_idx is not None:
                g_emb = g_emb.masked_fill((ids == self.embedding.module.padding_idx).unsqueeze(-1), 0)
        chunk = max(1, self.CHUNK_BYTES // (rows * width * like.element_size()))
        for start in range(0, batch, chunk):
            stop = min(start + chunk, batch)
            if g_lin is not None:
                per_example = torch.bmm(g_lin[start:stop].transpose(1, 2), x[start:stop])  # (c, V, H)
            else:
                per_example = torch.zeros(stop - start, rows, width, dtype=like.dtype, device=like.device)
            if g_emb is not None:
                offsets = torch.arange(stop - start, device=ids.device)[:, None] * rows
                per_example.view(-1, width).index_add_(0, (offsets + ids[start:stop]).reshape(-1),
                                                       g_emb[start:stop].reshape(-1, width))
            target.add_(per_example.square_().sum(0).to(target.dtype))


def _site_class(module: nn.Module, has_params: bool, transposed_linear: tuple[type, ...] = ()):
    if isinstance(module, nn.Linear):
        return _LinearSite
    if transposed_linear and isinstance(module, transposed_linear):
        return _TransposedLinearSite
    if isinstance(module, nn.LayerNorm) and has_params:
        return _LayerNormSite
    if isinstance(module, nn.Embedding):
        return _EmbeddingSite
    if isinstance(module, nn.Conv2d) and has_params:
        return _PatchConvSite
    return None


def _sites(model: nn.Module, added_parameters: Sequence[AddedParameter] = (),
           transposed_linear: tuple[type, ...] = ()) -> tuple[list[_Site], list[_TiedEmbeddingLinear]]:
    """Every site, and the ties between them. A parameter reached through a module that computes
    nothing with it (BERT's ``cls.predictions.bias``, used by the decoder) belongs to its user."""
    canonical = {id(p): n for n, p in model.named_parameters()}  # tied parameters appear once here
    claimed: dict[int, tuple[_Site, str]] = {}
    sites: list[_Site] = []
    ties: list[_TiedEmbeddingLinear] = []
    for prefix, module in model.named_modules():
        trainable = {n: p for n, p in module.named_parameters(recurse=False) if p.requires_grad}
        kind = _site_class(module, bool(trainable), transposed_linear)
        if kind is not None:
            site = kind(module, {})
            for n, p in trainable.items():
                if id(p) not in claimed:
                    claimed[id(p)] = (site, n)
                    site.params[n] = canonical[id(p)]
                    continue
                first, first_local = claimed[id(p)]
                pair = {type(first), type(site)}
                if pair != {_EmbeddingSite, _LinearSite} or {first_local, n} != {"weight"}:
                    raise NotImplementedError(
                        f"parameter {canonical[id(p)]!r} is shared by {type(first.module).__name__} and "
                        f"{prefix}; only an embedding tied to a linear layer is supported")
                del first.params[first_local]  # squared after the sum, by the tie
                embedding, linear = (first, site) if isinstance(first, _EmbeddingSite) else (site, first)
                ties.append(_TiedEmbeddingLinear(canonical[id(p)], embedding, linear))
            sites.append(site)
            continue
    modules = dict(model.named_modules())
    by_module: dict[str, list[AddedParameter]] = {}
    for added in added_parameters:
        by_module.setdefault(added.module, []).append(added)
    for module_name, group in by_module.items():
        sites.append(_AddedParameterSite(modules[module_name], group))
    for site in sites:
        _check_supported(site)
    return sites, ties


def _check_supported(site: _Site) -> None:
    m = site.module
    if isinstance(site, _LayerNormSite) and len(m.normalized_shape) != 1:
        raise NotImplementedError(f"{type(m).__name__}: LayerNorm over several dims")
    if isinstance(site, _PatchConvSite) and (m.stride != m.kernel_size or m.padding not in (0, (0, 0))
                                             or m.groups != 1):
        raise NotImplementedError("only patch-embedding convolutions (stride = kernel) are supported")


class PerExampleSquaredGradients:
    """Accumulates ``Σ_examples Σ_directions (∂(z·v)/∂θ)²`` for every trainable parameter of ``model``.

    Use: ``with engine.capture(batch_size): logits = model(...)``, then ``engine.accumulate(logits, V)``
    with ``V`` of shape ``(K, B, C)`` (see :mod:`lightning_merge.fisher.directions`). Parameters are
    frozen while the engine is attached and restored by :meth:`detach`. ``added_parameters``: what the
    backbone says is added to a module's output (:meth:`Backbone.added_parameters`);
    ``transposed_linear``: module types computing ``x W + b`` with ``W`` stored ``(in, out)``
    (:attr:`Backbone.transposed_linear`, GPT-2's ``Conv1D``).
    """

    def __init__(self, model: nn.Module, accumulate_dtype: torch.dtype = torch.float32,
                 added_parameters: Sequence[AddedParameter] = (), transposed_linear: tuple[type, ...] = ()) -> None:
        self.model = model
        self.names = [n for n, p in model.named_parameters() if p.requires_grad]
        self.sites, self.ties = _sites(model, added_parameters, tuple(transposed_linear))
        self.workspace = _Workspace()
        for site in self.sites:
            site.workspace = self.workspace
        covered = {name for site in self.sites for name in site.params.values()} | {t.name for t in self.ties}
        missing = [n for n in self.names if n not in covered]
        if missing:
            raise NotImplementedError(f"No per-example gradient rule for parameters {missing[:8]}"
                                      f"{' ...' if len(missing) > 8 else ''}")
        params = dict(model.named_parameters())
        self.sums = {n: torch.zeros(params[n].shape, dtype=accumulate_dtype, device=params[n].device)
                     for n in self.names}
        self._unfreeze = freeze(model)
        self._batch_size = 0
        self._handles = [s.module.register_forward_hook(self._hook(s)) for s in self.sites]

    def _hook(self, site: _Site) -> Callable:
        def hook(module, args, output):
            inputs = args[0] if args else None
            return site.record(inputs, output, self._batch_size)
        return hook

    @contextmanager
    def capture(self, batch_size: int) -> Iterator[None]:
        for site in self.sites:
            site.clear()
        self._batch_size = batch_size
        with torch.enable_grad():
            yield

    def accumulate(self, logits: torch.Tensor, directions: torch.Tensor) -> None:
        sites = [s for s in self.sites if s.output is not None]
        outputs = [s.output for s in sites]
        for k in range(directions.shape[0]):
            grads = torch.autograd.grad(logits, outputs, grad_outputs=directions[k],
                                        retain_graph=k < directions.shape[0] - 1, allow_unused=True)
            for site, grad in zip(sites, grads):
                if grad is not None:
                    site.accumulate(grad, self.sums)
            if self.ties:
                by_site = {site: grad for site, grad in zip(sites, grads) if grad is not None}
                for tie in self.ties:
                    tie.accumulate(by_site, self.sums)
        for site in self.sites:
            site.clear()

    def detach(self) -> None:
        self.workspace.release()
        for handle in self._handles:
            handle.remove()
        self._unfreeze()
