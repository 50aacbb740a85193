"""Rendering: case results (dicts from `CaseResult.to_dict()`) -> tables, CSV, JSON and plots.

The only package that imports pandas, tabulate and matplotlib (matplotlib optional: without it
the plots are skipped). Everything here reads records and writes text; nothing runs a case.

  frames       results_frame (one row per case), steps_frame (one row per case and step)
  tables       equivalence.md's tables: verdicts, invariants, failing cases, diagnosis, steps
  sections     checkpoint-resume cases, the pool's memory
  plots        the per-step and state plots
  write        write_reports, load_results (equivalence.md, results.csv/json, plots)
  peers        peers.md: the same cases through every sharder, side by side
  convergence  convergence.md/png/json (verify/tools/converge.py)
"""
from verify.report.convergence import write_convergence_report
from verify.report.frames import results_frame, steps_frame
from verify.report.peers import peers_table, write_peers_report
from verify.report.sections import pool_memory_section, resume_table
from verify.report.tables import (diagnosis_section, failures_table, invariants_table,
                                  steps_table, summary_table)
from verify.report.write import load_results, write_reports

__all__ = [
    "results_frame", "steps_frame", "summary_table", "invariants_table", "failures_table",
    "steps_table", "diagnosis_section", "write_reports", "load_results", "resume_table",
    "pool_memory_section", "peers_table", "write_peers_report", "write_convergence_report",
]
