"""The model repository: a folder per model, a sub-folder per version, a config per model."""
