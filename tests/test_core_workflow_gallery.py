"""The README's workflow gallery: every shared workflow has a thumbnail and a one-line purpose, and nothing else."""

from __future__ import annotations

import re

import pytest
from PIL import Image

from paths import ROOT

pytestmark = pytest.mark.core

WORKFLOWS = ROOT / "workflows"
THUMBNAILS = WORKFLOWS / "thumbnails"
ROW = re.compile(r"^\| \[!\[([\w.-]+)\]\(workflows/thumbnails/([\w.-]+)\.png\)\]\(workflows/([\w.-]+)\.json\) "
                 r"\| \[`([\w.-]+)\.json`\]\(workflows/([\w.-]+)\.json\): (.+) \|$")


def _gallery_rows() -> dict[str, str]:
    rows = {}
    for line in (ROOT / "README.md").read_text(encoding="utf-8").splitlines():
        match = ROW.match(line)
        if match:
            names = set(match.groups()[:5])
            assert len(names) == 1, f"a gallery row names different workflows: {line}"
            rows[names.pop()] = match.group(6)
    return rows


def test_every_workflow_has_a_gallery_row_with_a_thumbnail_and_a_purpose() -> None:
    workflows = sorted(p.stem for p in WORKFLOWS.glob("*.json"))
    rows = _gallery_rows()
    assert sorted(rows) == workflows
    for name, purpose in rows.items():
        assert 20 <= len(purpose) <= 200 and "\n" not in purpose, name
        with Image.open(THUMBNAILS / f"{name}.png") as thumbnail:
            assert thumbnail.width == 640 and 60 <= thumbnail.height <= 640, (name, thumbnail.size)
    assert sorted(p.stem for p in THUMBNAILS.glob("*.png")) == workflows, "a thumbnail without its workflow"
