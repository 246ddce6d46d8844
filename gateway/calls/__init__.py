"""Floor 3: calls: the user agent (admission, dispatch), `Call` with its linear flow, dial-out, registration, a call's audio (digits, prompts, hold), the API's handle on a live call."""
