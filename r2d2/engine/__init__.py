"""R2D2 engine: model, objectives, data, trainer, downstream tasks and the CLI."""
