"""verify.diagnosis: after a case fails, why.

    diagnose        the campaign's pass over its failures, grouped by signature
    shrink          the smallest scenario that still fails the same way
    locate          the first step, phase and unit that diverged
    collective_log  rank side: every collective a case issues, logged as it happens
    hangs           parent side: where the ranks' logged collectives disagree when a case hangs
"""
