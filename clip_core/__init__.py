"""A faithful PyTorch CLIP: models, tokenizer, preprocessing and checkpoints."""
