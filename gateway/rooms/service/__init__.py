"""The room service: Video API, room and participant state, the page and its signalling, moderation (its own process)."""
