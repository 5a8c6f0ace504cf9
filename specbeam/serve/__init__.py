"""`specbeam serve`: an OpenAI-compatible HTTP server over specbeam's engine (continuous batching, beam search,
speculation). `create_app(Server(model, tokenizer, draft))` is the FastAPI application."""
from specbeam.serve.app import create_app
from specbeam.serve.server import ServeConfig, Server

__all__ = ["ServeConfig", "Server", "create_app"]
