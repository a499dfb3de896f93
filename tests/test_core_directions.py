"""Edit directions (SeFa, GANSpace, InterFaceGAN boundaries, prompt directions) and their files, on tiny seeded
generators and synthetic data with known answers (no host)."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch

from retrace.editing.directions import (
    BOUNDARY_METHODS,
    DIRECTION_SPACES,
    Direction,
    apply_direction,
    apply_prompt_direction,
    condition,
    fit_boundary,
    ganspace,
    interpolate,
    load_direction,
    parse_layers,
    prompt_direction,
    read_boundary_file,
    save_direction,
    sefa,
    style_mix,
    sweep,
)
from retrace.inversion.gan_latent import GanLatent, save_gan_latent
from stylegan_files import tiny_generator

pytestmark = pytest.mark.core


@pytest.fixture(scope="module")
def generators() -> dict[str, torch.nn.Module]:
    return {family: tiny_generator(family, seed=0) for family in ("stylegan2", "stylegan3")}


def randn(*shape: int, seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def unit(v: torch.Tensor) -> torch.Tensor:
    return v / v.norm()


def orthonormality_error(v: torch.Tensor) -> float:
    v = v.double()
    return float((v @ v.T - torch.eye(v.shape[0], dtype=torch.float64)).abs().max())


def shape_error(shape: tuple[int, ...]) -> str:
    """A pytest ``match`` pattern for a message naming ``shape``."""
    return re.escape(str(tuple(shape)))


# --- SeFa -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family,layers", [("stylegan2", "all"), ("stylegan2", "2-4"), ("stylegan3", "all"),
                                           ("stylegan3", "1-3")])
def test_sefa_is_the_svd_of_the_row_normalised_affines(generators, family: str, layers: str) -> None:
    G = generators[family]
    start, end = parse_layers(layers, G.num_ws)
    weights = [affine.weight for _, idx, affine in G.style_layers() if start <= idx < end]
    assert len(weights) >= 2
    count = 10
    vectors, values = sefa(weights, count)
    assert vectors.shape == (count, G.w_dim) and values.shape == (count,)
    assert vectors.dtype == torch.float32 and values.dtype == torch.float32
    # Measured: orthonormality error 2e-8 to 4e-8.
    assert orthonormality_error(vectors) <= 1e-5
    assert bool((values[:-1] >= values[1:]).all()), values
    # Deterministic sign: each vector's largest-magnitude component is positive.
    assert bool((vectors.gather(1, vectors.abs().argmax(1, keepdim=True)) > 0).all())

    # Independent: numpy SVD of the stacked matrix with unit rows; right singular vectors, eigenvalues = S^2.
    A = np.concatenate([w.detach().numpy().astype(np.float64) for w in weights])
    A /= np.linalg.norm(A, axis=1, keepdims=True)
    _, S, Vt = np.linalg.svd(A)
    assert np.all(np.diff(S[:count + 1]) < -1e-3 * S[0])  # distinct eigenvalues: the vectors are well defined
    cos = np.abs(np.sum(vectors.double().numpy() * Vt[:count], axis=1))
    # Measured: 1 - |cos| <= 2e-8, eigenvalues within 5e-8 relative.
    assert cos.min() >= 1 - 1e-5, cos
    np.testing.assert_allclose(values.double().numpy(), S[:count] ** 2, rtol=1e-5)


def test_sefa_normalises_rows_not_layers(generators) -> None:
    weights = [affine.weight for _, _, affine in generators["stylegan2"].style_layers()]
    vectors, values = sefa(weights, 6)
    # Scaling whole rows changes nothing (each row is normalised); without the normalisation it would.
    scaled = [w * torch.linspace(0.01, 100, w.shape[0])[:, None] for w in weights]
    vectors2, values2 = sefa(scaled, 6)
    assert float((vectors2 - vectors).abs().max()) <= 1e-5
    assert float((values2 - values).abs().max()) <= 1e-4 * float(values[0])
    # Eigenvalues of A^T A with unit rows sum to the number of rows.
    _, all_values = sefa(weights, generators["stylegan2"].w_dim)
    assert abs(float(all_values.double().sum()) - sum(w.shape[0] for w in weights)) <= 1e-3


def test_sefa_refuses_bad_input() -> None:
    with pytest.raises(ValueError, match=shape_error((32,))):
        sefa([torch.ones(32)], 2)
    with pytest.raises(ValueError, match=shape_error((4, 16))):
        sefa([randn(4, 32), randn(4, 16)], 2)
    with pytest.raises(ValueError, match="non-empty"):
        sefa([], 2)
    with pytest.raises(ValueError, match="count"):
        sefa([randn(4, 32)], 33)
    with pytest.raises(ValueError, match="NaN"):
        sefa([torch.full((4, 32), float("nan"))], 2)


# --- GANSpace -------------------------------------------------------------------------------------------


def test_ganspace_on_mapped_samples(generators) -> None:
    G = generators["stylegan2"]
    with torch.no_grad():
        ws = G.mapping(randn(2000, G.z_dim, seed=3), None)[:, 0]
    count = 12
    components, stds, mean, ratios = ganspace(ws, count)
    assert components.shape == (count, G.w_dim) and stds.shape == ratios.shape == (count,)
    assert mean.shape == (G.w_dim,)
    assert orthonormality_error(components) <= 1e-5
    assert bool((ratios[:-1] >= ratios[1:]).all()) and bool((ratios > 0).all())
    assert float(ratios.double().sum()) <= 1 + 1e-6
    assert bool((stds[:-1] >= stds[1:]).all())
    X = ws.double()
    assert float((mean.double() - X.mean(0)).abs().max()) <= 1e-5
    projections = (X - X.mean(0)) @ components.double().T
    np.testing.assert_allclose(stds.double().numpy(), projections.std(0).numpy(), rtol=1e-5)
    total = float((X - X.mean(0)).pow(2).sum(1).mean()) * len(X) / (len(X) - 1)
    np.testing.assert_allclose(ratios.double().numpy(), (projections.var(0) / total).numpy(), rtol=1e-5)
    # All components explain everything.
    _, _, _, every = ganspace(ws, G.w_dim)
    assert abs(float(every.double().sum()) - 1) <= 1e-5


def test_ganspace_recovers_a_known_covariance() -> None:
    d, n = 8, 20000
    axes, _ = torch.linalg.qr(randn(d, d, seed=1, dtype=torch.float64))  # columns: the principal axes
    true_std = torch.tensor([5.0, 4.0, 3.0, 2.0, 1.0, 0.7, 0.5, 0.3], dtype=torch.float64)
    offset = torch.arange(d, dtype=torch.float64)
    samples = (randn(n, d, seed=2, dtype=torch.float64) * true_std) @ axes.T + offset
    components, stds, mean, ratios = ganspace(samples.float(), 4)
    cos = (components.double() @ axes[:, :4]).diagonal().abs()
    # Measured: |cos| >= 0.9997.
    assert float(cos.min()) >= 0.995, cos
    np.testing.assert_allclose(stds.double().numpy(), true_std[:4].numpy(), rtol=0.03)
    np.testing.assert_allclose(ratios.double().numpy(), (true_std[:4] ** 2 / (true_std ** 2).sum()).numpy(),
                               rtol=0.05)
    assert float((mean.double() - offset).abs().max()) <= 0.1


def test_ganspace_refuses_bad_input() -> None:
    with pytest.raises(ValueError, match=shape_error((10, 6, 32))):
        ganspace(randn(10, 6, 32), 2)
    with pytest.raises(ValueError, match=shape_error((1, 32))):
        ganspace(randn(1, 32), 1)
    with pytest.raises(ValueError, match="count"):
        ganspace(randn(5, 32), 5)
    with pytest.raises(ValueError, match="identical"):
        ganspace(torch.ones(5, 32), 2)


# --- moving latents -------------------------------------------------------------------------------------


def test_apply_direction_moves_only_the_chosen_rows() -> None:
    ws = randn(2, 6, 32, seed=1)
    before = ws.clone()
    v = unit(randn(32, seed=2))
    same = apply_direction(ws, v, 0.0, (0, 6))
    assert torch.equal(same, ws) and same.data_ptr() != ws.data_ptr()
    moved = apply_direction(ws, v, 3.0, (2, 5))
    assert torch.equal(ws, before)  # the input is never changed
    assert torch.equal(moved[:, :2], ws[:, :2]) and torch.equal(moved[:, 5:], ws[:, 5:])
    assert float((moved[:, 2:5] - (ws[:, 2:5] + 3.0 * v)).abs().max()) <= 1e-6
    back = apply_direction(moved, v, -3.0, (2, 5))
    assert float((back - ws).abs().max()) <= 1e-6
    # A layer string and None (all rows) are accepted too.
    assert torch.equal(apply_direction(ws, v, 1.5, "2-4"), apply_direction(ws, v, 1.5, (2, 5)))
    assert torch.equal(apply_direction(ws, v, 1.5, None), apply_direction(ws, v, 1.5, (0, 6)))


def test_apply_direction_per_layer_vectors() -> None:
    ws = randn(1, 6, 32, seed=1)
    per_layer = randn(6, 32, seed=3)
    moved = apply_direction(ws, per_layer, 2.0, (1, 4))
    for row in range(6):
        expected = ws[0, row] + 2.0 * per_layer[row] if 1 <= row < 4 else ws[0, row]
        assert float((moved[0, row] - expected).abs().max()) <= 1e-6, row
    assert torch.equal(moved[0, 0], ws[0, 0]) and torch.equal(moved[0, 4:], ws[0, 4:])


def test_apply_direction_refuses_bad_shapes_and_ranges() -> None:
    ws = randn(2, 6, 32)
    with pytest.raises(ValueError, match=shape_error((16,))) as info:
        apply_direction(ws, randn(16), 1.0, (0, 6))
    assert "(2, 6, 32)" in str(info.value)
    with pytest.raises(ValueError, match=shape_error((5, 32))):
        apply_direction(ws, randn(5, 32), 1.0, (0, 6))
    with pytest.raises(ValueError, match=shape_error((6, 32))):
        apply_direction(ws[0], randn(32), 1.0, (0, 6))
    for bad in [(0, 7), (3, 3), (-1, 2)]:
        with pytest.raises(ValueError, match="range"):
            apply_direction(ws, randn(32), 1.0, bad)
    with pytest.raises(ValueError, match="finite"):
        apply_direction(ws, randn(32), float("nan"), (0, 6))


def test_sweep_one_latent_per_strength() -> None:
    ws = randn(1, 6, 32, seed=4)
    v = unit(randn(32, seed=5))
    strengths = [-3.0, 0.0, 1.5, 3.0]
    out = sweep(ws, v, strengths, (0, 4))
    assert out.shape == (4, 6, 32)
    assert torch.equal(out[1], ws[0])
    for i, s in enumerate(strengths):
        assert torch.equal(out[i:i + 1], apply_direction(ws, v, s, (0, 4)))
    assert float(((out[3, :4] - out[0, :4]) - 6.0 * v).abs().max()) <= 1e-5
    with pytest.raises(ValueError, match=shape_error((2, 6, 32))):
        sweep(randn(2, 6, 32), v, strengths, (0, 6))
    with pytest.raises(ValueError, match="at least one"):
        sweep(ws, v, [], (0, 6))


def test_interpolate_ends_exactly_at_the_end_points() -> None:
    a, b = randn(6, 32, seed=6), randn(6, 32, seed=7)
    out = interpolate(a, b, 5)
    assert out.shape == (5, 6, 32)
    assert torch.equal(out[0], a) and torch.equal(out[-1], b)
    assert float((out[2] - (a + b) / 2).abs().max()) <= 1e-6
    assert float((out[1] - (0.75 * a + 0.25 * b)).abs().max()) <= 1e-6
    assert torch.equal(interpolate(a, b, 2), torch.stack([a, b]))
    with pytest.raises(ValueError, match=shape_error((5, 32))):
        interpolate(a, randn(5, 32), 4)
    with pytest.raises(ValueError, match="count"):
        interpolate(a, b, 1)


def test_style_mix_splits_rows_at_the_crossover() -> None:
    coarse, fine = randn(6, 32, seed=8), randn(6, 32, seed=9)
    assert torch.equal(style_mix(coarse, coarse, 3), coarse)
    mixed = style_mix(coarse, fine, 4)
    assert torch.equal(mixed[:4], coarse[:4]) and torch.equal(mixed[4:], fine[4:])
    assert torch.equal(style_mix(coarse, fine, 0), fine) and torch.equal(style_mix(coarse, fine, 6), coarse)
    batch = style_mix(coarse[None].repeat(2, 1, 1), fine[None].repeat(2, 1, 1), 2)
    assert torch.equal(batch[1, :2], coarse[:2]) and torch.equal(batch[1, 2:], fine[2:])
    for bad in (-1, 7):
        with pytest.raises(ValueError, match="0..6"):
            style_mix(coarse, fine, bad)
    with pytest.raises(ValueError, match=shape_error((8, 32))):
        style_mix(coarse, randn(8, 32), 2)


@pytest.mark.parametrize("conditions", [1, 2, 5])
def test_conditional_direction_is_orthogonal_to_the_removed_ones(conditions: int) -> None:
    primary = unit(randn(32, seed=10))
    others = randn(conditions, 32, seed=11 + conditions)
    others = others / others.norm(dim=1, keepdim=True)
    out = condition(primary, others)
    assert out.shape == (32,) and out.dtype == torch.float32
    # Measured: |dot| <= 6e-9, | |n| - 1 | <= 2e-8.
    assert float((others.double() @ out.double()).abs().max()) <= 1e-6
    assert abs(float(out.double().norm()) - 1) <= 1e-6
    assert float(out @ primary) > 0
    if conditions == 1:  # InterFaceGAN's closed form for one condition: n1 - (n1.n2) n2, normalised
        n2 = others[0].double()
        expected = unit(primary.double() - (primary.double() @ n2) * n2)
        assert float((out.double() - expected).abs().max()) <= 1e-6
    # Repeated conditions (a rank-deficient set) give the same answer.
    repeated = condition(primary, torch.cat([others, others[:1]]))
    assert float((repeated - out).abs().max()) <= 1e-6


def test_condition_refuses_a_primary_inside_the_span() -> None:
    others = randn(3, 32, seed=20)
    with pytest.raises(ValueError, match="span"):
        condition(0.3 * others[0] - 2 * others[2], others)
    with pytest.raises(ValueError, match=shape_error((3, 16))):
        condition(randn(32), randn(3, 16))
    with pytest.raises(ValueError, match=shape_error((2, 32))):
        condition(randn(2, 32), others)


# --- InterFaceGAN boundaries ----------------------------------------------------------------------------


def two_clouds(seed: int = 3, separation: float = 2.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Two unit-variance Gaussian clouds in 32-D, 200 points each, centred at offset +-separation*u."""
    u = unit(randn(32, seed=0, dtype=torch.float64))
    gen = torch.Generator().manual_seed(seed)
    pos = torch.randn(200, 32, generator=gen, dtype=torch.float64) + separation * u + 0.5
    neg = torch.randn(200, 32, generator=gen, dtype=torch.float64) - separation * u + 0.5
    return pos.float(), neg.float(), u


