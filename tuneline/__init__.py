"""tuneline: reproducible, cached, auditable QLoRA fine-tuning as a DVC pipeline."""
