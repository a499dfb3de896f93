"""Where things are, and one stable package name (`retrace`) for the pack whatever the checkout is called."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.append(str(ROOT))  # for `scripts`; appended, so the pack's folders never shadow the host's modules

from scripts.hosts import host_dir, import_host  # noqa: E402

HOST = host_dir()
CACHE = ROOT / ".cache"
TEST_OUT = ROOT / "tests" / "out"
PKGROOT = CACHE / "pkgroot"


def ensure_package() -> None:
    """Make `import retrace` resolve to this checkout (through a git-ignored link), and `import scripts` work."""
    link = PKGROOT / "retrace"
    PKGROOT.mkdir(parents=True, exist_ok=True)
    if link.is_symlink() and link.resolve() != ROOT:
        link.unlink()
    if not link.exists():
        link.symlink_to(ROOT, target_is_directory=True)
    if str(PKGROOT) not in sys.path:
        sys.path.insert(0, str(PKGROOT))
    if str(ROOT) not in sys.path:
        sys.path.append(str(ROOT))  # for `scripts`; appended, so the pack's folders never shadow the host's modules


def ensure_host() -> None:
    """Import the real host in-process, on the CPU (shared GUIDE section 1)."""
    ensure_package()
    import_host(HOST)
