"""Monitoring settings: one dataclass, filled from `cvrecipe serve`'s monitoring options."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass
class MonitorSettings:
    enabled: bool = True  # live statistics, drift, feedback, /v1/monitor and /dashboard
    window: int = 500  # predictions in the sliding window the drift and accuracy figures cover
    window_s: float = 3600.0  # ... and none older than this many seconds
    min_samples: int = 50  # fewer predictions in the window: drift states say "waiting"
    interval_s: float = 1.0  # how often the figures, gauges and states are recomputed
    alert_webhook: str | None = None  # URL that gets a JSON POST when the overall drift state changes
    log_db: Path | str | None = None  # prediction log: SQLite file (WAL mode) or postgresql:// URL; None = no log
    capture_percent: float = 0.0  # share of input images (0-100) saved beside the log, for `monitor export`
    log_max_rows: int | None = None  # retention: keep at most this many rows (oldest dropped first)
    log_max_age_s: float | None = None  # retention: drop rows older than this

    def __post_init__(self):
        postgres = str(self.log_db).startswith(("postgresql://", "postgres://", "postgresql+psycopg://"))
        if self.log_db is not None and not postgres:
            self.log_db = Path(self.log_db)
        checks = {"window": self.window >= 1, "window_s": self.window_s > 0, "min_samples": self.min_samples >= 1,
                  "interval_s": self.interval_s > 0, "capture_percent": 0 <= self.capture_percent <= 100,
                  "log_max_rows": self.log_max_rows is None or self.log_max_rows >= 1,
                  "log_max_age_s": self.log_max_age_s is None or self.log_max_age_s > 0}
        bad = [name for name, ok in checks.items() if not ok]
        if bad:
            raise ValueError(f"invalid monitoring setting(s): {', '.join(f'{n}={getattr(self, n)}' for n in bad)}")
        if self.capture_percent > 0 and self.log_db is None:
            raise ValueError("--capture needs a --log-db: captured images are listed in the prediction log (and kept "
                             "in a folder beside an SQLite file, or in the PostgreSQL database)")
        if self.alert_webhook is not None and not self.alert_webhook.startswith(("http://", "https://")):
            raise ValueError(f"--alert-webhook must be an http:// or https:// URL, got '{self.alert_webhook}'")

    @property
    def capture_dir(self) -> Path | None:
        if self.log_db is None or not isinstance(self.log_db, Path):
            return None
        return self.log_db.with_name(self.log_db.name + ".captures")
