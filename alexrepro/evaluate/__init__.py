"""The `evaluate` stage and what reads a checkpoint's results: 10-crop evaluation, outputs, the report, `predict`,
and the measured claims table."""
