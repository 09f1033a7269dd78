"""What a report says about the machine it ran on (the demo's summary, the benchmark drivers)."""
from __future__ import annotations

import os


def load_average() -> float | None:
  """The 1-minute load average, rounded to 0.01 (None where the OS has none)."""
  try:
    return round(os.getloadavg()[0], 2)
  except OSError:
    return None


def cpu_seconds() -> float:
  """CPU seconds of this process and its finished children, user and system."""
  t = os.times()
  return round(t.user + t.system + t.children_user + t.children_system, 1)
