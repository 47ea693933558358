"""Runs: the driver side of a pipeline. Its stages trained and published in order, new data added as
iterations (`add`, `watch`), where a run stands (`status`), pipelines as Ray jobs, the trackers the
driver forwards metrics to, and the connection to Ray."""
