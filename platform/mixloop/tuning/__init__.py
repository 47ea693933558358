"""Search mixes and learning-rate re-warm settings with Ray Tune and Optuna (`mixloop tune`)."""
