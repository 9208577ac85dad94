"""The one protocol between host daemons: a sans-IO frame codec and an asyncio channel."""
