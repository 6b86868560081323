"""What the user configures: registry files, the validated registry, SAE sources, sweeps, matrices."""
