"""The parts `offpg_offline.train` wires together, one job per module.

- `batches`: the training view of a log and the batch sources (in memory or streamed).
- `prepare`: the split, the propensity column, the baseline and the diagnostic probes.
- `checkpoints`: saving, resuming, and choosing a checkpoint by an OPE score (`Selector`).
- `monitor`: weight diagnostics, online evaluation and the progress bar.

`train.py` reads top to bottom as prepare → build → loop of `update` → finish.
"""
