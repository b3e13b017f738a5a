"""ssegw: a Server-Sent Events gateway for high fan-out (raw asyncio on uvloop)."""

__version__ = "0.1.0"
