"""Managed projects: git repositories the fleet keeps cloned (service.py, queries.sql)."""
