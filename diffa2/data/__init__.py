"""Data: manifests, recipes, collators, and the embedded default's synthetic corpus and tokenizer."""
