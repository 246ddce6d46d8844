"""Floor 5: the Voice API (/voice/v1), its OpenAPI document, and the signed webhooks it posts."""
