"""Editing quality on the trained toy world, on a subset of the bench's edits (bench/quality.py; the full table is
``make bench --only quality``): the recommended pipeline's edits take, its background stays, and its local blend
keeps more of the background than the same pipeline without it. A change that makes edits worse fails here.

The floors sit below what was measured here (in the comments) by margins meant for rounding, not for a worse
method. The pipeline is deterministic for given weights, so another torch build moves a PSNR by its rounding
only (hundredths of a dB); an edit near the read-back's decision boundary can flip, so accuracy keeps one edit
of slack."""

from __future__ import annotations

import pytest

from paths import HOST, ensure_host

if not HOST.is_dir():
    pytest.skip(f"no host at {HOST}: run `make setup` (GUIDE section 1)", allow_module_level=True)
ensure_host()

from bench import quality  # noqa: E402

pytestmark = pytest.mark.host
EDITS = 6  # the bench's first two scenes: two colour, two shape and two background swaps


@pytest.fixture(scope="module")
def measured() -> dict[str, float]:
    return quality.measure(EDITS, ["direct_p2p", quality.BEST])


def test_the_recommended_edit_takes_and_the_background_stays(measured: dict[str, float]) -> None:
    assert measured["quality_best_accuracy"] >= 5 / EDITS, measured  # measured: 6 of 6
    assert measured["quality_best_bg_psnr_db"] >= 30.5, measured  # measured: 31.8 dB (latent space, peak 8)
    assert measured[f"quality_{quality.BEST}_recon_psnr_db"] == quality.PSNR_CAP, measured  # direct inversion: exact


def test_local_blend_keeps_more_background_without_losing_edits(measured: dict[str, float]) -> None:
    # measured: +2.3 dB on these four colour and shape swaps (+3.2 dB over the bench's 16; the goal, 6 dB, is
    # not met yet: the toy world's shape words localise weakly, so their masks cover half the latent)
    assert measured["quality_blend_gain_db"] >= 2.0, measured
    assert measured["quality_blend_accuracy_change"] >= 0.0, measured
