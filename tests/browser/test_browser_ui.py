"""Every shared workflow in the host's real UI: it loads with no missing-node dialog or validation alert, every node is
registered, drawn and keeps the file's widget values; one small workflow queued from the Run button shows its
images; every node's help page is served where the UI's node help looks for it."""

from __future__ import annotations

import json
import urllib.request
from io import BytesIO
from pathlib import Path

import pytest
from PIL import Image

from paths import ROOT
from scripts.browser import ComfyUI, LoadReport
from scripts.comfy_server import ComfyServer

pytestmark = pytest.mark.browser

WORKFLOWS = sorted((ROOT / "workflows").glob("*.json"))
QUEUED_WORKFLOW = ROOT / "workflows" / "stylegan_generate.json"


def _load(ui: ComfyUI, path: Path, screenshots: Path, wait_for: str | None = None) -> LoadReport:
    report = ui.load_workflow(path, wait_for=wait_for)
    ui.screenshot(screenshots / f"{path.stem}.png")
    return report


@pytest.mark.parametrize("path", WORKFLOWS, ids=[p.stem for p in WORKFLOWS])
def test_workflow_loads_cleanly_in_the_ui(ui: ComfyUI, screenshots: Path, path: Path) -> None:
    report = _load(ui, path, screenshots)
    assert report.problems() == [], f"{path.name} in the UI (screenshot: {screenshots / (path.stem + '.png')})"
    saved = json.loads(path.read_text(encoding="utf-8"))
    retrace = [n for n in report.nodes if n["type"].startswith("Retrace")]
    assert len(retrace) == sum(n["type"].startswith("Retrace") for n in saved["nodes"]) > 0
    assert (screenshots / f"{path.stem}.png").stat().st_size > 10_000


def _with_node_type(path: Path, node_id: int, new_type: str, tmp_path: Path) -> Path:
    workflow = json.loads(path.read_text(encoding="utf-8"))
    next(n for n in workflow["nodes"] if n["id"] == node_id)["type"] = new_type
    out = tmp_path / f"{path.stem}_{new_type}.json"
    out.write_text(json.dumps(workflow), encoding="utf-8")
    return out


def test_a_missing_node_is_caught(ui: ComfyUI, screenshots: Path, tmp_path: Path) -> None:
    """The checks above can fail: an unknown node type brings the host's missing-node dialog and a red node."""
    broken = _with_node_type(QUEUED_WORKFLOW, 2, "RetraceNoSuchNode", tmp_path)
    # The missing-nodes dialog of older frontends, the error overlay of newer ones (1.4x).
    problems = _load(ui, broken, screenshots, wait_for='.p-dialog, [data-testid="error-overlay"]').problems()
    assert any(p.startswith("dialog:") and "RetraceNoSuchNode" in p for p in problems), problems
    assert any("type not registered" in p for p in problems), problems


def test_an_invalid_workflow_is_caught(ui: ComfyUI, screenshots: Path, tmp_path: Path) -> None:
    """A file the frontend's schema rejects raises its validation alert, which the check reports."""
    workflow = json.loads(QUEUED_WORKFLOW.read_text(encoding="utf-8"))
    workflow["version"] = "not a number"
    broken = tmp_path / "invalid_version.json"
    broken.write_text(json.dumps(workflow), encoding="utf-8")
    problems = _load(ui, broken, screenshots, wait_for=".p-toast-message-warn, .p-toast-message-error").problems()
    assert any(p.startswith("alert:") and "version" in p for p in problems), problems


