"""The one place the pack imports the host's V3 node API, so a host version shift is a one-line change."""

from comfy_api.latest import ComfyExtension, io, ui  # noqa: F401
