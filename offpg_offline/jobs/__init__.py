"""Jobs behind the `offpg` commands, callable without the CLI.

- `record`: a training run recorded in MLflow (dataset input, config TOML, training, plots, the
  policy as a model), resuming one, run names, and the config as TOML.
- `sweep`: the grid of a sweep and its child runs under one parent run.
- `evaluate`: off-policy evaluation of a trained policy.

The CLI parses options, calls these functions and prints what they return; nothing here prints
except through a `progress` callable it is given.
"""