@pytest.mark.parametrize("method", BOUNDARY_METHODS)
def test_fit_boundary_recovers_the_separating_direction(method: str) -> None:
    pos, neg, u = two_clouds()
    normal = fit_boundary(pos, neg, method)
    assert normal.shape == (32,) and normal.dtype == torch.float32
    assert abs(float(normal.double().norm()) - 1) <= 1e-6
    # Measured: svm 0.939, logistic 0.982, mean-difference 0.992.
    assert float(normal.double() @ u) >= 0.9
    assert float((pos - neg).mean(0) @ normal) > 0  # points toward the positive set
    assert torch.equal(fit_boundary(pos, neg, method), normal)  # deterministic
    assert float(fit_boundary(neg, pos, method) @ normal) <= -0.999


def test_fit_boundary_classifiers_account_for_the_covariance() -> None:
    """Clouds stretched along (e0 + e1) and shifted along e0: the separator (LDA's Sigma^-1 dmu) tilts away from
    the mean difference; svm and logistic find it, mean-difference does not."""
    d = 32
    stretch = torch.zeros(d, dtype=torch.float64)
    stretch[:2] = 2 ** -0.5
    shift = torch.zeros(d, dtype=torch.float64)
    shift[0] = 1

    def cloud(seed: int, sign: float) -> torch.Tensor:
        x = 0.3 * randn(200, d, seed=seed, dtype=torch.float64)
        return (x + 3 * randn(200, 1, seed=seed + 100, dtype=torch.float64) * stretch + sign * shift).float()

    cov = 0.09 * torch.eye(d, dtype=torch.float64) + 9 * torch.outer(stretch, stretch)
    lda = unit(torch.linalg.solve(cov, shift))
    cos = {m: float(fit_boundary(cloud(1, 1.0), cloud(2, -1.0), m).double() @ lda) for m in BOUNDARY_METHODS}
    # Measured: svm 0.97, logistic 0.99, mean-difference 0.68.
    assert cos["svm"] >= 0.9 and cos["logistic"] >= 0.9, cos
    assert cos["mean-difference"] <= 0.8, cos


