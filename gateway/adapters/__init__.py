"""Floor 2: thin asyncio adapters around the sans-I/O cores (SIP transports, RTP sessions, the media clock, the Janus API client)."""
