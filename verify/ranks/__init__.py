"""verify.ranks: the processes a case runs on.

    pool           RankPool: W rank processes spawned once, many cases run on them
    rank           what runs inside a rank: the RankContext a case receives, the pool rank loop
    poolset        the pools of a campaign: one RankPool with a sub-group per W, or one pool per W
                   for sharders that use the default process group
    backend_check  every collective a sharder may use, on inputs with known results
"""
