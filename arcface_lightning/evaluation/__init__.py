"""Measuring embeddings and runs: retrieval and verification metrics (metrics.py), the angle and sphere figures
(figures.py), a sweep's job folders read back (sweep_jobs.py)."""
