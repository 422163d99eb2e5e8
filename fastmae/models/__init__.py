"""The model, pure PyTorch with the official parameter names: patches, masking, positions, ViT, MAE, the feature
pyramid, task heads, DenseModel and `encode`. nn.Modules and pure functions only; nothing here reads files or flags.
"""
