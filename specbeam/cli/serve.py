"""An OpenAI-compatible HTTP server (completions, chat, beam search, speculation); with no --model, the shipped
pair."""
import argparse
import logging
import signal
import threading
from pathlib import Path

import torch

from specbeam.assets import load_default_pair

from specbeam.cli.errors import CliError
from specbeam.cli.loading import add_draft_weights, load_model, load_tokenizer

SHIPPED_NAME = "specbeam-pair"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", type=Path, default=None, help="local model directory (default: the shipped target)")
    parser.add_argument("--draft", default=None,
                        help='a draft model directory, "ngram" or "none" (default: the shipped draft with the shipped '
                             "target, else none)")
    add_draft_weights(parser)
    parser.add_argument("--tokenizer", type=Path, default=None,
                        help="tokenizer directory (default: the model's, else a sibling 'tokenizer' directory)")
    parser.add_argument("--served-model-name", default=None, help="the name clients ask for (default: the "
                        f"model directory's name, {SHIPPED_NAME!r} for the shipped pair)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                        help="auto: the checkpoint's dtype on a GPU, float32 on the CPU")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--max-num-seqs", type=int, default=64, help="sequences (beams, samples) decoded at once")
    parser.add_argument("--max-queue", type=int, default=512, help="requests waiting beyond those; more get a 503")
    parser.add_argument("--shutdown-timeout", type=float, default=10.0,
                        help="seconds running requests get to finish on SIGINT / SIGTERM before they are aborted")


def load(args: argparse.Namespace):
    """(target, draft or "ngram" or None, tokenizer, served name)."""
    if args.model is None:
        target, draft, tokenizer = load_default_pair()
        target = target.to(args.device)
        draft = draft.to(args.device) if args.draft is None else _draft(args)
        return target, draft, tokenizer, args.served_model_name or SHIPPED_NAME
    return load_model(args.model, args), _draft(args), load_tokenizer(args), args.served_model_name or args.model.name


def _draft(args: argparse.Namespace):
    if args.draft in (None, "none"):
        return None
    return "ngram" if args.draft == "ngram" else load_model(Path(args.draft), args)


def run(args: argparse.Namespace) -> int:
    try:
        import uvicorn

        from specbeam.serve import ServeConfig, Server, create_app
    except ImportError as error:
        raise CliError(f"the server needs its dependencies ({error.name} is missing): "
                       "pip install 'specbeam[serve]'") from error
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    target, draft, tokenizer, name = load(args)
    server = Server(target, tokenizer, draft, ServeConfig(name, args.max_num_seqs, args.max_queue, args.draft_weights))
    config = uvicorn.Config(create_app(server), host=args.host, port=args.port, access_log=False,
                            timeout_graceful_shutdown=args.shutdown_timeout, log_config=None)
    http = uvicorn.Server(config)
    _serve_until_signalled(http, server)
    if not http.started:
        raise CliError(f"the server could not start on {args.host}:{args.port} (its log says why)")
    return 0


def _serve_until_signalled(http, server) -> None:
    """uvicorn answers HTTP on a thread of its own while this thread, which loaded the models, steps the engine
    (its OpenMP team is the only one: `specbeam.engine.loop`). SIGINT / SIGTERM stop uvicorn gracefully (a
    second one at once); its shutdown closes the engine's loop, which ends `run_forever` here."""
    signals = (signal.SIGINT, signal.SIGTERM)

    def stop(sig, frame) -> None:
        http.force_exit = http.should_exit
        http.should_exit = True

    def answer() -> None:
        try:
            http.run()
        finally:  # also when uvicorn could not start
            server.close()

    previous = {sig: signal.signal(sig, stop) for sig in signals}
    thread = threading.Thread(target=answer, name="uvicorn")
    try:
        server.engine.loop.run_forever(started=thread.start)
        thread.join()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
