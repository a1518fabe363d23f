"""What one load run does: `LoadConfig`, validated on construction, and `--sweep`'s parser."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from ..errors import ConfigError

Arrival = Literal["constant", "poisson"]
SWEEP_PARAMS = ("connections", "inflight", "rate", "write_ratio")


@dataclass(frozen=True)
class LoadConfig:
    url: str
    connections: int = 1
    inflight: int = 1
    rate: float | None = None  # total queries/s: open loop; None: closed loop
    arrival: Arrival = "constant"
    duration_s: float | None = None  # measured time; with neither this nor count: 10 s
    count: int | None = None  # measured queries
    warmup_s: float = 0.0
    k: int | None = None
    binary: bool = False
    multi: int = 1  # queries per frame; 1 = single-query frames
    queries: Path | None = None
    http: bool = False
    verify: int = 0
    npy: Path | None = None
    seed: int = 0
    token: str | None = None  # Bearer token of a server started with --token
    time_limit_s: float = 300.0  # cap on the sending time of one run, warm-up included
    write_ratio: float = 0.0  # share of the frames that are one-row upserts (writes.py)

    def __post_init__(self) -> None:
        checks = [
            (self.connections >= 1, "--connections must be at least 1."),
            (self.inflight >= 1, "--inflight must be at least 1."),
            (self.rate is None or self.rate > 0, "--rate must be positive."),
            (self.arrival in ("constant", "poisson"), "--arrival is constant or poisson."),
            (self.duration_s is None or self.duration_s > 0, "--duration must be positive."),
            (self.count is None or self.count >= 1, "--count must be at least 1."),
            (self.warmup_s >= 0, "--warmup must not be negative."),
            (self.k is None or self.k >= 1, "--k must be at least 1."),
            (not self.binary or (self.k or 0) <= 65_535, "--k is at most 65535 with --binary."),
            (1 <= self.multi <= 65_535, "--multi must be from 1 to 65535."),
            (self.verify >= 0, "--verify must not be negative."),
            (self.time_limit_s > 0, "--time-limit must be positive."),
            (0 <= self.write_ratio <= 1, "--write-ratio must be from 0 to 1."),
            (not (self.http and self.binary), "--binary frames are WebSocket only; drop --http."),
            (not (self.http and self.multi > 1), "--multi frames are WebSocket only; drop --http."),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)

    @property
    def measured_s(self) -> float | None:
        """The measured duration; None when only --count bounds the run."""
        if self.duration_s is None and self.count is None:
            return 10.0
        return self.duration_s

    @property
    def mode(self) -> str:
        return "http" if self.http else ("ws-binary" if self.binary else "ws-json")

    def replace(self, **changes: Any) -> LoadConfig:
        return dataclasses.replace(self, **changes)


def parse_sweep(text: str) -> tuple[str, list[float]]:
    """ "connections=1,4,16,64" -> ("connections", [1, 4, 16, 64])."""
    name, _, values = text.partition("=")
    name = name.strip()
    if name not in SWEEP_PARAMS or not values:
        raise ConfigError(
            f"--sweep must look like connections=1,4,16 (one of {', '.join(SWEEP_PARAMS)}); "
            f"got {text!r}."
        )
    try:
        parsed = [
            float(v) if name in ("rate", "write_ratio") else int(v) for v in values.split(",")
        ]
    except ValueError as exc:
        raise ConfigError(f"--sweep {name} values must be numbers; got {values!r}.") from exc
    return name, parsed
