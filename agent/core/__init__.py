"""The daemon's core: windows, the model, the pipeline, detection."""
