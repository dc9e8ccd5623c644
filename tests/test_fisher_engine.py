"""The fast per-example Fisher engine against a batch-1 loop over examples and labels."""

import pytest
import torch

from lightning_merge.backbones import HFTextClassifier, TimmViT
from lightning_merge.fisher import per_example, zero_rows
from lightning_merge.fisher.directions import exact_directions, logit_directions, sampled_directions
from lightning_merge.fisher.per_example import PerExampleSquaredGradients
from tests.fixtures import SENTENCES, TINY_VIT, write_tiny_bert
from tests.reference_fisher import reference_fisher_sums


def fast_sums(backbone, batch, variant, labels=None, num_samples=1, with_directions=False):
    engine = PerExampleSquaredGradients(backbone.model, added_parameters=backbone.added_parameters(),
                                        transposed_linear=backbone.transposed_linear)
    try:
        with engine.capture(len(batch["labels"])):
            logits = backbone(batch)
            directions = logit_directions(logits, variant, labels, num_samples,
                                          torch.Generator().manual_seed(0))
            engine.accumulate(logits, directions)
    finally:
        engine.detach()
    return (engine.sums, directions) if with_directions else engine.sums


def engine_and_loop(backbone, batch, variant):
    """The engine's sums over ``batch`` and the batch-1 reference's, for ``exact`` or one ``sampled``
    label per example (a sampled label's direction is e_y − p: the empirical Fisher at the label drawn)."""
    fast, directions = fast_sums(backbone, batch, variant, batch["labels"], with_directions=True)
    labels = batch["labels"] if variant == "exact" else directions[0].argmax(-1)
    slow = reference_fisher_sums(backbone.model, lambda i: backbone(slice_batch(batch, i)), len(batch["labels"]),
                                 "exact" if variant == "exact" else "empirical", labels)
    return fast, slow


def assert_matches(fast, slow, rtol=1e-5):
    scale = max(v.abs().max().item() for v in slow.values())
    for name, ref in slow.items():
        # Key biases have Fisher exactly 0 (softmax is shift invariant): compare those absolutely.
        if ref.abs().max() <= 1e-6 * scale:
            assert fast[name].abs().max() <= 1e-6 * scale, name
            continue
        err = ((fast[name].double() - ref).abs().max() / ref.abs().max()).item()
        assert err <= rtol, f"{name}: relative error {err:.2e}"


def bert_batch(backbone, n=5):
    texts = [SENTENCES[i % len(SENTENCES)] + " the" * i for i in range(n)]  # different lengths → padding
    batch = dict(backbone.tokenizer(texts, [SENTENCES[(i + 3) % 8] for i in range(n)], padding=True,
                                    return_tensors="pt"))
    batch["labels"] = torch.arange(n) % backbone.num_labels
    return batch


def ragged_batch(backbone):
    """Four examples: one twice as long as the others, which are mostly padding."""
    batch = bert_batch(backbone, n=4)
    long_text = backbone.tokenizer(" ".join(SENTENCES), return_tensors="pt", padding="max_length",
                                   max_length=batch["input_ids"].shape[1] * 2, truncation=True)
    width = long_text["input_ids"].shape[1]
    for key in ("input_ids", "token_type_ids", "attention_mask"):
        padded = torch.zeros(4, width, dtype=batch[key].dtype)
        padded[:, :batch[key].shape[1]] = batch[key]
        padded[0] = long_text[key][0]
        batch[key] = padded
    return batch


def slice_batch(batch, i):
    return {k: v[i:i + 1] for k, v in batch.items()}


@pytest.mark.parametrize("num_labels", [2, 3, 25])
def test_bert_exact_fisher_matches_per_example_loop(tmp_path, num_labels):
    torch.manual_seed(0)
    backbone = HFTextClassifier(str(write_tiny_bert(tmp_path, num_labels=num_labels))).eval().double()
    batch = bert_batch(backbone)
    slow = reference_fisher_sums(backbone.model, lambda i: backbone(slice_batch(batch, i)), 5)
    assert_matches(fast_sums(backbone, batch, "exact"), slow)


def test_bert_empirical_and_regression(tmp_path):
    backbone = HFTextClassifier(str(write_tiny_bert(tmp_path / "c", num_labels=3))).eval().double()
    batch = bert_batch(backbone)
    slow = reference_fisher_sums(backbone.model, lambda i: backbone(slice_batch(batch, i)), 5, "empirical",
                                 batch["labels"])
    assert_matches(fast_sums(backbone, batch, "empirical", batch["labels"]), slow)
    regression = HFTextClassifier(str(write_tiny_bert(tmp_path / "r", num_labels=1))).eval().double()
    slow = reference_fisher_sums(regression.model, lambda i: regression(slice_batch(batch, i)), 5)
    assert_matches(fast_sums(regression, batch, "exact"), slow)


