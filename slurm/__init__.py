"""Getting Ray onto SLURM: worker pools (pools.py), the pool job (raynode.py), the head (head.py)."""
