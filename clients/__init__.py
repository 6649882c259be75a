"""livevoice clients: a Python async client with a CLI, and the browser widget."""
