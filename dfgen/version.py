"""dfgen's version (its own module, at the bottom layer: every layer may read it)."""

__version__ = "0.1.0"
