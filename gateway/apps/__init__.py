"""Floor 4: call applications: the dial-in flow, the in-room flow, echo, and what they share (services)."""
