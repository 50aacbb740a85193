"""What a case leaves in a rank process does not reach the next case ([Note: global state between
cases] in verify/ranks/global_state.py), and what an adapter's import installs stays."""
from __future__ import annotations

import pytest
import torch

from verify.campaign.run import run_one
from verify.ranks import global_state
from verify.ranks.global_state import GlobalState
from verify.ranks.torchrun import is_torchrun
from verify.scenarios import Scenario
from verify.tools.plants import mlp_scenario

# The pool's ranks restore their state between cases; under torchrun the case runs in the test
# process itself, which has no such guard.
pool_only = pytest.mark.skipif(is_torchrun(), reason="the rank pool's guard; torchrun has none")

# oneDNN off changes this convolution's last bits on the CPU (a bitwise failure at W = 1)
CONVNET = Scenario.from_json(
    '{"family":"convnet","model":{"channels":7,"image_size":2,"in_channels":2,"n_classes":2,'
    '"n_stages":1,"norm_groups":7},"world_size":1,"mode":"fast","optimizer":"sgd_momentum",'
    '"lr":0.05,"weight_decay":0.0,"steps":2,"micro_batches":2,"micro_batch_size":1,'
    '"dtype":"fp32","wrap":"root_only","reshard_after_forward":false,"seed":3762}')


@pytest.fixture
def guard(monkeypatch):
    monkeypatch.setattr(global_state, "_CURRENT", None)
    g = GlobalState(torch)
    yield g
    g.restore()


def test_restore_undoes_settings_and_hooks_a_case_added_and_says_so(guard):
    from torch.nn.modules.module import _global_forward_hooks, register_module_forward_hook
    from torch.optim.optimizer import _global_optimizer_post_hooks, register_optimizer_step_post_hook
    kept = register_module_forward_hook(lambda *a: None)
    global_state.adopt_imports()          # an adapter's import-time hook: stays
    torch.set_default_dtype(torch.float64)
    torch.backends.mkldnn.enabled = False
    torch.use_deterministic_algorithms(True)
    torch.set_default_device("meta")
    added = register_module_forward_hook(lambda *a: None)
    opt_hook = register_optimizer_step_post_hook(lambda *a: None)
    undone = " ".join(guard.restore())
    try:
        assert torch.get_default_dtype() == torch.float32 and "get_default_dtype" in undone
        assert torch.backends.mkldnn.enabled and "mkldnn.enabled" in undone
        assert not torch.are_deterministic_algorithms_enabled()
        assert torch.empty(1).device.type == "cpu" and "get_default_device" in undone
        assert added.id not in _global_forward_hooks and opt_hook.id not in _global_optimizer_post_hooks
        assert kept.id in _global_forward_hooks
        assert "_global_optimizer_post_hooks" in undone
        assert guard.restore() == []       # nothing left to undo
    finally:
        kept.remove()


def test_what_a_sharder_left_is_given_back_to_it_and_to_no_other(guard):
    from torch.optim.optimizer import _global_optimizer_post_hooks, register_optimizer_step_post_hook
    guard.enter("x")
    hook = register_optimizer_step_post_hook(lambda *a: None)
    torch.backends.mkldnn.enabled = False
    assert guard.restore("x")                  # said once ...
    assert "torch.backends.mkldnn.enabled = False" in guard.given_back("x")
    assert "1 hook(s) in torch.optim.optimizer._global_optimizer_post_hooks" in guard.given_back("x")
    assert guard.given_back("y") == ""
    assert hook.id not in _global_optimizer_post_hooks and torch.backends.mkldnn.enabled
    guard.enter("y")
    assert hook.id not in _global_optimizer_post_hooks and torch.backends.mkldnn.enabled
    assert guard.restore("y") == []
    guard.enter("x")
    assert hook.id in _global_optimizer_post_hooks and not torch.backends.mkldnn.enabled
    assert guard.restore("x") == []            # ... not again for the same things
    assert hook.id not in _global_optimizer_post_hooks and torch.backends.mkldnn.enabled
    guard.enter("x")
    hook.remove()                              # its owner removed it: not given back again
    guard.restore("x")
    guard.enter("x")
    assert hook.id not in _global_optimizer_post_hooks
    guard.restore("x")


