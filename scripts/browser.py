"""Drive the host's own web UI in Debian's Chromium, headless, through Playwright's Python driver.

The browser is the system's ``chromium`` (``make setup`` installs Debian's package where it is missing); Playwright
only drives it, so nothing is downloaded. Used by the browser test layer and to make the workflow thumbnails:

    python -m scripts.browser thumbnails   # workflows/thumbnails/<name>.png, from each workflow loaded in the UI
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
WORKFLOWS = ROOT / "workflows"
THUMBNAILS = WORKFLOWS / "thumbnails"
THUMBNAIL_WIDTH = 640

# As root in a sandbox with no network: no sandboxing, no GPU, and no background calls home (each would be refused).
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage"]
# A fresh user directory would open the template browser and a banner over the canvas.
# Full node drawing at any zoom (no low-detail boxes), so a fitted large graph still shows its titles and widgets.
# Workflow validation on (frontends from 1.4x turn it off by default), so a file the schema rejects raises its alert.
UI_SETTINGS = {"Comfy.TutorialCompleted": True, "Comfy.Minimap.Visible": False, "LiteGraph.Canvas.MinFontSizeForLOD": 0,
               "Comfy.Validation.Workflows": True}
UI_LOCAL_STORAGE = {"vueNodesBannerDismissed": "true"}
VIEWPORT = {"width": 1600, "height": 1000}
# The model files the shared workflows name, by the host's model folder. The UI checks each loader's file against the
# server's list and draws the loader with an error where it is missing. Where the workflows are only loaded (the
# browser layer, the thumbnails), an empty stand-in under the name is enough; the e2e layer runs them on tiny models.
WORKFLOW_MODEL_NAMES = {
    "checkpoints": ["v1-5-pruned-emaonly.safetensors", "sd_xl_base_1.0.safetensors"],
    "diffusion_models": ["flux1-dev.safetensors"],
    "text_encoders": ["clip_l.safetensors", "t5xxl_fp16.safetensors"],
    "vae": ["ae.safetensors"],
    "retrace_directions": ["smile.npy"],
    "stylegan": ["stylegan2-ffhq-1024x1024.pkl"],
}

log = logging.getLogger("retrace.browser")

# One record per node of the loaded graph: what the UI made of it.
_NODES_JS = """() => {
  const visible = new Set((app.canvas.computeVisibleNodes ? app.canvas.computeVisibleNodes() : app.canvas.visible_nodes || [])
                          .map(n => n.id));
  return app.graph.nodes.map(n => ({
    id: n.id, type: n.type, registered: !!LiteGraph.registered_node_types[n.type], has_errors: !!n.has_errors,
    visible: visible.has(n.id), widgets_values: n.serialize().widgets_values ?? null,
    width: n.size[0], height: n.size[1]}));
}"""
# Dialogs, and the error overlay that newer frontends (1.4x) show instead of the missing-nodes dialog.
_OPEN_DIALOGS_JS = """() => [...document.querySelectorAll('.p-dialog, [data-testid="error-overlay"]')]
  .filter(e => e.offsetParent !== null).map(e => e.innerText.trim().replace(/\\s+/g, ' ').slice(0, 400))"""
_ALERTS_JS = """() => [...document.querySelectorAll('.p-toast-message-error, .p-toast-message-warn')]
  .map(e => e.innerText.trim().replace(/\\s+/g, ' ').slice(0, 400))"""
# The nodes' bounding box (titles included) in page pixels, clipped to the window.
_GRAPH_BOX_JS = """(margin) => {
  const ds = app.canvas.ds, rect = app.canvas.canvas.getBoundingClientRect(), title = LiteGraph.NODE_TITLE_HEIGHT;
  let x0 = Infinity, y0 = Infinity, x1 = -Infinity, y1 = -Infinity;
  for (const n of app.graph.nodes) {
    x0 = Math.min(x0, n.pos[0]); y0 = Math.min(y0, n.pos[1] - title);
    x1 = Math.max(x1, n.pos[0] + n.size[0]); y1 = Math.max(y1, n.pos[1] + n.size[1]);
  }
  const sx = v => rect.left + (v + ds.offset[0]) * ds.scale, sy = v => rect.top + (v + ds.offset[1]) * ds.scale;
  const left = Math.max(0, sx(x0) - margin), top = Math.max(0, sy(y0) - margin);
  const right = Math.min(window.innerWidth, sx(x1) + margin), bottom = Math.min(window.innerHeight, sy(y1) + margin);
  return {x: left, y: top, width: right - left, height: bottom - top};
}"""
_IMAGES_SHOWN_JS = """(id) => { const n = app.graph.getNodeById(id);
  return n && n.imgs ? n.imgs.filter(i => i.complete && i.naturalWidth > 0).map(i => i.src) : []; }"""


class BrowserUnavailable(RuntimeError):
    """No Chromium executable or no Playwright driver: the browser layer cannot run here."""


def find_chromium() -> str | None:
    """The system Chromium: ``$RETRACE_CHROMIUM``, else ``chromium`` or ``chromium-browser`` on PATH."""
    explicit = os.environ.get("RETRACE_CHROMIUM")
    if explicit:
        return explicit if os.access(explicit, os.X_OK) else None
    for name in ("chromium", "chromium-browser"):
        found = shutil.which(name)
        if found:
            return found
    return None


def browser_unavailable_reason() -> str | None:
    """Why the browser layer cannot run here, or None when it can."""
    if find_chromium() is None:
        return ("no Chromium executable (looked for $RETRACE_CHROMIUM, `chromium`, `chromium-browser`); "
                "`make setup` installs Debian's `chromium` package where apt-get can run as root.")
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "the Python package `playwright` is missing; `make setup` installs it (requirements-dev.txt)."
    return None


def write_ui_settings(user_dir: Path) -> Path:
    """The frontend settings of the server's user directory: no first-run template browser, no minimap."""
    path = Path(user_dir) / "default" / "comfy.settings.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    settings = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    settings.update(UI_SETTINGS)
    path.write_text(json.dumps(settings, indent=2), encoding="utf-8")
    return path


