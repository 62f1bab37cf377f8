"""Data: raw rows -> Example (schemas) -> TokenizedGroup (tokenize) -> Batch (collate)."""
