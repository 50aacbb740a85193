"""verify.ranks: the processes a case runs on.

    pool           RankPool: W rank processes spawned once, many cases run on them
    generation     one set of a pool's rank processes, their pipes and private rendezvous store
    stderr         the pump of the ranks' stderr: forwarded, and its tail kept for failure reports
    failure        what a failed run reports: how a rank exited, hung ranks' stacks and collectives
    rank           what runs inside a rank: the RankContext a case receives, the pool rank loop
    torchrun       under torchrun: this process is a rank (TorchrunContext offers RankPool.run)
    spawn          fresh ranks for one task (spawn_run) and what the pool saves (measure_overhead)
    poolset        the pools of a campaign: one RankPool with a sub-group per W, or one pool per W
                   for sharders that use the default process group
    backend_check  every collective a sharder may use, on inputs with known results
"""