def write_stand_ins(root: Path, skip: set[str] = frozenset()) -> dict[str, list[Path]]:
    """Empty files under the names in WORKFLOW_MODEL_NAMES, one folder per model kind under ``root`` (emptied
    first); returns the server's ``model_dirs`` for them."""
    shutil.rmtree(root, ignore_errors=True)
    dirs = {}
    for folder, names in WORKFLOW_MODEL_NAMES.items():
        if folder in skip:
            continue
        (root / folder).mkdir(parents=True)
        for name in names:
            (root / folder / name).write_bytes(b"")
        dirs[folder] = [root / folder]
    return dirs


def _id_order(node_id: str) -> tuple[int, str]:
    return (int(node_id), "") if node_id.isdigit() else (1 << 62, node_id)


def _same_value(a: Any, b: Any) -> bool:
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        return math.isclose(float(a), float(b), rel_tol=1e-6, abs_tol=1e-9)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same_value(x, y) for x, y in zip(a, b))
    return a == b


@dataclass
class LoadReport:
    """What the UI showed after loading one workflow file."""

    workflow: Path
    nodes: list[dict[str, Any]]
    dialogs: list[str] = field(default_factory=list)
    alerts: list[str] = field(default_factory=list)
    page_errors: list[str] = field(default_factory=list)

    def problems(self) -> list[str]:
        """Everything a person would see go wrong, compared with the file: empty when the load was clean."""
        saved = json.loads(self.workflow.read_text(encoding="utf-8"))
        # Node ids are numbers in the file and in older frontends, strings in newer ones (1.4x).
        saved_nodes = {str(n["id"]): n for n in saved.get("nodes", [])}
        shown = {str(n["id"]): n for n in self.nodes}
        out = [f"dialog: {d}" for d in self.dialogs] + [f"alert: {a}" for a in self.alerts]
        out += [f"page error: {e}" for e in self.page_errors]
        if set(saved_nodes) != set(shown):
            out.append(f"nodes in the file {sorted(saved_nodes, key=_id_order)} but in the UI "
                       f"{sorted(shown, key=_id_order)}")
        for node_id, node in sorted(shown.items(), key=lambda item: _id_order(item[0])):
            label = f"node {node_id} ({node['type']})"
            if not node["registered"]:
                out.append(f"{label}: type not registered (missing node)")
            if node["has_errors"]:
                out.append(f"{label}: drawn with errors")
            if not node["visible"]:
                out.append(f"{label}: not drawn in the fitted view")
            if node["width"] <= 0 or node["height"] <= 0:
                out.append(f"{label}: has no size")
            before = saved_nodes.get(node_id, {}).get("widgets_values")
            # A node without widgets serialises its values as [] in older frontends and null in newer ones.
            after = node["widgets_values"] if node["widgets_values"] is not None else []
            if before is not None and not _same_value(before, after):
                out.append(f"{label}: widget values changed on load: {before} -> {node['widgets_values']}")
        return out


