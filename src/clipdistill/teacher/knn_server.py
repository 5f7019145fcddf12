"""`clipdistill serve-knn`: an embedded pool served as a clip-retrieval knn service (the protocol
`search --service` speaks, knn_service.py), and its images over HTTP.

Why: the archive is on one machine (a NAS of photos, shards on a file server) and the person who
has the words is on another; clip-retrieval's own back end needs its index built by its own tools,
where this serves the embedding cache fit-prompts already made. It is also how the words-only road
(search -> download -> fit-prompts) runs end to end with no internet: the same client code path
that asks LAION's service asks this one on the loopback address.

The answer to a POST is what clip_back answers: a JSON list of {url, caption, similarity, id},
best first, `num_images` long at most; the prompt is encoded by the teacher's text tower as it is
(no templates: a service gets raw text). `GET /images/ROW.png` serves a pool image (decoded and
written as PNG: a pool row may be a shard member, which has no URL of its own). Only rows the
cache holds as readable are answered; the pool's duplicates were embedded once."""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from ..core.config import at_least, check, check_fields, option
from ..core.errors import ConfigError
from .options import TeacherOptions

log = logging.getLogger(__name__)

MAX_BODY = 1 << 20  # a request is a few hundred bytes; anything larger is refused unread
MAX_IMAGES = 10000  # clip_back's own cap on num_images


@dataclasses.dataclass
class ServeKnnConfig(TeacherOptions):
    pool: list[str] = option(default_factory=list, help="the pool to serve: folders of images or tar shards "
                                                        "('pool-{000..099}.tar'), embedded first if they are not yet",
                             metavar="DIR|SHARDS[,...]")
    index: str = option("", "the index name clients ask for (--index of search); default: the pool folder's name",
                        metavar="NAME")
    host: str = option("127.0.0.1", "address to listen on (0.0.0.0: every interface; there is no "
                                    "authentication, so only on a network you trust)", runtime=True)
    port: int = option(1234, "port to listen on (0: any free one, printed)", runtime=True, valid=at_least(0))
    progress: bool = option(True, "show progress while the pool is embedded", runtime=True)

    def __post_init__(self) -> None:
        from ..data.shards import is_shard_spec

        self._check_teacher()
        check(bool(self.pool), "pool", "give the pool to serve: --pool DIR (a folder of images) or tar shards")
        for p in self.pool:
            check(Path(p).is_dir() or is_shard_spec(p), "pool",
                  f"{p} is not a folder or tar shards; give a folder of images or 'pool-{{000..099}}.tar'")
        check(self.port <= 65535, "port", "must be 0..65535")
        check_fields(self)
        if not self.index:
            first = self.pool[0].rstrip("/")
            self.index = Path(first).name if Path(first).is_dir() else Path(first).parent.name or "pool"


class KnnServer(ThreadingHTTPServer):
    """Answers the knn-service protocol from `embeddings` (rows x dim, any float dtype, a memmap
    is fine) with `encode(text) -> (dim,)`; `load(row)` gives the PIL image of a row. Made without
    them (`embeddings=None`), it is bound and says 503 + Retry-After until `ready(...)` gives them:
    the port is taken at once, and a client started beside it waits instead of failing."""

    daemon_threads = True

    def __init__(self, embeddings=None, valid=None, encode: Optional[Callable[[str], np.ndarray]] = None,
                 load: Optional[Callable[[int], object]] = None, index: str = "pool", host: str = "127.0.0.1",
                 port: int = 0, handler: Optional[type] = None):
        super().__init__((host, port), handler or KnnHandler)
        self.index = index
        self.lock = threading.Lock()  # the teacher's text tower is not reentrant
        self.embeddings = None
        if embeddings is not None:
            self.ready(embeddings, valid, encode, load)

    def ready(self, embeddings, valid, encode: Callable[[str], np.ndarray], load: Callable[[int], object]) -> None:
        self.valid, self.encode, self.load = valid, encode, load
        self.embeddings = embeddings  # last: a request sees all of it or none

    @property
    def url(self) -> str:
        """Where this machine reaches it (127.0.0.1 for a server on every interface)."""
        host, port = self.server_address[:2]
        return f"http://{'127.0.0.1' if host in ('0.0.0.0', '') else host}:{port}"

    def answer(self, body: dict, base: Optional[str] = None) -> list[dict]:
        """`base`: the URL the client reached us by (its Host header), for the image URLs: a client
        on another machine must not be sent to 0.0.0.0 or to itself."""
        from . import knn

        n = int(body.get("num_images") or 40)
        with self.lock:
            text = np.asarray(self.encode(str(body.get("text") or "")), np.float32).reshape(1, -1)
        (sims, rows), = knn.top_per_prompt(self.embeddings, text, min(n, MAX_IMAGES), self.valid)
        base = base or self.url
        return [{"url": f"{base}/images/{int(r)}.png", "caption": f"pool image {int(r)}",
                 "similarity": round(float(s), 6), "id": int(r)} for s, r in zip(sims, rows)]


