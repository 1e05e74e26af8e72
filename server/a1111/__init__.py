"""The A1111 wing: AUTOMATIC1111's web API (`/sdapi/v1`) a front door answers (standalone, router).
`protocol` holds its bodies, `requests` resolves one into a render order, `tasks` follows the renders for
`/progress` and `/interrupt`, `routes` answers."""
