"""flasma-ws convert (placeholder)."""

from . import app  # noqa: F401
