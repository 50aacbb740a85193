"""What a failing ``structure`` check hints at (verify/case/structure.py)."""
from __future__ import annotations

from verify.case.structure import prefix_hint, ranks_disagree
from verify.scenarios import Scenario


def test_names_carrying_a_wrappers_prefix_say_so():
    hint = prefix_hint(["module.fc.weight", "module.fc.bias"], ("fc.weight", "fc.bias"))
    assert "the prefix 'module.'" in hint and "unsharded model's parameters" in hint
    assert prefix_hint(["extra.w"], ("fc.weight",)) == ""


def _values(digests: list[dict]) -> list[dict]:
    return [{"rank": r, "records": [{"digests": d}]} for r, d in enumerate(digests)]


def test_another_replica_differing_on_a_2d_mesh_asks_about_the_replicate_reduction():
    s = Scenario("mlp", (), 4, mesh=(2, 2), micro_batches=4)
    good, bad = {"blocks.0.fc.weight": "a"}, {"blocks.0.fc.weight": "b"}
    lines = ranks_disagree(s, _values([good, good, bad, bad]), 0, "step 0")
    assert len(lines) == 2 and all("all-reduced across the replicate dimension" in ln for ln in lines)
    lines = ranks_disagree(s, _values([good, bad, good, good]), 0, "step 0")   # within a replica
    assert len(lines) == 1 and "replicate" not in lines[0]
    flat = Scenario("mlp", (), 4, micro_batches=4)
    assert all("replicate" not in ln for ln in ranks_disagree(flat, _values([good, good, bad, bad]), 0, "x"))
