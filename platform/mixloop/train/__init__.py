"""Training: learning-rate schedules, the balanced loss, the per-worker loop and the stage launcher."""
