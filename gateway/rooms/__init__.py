"""Floor 5: the room side: directories (meeting ID + PIN -> room), room connectors (where a phone joins a room), and the room service (control plane and its page)."""
