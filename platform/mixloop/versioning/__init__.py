"""Versions: what a stage publishes and how it is judged. The registry of immutable version folders
(`models/<version>/`, the `current` alias), their lineage records, the gate that decides which
version is current, and the export of a version as a Hugging Face folder to share."""
