"""Downstream tasks on CCMB and the public Chinese benchmarks.

retrieval  two-stage (pre-rank + cross-encoder re-rank) image-text retrieval evaluation
matching   ITM fine-tuning objective and AUC / accuracy evaluation
zeroshot   zero-shot classification with Chinese prompt templates
rerank     the batched, distributed top-k re-ranking shared by retrieval and inference
cli        ``r2d2 eval retrieval|matching|zeroshot``
"""
