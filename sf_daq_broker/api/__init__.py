"""The broker's HTTP API (aiohttp)."""
