"""flasma-ws loadtest (placeholder)."""

from . import app  # noqa: F401
