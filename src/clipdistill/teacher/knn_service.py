"""A client of a clip-retrieval knn service (rom1504/clip-retrieval's `clip_back`), as
NVIDIA-AI-IOT/clip-distillation's `search_clip_images.py` asks it: one POST of JSON per prompt,
answered by a JSON list of `{url, caption, similarity, id}`.

The request carries the fields `clip_retrieval/clip_client.py` sends: `text`, `image`, `image_url`,
`embedding_input` (null here), `modality` ("image": images are searched), `num_images`,
`indice_name`, `num_result_ids`, `use_mclip`, `deduplicate`, `use_safety_model`,
`use_violence_detector`, `aesthetic_score` and `aesthetic_weight` (as strings, "" for none: the
server parses them with int()/float()).

A public service is slow and busy: every answer is cached per prompt in a folder (one JSON file,
written atomically, named by the request's content), so a search killed half-way asks again only
the prompts not answered yet, and a second run asks nothing. 5xx answers, 429, timeouts and
connection errors are tried again after an exponential back-off (Retry-After honoured); requests
are spaced by at least `rate_limit` seconds. The standard library only (urllib)."""

from __future__ import annotations

import hashlib
import http.client
import json
import logging
import socket
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Optional

from ..core import atomic
from ..core.errors import ClipDistillError

log = logging.getLogger(__name__)

MAX_BACKOFF = 60.0


def request_body(text: str, index: str, num_images: int, num_result_ids: int, use_mclip: bool = False,
                 deduplicate: bool = True, use_safety_model: bool = True, use_violence_detector: bool = True,
                 aesthetic_score: Optional[int] = None, aesthetic_weight: float = 0.5) -> dict:
    """The JSON a knn service reads for a text query (module docstring)."""
    return {"text": text, "image": None, "image_url": None, "embedding_input": None, "modality": "image",
            "num_images": int(num_images), "indice_name": index, "num_result_ids": int(max(num_result_ids, num_images)),
            "use_mclip": bool(use_mclip), "deduplicate": bool(deduplicate), "use_safety_model": bool(use_safety_model),
            "use_violence_detector": bool(use_violence_detector),
            "aesthetic_score": "" if aesthetic_score is None else str(int(aesthetic_score)),
            "aesthetic_weight": str(float(aesthetic_weight))}


class _Retry(Exception):
    """A failure worth another try (the message says what happened; `wait`: the server's Retry-After)."""

    def __init__(self, message: str, wait: float = 0.0):
        super().__init__(message)
        self.wait = wait


def _results(payload: bytes, url: str) -> list[dict]:
    try:
        data = json.loads(payload)
    except ValueError:
        raise _Retry(f"not JSON ({payload[:80]!r})") from None
    if isinstance(data, dict) and "error" in data:
        raise ClipDistillError(f"--service {url}: the service answered with an error: {str(data['error'])[:300]}; "
                               f"check --index (the names it serves) and the filters")
    if not isinstance(data, list):
        raise _Retry(f"a JSON {type(data).__name__}, not a list of results")
    out, refused = [], 0
    for item in data:
        if isinstance(item, dict) and isinstance(item.get("url"), str) and item["url"]:
            if not item["url"].lower().startswith(("http://", "https://")):
                refused += 1  # a service must not point us at this machine's files (file://, ...)
                continue
            out.append({"url": item["url"], "caption": str(item.get("caption") or ""),
                        "similarity": float(item.get("similarity") or 0.0), "id": item.get("id")})
    if refused:
        log.warning("--service %s: %d result(s) with a URL that is not http(s) left out", url, refused)
    return out


class KnnService:
    """Ask one service (`url`, index `index`) for images per prompt; answers cached in `cache_dir`."""

    def __init__(self, url: str, cache_dir: str | Path, timeout: float = 60.0, retries: int = 5,
                 backoff: float = 1.0, rate_limit: float = 0.0):
        self.url, self.cache_dir = url, Path(cache_dir)
        self.timeout, self.retries, self.backoff, self.rate_limit = timeout, retries, backoff, rate_limit
        self.requests = 0  # HTTP requests sent by this client (cached answers send none)
        self._last = -float("inf")

    def cache_file(self, body: dict) -> Path:
        key = json.dumps({"url": self.url, "request": body}, sort_keys=True)
        return self.cache_dir / f"{hashlib.sha1(key.encode()).hexdigest()[:20]}.json"

    def cached(self, body: dict) -> Optional[list[dict]]:
        path = self.cache_file(body)
        if not path.is_file():
            return None
        try:
            saved = atomic.read_json(path)
        except ClipDistillError as e:  # only a cache: asked again
            log.warning("%s; asking the service again", e)
            return None
        if not isinstance(saved, dict) or saved.get("request") != body or not isinstance(saved.get("results"), list):
            return None
        return saved["results"]

    def query(self, body: dict) -> tuple[list[dict], bool]:
        """(results, from_cache) for one request body (`request_body`)."""
        hit = self.cached(body)
        if hit is not None:
            return hit, True
        results = self._post(body)
        atomic.write_json(self.cache_file(body), {"url": self.url, "request": body, "results": results})
        return results, False

    def _post(self, body: dict) -> list[dict]:
        data = json.dumps(body).encode("utf-8")
        last = ""
        for attempt in range(self.retries + 1):
            wait = self._last + self.rate_limit - time.monotonic()
            if wait > 0:
                time.sleep(wait)
            self._last = time.monotonic()
            self.requests += 1
            try:
                return self._once(data)
            except _Retry as e:
                last = str(e)
                if attempt == self.retries:
                    break
                pause = max(e.wait, min(MAX_BACKOFF, self.backoff * 2 ** attempt))
                log.warning("--service %s: %s for %r; trying again in %.1f s (%d of %d)", self.url, last,
                            body["text"], pause, attempt + 1, self.retries)
                time.sleep(pause)
        raise ClipDistillError(f"--service {self.url}: no answer for {body['text']!r} after {self.retries + 1} tries "
                               f"(last: {last}); check the URL and that the service is up, or raise --retries / "
                               f"--timeout. Prompts answered so far are cached in {self.cache_dir} and not asked "
                               f"again: run the same command to continue")

    def _once(self, data: bytes) -> list[dict]:
        req = urllib.request.Request(self.url, data=data, method="POST",
                                     headers={"Content-Type": "application/json", "Accept": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                payload = resp.read()
        except urllib.error.HTTPError as e:
            if e.code >= 500 or e.code == 429:
                after = e.headers.get("Retry-After", "") if e.headers else ""
                raise _Retry(f"HTTP {e.code}", float(after) if after.isdigit() else 0.0) from None
            raise ClipDistillError(f"--service {self.url}: HTTP {e.code} ({e.reason}); the service refused the "
                                   f"request: check the URL (the knn endpoint, e.g. .../knn-service) and "
                                   f"--index") from None
        except (urllib.error.URLError, socket.timeout, TimeoutError, ConnectionError, http.client.HTTPException) as e:
            raise _Retry(f"{type(e).__name__}: {getattr(e, 'reason', e)}") from None
        return _results(payload, self.url)
