"""mixloop: keep a small decoder LLM current as data arrives, on Ray."""

__version__ = "0.1.0"
