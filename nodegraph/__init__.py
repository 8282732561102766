"""nodegraph: a node-graph workflow engine that speaks ComfyUI's formats. This package is torch-free."""

__version__ = "0.1.0"
