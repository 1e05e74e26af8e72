"""The node wing: where orders render (the node role, and the standalone role in-process). The engine pool
(`pool`) loads the model directories `models_dir` finds (or says why it finds none) and holds one queue per
model (`queue`, its tickets: `ticket`), whose render threads step renders alone or batched (`batcher`);
`stream` turns a render into events, `local` is the pool as the standalone dispatcher's in-process node,
`agent` keeps a node registered with its routers, `routes` are `/v0`."""
