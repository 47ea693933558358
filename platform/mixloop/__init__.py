"""mixloop: keep a small decoder LLM current as data arrives, on Ray (see mixloop.api)."""

__version__ = "0.1.0"

from mixloop.api import evaluate, from_dict, load, preview, run, versions  # noqa: E402

__all__ = ["__version__", "evaluate", "from_dict", "load", "preview", "run", "versions"]
