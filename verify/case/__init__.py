"""A case, end to end: `train` is the one training protocol every sharder runs (rank side),
`probes` what the harness measures of any sharder itself (`recorder`: the collectives, at the
torch.distributed, process-group and backend levels), `judge` the records against the
reference as structured check results (parent side), `state_check` its gradient and
optimizer-state comparisons."""
