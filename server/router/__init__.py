"""The router wing: a front door's dispatch of orders over nodes (the router role, and the standalone role
over its in-process node). `registry` knows the nodes, `admission` lets them join, `prober` watches them,
`dispatch` sends each order to one (`relay` passes a stream on), `node_client` is the HTTP transport to a
remote node, `routes` are the fleet's `/v0` routes."""
