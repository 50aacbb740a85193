"""verify: the harness that proves a sharded run trains exactly like the unsharded one.

Layout (read the module names top to bottom to follow a case):
  verify.scenarios  - a case as frozen data, and everything a rank rebuilds from it
  verify.strategies - Hypothesis strategies that draw cases, aimed at the edges
  verify.reference  - the plain single-process reference run
  verify.compare    - pure comparisons (bitwise, ULP, tolerance tiers) and verdicts
  verify.results    - the records that cross the process boundary
  verify.pool       - the persistent ranks that run the sharded side
  verify.peers      - the same cases through FSDP2 and DDP; what a peer cannot run, and why
  verify.converge   - sharded vs unsharded loss curves on real text (Python's stdlib sources)
  verify.report     - results to markdown tables (the only pandas/tabulate user)
  verify.cli        - `python -m verify run | replay`

This package imports nothing heavy on import; import the submodules you need.
"""
