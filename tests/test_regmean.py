"""RegMean (Jin et al., ICLR 2023) against independent references: least squares on stacked inputs
(α = 1), the diagonal formula element by element (α = 0), the closed form with α in between; identical
models; streamed = in memory; bad input."""

import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file

from lightning_merge.merging import FlatMerger, RegMeanMerge, merge_safetensors
from lightning_merge.statistics import save_gram

SHAPES = {"a.weight": (5, 7), "a.bias": (5,), "b.weight": (3, 5), "norm.weight": (5,)}
LAYERS = {"a.weight": 7, "b.weight": 5}  # linear weight -> input size


def setup_models(n=3, rows=20, seed=0):
    """Models, and the inputs each layer saw (``X_i``), from which the Grams are taken."""
    g = torch.Generator().manual_seed(seed)
    states = [{k: torch.randn(s, generator=g, dtype=torch.float64).float() for k, s in SHAPES.items()}
              for _ in range(n)]
    inputs = [{w: torch.randn(rows + 3 * i, d, generator=g, dtype=torch.float64) for w, d in LAYERS.items()}
              for i in range(n)]
    grams = [{w: x.T @ x for w, x in xs.items()} for xs in inputs]
    return states, inputs, grams


def merged(states, grams, lam, alpha=1.0, chunk=1 << 19, **kwargs):
    body = {k: torch.Size(s) for k, s in SHAPES.items()}
    method = RegMeanMerge(alpha=alpha, **kwargs)
    return FlatMerger.from_states(method, states, body, {"gram": grams}, chunk=chunk)(lam)


def test_alpha_one_is_least_squares_on_stacked_inputs():
    states, inputs, grams = setup_models()
    lam = [0.2, 0.5, 0.3]
    out = merged(states, grams, lam, alpha=1.0, chunk=8)  # pieces of whole rows, several per weight
    for w in LAYERS:
        # min_W Σ_i λ_i ‖X_i W − X_i W_i‖²: stack √λ_i X_i against √λ_i X_i W_i (W = weightᵀ)
        a = torch.cat([lam_i ** 0.5 * x[w] for lam_i, x in zip(lam, inputs)])
        b = torch.cat([lam_i ** 0.5 * x[w] @ s[w].double().T for lam_i, x, s in zip(lam, inputs, states)])
        expected = torch.linalg.lstsq(a, b).solution.T
        torch.testing.assert_close(out[w].double(), expected, rtol=1e-5, atol=1e-5)
    for other in ("a.bias", "norm.weight"):  # not a linear weight: the λ-weighted average
        expected = sum(lam_i * s[other].double() for lam_i, s in zip(lam, states))
        torch.testing.assert_close(out[other].double(), expected, rtol=1e-6, atol=1e-6)


def test_alpha_zero_is_the_diagonal_formula_element_by_element():
    states, _, grams = setup_models()
    lam = [0.2, 0.5, 0.3]
    out = merged(states, grams, lam, alpha=0.0)
    for w, d in LAYERS.items():
        weight = states[0][w]
        for j in range(weight.shape[0]):  # output unit
            for k in range(d):  # input feature: weighted by each model's G_kk
                num = sum(lam[i] * float(grams[i][w][k, k]) * float(states[i][w][j, k]) for i in range(3))
                den = sum(lam[i] * float(grams[i][w][k, k]) for i in range(3))
                assert abs(float(out[w][j, k]) - num / den) <= 1e-5 * (1 + abs(num / den))


@pytest.mark.parametrize("rows", [512, 3], ids=["whole-grams", "gram-row-blocks"])
def test_alpha_between_is_the_closed_form(rows, monkeypatch):
    from lightning_merge.merging import regmean

    monkeypatch.setattr(regmean, "ROWS", rows)  # 3: Grams converted to float64 three rows at a time
    states, _, grams = setup_models()
    lam, alpha = [1 / 3] * 3, 0.6
    out = merged(states, grams, lam, alpha=alpha)
    for w, d in LAYERS.items():
        scaled = []
        for g in grams:
            gt = torch.empty(d, d, dtype=torch.float64)
            for r in range(d):
                for c in range(d):
                    gt[r, c] = g[w][r, c] * (1.0 if r == c else alpha)
            scaled.append(gt)
        total = sum(scaled)
        rhs = sum(gt @ s[w].double().T for gt, s in zip(scaled, states))
        expected = torch.linalg.solve(total, rhs).T
        torch.testing.assert_close(out[w].double(), expected, rtol=1e-5, atol=1e-5)


def test_identical_models_give_the_model():
    states, _, grams = setup_models()
    same = [states[0]] * 3
    out = merged(same, grams, [0.2, 0.5, 0.3], alpha=0.9)
    for name in SHAPES:
        torch.testing.assert_close(out[name], states[0][name], rtol=1e-6, atol=1e-6)


def write(tmp_path, states, grams):
    models, files = [], []
    for i, (state, gram) in enumerate(zip(states, grams)):
        save_file(state, tmp_path / f"m{i}.safetensors")
        save_gram(tmp_path / f"g{i}.safetensors", {w: g.float() for w, g in gram.items()},
                  {w: 1 for w in gram}, {w: w for w in gram}, {"num_examples": 1})
        models.append(tmp_path / f"m{i}.safetensors")
        files.append(tmp_path / f"g{i}.safetensors")
    return models, files


