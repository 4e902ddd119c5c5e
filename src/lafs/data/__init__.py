"""Face data: alignment, few-shot subsets and dataset readers."""
