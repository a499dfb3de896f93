"""Convert a StyleGAN generator file (NVlabs .pkl, rosinality .pt, state-dict .pt) to a Retrace .safetensors.

    python -m models.convert SRC [DST] [--overwrite]

Reads SRC with the safe loaders (tensors and constructor arguments only; nothing from the file is run) and
writes DST (default: SRC with the suffix .safetensors). Never replaces an existing file unless --overwrite is
given. Exit code 0 on success, 2 when the file is refused or DST exists.
"""

from __future__ import annotations

import argparse
import logging
import sys

from .loader import UnsafeFileError, UnsupportedFileError, convert_to_safetensors

log = logging.getLogger("retrace.convert")


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the exit code."""
    parser = argparse.ArgumentParser(prog="python -m models.convert",
                                     description="Convert a StyleGAN generator file to a Retrace .safetensors, "
                                                 "without running any code from it.")
    parser.add_argument("src", help="NVlabs .pkl, rosinality .pt, torch.save state dict or Retrace .safetensors")
    parser.add_argument("dst", nargs="?", default=None, help="output path (default: SRC with suffix .safetensors)")
    parser.add_argument("--overwrite", action="store_true", help="replace DST if it exists")
    args = parser.parse_args(argv)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(message)s")
    try:
        out = convert_to_safetensors(args.src, args.dst, overwrite=args.overwrite)
    except (UnsafeFileError, UnsupportedFileError, FileExistsError, FileNotFoundError) as exc:
        log.error("%s", exc)
        return 2
    log.debug("done: %s", out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
