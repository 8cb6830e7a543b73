"""Monitor: watch a served model — drift against a reference profile, live accuracy from
feedback, resources, a prediction log and a dashboard (see docs/monitoring.md)."""
from cvrecipe.monitor.settings import MonitorSettings

__all__ = ["MonitorSettings"]
