from __future__ import annotations

import os
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from paths import HOST, ensure_host, ensure_package

# Two cores: one torch process computing at a time, and no oversubscription inside it.
torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", 0)) or max(1, min(2, os.cpu_count() or 1)))
ensure_package()


@pytest.fixture
def output_dir(tmp_path: Path) -> Iterator[Path]:
    """Point the host's output directory (and Retrace's saved-records folder) at a temporary directory."""
    ensure_host()
    import folder_paths

    from retrace.nodes import _records

    old = folder_paths.get_output_directory()
    folder_paths.set_output_directory(str(tmp_path))
    _records.register_folder()
    saved = str(tmp_path / _records.OUTPUT_SUBFOLDER)
    folder_paths.add_model_folder_path(_records.FOLDER, saved, is_default=True)
    try:
        yield tmp_path
    finally:
        folder_paths.set_output_directory(old)
        folder_paths.folder_names_and_paths[_records.FOLDER][0].remove(saved)


# Per-layer counts at the end of a run (make test prints them per host; RETRACE_LAYER_SUMMARY gets them as a line).
LAYERS = ("core", "host", "e2e", "browser", "fuzz")
_OUTCOMES: dict[str, Counter] = {}


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    # fuzz first: its prompt tests live in tests/e2e/, a folder name pytest counts among the keywords.
    layer = next((m for m in ("fuzz", *LAYERS) if m in report.keywords), "unmarked")
    if report.when == "call":
        outcome = "skipped" if report.skipped else report.outcome
    elif report.outcome in ("skipped", "failed"):
        outcome = "skipped" if report.skipped else "error"
    else:
        return
    _OUTCOMES.setdefault(layer, Counter())[outcome] += 1


def pytest_terminal_summary(terminalreporter: Any) -> None:
    from scripts.hosts import host_version

    parts = [f"{layer} " + ", ".join(f"{n} {o}" for o, n in sorted(_OUTCOMES[layer].items()))
             for layer in (*LAYERS, "unmarked") if layer in _OUTCOMES]
    line = f"ComfyUI {host_version(HOST)}: " + "; ".join(parts)
    terminalreporter.write_line(line)
    if os.environ.get("RETRACE_LAYER_SUMMARY"):
        Path(os.environ["RETRACE_LAYER_SUMMARY"]).write_text(line + "\n")
