"""The A1111 wing: AUTOMATIC1111's web API (`/sdapi/v1`) and its ControlNet extension's (`/controlnet`) that a
front door answers (standalone, router). `protocol` holds their bodies, `requests` resolves one into a render
order, `tasks` follows the renders for `/progress` and `/interrupt`, `infotext` writes and reads the
parameters its PNGs carry, `lists` answers what scripts read at start-up, `controlnet` the extension's routes,
`units` its units on txt2img and img2img, `routes` the rest."""
