"""Ray Tune trainables: thin wrappers that turn a trial config into `backdoor` calls.

- `victim_stage.prepare_victim`: a Ray task that trains (or loads) one victim and returns it
  packed (weights + data) for the object store, so trials never read the driver's disk.
- `purify_trial.purify_trial`: one defence run on one victim and clean budget, streaming
  ACC / ASR to `tune.report` every epoch and a final row.
"""
