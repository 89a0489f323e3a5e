"""The outside-formats wing: HF checkpoints, encoder key layouts, the released SPHINX-X checkpoints.

Every module here builds the core's models (model.py, vision.py) and renames outside tensors into
them; the core never imports this package."""
