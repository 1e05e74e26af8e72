"""The HTTP server: the OpenAI Images API over `engines`, as a standalone process, a node or a router."""
