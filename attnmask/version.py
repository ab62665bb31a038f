"""attnmask's version: a leaf that every stage may import (stores record it)."""

__version__ = "0.1.0"
