"""The input pipeline: built-in example datasets, the resumable sampler and loader, online streams."""
