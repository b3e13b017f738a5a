"""Sans-I/O core of ssegw: no asyncio, sockets, clocks, logging or brokers in here.

Everything in this package takes bytes, plain values and an integer ``now_ms`` and
returns bytes, records or decisions, so it can be unit- and property-tested
without a loop (the h11 way).
"""
