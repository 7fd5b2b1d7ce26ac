"""`atmpipe inspect --serve`: the built browser over HTTP on the loopback address, with a live text box.

Flask serves the browser's files and one endpoint, POST /api/text {"text": "..."}, which runs the text
through the LM (up to the SAEs' layer) and every SAE, and answers as the build's `--text` view does: the
token ids, each token's strongest latents per SAE (as a share of the latent's held-out max) and the
tokens' strings. The server listens on 127.0.0.1 only: it runs the model for whoever can reach it.
"""

from __future__ import annotations

import socket
from pathlib import Path

from flask import Flask, jsonify, request, send_from_directory
from werkzeug.serving import make_server

from atmpipe.errors import UserError
from atmpipe.inspect import texts

HOST = "127.0.0.1"  # loopback only, never a public interface
MAX_CHARS = 20_000  # a request's text (the LM sees at most texts.MAX_TOKENS tokens of it)


class TextRunner:
    """The LM, the SAEs and their held-out maxima, kept loaded between requests."""

    def __init__(self, lm, saes: list, maxes: list, layer: int):
        self.lm, self.saes, self.maxes, self.layer = lm, saes, maxes, layer

    def __call__(self, text: str) -> dict:
        ids, resid = texts.residual(self.lm, self.layer, text)
        view = texts.text_view(self.saes, self.maxes, [(ids, resid)])[0]
        strings = {str(i): self.lm.tokenizer.decode([i]) for i in set(ids)}
        return view | {"vocab": strings}


def make_app(out: Path, runner):
    """The Flask app: the browser's files under `out`, and POST /api/text answered by `runner(text)`."""
    app = Flask(__name__, static_folder=None)
    root = str(Path(out).resolve())

    @app.get("/")
    def index():
        return send_from_directory(root, "index.html")

    @app.get("/<path:name>")
    def files(name: str):
        return send_from_directory(root, name)  # refuses paths outside `root`

    @app.get("/api/info")
    def info():
        return jsonify({"live": True, "max_chars": MAX_CHARS, "max_tokens": texts.MAX_TOKENS})

    @app.post("/api/text")
    def run_text():
        body = request.get_json(silent=True)
        text = body.get("text") if isinstance(body, dict) else None
        if not isinstance(text, str) or not text.strip():
            return jsonify({"error": 'send JSON {"text": "..."} with some text in it'}), 400
        if len(text) > MAX_CHARS:
            return jsonify(
                {"error": f"the text has {len(text):,} characters; send at most {MAX_CHARS:,}"}
            ), 400
        return jsonify(runner(text.strip()))

    return app


def start(out: Path, runner, port: int):
    """A server bound to HOST:port (0: any free port), not yet serving; refused when the port is taken.
    The socket is bound here and handed to werkzeug, whose own bind exits the process on failure."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((HOST, port))
        sock.listen(64)
        return make_server(HOST, port, make_app(out, runner), threaded=False, fd=sock.fileno())
    except OSError as e:
        raise UserError(f"cannot listen on {HOST}:{port} ({e.strerror}); pass another --port") from None
    finally:
        sock.close()  # werkzeug holds its own duplicate of the socket


def serve(out: Path, runner, port: int, console) -> None:
    """Serve until interrupted (Ctrl-C ends it cleanly)."""
    server = start(out, runner, port)
    console.print(f"serving the browser at http://{HOST}:{server.port}/  (Ctrl-C stops it)")
    try:
        server.serve_forever()  # werkzeug's returns on Ctrl-C
    finally:
        server.server_close()
    console.print("stopped serving")
