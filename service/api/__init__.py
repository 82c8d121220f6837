"""The HTTP layer: schemas, routes, and the one mapping from domain errors to status codes."""
