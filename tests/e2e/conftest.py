"""The end-to-end layer's server: the real host, headless, on a free port, with its own directories."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from e2e_support import TEST_NODES, ComfyClient, ComfyServer
from paths import CACHE
from scripts.comfy_server import ensure_tiny_checkpoint
from scripts.images import make_test_image

RUN_DIR = CACHE / "e2e" / "run"
IMAGE_SIZE = 64


@pytest.fixture(scope="session")
def tiny_checkpoint() -> Path:
    return ensure_tiny_checkpoint()


@pytest.fixture(scope="session")
def server(tiny_checkpoint: Path) -> Iterator[ComfyServer]:
    """One host server for the session, stopped by pid at the end whatever happens."""
    shutil.rmtree(RUN_DIR, ignore_errors=True)
    srv = ComfyServer(run_dir=RUN_DIR, checkpoint_dirs=[tiny_checkpoint.parent], custom_node_dirs=[TEST_NODES])
    try:
        srv.start()
        yield srv
    finally:
        srv.stop()


@pytest.fixture(scope="session")
def client(server: ComfyServer) -> ComfyClient:
    return server.client()


@pytest.fixture(scope="session")
def object_info(client: ComfyClient) -> dict:
    return client.object_info()


@pytest.fixture(scope="session")
def input_image(server: ComfyServer) -> str:
    """A generated 64x64 test image in the server's input directory; returns its name there."""
    name = "retrace_e2e_input.png"
    make_test_image(IMAGE_SIZE).save(server.input_dir / name)
    return name
