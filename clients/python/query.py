"""One query from a script, with the blocking SyncClient.

flasma-ws serve --dim 100 &           # a demo server on port 8080
python clients/python/query.py        # or: python query.py ws://HOST:PORT/ws
"""

from __future__ import annotations

import sys

import numpy as np

from flasma_ws.client import ServerError, SyncClient, server_info


def main(url: str = "ws://127.0.0.1:8080/ws") -> None:
    dim = server_info(url)["dim"]  # GET /info on the same host and port
    query = np.random.default_rng(0).standard_normal(dim).astype(np.float32)
    with SyncClient(url) as client:
        ids, scores = client.query(query, k=5)  # numpy arrays, best first
        for index, score in zip(ids, scores):
            print(f"row {index:>8}  cosine {score:.4f}")
        print(client.query(query, k=2).pairs())  # or as [(index, score), ...]
        try:
            client.query(query, k=100_000)  # the server refuses it; the connection stays usable
        except ServerError as exc:
            print(f"refused as expected: {exc.code}")


if __name__ == "__main__":
    main(*sys.argv[1:])
