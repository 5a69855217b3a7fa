"""Tasks: bloom/tasks/service.py and the statements beside it."""
