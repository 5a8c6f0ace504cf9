"""The one place the server takes the engine from: an `Engine` with `.loop` (submit / abort / close) and
`.core` (metrics), and the `RequestOutput` its callbacks receive."""
from specbeam.serve._shim import Engine, RequestOutput  # TEMPORARY: specbeam.engine once the step core lands

__all__ = ["Engine", "RequestOutput"]
