"""What the scheduler and the running jobs say: the submission ledger, SLURM's queue and accounting,
the one live view of a set of stage jobs, status, logs and progress."""
