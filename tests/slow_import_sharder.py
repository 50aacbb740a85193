"""An adapter whose import takes longer than a case may (DeepSpeed checks its op builders at
import): the import is not the case's hang (tests/test_global_state.py)."""
from __future__ import annotations

import time

from verify.sharders.fsdp_core import FsdpCore

time.sleep(6.0)


class SlowImport(FsdpCore):
    name = "slow_import"
