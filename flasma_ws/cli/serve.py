"""flasma-ws serve (placeholder)."""

from . import app  # noqa: F401
