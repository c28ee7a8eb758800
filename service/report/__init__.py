"""The architecture comparison: Markdown report, claims worded from the numbers, charts."""