def test_fit_boundary_refuses_bad_input() -> None:
    pos, neg, _ = two_clouds()
    with pytest.raises(ValueError, match=shape_error((1, 32))):
        fit_boundary(pos[:1], neg)
    with pytest.raises(ValueError, match=shape_error((200, 16))):
        fit_boundary(pos, neg[:, :16])
    with pytest.raises(ValueError, match=shape_error((4, 6, 32))):
        fit_boundary(randn(4, 6, 32), neg)
    bad = pos.clone()
    bad[3, 7] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        fit_boundary(bad, neg)
    with pytest.raises(ValueError, match="method"):
        fit_boundary(pos, neg, "svc")
    for method in BOUNDARY_METHODS:
        with pytest.raises(ValueError, match="cannot be told apart"):
            fit_boundary(pos, pos.clone(), method)


# --- prompt directions ----------------------------------------------------------------------------------


def test_prompt_direction_is_the_difference_of_means() -> None:
    source, target = randn(3, 77, 64, seed=1), randn(2, 77, 64, seed=2)
    same, same_pooled = prompt_direction(source, source.clone(), randn(3, 16, seed=3), randn(3, 16, seed=3))
    assert same.shape == (77, 64) and same_pooled.shape == (16,)
    assert torch.equal(same, torch.zeros(77, 64)) and torch.equal(same_pooled, torch.zeros(16))
    direction, pooled = prompt_direction(source, target)
    assert pooled is None
    expected = target.double().mean(0) - source.double().mean(0)
    assert float((direction.double() - expected).abs().max()) <= 1e-6
    sp, tp = randn(3, 16, seed=4), randn(2, 16, seed=5)
    _, pooled = prompt_direction(source, target, sp, tp)
    assert float((pooled.double() - (tp.double().mean(0) - sp.double().mean(0))).abs().max()) <= 1e-6
    with pytest.raises(ValueError, match=shape_error((2, 70, 64))):
        prompt_direction(source, randn(2, 70, 64))
    with pytest.raises(ValueError, match="both"):
        prompt_direction(source, target, sp, None)
    with pytest.raises(ValueError, match=shape_error((2, 16))):
        prompt_direction(source, target, randn(2, 16), tp)
    with pytest.raises(ValueError, match=shape_error((77, 64))):
        prompt_direction(randn(77, 64), target)


