"""The engine's scenarios (``python -m bench run NAME``); a new one is a class like these.

Each runs against ``--target`` (ssegw, sse-starlette or aiohttp-sse) with the exact counting
of bench/client.py; see engine.py for what the attributes mean.
"""

from __future__ import annotations

import asyncio
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import run  # noqa: E402
from common import wait_quiet  # noqa: E402
from engine import SSEUser, Timeline  # noqa: E402
from loadgen import Clients  # noqa: E402


class TickerUser(SSEUser):
    """Fan-out: every user on one topic, the publisher sends ``rate`` msg/s to it."""

    topics = "ticker"
    rate = 100


class DirectedUser(SSEUser):
    """Per-user push: user i listens to ``user.<i>``; each message goes to a random user."""

    topics = "user.{i}"
    rate = 500


class RateSweepUser(TickerUser):
    """Fan-out at each of ``rates`` on one set of connections; stops after the first rate
    that fails the verdict (loss, p99 over ``max_p99_ms``, backlog)."""

    rates: tuple[float, ...] = (10, 100, 1000)

    async def run(self, env: run.Env) -> dict[str, object]:
        steps = []
        for rate in self.rates:
            res = await self.window(env, rate)
            steps.append(res)
            if res["verdict"] != "ok":
                break
        return {"steps": steps}


class StormUser(TickerUser):
    """A connection storm next to live subscribers: while the users get the ticker,
    ``storm`` more subscribers connect at once (a quarter into the window), stay for a quarter
    of it and all leave at once.  Adds a timeline (open streams, events/s, p99 per 0.5 s)."""

    storm = 1500
    duration = 12.0

    async def run(self, env: run.Env) -> dict[str, object]:
        assert env.srv is not None
        env.args.attempts = 1  # the storm's own process would count as someone else's CPU
        # Wait for a quiet machine here, not inside the window, so that the storm's times
        # count from the start of publishing.
        info: dict[str, object] = {"storm": self.storm, "before_window": await wait_quiet(self.quiet_wait) if self.quiet_wait > 0 else None}
        env.args.quiet_wait = 0
        timeline = Timeline(env)

        async def storm() -> None:
            assert env.srv is not None
            await asyncio.sleep(self.duration / 4)
            t = asyncio.get_running_loop().time()
            extra = await Clients.start(env.srv.port, self.storm, 1, self.topics, 0, run.CLIENT_CORE, count="seq",
                                        max_life=self.duration * 4 + 120)
            try:
                info["storm_connected"] = extra.ok
                info["storm_connect_s"] = round(asyncio.get_running_loop().time() - t, 2)
                await asyncio.sleep(self.duration / 4)
            finally:
                await extra.quit()

        sampler = asyncio.ensure_future(timeline.run())
        storming = asyncio.ensure_future(storm())
        try:
            res = await self.window(env, self.rate)
            await storming
            await asyncio.sleep(1.0)  # the server's count of open streams after the storm left
        finally:
            timeline.stop.set()
            storming.cancel()
            await sampler
        res.update(info)
        res["timeline"] = timeline.rows
        return res
