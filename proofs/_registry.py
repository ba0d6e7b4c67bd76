"""Registry of claims: a name, a method, a statement and a check function."""

from __future__ import annotations

import dataclasses
import importlib
import time
import traceback
from collections.abc import Callable

METHODS = ("symbolic", "SMT", "exact arithmetic", "experiment")

#: Modules whose import registers the claims, in report order.
CHECK_MODULES = (
  "proofs.checks_lemma2",
  "proofs.checks_bound",
  "proofs.checks_lemma1",
  "proofs.checks_smt",
  "proofs.checks_float32",
)


@dataclasses.dataclass(frozen=True)
class Claim:
  """A checkable statement.

  Attributes:
    name: dotted identifier cited by the written proofs, e.g. ``lemma2.quadratic_identity_2d``.
    method: one of :data:`METHODS`.
    statement: one sentence saying what is proved.
    func: the check; raises (AssertionError) on failure, may return a short detail string.
  """

  name: str
  method: str
  statement: str
  func: Callable[[], str | None]


@dataclasses.dataclass(frozen=True)
class ClaimResult:
  """Outcome of one claim."""

  name: str
  method: str
  passed: bool
  seconds: float
  detail: str


CLAIMS: dict[str, Claim] = {}


def claim(name: str, method: str, statement: str) -> Callable:
  """Decorator registering a check function as a claim."""
  if method not in METHODS:
    raise ValueError(f"method: expected one of {METHODS}, got {method!r}")

  def register(func: Callable[[], str | None]) -> Callable[[], str | None]:
    if name in CLAIMS:
      raise ValueError(f"name: claim {name!r} is already registered")
    CLAIMS[name] = Claim(name, method, statement, func)
    return func

  return register


def all_claims() -> list[Claim]:
  """Imports every check module and returns the claims in registration order."""
  for mod in CHECK_MODULES:
    importlib.import_module(mod)
  return list(CLAIMS.values())


def run_claim(c: Claim) -> ClaimResult:
  """Runs one claim, catching any exception as a failure."""
  t0 = time.perf_counter()
  try:
    detail = c.func() or ""
    passed = True
  except Exception as exc:  # noqa: BLE001 - a failing claim is reported, not raised
    passed = False
    detail = f"{type(exc).__name__}: {exc}\n{traceback.format_exc(limit=3)}"
  return ClaimResult(c.name, c.method, passed, time.perf_counter() - t0, detail)
