"""flasma-ws: exact cosine-similarity top-k over WebSocket and HTTP, batched on TensorFlow."""

__version__ = "0.1.0"
