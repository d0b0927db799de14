"""Knowledge distillation (TinyBERT / MiniLM): losses, general and task distillation, data augmentation."""
