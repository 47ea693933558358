"""Data: corpora read, validated, tokenized and packed (Ray Data), and mixed by plan. The spec's
corpora in a workdir (`corpora`), the tokenizer and its encoders, the file readers with file:line
rejects, packing and the packed store, the mix plan, and the quickstart's generated worlds."""
