"""offpg-offline: offline RL by importance-weighted (off-policy) policy gradient."""

__version__ = "0.1.0"
