"""experiments.intervals: t intervals over seeds and their text form."""

import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from experiments import intervals


@st.composite
def paired_samples(draw):
  n = draw(st.integers(2, 6))
  values = st.floats(0.0, 1.0, allow_nan=False, allow_infinity=False)
  return draw(st.lists(values, min_size=n, max_size=n))


@given(paired_samples())
def test_t_interval_contains_the_mean_and_matches_scipy(values):
  from scipy import stats

  ci = intervals.t_interval(values)
  n = len(values)
  assert ci["n"] == n and ci["low"] <= ci["mean"] <= ci["high"]
  half = stats.t.ppf(0.975, n - 1) * np.std(values, ddof=1) / math.sqrt(n)
  assert ci["mean"] == pytest.approx(np.mean(values), abs=1e-12)
  assert (ci["low"], ci["high"]) == pytest.approx((ci["mean"] - half, ci["mean"] + half), abs=1e-12)


def test_t_interval_errors():
  with pytest.raises(ValueError, match="^values: expected"):
    intervals.t_interval([])
  with pytest.raises(ValueError, match="^confidence: expected"):
    intervals.t_interval([0.1, 0.2], confidence=1.0)
  single = intervals.t_interval([0.3])
  assert single["mean"] == 0.3 and single["low"] is None and single["n"] == 1


def test_interval_text():
  ci = {"mean": 0.0123, "std": 0.001, "low": 0.0101, "high": 0.0145, "n": 3}
  assert intervals.interval_text(ci) == "0.0123 [0.0101, 0.0145]"
  assert intervals.interval_text(ci, 100.0, "+.2f") == "+1.23 [+1.01, +1.45]"
  single = intervals.t_interval([-0.5])
  assert intervals.interval_text(single, 10.0, ".1f") == "-5.0"