def test_changed_widget_values_are_caught(ui: ComfyUI, screenshots: Path, tmp_path: Path) -> None:
    """A value the widget cannot hold (an option the combo lacks is kept, so use a clamped number) is reported."""
    workflow = json.loads(QUEUED_WORKFLOW.read_text(encoding="utf-8"))
    report = ui.load_workflow(QUEUED_WORKFLOW)
    generate = next(n for n in report.nodes if n["type"] == "RetraceStyleGANGenerate")
    assert generate["widgets_values"][2] == 4  # batch_size, as saved
    node = next(n for n in workflow["nodes"] if n["type"] == "RetraceStyleGANGenerate")
    node["widgets_values"] = node["widgets_values"][:1] + node["widgets_values"][2:]  # the control value dropped
    shifted = tmp_path / "shifted_widgets.json"
    shifted.write_text(json.dumps(workflow), encoding="utf-8")
    problems = _load(ui, shifted, screenshots).problems()
    assert any("widget values changed on load" in p for p in problems), problems


def test_queue_from_the_ui_shows_the_output(ui: ComfyUI, browser_server: ComfyServer, screenshots: Path) -> None:
    report = ui.load_workflow(QUEUED_WORKFLOW)
    assert report.problems() == []
    save = next(n for n in report.nodes if n["type"] == "SaveImage")
    urls = ui.run_and_wait_for_images(save["id"], timeout=180)
    ui.screenshot(screenshots / "queued_stylegan_generate.png")
    batch = json.loads(QUEUED_WORKFLOW.read_text(encoding="utf-8"))
    batch_size = next(n for n in batch["nodes"] if n["type"] == "RetraceStyleGANGenerate")["widgets_values"][2]
    assert len(urls) == batch_size == 4
    with urllib.request.urlopen(urls[0], timeout=30) as response:
        image = Image.open(BytesIO(response.read()))
        assert image.size == (32, 32)  # the tiny generator's resolution: the image came from this run
    saved = sorted(p.name for p in browser_server.output_dir.glob("retrace_stylegan_samples_*.png"))
    assert len(saved) == 4, saved


def test_every_node_help_page_is_served(ui: ComfyUI, browser_server: ComfyServer) -> None:
    """The UI's node help fetches /extensions/<pack>/docs/<NodeId>.md; each Retrace node's page comes back as written."""
    node_ids = sorted(t for t in ui.registered_types() if t.startswith("Retrace") and not t.startswith("RetraceTest"))
    assert len(node_ids) >= 40
    for node_id in node_ids:
        with urllib.request.urlopen(f"{browser_server.url}/extensions/retrace/docs/{node_id}.md", timeout=30) as r:
            assert r.read().decode("utf-8") == (ROOT / "web" / "docs" / f"{node_id}.md").read_text(encoding="utf-8")


def test_every_node_help_page_opens_in_the_ui(ui: ComfyUI, screenshots: Path) -> None:
    """Select each Retrace node and press the info button: the help panel renders its page (title and sections)."""
    node_ids = sorted(t for t in ui.registered_types() if t.startswith("Retrace") and not t.startswith("RetraceTest"))
    ui.load_workflow(QUEUED_WORKFLOW)
    untold = ui.page.evaluate("""(ids) => ids.flatMap(id => {
        const data = LiteGraph.registered_node_types[id].nodeData, out = [];
        if (!data.description) out.push(id + ': no description');
        for (const section of ['required', 'optional'])
          for (const [name, spec] of Object.entries((data.input || {})[section] || {}))
            if (!(spec[1] || {}).tooltip) out.push(id + '.' + name + ': no tooltip');
        (data.output_tooltips || []).forEach((t, i) => { if (!t) out.push(id + ' output ' + i + ': no tooltip'); });
        return out; })""", node_ids)
    assert untold == [], "what the UI has to show on hover"
    for node_id in node_ids:
        page = (ROOT / "web" / "docs" / f"{node_id}.md").read_text(encoding="utf-8")
        title = page.splitlines()[0].removeprefix("# ").strip()
        shown = ui.show_node_help(node_id, title)
        for section in ("Inputs", "Outputs", "Models", "Defaults", "Common mistakes"):
            assert section in shown, f"{node_id}: the help panel lacks '{section}'"
    ui.screenshot(screenshots / "node_help.png")
