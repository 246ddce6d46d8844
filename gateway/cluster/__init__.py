"""Floor 5: running many workers: the supervisor, the shared registry, metrics, the media servers we start."""
