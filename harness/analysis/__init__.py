"""What the numbers mean across SAEs and models: survival, alignment, bootstrap intervals, per-latent data."""
