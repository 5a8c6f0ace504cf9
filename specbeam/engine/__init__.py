"""The engine: the drop-in `Engine.generate` and `patch`, on a step-based core that batches every request."""
from specbeam.engine.core import EngineCore
from specbeam.engine.drop_in import Engine, patch, unpatch
from specbeam.engine.loop import EngineLoop
from specbeam.outputs import RequestOutput

__all__ = ["Engine", "EngineCore", "EngineLoop", "RequestOutput", "patch", "unpatch"]
