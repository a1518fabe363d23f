"""Shared test set-up.

TensorFlow reads its oneDNN switch once, at import; some test modules import TensorFlow
directly, so the engine's runtime defaults are applied here, before any test module loads, and
the tests run the kernels that `flasma-ws serve` runs.

`server` and `matrix` serve and load the demo set of the test module's own `SETTINGS`.
"""

import flasma_ws.tf_runtime  # noqa: F401  (first: before anything imports TensorFlow)

# isort: split
from collections.abc import Iterator

import numpy as np
import pytest

from flasma_ws.server import BackgroundServer
from flasma_ws.vectors import load_matrix, open_targets


@pytest.fixture(scope="module")
def server(request: pytest.FixtureRequest) -> Iterator[BackgroundServer]:
    """A server on a loopback port with the test module's SETTINGS, for the whole module."""
    with BackgroundServer(request.module.SETTINGS) as running:
        yield running


@pytest.fixture(scope="module")
def matrix(request: pytest.FixtureRequest) -> np.ndarray:
    """The unit float32 rows the module's server holds (its SETTINGS' demo set)."""
    settings = request.module.SETTINGS
    targets = open_targets(None, settings.dim, settings.demo_size, settings.demo_seed)
    return load_matrix(targets)
