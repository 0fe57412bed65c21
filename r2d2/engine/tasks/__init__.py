"""Downstream tasks on CCMB and the public Chinese benchmarks.

retrieval  two-stage (pre-rank + cross-encoder re-rank) image-text retrieval evaluation
matching   ITM fine-tuning objective and AUC / accuracy evaluation
zeroshot   zero-shot classification with Chinese prompt templates
rerank     the batched, distributed top-k re-ranking shared by retrieval and inference
config     ``r2d2 eval``'s typed config (read with the run config's loader)
evaluate   the ``r2d2 eval`` runner: read, load, evaluate, write (the command is r2d2.cli.eval)
report     recall@k curves, their plot, the Markdown table
heldout    the trainer's end-of-run held-out retrieval evaluation
"""
