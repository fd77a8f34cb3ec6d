"""The converter's version, in one leaf module (imports nothing) so any layer can read it."""

__version__ = "0.1.0"
