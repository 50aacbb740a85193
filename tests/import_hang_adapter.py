"""A test adapter whose import never ends on pool ranks (child processes), and imports at once
in the parent (tests/test_diagnose.py)."""
import multiprocessing
import time

if multiprocessing.parent_process() is not None:
    time.sleep(3600)

from tests.hang_sharders import Replicated  # noqa: E402


class SlowImport(Replicated):
    name = "slow_import"