def test_apply_prompt_direction_is_linear() -> None:
    cond = randn(2, 77, 64, seed=6)
    before = cond.clone()
    direction = 0.1 * randn(77, 64, seed=7)
    one, two = apply_prompt_direction(cond, direction, 1.5), apply_prompt_direction(cond, direction, 3.0)
    assert torch.equal(cond, before)
    assert float(((two - cond) - 2 * (one - cond)).abs().max()) <= 1e-6
    assert float((one - (cond + 1.5 * direction)).abs().max()) <= 1e-6
    zero = apply_prompt_direction(cond, direction, 0.0)
    assert torch.equal(zero, cond) and zero.data_ptr() != cond.data_ptr()
    # Pooled outputs: [B, P] with [P].
    pooled, offset = randn(2, 16, seed=8), randn(16, seed=9)
    assert float((apply_prompt_direction(pooled, offset, -2.0) - (pooled - 2 * offset)).abs().max()) <= 1e-6
    # The conditioning keeps its dtype.
    assert apply_prompt_direction(cond.half(), direction, 1.0).dtype == torch.float16
    with pytest.raises(ValueError, match=shape_error((154, 64))) as info:
        apply_prompt_direction(cond, randn(154, 64), 1.0)
    assert "(2, 77, 64)" in str(info.value)
    with pytest.raises(ValueError, match=shape_error((77, 32))):
        apply_prompt_direction(cond, randn(77, 32), 1.0)


