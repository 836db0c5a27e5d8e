"""The version of cpusparse (private module, so that every layer of the package can read it)."""

__version__ = "0.2.0.dev0"
