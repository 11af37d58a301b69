"""Training stages: self-supervised vision pretraining, text MLM, image-report alignment, heads."""