class ComfyUI:
    """One headless Chromium page on the host's UI. Use as a context manager."""

    def __init__(self, url: str, executable: str | None = None, viewport: dict[str, int] | None = None):
        self.url = url.rstrip("/")
        self.executable = executable or find_chromium()
        self.viewport = viewport or VIEWPORT
        self.page_errors: list[str] = []
        self._playwright: Any = None
        self._browser: Any = None
        self.page: Any = None

    def __enter__(self) -> ComfyUI:
        reason = browser_unavailable_reason() if self.executable is None else None
        if reason:
            raise BrowserUnavailable(reason)
        from playwright.sync_api import sync_playwright

        self._playwright = sync_playwright().start()
        try:
            self._browser = self._playwright.chromium.launch(executable_path=self.executable, headless=True,
                                                             args=CHROMIUM_ARGS)
            self.page = self._browser.new_page(viewport=self.viewport)
            self.page.add_init_script(";".join(f"localStorage.setItem({json.dumps(k)}, {json.dumps(v)})"
                                               for k, v in UI_LOCAL_STORAGE.items()))
            self.page.on("pageerror", lambda err: self.page_errors.append(str(err).splitlines()[0][:300]))
            self.open()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._browser is not None:
            self._browser.close()
            self._browser = None
        if self._playwright is not None:
            self._playwright.stop()
            self._playwright = None

    def open(self, timeout: float = 90.0) -> None:
        """Load the UI and wait until the app and its node definitions are ready."""
        self.page.goto(self.url + "/", wait_until="domcontentloaded", timeout=timeout * 1000)
        self.page.wait_for_function("() => window.app && app.graph && window.LiteGraph && "
                                    "Object.keys(LiteGraph.registered_node_types).length > 0", timeout=timeout * 1000)
        self.page.wait_for_selector("#comfy-file-input", state="attached", timeout=timeout * 1000)
        self.settle(1.0)
        self.page_errors.clear()  # the UI's own start-up (it tries to reach the internet), not a workflow's doing

    def settle(self, seconds: float) -> None:
        self.page.wait_for_timeout(seconds * 1000)

    def registered_types(self) -> list[str]:
        return self.page.evaluate("() => Object.keys(LiteGraph.registered_node_types)")

    def dismiss_messages(self) -> None:
        """Close every open dialog and toast, so the next load starts from a quiet screen."""
        for selector in (".p-dialog .p-dialog-close-button", ".p-toast-close-button",
                         '[data-testid="error-overlay"] button[aria-label="Close"]'):
            for button in self.page.locator(selector).all():
                try:
                    button.click(timeout=2000)
                except Exception:  # noqa: BLE001 - a toast may leave on its own between query and click
                    pass
        self.page.keyboard.press("Escape")
        self.page.wait_for_function("() => document.querySelectorAll('.p-toast-message').length === 0",
                                    timeout=10000)

    def load_workflow(self, path: Path, settle: float = 1.0, timeout: float = 60.0,
                      wait_for: str | None = None) -> LoadReport:
        """Open a workflow file as a person does (the UI's file input), wait until its nodes are on the canvas (and,
        with ``wait_for``, until an element matching that selector shows), fit it to the view, report what showed."""
        self.dismiss_messages()
        errors_before = len(self.page_errors)
        node_ids = sorted(str(n["id"]) for n in json.loads(Path(path).read_text(encoding="utf-8")).get("nodes", []))
        # Mark the current nodes, so a reload of the same file is told apart from the graph already shown.
        self.page.evaluate("() => app.graph.nodes.forEach(n => { n.__retrace_before_load = true; })")
        self.page.locator("#comfy-file-input").set_input_files(str(path))
        self.page.wait_for_function("""(ids) => { const nodes = app.graph.nodes;
            return nodes.length === ids.length && nodes.every(n => !n.__retrace_before_load)
                   && JSON.stringify(nodes.map(n => String(n.id)).sort()) === JSON.stringify(ids); }""",
                                    arg=node_ids, timeout=timeout * 1000)
        if wait_for:
            self.page.wait_for_selector(wait_for, state="visible", timeout=timeout * 1000)
        self.settle(settle)  # dialogs and alerts come after the graph; give them their moment
        self.page.evaluate("() => app.extensionManager.command.execute('Comfy.Canvas.FitView')")
        self.settle(0.5)
        return LoadReport(workflow=Path(path), nodes=self.page.evaluate(_NODES_JS),
                          dialogs=self.page.evaluate(_OPEN_DIALOGS_JS), alerts=self.page.evaluate(_ALERTS_JS),
                          page_errors=self.page_errors[errors_before:])

    def screenshot(self, path: Path, graph_only: bool = False, margin: int = 24) -> Path:
        """The whole window, or (``graph_only``) just the nodes' bounding box on the canvas."""
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        clip = self.page.evaluate(_GRAPH_BOX_JS, margin) if graph_only else None
        self.page.screenshot(path=str(path), clip=clip)
        return Path(path)

    def focus_mode(self) -> None:
        """Hide the menus and side bars (the UI's focus mode), so a fitted graph fills the window."""
        self.page.evaluate("() => app.extensionManager.command.execute('Workspace.ToggleFocusMode')")
        self.settle(0.5)

    def show_node_help(self, node_type: str, title: str, timeout: float = 30.0) -> str:
        """Add a node of this type, select it, press the selection toolbox's info button as a person does, wait for the
        help panel to show ``title``; return the panel's text (the node is removed again)."""
        node_id = self.page.evaluate("""(type) => {
            const node = LiteGraph.createNode(type); node.pos = [100, 100]; app.graph.add(node);
            app.canvas.deselectAll(); app.canvas.selectNode(node); app.canvas.setDirty(true, true); return node.id; }""",
                                     node_type)
        try:
            # The selection toolbox glides after the selected node, so Playwright never sees it "stable": send the
            # click event itself once the button is there.
            button = self.page.locator('[data-testid="info-button"]')
            button.wait_for(state="visible", timeout=timeout * 1000)
            button.dispatch_event("click")
            self.page.wait_for_function("""(title) => [...document.querySelectorAll('.node-help-content')]
                .some(e => e.innerText.includes(title))""", arg=title, timeout=timeout * 1000)
            return self.page.evaluate("() => document.querySelector('.node-help-content').innerText")
        finally:
            self.page.evaluate("(id) => { const n = app.graph.getNodeById(id); if (n) app.graph.remove(n); }", node_id)

    def run_and_wait_for_images(self, node_id: int | str, timeout: float = 300.0) -> list[str]:
        """Press the UI's Run button (the queue button of newer frontends, the Run button of older ones); wait until
        the node (its id as the UI gives it) shows output images; return their URLs."""
        button = self.page.locator('[data-testid="queue-button"]')
        if button.count() == 0:
            button = self.page.get_by_role("button", name="Run", exact=True)
        button.first.click()
        self.page.wait_for_function(f"(id) => ({_IMAGES_SHOWN_JS})(id).length > 0", arg=node_id,
                                    timeout=timeout * 1000)
        return self.page.evaluate(_IMAGES_SHOWN_JS, node_id)