@pool_only
def test_a_hook_a_sharder_registers_once_per_process_stays_its_own(rank_pool):
    once = "tests.leaky_sharders:HookRegisteredOnce"
    for s, sharder in ((mlp_scenario(1), once), (mlp_scenario(1), None), (mlp_scenario(2), once),
                       (mlp_scenario(2), None), (mlp_scenario(1), once)):
        case = run_one(rank_pool, s, **({"sharder": sharder} if sharder else {}))
        assert case.verdict == "pass", (sharder, s.world_size, case.reason)


@pool_only
def test_a_sharder_that_switches_onednn_off_does_not_fail_the_next_one(rank_pool):
    leaky = run_one(rank_pool, CONVNET, sharder="tests.leaky_sharders:MkldnnOff")
    assert leaky.verdict in ("pass", "fail"), leaky.reason   # its own kernels: its own verdict
    after = run_one(rank_pool, CONVNET)
    assert after.verdict == "pass", after.reason


@pool_only
@pytest.mark.parametrize("leaky", [
    "AllReducingOptimizerHook",   # its all-reduce is not counted as the next sharder's collective
    "MetaDefaultDevice",          # the meta device reaches neither the data nor the next case
])
def test_a_global_hook_or_default_device_does_not_reach_the_next_sharder(rank_pool, leaky):
    case = run_one(rank_pool, mlp_scenario(2), sharder=f"tests.leaky_sharders:{leaky}")
    assert case.verdict == "pass", case.reason
    after = run_one(rank_pool, mlp_scenario(2))
    assert after.verdict == "pass", after.reason


@pool_only
def test_a_destroyed_process_group_is_an_error_and_the_ranks_restart(rank_pool):
    for w in (1, 2):
        case = run_one(rank_pool, mlp_scenario(w), sharder="tests.leaky_sharders:DestroysTheProcessGroup")
        assert case.verdict == "error" and "destroy_process_group" in case.reason, case.reason
        after = run_one(rank_pool, mlp_scenario(w))
        assert after.verdict == "pass", after.reason


@pool_only
def test_what_an_adapters_import_installs_outlives_its_cases(rank_pool):
    for s in (mlp_scenario(1), mlp_scenario(2), mlp_scenario(2, steps=3)):
        case = run_one(rank_pool, s, sharder="tests.import_time_sharder:ImportTimePatches")
        assert case.verdict == "pass", case.reason


@pool_only
def test_a_slow_import_is_not_a_hang_of_the_case(rank_pool):
    case = run_one(rank_pool, mlp_scenario(2), sharder="tests.slow_import_sharder:SlowImport",
                   timeout_s=4.0)
    assert case.verdict == "pass", case.reason


@pool_only
def test_a_failing_case_says_what_process_global_state_its_sharder_ran_with(rank_pool):
    """A sharder that switches oneDNN off (other kernels: other last bits) and fails: its reason
    names the setting it ran with that the reference did not, on every case it runs, not only
    the first one the guard undid it after. A passing case says nothing."""
    leaky = "tests.leaky_sharders:MkldnnOff"
    for _ in range(2):
        case = run_one(rank_pool, mlp_scenario(2), sharder=leaky, plant="no_divide_by_world")
        assert case.verdict == "fail", case.reason
        assert "ran with process-global state the harness (and the reference) does not have" \
            in case.reason and "torch.backends.mkldnn.enabled = False (the harness's: True)" \
            in case.reason, case.reason
    ok = run_one(rank_pool, mlp_scenario(2), sharder=leaky)
    assert ok.verdict == "pass" and "process-global" not in ok.reason, ok.reason
