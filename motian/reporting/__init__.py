"""The report layer: every Markdown page and table motian writes is built here from data."""