def test_regression_empirical_fisher_uses_the_targets(tmp_path):
    """One output, Gaussian of unit variance: the empirical Fisher is Σ_i (y_i − z_i)² (∂z_i/∂θ)², checked
    against autograd of −(y − z)²/2 itself (the reference shares no code with the engine)."""
    regression = HFTextClassifier(str(write_tiny_bert(tmp_path, num_labels=1))).eval().double()
    batch = bert_batch(regression)
    targets = torch.tensor([0.0, 1.5, -2.0, 3.25, 0.5], dtype=torch.float64)
    batch["labels"] = targets
    slow = reference_fisher_sums(regression.model, lambda i: regression(slice_batch(batch, i)), 5, "empirical",
                                 targets)
    fast = fast_sums(regression, batch, "empirical", targets)
    assert_matches(fast, slow)
    exact = fast_sums(regression, batch, "exact")
    name = "classifier.weight"
    assert not torch.allclose(fast[name], exact[name])  # the targets matter (they were ignored before)


def test_regression_sampled_fisher_converges_to_exact(tmp_path):
    """``sampled`` for one output draws y ~ N(z, 1): directions ε/√k whose squares average to 1."""
    regression = HFTextClassifier(str(write_tiny_bert(tmp_path, num_labels=1))).eval().double()
    batch = bert_batch(regression)
    exact = fast_sums(regression, batch, "exact")
    sampled = fast_sums(regression, batch, "sampled", num_samples=4000)
    name = "classifier.weight"
    err = ((sampled[name] - exact[name]).abs().max() / exact[name].abs().max()).item()
    assert err < 0.1
    directions = logit_directions(torch.zeros(3, 1), "sampled", num_samples=4000,
                                  generator=torch.Generator().manual_seed(0))
    assert directions.shape == (4000, 3, 1) and abs(float(directions.pow(2).sum(0).mean()) - 1) < 0.05


@pytest.mark.parametrize("num_classes", [2, 3])
def test_vit_exact_fisher_matches_per_example_loop(num_classes):
    torch.manual_seed(0)
    backbone = TimmViT(num_classes=num_classes, **TINY_VIT).eval().double()
    batch = {"pixel_values": torch.randn(4, 3, 8, 8, dtype=torch.float64), "labels": torch.zeros(4).long()}
    slow = reference_fisher_sums(backbone.model, lambda i: backbone(slice_batch(batch, i)), 4)
    fast = fast_sums(backbone, batch, "exact")
    assert {"pos_embed", "cls_token", "patch_embed.proj.weight"} <= set(fast)
    assert_matches(fast, slow)


