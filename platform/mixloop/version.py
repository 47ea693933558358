"""mixloop's version, in a module of its own: the modules that record it (lineage, exports, job
metadata) import it from here rather than from the package, whose __init__ imports the API and
through it, lazily, those same modules (an import cycle)."""

__version__ = "0.1.0"
