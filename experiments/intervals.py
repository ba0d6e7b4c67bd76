"""Confidence intervals over seeds, shared by the studies (data efficiency, conversion,
receptive fields): a mean with its two-sided Student-t interval, and its text form.

With ``n`` paired seeds the interval has ``n - 1`` degrees of freedom; three seeds give 2, so a
95 % interval is ``mean ± 4.30 std / sqrt(3)``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from scipy import stats

CONFIDENCE = 0.95


def t_interval(values: Sequence[float], confidence: float = CONFIDENCE) -> dict[str, Any]:
  """Mean and two-sided t interval of ``values`` (n - 1 degrees of freedom).

  Returns:
    ``{"mean", "std" (ddof=1), "low", "high", "n"}``; with fewer than 2 values ``std``, ``low``
    and ``high`` are None.

  Raises:
    ValueError: if ``values`` is empty or ``confidence`` is not in (0, 1).
  """
  if not 0.0 < confidence < 1.0:
    raise ValueError(f"confidence: expected a float in (0, 1), got {confidence!r}")
  x = np.asarray(values, dtype=np.float64)
  if x.ndim != 1 or x.size == 0:
    raise ValueError(f"values: expected a non-empty 1-D sequence, got shape {x.shape}")
  mean, n = float(x.mean()), int(x.size)
  if n < 2:
    return {"mean": mean, "std": None, "low": None, "high": None, "n": n}
  std = float(x.std(ddof=1))
  half = float(stats.t.ppf(0.5 + confidence / 2.0, n - 1)) * std / math.sqrt(n)
  return {"mean": mean, "std": std, "low": mean - half, "high": mean + half, "n": n}


def interval_text(v: Mapping[str, Any], scale: float = 1.0, fmt: str = ".4f") -> str:
  """``"mean [low, high]"`` of a :func:`t_interval` dict scaled by ``scale`` (``"mean"`` alone
  when it has no interval: one value)."""
  m = v["mean"] * scale
  if v["low"] is None:
    return f"{m:{fmt}}"
  return f"{m:{fmt}} [{v['low'] * scale:{fmt}}, {v['high'] * scale:{fmt}}]"
