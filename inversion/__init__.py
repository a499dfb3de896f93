"""Inversion numerics in plain torch. Never imports ComfyUI."""
