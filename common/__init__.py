"""Small utilities every package may use (atomic writes, progress bars); imports nothing from the project."""
