"""rapido: speech audio in, a lip-synced talking-avatar stream out."""

from rapido import _threads  # noqa: F401  (must run before numpy is imported)

__version__ = "0.1.0"
