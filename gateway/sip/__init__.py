"""Floor 1: sans-I/O SIP: messages, SDP, transactions, dialogs, digest; fed bytes and `now`, returning bytes and events."""