# --- layers ---------------------------------------------------------------------------------------------


def test_parse_layers_presets_and_ranges() -> None:
    assert parse_layers("all", 14) == (0, 14)
    assert parse_layers("coarse", 14) == (0, 4)
    assert parse_layers("middle", 14) == (4, 8)
    assert parse_layers("fine", 14) == (8, 14)
    assert parse_layers(" Fine ", 18) == (8, 18)
    assert parse_layers("coarse", 3) == (0, 3)
    assert parse_layers("middle", 6) == (4, 6)
    assert parse_layers("3-5", 14) == (3, 6)
    assert parse_layers("2 - 2", 14) == (2, 3)
    assert parse_layers("7", 14) == (7, 8)
    assert parse_layers("0-13", 14) == (0, 14)


def test_parse_layers_errors_name_the_spec_and_rows() -> None:
    with pytest.raises(ValueError, match=re.escape("layers '3-20' are outside 0-13 for a generator with 14 W+ rows")):
        parse_layers("3-20", 14)
    with pytest.raises(ValueError, match=re.escape("layers '14' are outside 0-13")):
        parse_layers("14", 14)
    with pytest.raises(ValueError, match="'fine'.*6 W\\+ rows"):
        parse_layers("fine", 6)
    with pytest.raises(ValueError, match="'middle'"):
        parse_layers("middle", 4)
    for bad in ("5-3", "-1", "1-", "eyes", "1.5", ""):
        with pytest.raises(ValueError, match=re.escape(f"'{bad}'")):
            parse_layers(bad, 14)
    with pytest.raises(ValueError, match="num_ws"):
        parse_layers("all", 0)


