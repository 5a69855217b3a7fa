"""URL converters for ids that may hold any character, '/' included (docs/API.md, Conventions)."""
from __future__ import annotations

from werkzeug.routing import BaseConverter


class WorkerIdConverter(BaseConverter):
    """A worker id is its name, and Membridge agent names may contain '/', '%' or '..'.

    Clients percent-encode the id as one path segment (`rack%2F1`); the server hands
    the application the decoded path (`rack/1`), so the id may span several segments:
    it matches everything up to the route's fixed suffix (`/claim`), if any.
    """

    regex = r"[^\x00]+?"
    part_isolating = False
