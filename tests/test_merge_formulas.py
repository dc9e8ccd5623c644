"""The merge formulas against hand-computed values and a slow element-by-element reference."""

import pytest
import torch

from lightning_merge.merging import fisher_merge, isotropic_merge, merge_bodies, normalize_coefficients


def slow_fisher_merge(thetas, fishers, lam):
    """Eq. 4 one element at a time."""
    out = torch.empty_like(thetas[0], dtype=torch.float64)
    for j in range(thetas[0].numel()):
        num = sum(c * f.flatten()[j].item() * t.flatten()[j].item() for c, t, f in zip(lam, thetas, fishers))
        den = sum(c * f.flatten()[j].item() for c, f in zip(lam, fishers))
        out.view(-1)[j] = num / den
    return out


def test_hand_computed_values():
    lam = normalize_coefficients([1, 3], 2)  # -> 0.25, 0.75
    a, b = torch.tensor([1.0, 2.0]), torch.tensor([3.0, 4.0])
    torch.testing.assert_close(isotropic_merge([a, b], lam), torch.tensor([2.5, 3.5]))
    # θ = 1 and 3, F = 1 and 3, λ = ½: (½·1·1 + ½·3·3) / (½·1 + ½·3) = 2.5
    merged = fisher_merge([torch.tensor([1.0]), torch.tensor([3.0])], [torch.tensor([1.0]), torch.tensor([3.0])],
                          normalize_coefficients([1, 1], 2))
    torch.testing.assert_close(merged, torch.tensor([2.5]))


def test_three_models_match_the_slow_reference():
    g = torch.Generator().manual_seed(0)
    thetas = [torch.randn(4, 5, generator=g) for _ in range(3)]
    fishers = [torch.rand(4, 5, generator=g) + 0.01 for _ in range(3)]
    lam = normalize_coefficients([0.2, 0.5, 0.3], 3)
    torch.testing.assert_close(fisher_merge(thetas, fishers, lam).double(),
                               slow_fisher_merge(thetas, fishers, lam.tolist()), rtol=1e-6, atol=1e-7)


def test_equal_fishers_equal_isotropic_and_target_only_is_exact():
    g = torch.Generator().manual_seed(1)
    thetas = [torch.randn(7, generator=g) for _ in range(2)]
    same = torch.rand(7, generator=g) + 0.1
    lam = normalize_coefficients([0.3, 0.7], 2)
    torch.testing.assert_close(fisher_merge(thetas, [same, same], lam), isotropic_merge(thetas, lam))
    one = normalize_coefficients([1, 0], 2)
    assert torch.equal(fisher_merge(thetas, [same, same * 5], one), thetas[0])
    assert torch.equal(isotropic_merge(thetas, one), thetas[0])


def test_floor_fallback_target_and_isotropic():
    thetas = [torch.tensor([1.0, 1.0]), torch.tensor([3.0, 3.0])]
    fishers = [torch.tensor([0.0, 1.0]), torch.tensor([1e-9, 1.0])]  # element 0: all below the floor
    lam = normalize_coefficients([0.5, 0.5], 2)
    torch.testing.assert_close(fisher_merge(thetas, fishers, lam, floor=1e-6, fallback="target", target=1),
                               torch.tensor([3.0, 2.0]))
    torch.testing.assert_close(fisher_merge(thetas, fishers, lam, floor=1e-6, fallback="isotropic"),
                               torch.tensor([2.0, 2.0]))


def test_normalization_uses_each_models_global_norm():
    states = [{"w": torch.tensor([0.0, 0.0]), "b": torch.tensor([0.0])},
              {"w": torch.tensor([4.0, 4.0]), "b": torch.tensor([4.0])}]
    fishers = [{"w": torch.tensor([3.0, 0.0]), "b": torch.tensor([4.0])},  # norm 5
               {"w": torch.tensor([30.0, 0.0]), "b": torch.tensor([40.0])}]  # norm 50
    raw = merge_bodies(states, [0.5, 0.5], fishers)
    normalized = merge_bodies(states, [0.5, 0.5], fishers, normalize=True)
    torch.testing.assert_close(raw["b"], torch.tensor([4.0 * 40 / 44]))
    torch.testing.assert_close(normalized["b"], torch.tensor([2.0]))  # both weigh 0.8 after normalizing


def test_heads_are_left_out_of_the_merge():
    states = [{"body": torch.ones(2), "classifier.weight": torch.ones(2, 4)},
              {"body": torch.zeros(2), "classifier.weight": torch.ones(3, 4)}]
    merged = merge_bodies(states, [0.5, 0.5], head_names={"classifier.weight"})
    assert set(merged) == {"body"}
    torch.testing.assert_close(merged["body"], torch.full((2,), 0.5))


@pytest.mark.parametrize("coefficients,message", [([1.0], "1 merging coefficients for 2 models"),
                                                  ([-0.1, 1.1], "must be finite and >= 0"),
                                                  ([0.0, 0.0], "all zero")])
def test_bad_coefficients(coefficients, message):
    with pytest.raises(ValueError, match=message):
        normalize_coefficients(coefficients, 2)


def test_bad_inputs_name_the_offending_tensors():
    a = {"x": torch.ones(2), "y": torch.ones(3)}
    with pytest.raises(ValueError, match=r"1 tensors only in model 0 \(e.g. \['y'\]\)"):
        merge_bodies([a, {"x": torch.ones(2)}], [1, 1])
    with pytest.raises(ValueError, match="'y' has different shapes across models"):
        merge_bodies([a, {"x": torch.ones(2), "y": torch.ones(4)}], [1, 1])
    good = {"x": torch.ones(2), "y": torch.ones(3)}
    with pytest.raises(KeyError, match=r"model 1 fisher has no entry for \['y'\]"):
        merge_bodies([a, a], [1, 1], [good, {"x": torch.ones(2)}])
    for bad, what in ((float("nan"), "NaN or Inf"), (-1.0, "negative")):
        broken = {"x": torch.tensor([1.0, bad]), "y": torch.ones(3)}
        with pytest.raises(ValueError, match=f"model 0 fisher: 'x' has {what}"):
            merge_bodies([a, a], [1, 1], [broken, good])
