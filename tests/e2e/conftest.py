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
STYLEGAN_DIR = CACHE / "e2e" / "stylegan"
STYLEGAN_PAYLOAD = CACHE / "e2e" / "stylegan_payload_ran"
IMAGE_SIZE = 64


@pytest.fixture(scope="session")
def tiny_checkpoint() -> Path:
    return ensure_tiny_checkpoint()


@pytest.fixture(scope="session")
def tiny_stylegan() -> Path:
    """A seeded tiny StyleGAN2 (32 px) as an NVlabs-style pickle whose embedded source would leave a marker file
    if anything ever ran it."""
    from stylegan_files import tiny_generator, write_nvlabs_pickle

    folder = STYLEGAN_DIR
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    return write_nvlabs_pickle(folder / "tiny_stylegan2.pkl", tiny_generator("stylegan2", seed=0, img_resolution=32),
                               source_payload=STYLEGAN_PAYLOAD)


@pytest.fixture(scope="session")
def boundary_file() -> Path:
    """A unit normal for the tiny generator's w (32 values), as a user's InterFaceGAN ``.npy``."""
    import numpy as np

    folder = CACHE / "e2e" / "directions"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    normal = np.random.default_rng(0).standard_normal(32).astype(np.float32)
    np.save(folder / "smile.npy", normal / np.linalg.norm(normal))
    return folder / "smile.npy"


@pytest.fixture(scope="session")
def server(tiny_checkpoint: Path, tiny_stylegan: Path, boundary_file: Path) -> Iterator[ComfyServer]:
    """One host server for the session, stopped by pid at the end whatever happens."""
    shutil.rmtree(RUN_DIR, ignore_errors=True)
    srv = ComfyServer(run_dir=RUN_DIR, checkpoint_dirs=[tiny_checkpoint.parent], custom_node_dirs=[TEST_NODES],
                      model_dirs={"stylegan": [tiny_stylegan.parent], "retrace_directions": [boundary_file.parent]})
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
