"""livevoice server: aiohttp app, sessions, voice store, models."""
