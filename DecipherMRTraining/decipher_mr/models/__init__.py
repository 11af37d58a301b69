"""Model definitions shared by training and inference."""