class KnnHandler(BaseHTTPRequestHandler):
    server: KnnServer

    def log_message(self, fmt, *args):
        log.debug("%s " + fmt, self.address_string(), *args)

    def send(self, code: int, data: bytes, kind: str) -> None:
        try:
            self.send_response(code)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):  # the client gave up waiting
            pass

    def send_json(self, obj, code: int = 200) -> None:
        self.send(code, json.dumps(obj).encode(), "application/json")

    def base_url(self) -> str:
        host = self.headers.get("Host", "")
        return f"http://{host}" if host and "/" not in host and " " not in host else self.server.url

    def do_POST(self):  # noqa: N802 (http.server's name)
        try:
            size = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            size = -1
        if not 0 < size <= MAX_BODY:
            return self.send_json({"error": f"a request body of {self.headers.get('Content-Length')} bytes"}, 400)
        try:
            body = json.loads(self.rfile.read(size))
        except (json.JSONDecodeError, UnicodeDecodeError):
            return self.send_json({"error": "the body is not JSON"}, 400)
        if not isinstance(body, dict) or not isinstance(body.get("text"), str) or not body["text"]:
            return self.send_json({"error": "only text queries are served: give \"text\""}, 400)
        n = body.get("num_images", 40)
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            return self.send_json({"error": f"num_images must be a positive integer, not {n!r}"}, 400)
        if self.server.embeddings is None:
            self.send_response(503)
            self.send_header("Retry-After", "5")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return None
        if body.get("indice_name") != self.server.index:
            # clip_back's way: 200 with an error object, which the client turns into --index's error
            return self.send_json({"error": f"unknown index {body.get('indice_name')!r}; this server has "
                                            f"{self.server.index!r}"})
        return self.send_json(self.server.answer(body, self.base_url()))

    def do_GET(self):  # noqa: N802
        parts = self.path.strip("/").split("/")
        if len(parts) != 2 or parts[0] != "images" or not parts[1].removesuffix(".png").isdigit():
            return self.send(404, b"no such path", "text/plain")
        if self.server.embeddings is None:
            return self.send(503, b"the pool is being embedded", "text/plain")
        row = int(parts[1].removesuffix(".png"))
        if row >= len(self.server.embeddings):
            return self.send(404, b"no such image", "text/plain")
        try:
            im = self.server.load(row)
        except OSError as e:  # changed on disk since it was embedded
            return self.send(410, f"unreadable: {e}".encode(), "text/plain")
        buf = io.BytesIO()
        im.save(buf, format="PNG")
        return self.send(200, buf.getvalue(), "image/png")


def bind(cfg: ServeKnnConfig) -> KnnServer:
    """The socket first, so that a port in use is said before minutes of embedding."""
    import errno

    try:
        return KnnServer(index=cfg.index, host=cfg.host, port=cfg.port)
    except OSError as e:
        if e.errno == errno.EADDRINUSE:
            raise ConfigError(f"--port {cfg.port} is in use on {cfg.host}; give another, or --port 0 for any free "
                              "one") from None
        if e.errno in (errno.EADDRNOTAVAIL, errno.EACCES):
            raise ConfigError(f"--host {cfg.host} --port {cfg.port}: {e.strerror}") from None
        raise


def load_index(server: KnnServer, cfg: ServeKnnConfig) -> KnnServer:
    """The pool embedded (or its cache opened) and the teacher loaded: the server answers."""
    from ..data.options import DataOptions
    from .embed import fill_cache
    from .openclip_teacher import create_teacher
    from .outputs import cache_path

    ds = DataOptions(dataset="folder", pool=list(cfg.pool)).open_split("unlabeled", cfg.cache_dir)
    teacher = create_teacher(cfg.teacher, cfg.pretrained, cfg.device, cfg.precision, cfg.cache_dir)
    cache = fill_cache(teacher, ds, cache_path(cfg.cache_dir, teacher.slug, ds.slug(), "unlabeled"),
                       cfg.embed_batch_size, cfg.workers, False, cfg.progress)
    server.ready(cache.embeddings, cache.valid, lambda t: teacher.encode_texts([t]).numpy()[0], ds.load)
    return server


def open_server(cfg: ServeKnnConfig) -> KnnServer:
    """Bound and loaded, not yet serving (the caller runs serve_forever)."""
    return load_index(bind(cfg), cfg)


def serve(cfg: ServeKnnConfig, emit=None) -> dict:
    """Bound at once (clients asking meanwhile are told to retry), answering once the pool is
    embedded; serves until interrupted (Ctrl-C). Says where when it answers."""
    server, where = bind(cfg), {}
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        log.info("listening on %s; embedding the pool first (clients are told to retry meanwhile)", server.url)
        load_index(server, cfg)
        where = {"service": f"{server.url}/knn-service", "index": cfg.index, "images": len(server.embeddings)}
        if emit is not None:
            emit(where)
        thread.join()
    except KeyboardInterrupt:
        pass
    finally:
        server.shutdown()
        server.server_close()
    return where


def text(where: dict, cfg: ServeKnnConfig) -> str:
    return (f"serving {where['images']} images of {', '.join(cfg.pool)} as index {where['index']!r} at "
            f"{where['service']} (Ctrl-C stops)\n"
            f"search it: clipdistill search --prompts PROMPTS --service {where['service']} --index {where['index']}")
