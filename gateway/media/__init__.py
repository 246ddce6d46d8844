"""Floor 1: sans-I/O media: RTP/RTCP packets, G.711, RFC 4733 and in-band DTMF, the jitter buffer, voice activity."""
