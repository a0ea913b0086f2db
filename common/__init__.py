"""Small utilities every package may use (atomic writes, progress bars, process groups); imports nothing from the project."""
