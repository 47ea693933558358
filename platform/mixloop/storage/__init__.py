"""Storage: files under a local or fsspec run directory (`fs`), the workdir's lock, and the Hugging
Face Hub's cache for models and datasets named by id."""
