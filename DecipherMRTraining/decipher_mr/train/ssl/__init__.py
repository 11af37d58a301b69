"""Stage 1: self-supervised pretraining of the 3D ViT with DINOv2-style DINO + iBOT + KoLeo losses.

``trainer.train(config)`` runs it; ``decipher-mr pretrain-vision`` is the command line.
"""
