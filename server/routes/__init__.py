"""Route handlers: parse, call, shape the reply."""