# --- the record -----------------------------------------------------------------------------------------


def gan_direction() -> Direction:
    vectors, values = sefa([randn(40, 32, seed=1), randn(24, 32, seed=2)], 5)
    return Direction(vectors=vectors, space="w", method="sefa", model_id="ab" * 32, num_ws=6, layers=(2, 5),
                     scales=values, mean=randn(32, seed=3))


def test_direction_fields_and_pick() -> None:
    d = gan_direction()
    assert d.count == 5 and d.w_dim == 32 and not d.per_layer
    one = d.pick(3)
    assert one.count == 1 and torch.equal(one.vectors[0], d.vectors[3]) and torch.equal(one.scales, d.scales[3:4])
    assert (one.model_id, one.num_ws, one.layers, one.method) == (d.model_id, 6, (2, 5), "sefa")
    assert torch.equal(one.mean, d.mean)
    with pytest.raises(ValueError, match="0-4"):
        d.pick(5)
    per_layer = Direction(vectors=randn(2, 6, 32), space="w", method="file", num_ws=6)
    assert per_layer.per_layer and per_layer.w_dim == 32 and per_layer.count == 2
    text = Direction(vectors=randn(1, 77, 64), space="text", method="prompt", pooled=randn(1, 16))
    assert not text.per_layer and text.count == 1
    with pytest.raises(ValueError, match="w_dim"):
        text.w_dim
    # Converted to float32 on the CPU.
    assert Direction(vectors=randn(1, 32, dtype=torch.float64), space="w", method="file").vectors.dtype == \
        torch.float32
    assert DIRECTION_SPACES == ("w", "text")


