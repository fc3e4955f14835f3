"""mlipops: data and model operations for machine-learning interatomic potentials."""

__version__ = "0.1.0"
