"""The only code that touches instance bytes: the local cache (and, later, the bucket client)."""
