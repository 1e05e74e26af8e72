"""The OpenAI wing: the Images API (`/v1`) a front door answers (standalone, router). `requests` resolves a
request into a render order, `uploads` (with `forms` and `fetch`) reads its images, `routes` answers it,
`store` keeps the images behind `url` responses, `models` lists the models, `playground` serves the page."""
