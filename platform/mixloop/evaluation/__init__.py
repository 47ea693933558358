"""Evaluation: what each version scores (eval loss per corpus with its standard error, chat health,
and what it knows: lm-evaluation-harness tasks and probes), the HTML report of gains and forgetting,
and talking to a version (`mixloop chat`)."""
