"""Live drafts: the worker's publisher, the API server's stream weaving and routes, and the
playground page."""
