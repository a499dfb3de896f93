"""Which test host the tests, the demo and the batch runner use: ``RETRACE_HOST`` (a ComfyUI folder, as
``make`` sets it), else the default host that ``make setup`` builds in ``.host/``."""

from __future__ import annotations

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# The newest host the tests run (the default), and the oldest Retrace supports; scripts/setup_host.sh builds both.
NEWEST = "0.33.0"
OLDEST = "0.3.75"


def host_dir() -> Path:
    chosen = os.environ.get("RETRACE_HOST")
    return Path(chosen).resolve() if chosen else ROOT / ".host" / NEWEST / "ComfyUI"


def host_version(host: Path) -> str:
    """The ``__version__`` in the host's comfyui_version.py ("unknown" without one)."""
    version_file = host / "comfyui_version.py"
    if not version_file.is_file():
        return "unknown"
    for line in version_file.read_text().splitlines():
        if line.startswith("__version__"):
            return line.split("=", 1)[1].strip().strip("\"'")
    return "unknown"


def import_host(host: Path | None = None) -> Path:
    """Import the host's ``comfy`` in this process, on the CPU (shared GUIDE section 1); returns the host folder."""
    host = host or host_dir()
    if str(host) not in sys.path:
        sys.path.insert(1, str(host))
    if "comfy.model_management" not in sys.modules:
        argv = sys.argv
        sys.argv = [argv[0], "--cpu"]
        try:
            import comfy.options

            comfy.options.enable_args_parsing()
            import comfy.model_management  # noqa: F401
        finally:
            sys.argv = argv
    return host
