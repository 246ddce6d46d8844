"""Call applications, one per DID route: what a caller gets once admitted."""
