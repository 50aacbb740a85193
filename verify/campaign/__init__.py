"""verify.campaign: a campaign from the drawn cases to the reports.

    run      draw -> run each case on the ranks -> reference -> judge -> report; replay of one case
    resume   checkpoint-resume cases (train at W_a, save, load at W_b, train on)
    console  what a replayed case prints; a failed case in a test report (the pytest plugin)
"""
