"""Baseline: an SSE fan-out server as a Python user writes it with sse-starlette
(Starlette + uvicorn, uvloop and httptools from ``uvicorn[standard]``).

    python bench/baselines/starlette_app.py --port 8090
    curl -N 'localhost:8090/events?topic=ticker'
    curl -d '{"topic":"ticker","data":{"px":1}}' localhost:8090/publish
"""

from __future__ import annotations

import os
import sys

import uvicorn
from sse_starlette import EventSourceResponse
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse
from starlette.routing import Route

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from hub import Hub, listen_socket  # noqa: E402

hub = Hub()


async def events(request: Request) -> EventSourceResponse:
    topics = request.query_params.getlist("topic")
    last = request.headers.get("last-event-id") or request.query_params.get("last_event_id")
    queue, replay = hub.subscribe(topics, last)

    async def stream():  # type: ignore[no-untyped-def]
        try:
            for event in replay:
                yield event
            while True:
                yield await queue.get()
        finally:
            hub.unsubscribe(topics, queue)

    # sep="\n": the separator ssegw uses (sse-starlette's default is "\r\n").
    return EventSourceResponse(stream(), sep="\n", ping=15)


async def publish(request: Request) -> JSONResponse:
    try:
        ids = hub.publish(await request.json())
    except (KeyError, TypeError, ValueError) as e:
        return JSONResponse({"error": "bad_request", "detail": str(e)}, status_code=400)
    return JSONResponse({"ids": ids})


async def stats(request: Request) -> JSONResponse:
    return JSONResponse(hub.stats())


async def ok(request: Request) -> PlainTextResponse:
    return PlainTextResponse("ok\n")


app = Starlette(routes=[
    Route("/events", events), Route("/publish", publish, methods=["POST"]),
    Route("/admin/stats", stats), Route("/healthz", ok), Route("/metrics", ok),
])

if __name__ == "__main__":
    sock = listen_socket()
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False))
    server.run(sockets=[sock])