def make_thumbnails(workflows: list[Path], out_dir: Path = THUMBNAILS, width: int = THUMBNAIL_WIDTH) -> list[Path]:
    """Load each workflow in the UI of a fresh headless host and save a small PNG of the fitted graph."""
    from PIL import Image

    from scripts.comfy_server import CACHE, ComfyServer
    from scripts.images import make_test_image

    run_dir = CACHE / "thumbnails" / "run"
    shutil.rmtree(run_dir, ignore_errors=True)
    write_ui_settings(run_dir / "user")
    (run_dir / "input").mkdir(parents=True, exist_ok=True)
    make_test_image(512).save(run_dir / "input" / "example.png")
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    model_dirs = write_stand_ins(CACHE / "thumbnails" / "stand_ins")
    with ComfyServer(run_dir=run_dir, model_dirs=model_dirs) as server, ComfyUI(server.url) as ui:
        ui.focus_mode()
        for workflow in workflows:
            report = ui.load_workflow(workflow)
            for problem in report.problems():
                log.warning("%s: %s", workflow.name, problem)
            shot = ui.screenshot(run_dir / "shots" / f"{workflow.stem}.png", graph_only=True)
            with Image.open(shot) as image:
                image = image.convert("RGB")
                height = round(image.height * width / image.width)
                target = out_dir / f"{workflow.stem}.png"
                image.resize((width, height), Image.LANCZOS).save(target, optimize=True)
            written.append(target)
            log.info("thumbnail %s", target.relative_to(ROOT))
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    thumbs = sub.add_parser("thumbnails", help="write workflows/thumbnails/<name>.png for every (or the named) workflow")
    thumbs.add_argument("workflows", nargs="*", type=Path, help="workflow files (default: all of workflows/*.json)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    reason = browser_unavailable_reason()
    if reason:
        log.error("cannot drive the browser: %s", reason)
        return 2
    files = args.workflows or sorted(WORKFLOWS.glob("*.json"))
    start = time.monotonic()
    make_thumbnails([Path(f).resolve() for f in files])
    log.info("%d thumbnails in %.0f s", len(files), time.monotonic() - start)
    return 0


if __name__ == "__main__":
    sys.exit(main())
