"""Shared test set-up.

TensorFlow reads its oneDNN switch once, at import; some test modules import TensorFlow
directly, so the engine's runtime defaults are applied here, before any test module loads, and
the tests run the kernels that `flasma-ws serve` runs."""

import flasma_ws.tf_runtime  # noqa: F401