def test_streamed_equals_in_memory_bit_for_bit(tmp_path):
    states, _, grams = setup_models()
    models, files = write(tmp_path, states, grams)
    lam = [0.2, 0.5, 0.3]
    out = load_file(merge_safetensors(models, lam, tmp_path / "out.safetensors", RegMeanMerge(alpha=0.7),
                                      inputs={"gram": files}, chunk_elements=12))
    body = {k: torch.Size(s) for k, s in SHAPES.items()}
    stored = [{w: g.float() for w, g in gram.items()} for gram in grams]
    memory = FlatMerger.from_states(RegMeanMerge(alpha=0.7), states, body, {"gram": files}, chunk=12)(lam)
    from_tensors = FlatMerger.from_states(RegMeanMerge(alpha=0.7), states, body, {"gram": stored}, chunk=12)(lam)
    for name in SHAPES:
        assert torch.equal(out[name], memory[name]) and torch.equal(memory[name], from_tensors[name]), name


def test_singular_sums_average_with_a_warning_or_are_an_error():
    states, _, grams = setup_models(rows=2)  # 2 rows (and 5, 8): G of rank < 7 in some models
    for g in grams:  # feature 0 of layer a never active: a zero row and column in every Gram
        g["a.weight"][0, :] = 0
        g["a.weight"][:, 0] = 0
    lam = [0.2, 0.5, 0.3]
    with pytest.warns(UserWarning, match="'a.weight' is singular; that weight is averaged"):
        out = merged(states, grams, lam, alpha=0.5)
    expected = sum(lam_i * s["a.weight"].double() for lam_i, s in zip(lam, states))
    torch.testing.assert_close(out["a.weight"].double(), expected, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="'a.weight' is singular"):
        merged(states, grams, lam, alpha=0.5, singular="error")


def test_bad_input_is_named_before_any_arithmetic(tmp_path):
    states, _, grams = setup_models()
    with pytest.raises(ValueError, match=r"alpha=1.5\): the off-diagonal scale is in \[0, 1\]"):
        RegMeanMerge(alpha=1.5)
    lacking = [grams[0], grams[1], {"a.weight": grams[2]["a.weight"]}]
    with pytest.raises(ValueError, match=r"model 2 gram has no Gram for 1 layers .*'b.weight'"):
        merged(states, lacking, [1, 1, 1])
    wrong = [grams[0], grams[1], {**grams[2], "b.weight": torch.eye(4, dtype=torch.float64)}]
    with pytest.raises(ValueError, match="a Gram of another model or layer size"):
        merged(states, wrong, [1, 1, 1])
    with pytest.raises(ValueError, match="needs `gram` for every model"):
        merged(states, grams[:2] + [None], [1, 1, 1])
    models, files = write(tmp_path, states, grams)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(ValueError, match="coefficients"):
            merge_safetensors(models, [1, -1, 1], tmp_path / "out.safetensors", RegMeanMerge(),
                              inputs={"gram": files})
    assert not (tmp_path / "out.safetensors").exists()


def test_a_gram_of_another_checkpoint_is_refused(tmp_path):
    from lightning_merge.fisher.provenance import FINGERPRINT_KEY, fingerprint_tensors

    states, _, grams = setup_models()
    models, files = write(tmp_path, states, grams)
    other = {k: v + 1 for k, v in states[1].items()}  # same architecture, other weights
    save_gram(files[1], {w: g.float() for w, g in grams[1].items()}, {w: 1 for w in grams[1]},
              {w: w for w in grams[1]}, {"num_examples": 1, FINGERPRINT_KEY: fingerprint_tensors(other)})
    with pytest.raises(ValueError, match="fingerprint"):
        merge_safetensors(models, [1, 1, 1], tmp_path / "out.safetensors", RegMeanMerge(), inputs={"gram": files})
    assert not (tmp_path / "out.safetensors").exists()


def test_fisher_files_weight_the_other_parameters():
    states, _, grams = setup_models()
    g = torch.Generator().manual_seed(5)
    fishers = [{k: torch.rand(s, generator=g) for k, s in SHAPES.items()} for _ in range(3)]
    lam = [0.2, 0.5, 0.3]
    body = {k: torch.Size(s) for k, s in SHAPES.items()}
    out = FlatMerger.from_states(RegMeanMerge(alpha=0.6, fisher="fisher"), states, body,
                                 {"gram": grams, "fisher": fishers})(lam)
    plain = merged(states, grams, lam, alpha=0.6)
    for name in LAYERS:  # linear weights: RegMean either way
        assert torch.equal(out[name], plain[name])
    for name in ("a.bias", "norm.weight"):  # eq. 4, element by element
        for j in range(SHAPES[name][0]):
            num = sum(lam[i] * float(fishers[i][name][j]) * float(states[i][name][j]) for i in range(3))
            den = sum(lam[i] * float(fishers[i][name][j]) for i in range(3))
            assert abs(float(out[name][j]) - num / den) <= 1e-5 * (1 + abs(num / den))


def test_solved_rows_leave_float64_inputs_alone():
    """``regmean_rows`` builds its result in a copy of the first model's rows, even when they are float64."""
    from lightning_merge.merging.regmean import regmean_factor, regmean_rows

    g = torch.Generator().manual_seed(0)
    x = [torch.randn(40, 6, generator=g, dtype=torch.float64) for _ in range(2)]
    grams = [xi.T @ xi for xi in x]
    rows = [torch.randn(3, 6, generator=g, dtype=torch.float64) for _ in range(2)]
    before = [r.clone() for r in rows]
    merged = regmean_rows(rows, grams, [0.5, 0.5], 0.9, regmean_factor(grams, [0.5, 0.5], 0.9))
    assert all(torch.equal(r, b) for r, b in zip(rows, before))
    assert not torch.equal(merged, rows[0])
