"""Budgeted hyperparameter sweeps of the training job on Ray Tune: every trial is a full Ray Train run."""
