"""Machine-checked claims behind Theorem 1 of Cordonnier, Loukas & Jaggi (ICLR 2020).

Every claim is a function registered with :func:`claim`; ``python -m proofs`` runs them all and
prints one line per claim (name, method, PASS/FAIL, time). The written proofs (``*.md`` next to
this file) name the claim that checks each step; ``proofs/README.md`` is the index.
"""

from __future__ import annotations

from proofs._registry import CLAIMS, Claim, ClaimResult, all_claims, claim, run_claim

__all__ = ["CLAIMS", "Claim", "ClaimResult", "all_claims", "claim", "run_claim"]