@pytest.mark.parametrize("skip_rows_below", [0.0, 2.0])
def test_skipping_zero_gradient_rows_changes_nothing(tmp_path, monkeypatch, skip_rows_below):
    """Per-example products over only the rows where the output gradient is non-zero (padding, and
    every position but [CLS] in the last layer) against the batched product over all rows: both match
    the loop, and the skipping path really ran on short prefixes."""
    backbone = HFTextClassifier(str(write_tiny_bert(tmp_path, num_labels=3))).eval().double()
    batch = ragged_batch(backbone)
    width = batch["input_ids"].shape[1]
    seen = []
    monkeypatch.setattr(zero_rows, "SKIP_ROWS_BELOW", skip_rows_below)
    monkeypatch.setattr(per_example, "active_prefix_lengths",
                        lambda g: seen.append(zero_rows.active_prefix_lengths(g)) or seen[-1])
    slow = reference_fisher_sums(backbone.model, lambda i: backbone(slice_batch(batch, i)), 4)
    assert_matches(fast_sums(backbone, batch, "exact"), slow)
    if skip_rows_below == 0.0:
        assert all(lengths is None for lengths in seen)
    else:
        per_token = [lengths for lengths in seen if lengths is not None]  # pooler, classifier: one row
        assert len(per_token) == 2 * 2 * 6  # 2 directions × 2 blocks × 6 token-wise linear layers
        assert min(min(lengths) for lengths in per_token) == 1  # the last layer: [CLS] only
        assert any(lengths[0] == width and max(lengths[1:]) <= width // 2 for lengths in per_token)  # padding


def test_squaring_a_batch_gradient_is_caught(tmp_path):
    """FusionBench-style (∇ of the batch-summed objective)² differs from eq. 2 — our check sees it."""
    backbone = HFTextClassifier(str(write_tiny_bert(tmp_path, num_labels=3))).eval().double()
    batch = bert_batch(backbone)
    slow = reference_fisher_sums(backbone.model, lambda i: backbone(slice_batch(batch, i)), 5)
    params = dict(backbone.model.named_parameters())
    log_p = torch.log_softmax(backbone(batch), -1)
    wrong = {n: torch.zeros_like(p) for n, p in params.items()}
    for c in range(3):
        grads = torch.autograd.grad((log_p[:, c].exp().detach() * log_p[:, c]).sum(), list(params.values()),
                                    retain_graph=True)
        for n, g in zip(params, grads):
            wrong[n] += g**2
    with pytest.raises(AssertionError, match="relative error"):
        assert_matches(wrong, slow)


def test_exact_directions_reproduce_the_label_covariance():
    logits = torch.randn(6, 4, dtype=torch.float64)
    v = exact_directions(logits)
    assert v.shape == (3, 6, 4)
    p = torch.softmax(logits, -1)
    covariance = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
    torch.testing.assert_close(torch.einsum("kbi,kbj->bij", v, v), covariance)


def test_sampled_converges_to_exact():
    torch.manual_seed(0)
    logits = torch.randn(3, 4, dtype=torch.float64)
    p = torch.softmax(logits, -1)
    covariance = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
    errors = []
    for k in (10, 10000):
        v = sampled_directions(logits, k, torch.Generator().manual_seed(1))
        errors.append((torch.einsum("kbi,kbj->bij", v, v) - covariance).abs().max().item())
    assert errors[1] < 0.02 and errors[1] < errors[0] / 5


def test_parameters_are_restored_after_detach(tiny_bert):
    backbone = HFTextClassifier(str(tiny_bert))
    engine = PerExampleSquaredGradients(backbone.model)
    assert not any(p.requires_grad for p in backbone.parameters())
    engine.detach()
    assert all(p.requires_grad for p in backbone.parameters())


def test_masked_lm_with_tied_decoder_matches_the_loop(tiny_bert, tmp_path):
    """A masked LM's decoder is tied to the word embeddings: each example's gradient of that weight
    is the sum of both uses, squared after summing. Empirical variant (true tokens at the masked
    positions), padded mask slots, against plain autograd one example at a time."""
    from lightning_merge.backbones.hf_mlm import HFMaskedLM
    from lightning_merge.data.masked_text import MaskedTextDataModule

    text = tmp_path / "text.txt"
    lines = [*SENTENCES, "the cat", " ".join(SENTENCES[:3])]  # 1 to 5 masked tokens: padded slots
    text.write_text("\n".join(lines) + "\n")
    backbone = HFMaskedLM(str(tiny_bert)).eval()
    decoder = backbone.model.get_output_embeddings()
    assert decoder.weight is backbone.model.get_input_embeddings().weight
    dm = MaskedTextDataModule(str(text), tokenizer=str(tiny_bert), mask_probability=0.3, max_predict_examples=None)
    dm.setup("predict")
    batch = dm.collate([dm.dataset[i] for i in range(len(dm.dataset))])
    assert (batch["labels"] == -100).any()  # examples with fewer masked tokens: padded slots
    n = len(batch["labels"])
    reference = reference_fisher_sums(backbone.model, lambda i: backbone({k: v[i:i + 1] for k, v in batch.items()}),
                                      n, "empirical", batch["labels"])
    engine = PerExampleSquaredGradients(backbone.model)
    with engine.capture(n):
        logits = backbone(batch)
        engine.accumulate(logits, logit_directions(logits, "empirical", batch["labels"]))
    engine.detach()
    name = "bert.embeddings.word_embeddings.weight"
    assert name in engine.sums and reference[name].abs().max() > 0
    assert_matches(engine.sums, reference, rtol=1e-5)


class _MLP(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(12, 9), torch.nn.Tanh(), torch.nn.Linear(9, 7),
                                       torch.nn.Tanh(), torch.nn.Linear(7, 3))

    def forward(self, x):
        return self.net(x)


@pytest.mark.parametrize("variant", ["exact", "sampled", "empirical"])
def test_mlp_rank_one_products_match_the_loop(monkeypatch, variant):
    """Layers without a sequence dimension go through (g∘g)ᵀ(x∘x) and still equal the loop, for each
    variant (a sampled label is the empirical Fisher at the label drawn: e_y − p peaks at y)."""
    torch.manual_seed(0)
    model = _MLP().double().eval()
    x = torch.randn(6, 12, dtype=torch.float64)
    labels = torch.tensor([0, 1, 2, 2, 1, 0])
    calls = []
    real = torch.mm
    monkeypatch.setattr(torch, "mm", lambda *a, **k: calls.append(1) or real(*a, **k))
    monkeypatch.setattr(torch, "bmm", None)  # no per-example (B, out, in) product at all
    engine = PerExampleSquaredGradients(model, accumulate_dtype=torch.float64)
    with engine.capture(6):
        logits = model(x)
        directions = logit_directions(logits, variant, labels, 1, torch.Generator().manual_seed(1))
        engine.accumulate(logits, directions)
    engine.detach()
    if variant == "sampled":
        labels = directions[0].argmax(-1)
    slow = reference_fisher_sums(model, lambda i: model(x[i:i + 1]), 6, "exact" if variant == "exact" else
                                 "empirical", labels)
    assert_matches(engine.sums, slow, rtol=1e-10 if variant == "exact" else 1e-6)  # e_y − p: p in float32
    assert len(calls) == 3 * len(directions)  # three layers: one product per direction each
