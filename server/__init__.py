"""The HTTP server: the OpenAI Images API over `engines`, as a standalone process, a node or a router.

Folders say where each piece runs; imports run one way, from the wings down to the floor:

    app.py, __main__.py     the process: settings → create_app(settings) wires the wings of its role
    openai/   a1111/        the public APIs a front door (standalone, router) answers: requests → orders
    router/                 a front door's dispatch of orders over nodes: registry, prober, relay, admission
    node/                   where orders render (node, standalone): engine pool, queues, batcher, streams
    floor: protocol.py (the public OpenAI Structs), wire.py (router ↔ node), sse.py (event streams),
           state.py, errors.py, settings.py, guards.py, tenants.py, images.py, adapters.py,
           metrics.py, logs.py, supervisor.py

The wings import the floor and never each other: a front door's APIs reach the dispatcher through
`state.Renderer`, the dispatcher reaches nodes through `wire.NodeTransport`, the batcher its queue through
`batcher.Slot`. Only the process (`app.py`, `__main__.py`) imports the wings, to wire them together.
"""
