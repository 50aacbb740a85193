"""verify: the harness that proves a sharded run trains exactly like the unsharded one.

Layout (read the module names top to bottom to follow a case):
  verify.scenarios  - a case as frozen data, and everything a rank rebuilds from it
  verify.strategies - Hypothesis strategies that draw cases, aimed at the edges
  verify.sharders   - the adapter protocol (`Sharder`, `WrapPlan`) and the built-in adapters
  verify.case       - the one training protocol (train), what it measures (probes), the verdict
                      against the reference as structured checks (judge)
  verify.reference  - the plain single-process reference run
  verify.compare    - pure comparisons (bitwise, ULP, tolerance tiers) and verdicts
  verify.results    - the records that cross the process boundary
  verify.pool       - the persistent ranks (verify.rank: their side; verify.poolset: one pool per
                      world size for sharders that use the default process group)
  verify.campaign   - draw, run, judge, report; verify.resume: checkpoint-resume cases
  verify.report     - results to markdown tables (the only pandas/tabulate user)
  verify.cli        - `python -m verify run | replay | report | bench | converge | mutants`
  verify.pytest_plugin - `pytest --sharder pkg.module:Name` (the pytest11 entry point)

`from verify import Sharder, WrapPlan` is the public surface for a sharder of your own (DESIGN
section 6). This package imports nothing heavy on import; import the submodules you need.
"""

__all__ = ["Sharder", "WrapPlan"]


def __getattr__(name: str):
    if name in ("Sharder", "WrapPlan", "StepTrace"):
        from verify.sharders import base
        return getattr(base, name)
    raise AttributeError(f"module 'verify' has no attribute {name!r}")
