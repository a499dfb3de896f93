"""Developer scripts: host server control, workflow conversion, the demo."""
