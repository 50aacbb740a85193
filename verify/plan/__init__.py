"""verify.plan: the scale planner (`python -m verify plan`).

    units   fsdp_core's layout applied to a scenario's units: the figures a case must measure
    models  meta-device models (built-in names, HF config.json, scenario families)
    scale   per-rank memory and per-step traffic at 8..1024 ranks, FSDP2 and ZeRO-3 beside it
    cli     the arguments, the markdown table and the plot (imported without torch)
"""
