"""Data: validate, tokenize and pack corpora (Ray Data), and mix them by plan."""
