"""verify.diagnosis: after a case fails, why.

    diagnose  the campaign's pass over its failures, grouped by signature
    shrink    the smallest scenario that still fails the same way
    locate    the first step, phase and unit that diverged
    hangs     every rank's collectives, and where they disagree when a case hangs
"""
