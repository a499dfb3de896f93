"""Retrace: image inversion and editing for ComfyUI.

The host loads this package and calls ``comfy_entrypoint``. Nothing here imports ComfyUI at import
time, so the numerics in ``inversion/`` and ``editing/`` can be used and tested without the host.
"""

__version__ = "0.1.0"
# Served by the host at /extensions/retrace/: the node help pages (web/docs/<NodeId>.md) shown in its node help panel.
WEB_DIRECTORY = "web"


async def comfy_entrypoint():
    from .nodes import RetraceExtension

    return RetraceExtension()
