"""rapido: speech audio in, a lip-synced talking-avatar stream out."""

__version__ = "0.1.0"
