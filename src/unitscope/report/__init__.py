"""Feature browser: a static site that opens from the file system (and that `unitscope serve` also serves)."""

from .site import Source, report_run, write_report, write_site

__all__ = ["Source", "report_run", "write_report", "write_site"]
