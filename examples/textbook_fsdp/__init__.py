"""A textbook flat-parameter FSDP and its adapter for `verify` (see README.md here)."""
