"""The one place the server takes the engine from: an `Engine` with `.loop` (submit / abort / close) and
`.core` (metrics), and the `RequestOutput` its callbacks receive."""
from specbeam.engine import Engine, RequestOutput

__all__ = ["Engine", "RequestOutput"]
