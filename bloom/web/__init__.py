"""The web layer under the app factory: request guards, JSON in and out, limits, the request
log, errors as JSON, OpenAPI. It imports nothing from the app factory or the blueprints."""
