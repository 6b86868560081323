"""Sparse autoencoders: the base class, training, the SAELens format and other pretrained formats."""
