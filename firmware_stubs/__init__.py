"""C99 runtime for exported SNNs (package data; arrives with the export stage)."""
