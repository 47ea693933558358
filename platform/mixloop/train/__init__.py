"""Training on the workers: the model (built or loaded), learning-rate schedules, the balanced loss,
the forward routes, the per-worker loop with its checkpoints and sessions, and the stage launcher."""
