"""mixloop: keep a small decoder LLM current as data arrives, on Ray (see mixloop.api)."""

from mixloop.api import evaluate, from_dict, load, preview, run, versions
from mixloop.version import __version__

__all__ = ["__version__", "evaluate", "from_dict", "load", "preview", "run", "versions"]
