"""Data: readers (jsonl, tsv, webdataset, CCMB), the synthetic default, transforms and collate."""
