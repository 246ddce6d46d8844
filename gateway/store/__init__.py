"""Floor 2: persistence in the data dir (SQLite): the CDR and the webhook outbox, projects, rooms. Imports only config and log."""