@pytest.mark.parametrize("kwargs,received", [
    (dict(vectors=torch.ones(32), space="w", method="file"), (32,)),
    (dict(vectors=torch.ones(1, 2, 3, 4), space="w", method="file"), (1, 2, 3, 4)),
    (dict(vectors=torch.ones(1, 5, 32), space="w", method="file", num_ws=6), (1, 5, 32)),
    (dict(vectors=torch.ones(2, 32), space="w", method="sefa", scales=torch.ones(3)), (3,)),
    (dict(vectors=torch.ones(2, 32), space="w", method="ganspace", mean=torch.ones(16)), (16,)),
    (dict(vectors=torch.ones(77, 64), space="text", method="prompt"), (77, 64)),
    (dict(vectors=torch.ones(1, 77, 64), space="text", method="prompt", pooled=torch.ones(2, 16)), (2, 16)),
])
def test_direction_refuses_bad_shapes(kwargs: dict, received: tuple[int, ...]) -> None:
    with pytest.raises(ValueError, match=shape_error(received)):
        Direction(**kwargs)


def test_direction_refuses_inconsistent_fields() -> None:
    v = torch.ones(1, 32)
    with pytest.raises(ValueError, match="space"):
        Direction(vectors=v, space="z", method="file")
    with pytest.raises(ValueError, match="method"):
        Direction(vectors=v, space="w", method="pca")
    with pytest.raises(ValueError, match="layers"):
        Direction(vectors=v, space="w", method="file", num_ws=6, layers=(4, 8))
    with pytest.raises(ValueError, match="pooled"):
        Direction(vectors=v, space="w", method="file", pooled=torch.ones(1, 16))
    with pytest.raises(ValueError, match="text"):
        Direction(vectors=torch.ones(1, 77, 64), space="text", method="prompt", num_ws=6)
    with pytest.raises(ValueError, match="NaN"):
        Direction(vectors=torch.full((1, 32), float("nan")), space="w", method="file")


# --- files ----------------------------------------------------------------------------------------------


def test_save_and_load_round_trip_bitwise(tmp_path: Path) -> None:
    for name, d in [("gan", gan_direction()),
                    ("text", Direction(vectors=randn(2, 77, 64), space="text", method="prompt",
                                       pooled=randn(2, 16, seed=1))),
                    ("plain", Direction(vectors=randn(3, 6, 32), space="w", method="file"))]:
        path = save_direction(tmp_path / f"{name}.safetensors", d)
        back = load_direction(path)
        for field in ("space", "method", "model_id", "num_ws", "layers"):
            assert getattr(back, field) == getattr(d, field), (name, field)
        for field in ("vectors", "scales", "mean", "pooled"):
            a, b = getattr(d, field), getattr(back, field)
            assert (a is None and b is None) or torch.equal(a, b), (name, field)
        assert read_boundary_file(path).equal(d.vectors)


def test_save_never_overwrites_and_load_refuses_foreign_files(tmp_path: Path) -> None:
    path = save_direction(tmp_path / "d.safetensors", gan_direction())
    stamp = path.read_bytes()
    with pytest.raises(FileExistsError, match="never overwrites"):
        save_direction(path, gan_direction().pick(0))
    assert path.read_bytes() == stamp
    save_direction(path, gan_direction().pick(0), overwrite=True)
    assert load_direction(path).count == 1

    from safetensors.torch import save_file

    foreign = tmp_path / "foreign.safetensors"
    save_file({"vectors": torch.ones(1, 32)}, str(foreign))
    with pytest.raises(ValueError, match="not a Retrace direction"):
        load_direction(foreign)
    latent = save_gan_latent(tmp_path / "latent.safetensors",
                             GanLatent(ws=torch.ones(1, 6, 32), space="w", model_id="x", family="stylegan2"))
    with pytest.raises(ValueError, match="not a Retrace direction"):
        load_direction(latent)
    with pytest.raises(ValueError, match=".safetensors"):
        save_direction(tmp_path / "d.npy", gan_direction())


