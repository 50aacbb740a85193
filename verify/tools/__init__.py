"""verify.tools: the commands beside the equivalence campaign.

    bench         ours vs FSDP2 on the same GPT, ratios in one run (`python -m verify bench`);
                  bench_memory (its memory probes), bench_overhead (the harness's own cost),
                  bench_report (performance.md/png)
    timing_check  a second, independent timing (`python -m verify.tools.timing_check`)
    converge      sharded vs unsharded loss curves on real text (`python -m verify converge`)
    soak          rank memory over a campaign (`--soak`)
    plants/       the planted bugs; mutants: run them all and say which check caught each
"""
