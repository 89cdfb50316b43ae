"""dpr-hpc: run the DPR encoder-efficiency grid (train -> index -> infer) on SLURM or locally."""

__version__ = "0.1.0"
