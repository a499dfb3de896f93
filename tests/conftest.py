from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from paths import ensure_host, ensure_package

# Two cores: one torch process computing at a time, and no oversubscription inside it.
torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", 0)) or max(1, min(2, os.cpu_count() or 1)))
ensure_package()


@pytest.fixture
def output_dir(tmp_path: Path) -> Iterator[Path]:
    """Point the host's output directory (and Retrace's saved-records folder) at a temporary directory."""
    ensure_host()
    import folder_paths

    from retrace.nodes import inversion_io

    old = folder_paths.get_output_directory()
    folder_paths.set_output_directory(str(tmp_path))
    inversion_io.register_folder()
    saved = str(tmp_path / inversion_io.OUTPUT_SUBFOLDER)
    folder_paths.add_model_folder_path(inversion_io.FOLDER, saved, is_default=True)
    try:
        yield tmp_path
    finally:
        folder_paths.set_output_directory(old)
        folder_paths.folder_names_and_paths[inversion_io.FOLDER][0].remove(saved)