def test_read_boundary_file_formats(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    normal = unit(randn(512, seed=1))
    np.save(tmp_path / "flat.npy", normal.double().numpy())
    np.save(tmp_path / "row.npy", normal[None].numpy())
    np.save(tmp_path / "per_layer.npy", randn(2, 18, 512).numpy())
    torch.save(normal[None].clone(), tmp_path / "pti.pt")
    torch.save({"boundary": normal.clone()}, tmp_path / "dict.pth")
    save_file({"direction": normal[None].clone(), "aaa": torch.zeros(3)}, str(tmp_path / "named.safetensors"))
    save_file({"w": normal.clone()}, str(tmp_path / "first.safetensors"))
    for name in ("flat.npy", "row.npy", "pti.pt", "dict.pth", "named.safetensors", "first.safetensors"):
        out = read_boundary_file(tmp_path / name)
        assert out.shape == (1, 512) and out.dtype == torch.float32, name
        assert torch.equal(out[0], normal), name
    assert read_boundary_file(tmp_path / "per_layer.npy").shape == (2, 18, 512)
    torch.save({"a": normal.clone(), "b": normal.clone()}, tmp_path / "two.pt")
    with pytest.raises(ValueError, match="2 tensors"):
        read_boundary_file(tmp_path / "two.pt")
    torch.save({"only": normal.clone(), "note": "age"}, tmp_path / "one.pt")
    assert torch.equal(read_boundary_file(tmp_path / "one.pt")[0], normal)


class _Touch:
    """Unpickling this creates ``marker`` (what a malicious object array would do)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return Path.touch, (self.marker,)


def test_read_boundary_file_refuses_pickles_nan_and_empty(tmp_path: Path) -> None:
    marker = tmp_path / "unpickled"
    payload = np.empty(2, dtype=object)
    payload[0], payload[1] = _Touch(marker), 1.0
    np.save(tmp_path / "object.npy", payload, allow_pickle=True)
    with pytest.raises(ValueError, match="object arrays"):
        read_boundary_file(tmp_path / "object.npy")
    assert not marker.exists()
    np.load(tmp_path / "object.npy", allow_pickle=True)  # the payload is live: unpickling would have run it
    assert marker.exists()

    marker.unlink()
    torch.save({"boundary": _Touch(marker)}, tmp_path / "object.pt")
    with pytest.raises(ValueError, match="weights_only"):
        read_boundary_file(tmp_path / "object.pt")
    assert not marker.exists()

    bad = np.ones((1, 512), dtype=np.float32)
    bad[0, 7] = np.nan
    np.save(tmp_path / "nan.npy", bad)
    with pytest.raises(ValueError, match="NaN"):
        read_boundary_file(tmp_path / "nan.npy")
    np.save(tmp_path / "empty.npy", np.zeros((0, 512), dtype=np.float32))
    with pytest.raises(ValueError, match="empty"):
        read_boundary_file(tmp_path / "empty.npy")
    np.save(tmp_path / "deep.npy", np.zeros((1, 1, 2, 512), dtype=np.float32))
    with pytest.raises(ValueError, match=shape_error((1, 1, 2, 512))):
        read_boundary_file(tmp_path / "deep.npy")
    np.save(tmp_path / "text.npy", np.array(["a", "b"]))
    with pytest.raises(ValueError, match="real numbers"):
        read_boundary_file(tmp_path / "text.npy")
    (tmp_path / "x.txt").write_text("0.1 0.2")
    with pytest.raises(ValueError, match=".npy"):
        read_boundary_file(tmp_path / "x.txt")
    (tmp_path / "broken.pt").write_bytes(b"not a torch file")
    with pytest.raises(ValueError, match="broken.pt"):
        read_boundary_file(tmp_path / "broken.pt")
    (tmp_path / "broken.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="broken.safetensors"):
        read_boundary_file(tmp_path / "broken.safetensors")


def test_fit_boundary_works_under_inference_mode() -> None:
    """ComfyUI runs nodes under torch.inference_mode(); the solvers still need autograd."""
    gen = torch.Generator().manual_seed(4)
    axis = torch.zeros(8)
    axis[0] = 1
    with torch.inference_mode():
        pos = torch.randn(20, 8, generator=gen) + 3 * axis
        neg = torch.randn(20, 8, generator=gen) - 3 * axis
        for method in ("svm", "logistic"):
            assert float(fit_boundary(pos, neg, method) @ axis) > 0.9
