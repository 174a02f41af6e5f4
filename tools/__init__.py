"""Developer tools that are not part of the runtime package (like diffusers' examples/): the tiny model's
trainer. Run from the repository root: `python -m tools.train_tiny`."""
