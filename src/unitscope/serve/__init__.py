"""Live feature browser: the report plus a JSON API over the subject (needs the `serve` extra)."""

from .app import Limits, check_host, create_app, safe_file

__all__ = ["Limits", "check_host", "create_app", "safe_file"]
