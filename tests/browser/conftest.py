"""The browser layer: the host's own web UI in Debian's Chromium, headless, against the real server on 127.0.0.1.

Skipped, loudly, only where no Chromium executable exists (``make setup`` installs Debian's package where it can);
a missing Playwright driver is a set-up error and fails.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from paths import CACHE, TEST_OUT
from scripts.browser import WORKFLOW_MODEL_NAMES, ComfyUI, find_chromium, write_stand_ins, write_ui_settings
from scripts.comfy_server import ComfyServer
from scripts.images import make_test_image

RUN_DIR = CACHE / "browser" / "run"
MODELS_DIR = CACHE / "browser" / "stylegan"
STAND_INS = CACHE / "browser" / "stand_ins"
SCREENSHOTS = TEST_OUT / "browser"
# The generator file name the StyleGAN workflows ask for: the tiny seeded generator stands in under that name.
WORKFLOW_GENERATOR_NAME = WORKFLOW_MODEL_NAMES["stylegan"][0]
SKIPPED: list[str] = []


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if find_chromium() is not None:
        return
    reason = ("BROWSER LAYER SKIPPED: no Chromium executable on this machine ($RETRACE_CHROMIUM, `chromium`, "
              "`chromium-browser`). `make setup` installs Debian's `chromium` where apt-get runs as root.")
    SKIPPED.append(reason)
    for item in items:
        if item.get_closest_marker("browser"):
            item.add_marker(pytest.mark.skip(reason=reason))


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    for reason in SKIPPED:
        terminalreporter.write_sep("!", reason, red=True, bold=True)


# Module scope: Playwright's sync API keeps an event loop running in this thread until it stops, and later
# layers in the same process (the host's async validation) need the thread without one.
@pytest.fixture(scope="module")
def browser_server() -> Iterator[ComfyServer]:
    """A host server of its own: the tiny StyleGAN under the workflows' file name, the workflows' example.png as input,
    and UI settings that skip the first-run template browser."""
    from stylegan_files import tiny_generator, write_nvlabs_pickle

    shutil.rmtree(RUN_DIR, ignore_errors=True)
    shutil.rmtree(MODELS_DIR, ignore_errors=True)
    MODELS_DIR.mkdir(parents=True)
    write_nvlabs_pickle(MODELS_DIR / WORKFLOW_GENERATOR_NAME, tiny_generator("stylegan2", seed=0, img_resolution=32))
    model_dirs = {**write_stand_ins(STAND_INS, skip={"stylegan"}), "stylegan": [MODELS_DIR]}
    write_ui_settings(RUN_DIR / "user")
    (RUN_DIR / "input").mkdir(parents=True)
    make_test_image(64).save(RUN_DIR / "input" / "example.png")
    server = ComfyServer(run_dir=RUN_DIR, model_dirs=model_dirs, threads=1)
    try:
        server.start()
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def ui(browser_server: ComfyServer) -> Iterator[ComfyUI]:
    with ComfyUI(browser_server.url) as page:
        yield page


@pytest.fixture(scope="session")
def screenshots() -> Path:
    shutil.rmtree(SCREENSHOTS, ignore_errors=True)
    SCREENSHOTS.mkdir(parents=True)
    return SCREENSHOTS
