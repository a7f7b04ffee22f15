"""Adapting and training models: palindrome LoRA fine-tuning and pretraining sam2pal-micro."""
