"""flasma-ws bench (placeholder)."""

from . import app  # noqa: F401
