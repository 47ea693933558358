"""Evaluation: what each version scores (eval loss per corpus, chat health), the HTML report of
gains and forgetting, and talking to a version (`mixloop chat`)."""
