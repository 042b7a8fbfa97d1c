"""ComfyUI glue: thin V3 nodes over the wan_capture core (``extension.py`` registers them)."""
