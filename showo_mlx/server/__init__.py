"""`showo serve`: an OpenAI-compatible HTTP server for one Show-o model, with a browser page.

    showo serve --model showlab/show-o            # http://127.0.0.1:8080

Needs the `server` extra (FastAPI + uvicorn): `pip install 'showo-mlx[server]'`. The modules:
`cli` (the command), `app` (routes), `schemas` (request bodies), `work_queue` (one model, one
request at a time), `tasks` (what a request runs on the model, through `Pipeline`), `chat`
(messages → Show-o's prompt format), `inputs` (uploaded images and masks), `outputs` (PNGs),
`middleware` (request log, body limit, API key), `static/` (the page). docs/SERVER.md describes
the endpoints."""
