"""Feature browser: a static site that opens from the file system."""

from .static import write_report

__all__ = ["write_report"]
