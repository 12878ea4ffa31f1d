"""Per-job pieces for the trainer: pretraining (token stages over indexed corpora)."""
