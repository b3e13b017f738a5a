"""Baseline: an SSE fan-out server as a Python user writes it with aiohttp-sse (on uvloop).

    python bench/baselines/aiohttp_app.py --port 8091
    curl -N 'localhost:8091/events?topic=ticker'
    curl -d '{"topic":"ticker","data":{"px":1}}' localhost:8091/publish
"""

from __future__ import annotations

import asyncio
import json
import os
import sys

import uvloop
from aiohttp import web
from aiohttp_sse import sse_response

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from hub import Hub, listen_socket  # noqa: E402

hub = Hub()


async def events(request: web.Request) -> web.StreamResponse:
    topics = request.query.getall("topic", [])
    last = request.headers.get("Last-Event-ID") or request.query.get("last_event_id")
    queue, replay = hub.subscribe(topics, last)
    try:
        # sep="\n": the separator ssegw uses (aiohttp-sse's default is "\r\n").
        async with sse_response(request, sep="\n") as resp:
            for event in replay:
                await resp.send(event["data"], id=event["id"], event=event.get("event"))
            while resp.is_connected():
                event = await queue.get()
                await resp.send(event["data"], id=event["id"], event=event.get("event"))
    finally:
        hub.unsubscribe(topics, queue)
    return resp


async def publish(request: web.Request) -> web.Response:
    try:
        ids = hub.publish(await request.json())
    except (KeyError, TypeError, ValueError) as e:
        return web.json_response({"error": "bad_request", "detail": str(e)}, status=400)
    return web.json_response({"ids": ids}, dumps=json.dumps)


async def stats(request: web.Request) -> web.Response:
    return web.json_response(hub.stats())


async def ok(request: web.Request) -> web.Response:
    return web.Response(text="ok\n")


app = web.Application()
app.add_routes([web.get("/events", events), web.post("/publish", publish), web.get("/admin/stats", stats),
                web.get("/healthz", ok), web.get("/metrics", ok)])

if __name__ == "__main__":
    sock = listen_socket()
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    # handler_cancellation: a subscriber that goes away cancels its handler (aiohttp's "peer
    # disconnection" docs), so its queue leaves the hub; without it the handler waits in
    # queue.get() and the dead queue keeps filling.
    web.run_app(app, sock=sock, print=None, access_log=None, handler_cancellation=True)
