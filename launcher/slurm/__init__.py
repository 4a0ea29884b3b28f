"""Slurm wing: env.py reads the job shape from SLURM_* inside an allocation (pure functions); submit.py fills
an sbatch template from slurm/ and submits it (``--slurm``).

May import: launcher.errors, launcher.resources."""
