"""What every command shares, importing neither torch nor the model: the user errors and range checks (checks.py),
the configs (config.py), the command line before Hydra (overrides.py), running a command (runs.py), the allow-list
of buildable classes (registry.py), outputs written aside (writing.py)."""
