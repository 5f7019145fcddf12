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
    is fine) with `encode(text) -> (dim,)`; `load(row)` gives the PIL image of a row."""

    daemon_threads = True

    def __init__(self, embeddings, valid, encode: Callable[[str], np.ndarray], load: Callable[[int], object],
                 index: str, host: str = "127.0.0.1", port: int = 0, handler: Optional[type] = None):
        super().__init__((host, port), handler or KnnHandler)
        self.embeddings, self.valid, self.encode, self.load, self.index = embeddings, valid, encode, load, index
        self.lock = threading.Lock()  # the teacher's text tower is not reentrant

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}"

    def answer(self, body: dict) -> list[dict]:
        from . import knn

        n = int(body.get("num_images") or 40)
        with self.lock:
            text = np.asarray(self.encode(str(body.get("text") or "")), np.float32).reshape(1, -1)
        (sims, rows), = knn.top_per_prompt(self.embeddings, text, min(n, MAX_IMAGES), self.valid)
        return [{"url": f"{self.url}/images/{int(r)}.png", "caption": f"pool image {int(r)}",
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

    def do_POST(self):  # noqa: N802 (http.server's name)
        size = int(self.headers.get("Content-Length") or 0)
        if not 0 < size <= MAX_BODY:
            return self.send_json({"error": f"a request body of {size} bytes"}, 400)
        try:
            body = json.loads(self.rfile.read(size))
        except json.JSONDecodeError:
            return self.send_json({"error": "the body is not JSON"}, 400)
        if not isinstance(body, dict) or not body.get("text"):
            return self.send_json({"error": "only text queries are served: give \"text\""}, 400)
        if body.get("indice_name") != self.server.index:
            # clip_back's way: 200 with an error object, which the client turns into --index's error
            return self.send_json({"error": f"unknown index {body.get('indice_name')!r}; this server has "
                                            f"{self.server.index!r}"})
        return self.send_json(self.server.answer(body))

    def do_GET(self):  # noqa: N802
        parts = self.path.strip("/").split("/")
        if len(parts) != 2 or parts[0] != "images" or not parts[1].removesuffix(".png").isdigit():
            return self.send(404, b"no such path", "text/plain")
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


def open_server(cfg: ServeKnnConfig) -> KnnServer:
    """The pool embedded (or its cache opened), the teacher loaded, the socket bound: ready to serve."""
    from ..data.options import DataOptions
    from .embed import fill_cache
    from .openclip_teacher import create_teacher
    from .outputs import cache_path

    ds = DataOptions(dataset="folder", pool=list(cfg.pool)).open_split("unlabeled", cfg.cache_dir)
    teacher = create_teacher(cfg.teacher, cfg.pretrained, cfg.device, cfg.precision, cfg.cache_dir)
    cache = fill_cache(teacher, ds, cache_path(cfg.cache_dir, teacher.slug, ds.slug(), "unlabeled"),
                       cfg.embed_batch_size, cfg.workers, False, cfg.progress)
    return KnnServer(cache.embeddings, cache.valid, lambda t: teacher.encode_texts([t]).numpy()[0], ds.load,
                     cfg.index, cfg.host, cfg.port)


def serve(cfg: ServeKnnConfig, emit=None) -> dict:
    """Serves until interrupted (Ctrl-C); says where first."""
    server = open_server(cfg)
    where = {"service": f"{server.url}/knn-service", "index": cfg.index, "images": len(server.embeddings)}
    if emit is not None:
        emit(where)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return where


def text(where: dict, cfg: ServeKnnConfig) -> str:
    return (f"serving {where['images']} images of {', '.join(cfg.pool)} as index {where['index']!r} at "
            f"{where['service']} (Ctrl-C stops)\n"
            f"search it: clipdistill search --prompts PROMPTS --service {where['service']} --index {where['index']}")
