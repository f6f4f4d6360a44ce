"""Training the embedded default model: procedural shapes dataset, pixel-analysis checker, training script."""
