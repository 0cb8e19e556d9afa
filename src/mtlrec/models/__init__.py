"""Models: fused embeddings, user/item encoders, multi-task backbones and heads."""
