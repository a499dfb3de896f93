"""The toy world's ground truth (no host): scenes render and read back exactly, every edit changes one attribute and
only pixels inside its mask, and prompts differ in the one swapped word."""

from __future__ import annotations

import pytest
import torch

from paths import ensure_package

ensure_package()

from retrace.models import toy_world as world  # noqa: E402

pytestmark = pytest.mark.core


def test_rendered_scenes_read_back_exactly() -> None:
    generator = torch.Generator().manual_seed(0)
    scenes = [world.sample_scene(generator) for _ in range(200)]
    wrong = [s for s in scenes if world.read_attributes(world.render(s)) != world.attributes_of(s)]
    assert wrong == []
    # Every attribute value occurs, so the reader is checked on all of them.
    seen = {v for s in scenes for v in world.attributes_of(s).values()}
    assert seen == {*world.COLOURS, *world.SHAPES, *world.BACKGROUNDS}


def test_the_reader_tells_a_wrong_picture() -> None:
    scene = world.sample_scene(torch.Generator().manual_seed(3))
    blank = torch.tensor(world.BACKGROUNDS[scene.background]).expand(world.SIZE, world.SIZE, 3)
    assert world.read_attributes(blank)["shape0"] == "none"
    for edit in world.edits_of(scene, torch.Generator().manual_seed(4)):
        assert world.read_attributes(world.render(edit.target)) != world.attributes_of(edit.source)


def test_every_edit_changes_one_attribute_inside_its_mask() -> None:
    edits = world.edit_set(30, seed=1)
    assert [e.kind for e in edits].count("shape") == 10
    for edit in edits:
        before, after = world.attributes_of(edit.source), world.attributes_of(edit.target)
        assert sum(before[k] != after[k] for k in before) == 1
        changed = (world.render(edit.source) != world.render(edit.target)).any(-1)
        mask = world.edit_mask(edit)
        assert changed.any() and not (changed & ~mask).any()
        source_words, target_words = edit.source.prompt.split(), edit.target.prompt.split()
        assert len(source_words) == len(target_words)
        swapped = [(a, b) for a, b in zip(source_words, target_words) if a != b]
        assert swapped == [(edit.old_word, edit.new_word)]


def test_psnr_over_a_mask() -> None:
    a, b = torch.zeros(1, 4, 4), torch.zeros(1, 4, 4)
    b[0, 0, 0] = 1.0
    mask = torch.ones(4, 4, dtype=torch.bool)
    mask[0, 0] = False
    assert world.psnr(a, b, peak=8.0, mask=mask) == pytest.approx(10 * torch.log10(torch.tensor(64 / 1e-20)).item())
    assert world.psnr(a, b, peak=1.0) == pytest.approx(10 * torch.log10(torch.tensor(16.0)).item())
