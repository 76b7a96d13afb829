"""What a public deployment bounds, and the HTTP guard in front of Gradio's routes that enforces it.

Gradio 6.31's routes leave these open (measured against ``python app.py``, issue 26):

- ``POST /gradio_api/run/<api_name>`` runs an event outside the queue and its concurrency limit
  (40 concurrent calls all ran). ``build_demo`` closes it with ``demo.queue(api_open=False)``:
  Gradio then answers 404 for every queued event there, and the queue (``/queue/join``,
  ``/call/<api_name>``) is the one way in.
- A FileData may carry its bytes as a ``data:`` URL inside the JSON body, which the upload
  route's byte limit never sees and ``gr.Image`` decodes in full before the app's callback; or
  name an ``http(s)`` link, which the server downloads with no byte limit. :class:`Guard` stores
  a ``data:`` URL as an uploaded file under the same limits as an upload (bytes, rate, disk), so
  the queue holds only a path and the callback's checks (pixels, format) run before decoding;
  links are refused.
- JSON bodies have no size limit and are read whole into memory: each is capped at what a
  maximal ``data:`` URL needs, and all being read at once share one byte budget.
- Uploads are each <= 20 MB, but nothing bounds one request's file count (Gradio allows 1000),
  their rate or the disk they fill until the cache sweep; and an empty file name is a 500.
- Routes the app never uses stay open: ``POST /gradio_api/stream/<event_id>`` swapped a queued
  event's inputs past these checks (a link was fetched), ``GET /gradio_api/deep_link`` wrote every
  input of a session to disk, ``POST /gradio_api/process_recording`` took uploads nothing counted.
  The guard answers only :data:`SERVED_ROUTES` and 404s the rest, new ones included
  (:data:`REFUSED_ROUTES` says why each of today's is shut; ``tests/test_routes.py`` fails when
  Gradio adds a route nobody reviewed).

Per-client limits key on the client address. Behind ``Limits.proxy_hops`` proxies (1 on a Hugging
Face Space, which is reachable only through its proxy) it is the X-Forwarded-For entry the
nearest of them wrote, counted from the right (:func:`forwarded_client`): a proxy that appends
writes the address it saw last, one that overwrites writes only that one, so either way the
entries a visitor writes themselves, on the left, are never read. (uvicorn's
``FORWARDED_ALLOW_IPS=*`` took the leftmost entry: a visitor who sent one had a new address per
request.) With no hops configured it is the address uvicorn reports, which trusts X-Forwarded-For
from loopback proxies only. The per-client limits slow one address down; the global bounds (queue,
JSON bytes, upload disk, result cache) hold whatever the number of addresses.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import json
import math
import os
import threading
import time
from collections import OrderedDict, deque
from contextlib import asynccontextmanager, contextmanager, suppress
from dataclasses import dataclass, replace
from pathlib import Path
from typing import ClassVar

import anyio
from gradio.route_utils import MultiPartException
from gradio_client import utils as client_utils
from starlette.middleware import Middleware
from starlette.responses import JSONResponse
from starlette.routing import compile_path

from model.inputs import MAX_IMAGE_BYTES, MAX_QUESTION_CHARS, InputError, check_size

from .traces import LIMITS as TRACE_LIMITS

API_PREFIX = "/gradio_api"


# What the page (Chromium, every tab, examples, uploads, downloads) and gradio_client use, as
# "METHOD template" in Gradio's own route syntax: the only routes the guard lets through.
SERVED_ROUTES = frozenset({
    "GET /", "HEAD /", "GET /config", "GET /config/", "GET /theme.css", "GET /favicon.ico", "GET /robots.txt",
    "GET /static/{path:path}", "GET /assets/{path:path}", "GET /gradio_api/theme.css",
    "GET /gradio_api/info", "GET /gradio_api/info/", "GET /gradio_api/startup-events",
    "GET /gradio_api/heartbeat/{session_hash}",
    "POST /gradio_api/queue/join", "GET /gradio_api/queue/data",
    # The page loads a clicked example's inputs here (Gradio runs that event unqueued); queued
    # events answer 404 on this route (``api_open=False``).
    "POST /gradio_api/run/{api_name}",
    "POST /gradio_api/call/{api_name}", "POST /gradio_api/call/{api_name}/",
    "GET /gradio_api/call/{api_name}/{event_id}",
    "POST /gradio_api/upload", "GET /gradio_api/upload_progress",
    "GET /gradio_api/file={path_or_url:path}", "HEAD /gradio_api/file={path_or_url:path}",
})

# Every other route Gradio 6.31 mounts, and why it stays shut.
_UNUSED = "a Gradio feature this app does not use"
REFUSED_ROUTES = {
    "GET /openapi.json": "API schema; gradio_client reads /gradio_api/info",
    "HEAD /openapi.json": "API schema; gradio_client reads /gradio_api/info",
    "GET /gradio_api/openapi.json": "API schema; gradio_client reads /gradio_api/info",
    "POST /login": "no login", "POST /login/": "no login", "GET /logout": "no login",
    "GET /gradio_api/user": "no login", "GET /gradio_api/user/": "no login",
    "GET /gradio_api/login_check": "no login", "GET /gradio_api/login_check/": "no login",
    "GET /gradio_api/token": "no login", "GET /gradio_api/token/": "no login",
    "GET /gradio_api/app_id": _UNUSED, "GET /gradio_api/app_id/": _UNUSED,
    "GET /svelte/{path:path}": "custom components' code; none here",
    "GET /gradio_api/custom_component/{id}/{environment}/{type}/{file_name}": "custom components; none here",
    "POST /gradio_api/component_server": "server functions of custom components; none here",
    "POST /gradio_api/component_server/": "server functions of custom components; none here",
    "GET /pwa_icon": "no progressive web app", "GET /pwa_icon/{size}": "no progressive web app",
    "GET /manifest.json": "no progressive web app",
    "GET /monitoring": "analytics dashboard", "GET /monitoring/summary": "analytics dashboard",
    "GET /monitoring/{key}": "analytics dashboard",
    "GET /gradio_api/dev/reload": "development reload", "GET /gradio_api/runs": _UNUSED, "GET /gradio_api/runs/": _UNUSED,
    "POST /gradio_api/run-history/connect": _UNUSED, "GET /gradio_api/run-history/buckets": _UNUSED,
    "GET /gradio_api/run-history/records": _UNUSED,
    "GET /gradio_api/run-history/records/{endpoint}/{record_id}/assets/{asset_id}": _UNUSED,
    "GET /gradio_api/deep_link": "writes a session's inputs to disk, outside the upload budget",
    "GET /gradio_api/proxy={url_path:path}": "fetches from other Spaces", "HEAD /gradio_api/proxy={url_path:path}":
        "fetches from other Spaces",
    "GET /gradio_api/file/{path:path}": "the page fetches files through file=",
    "POST /gradio_api/stream/{event_id}": "streamed inputs: replaced a queued event's body past the guard",
    "POST /gradio_api/stream/{event_id}/close": "streamed inputs; none here",
    "GET /gradio_api/stream/{session_hash}/{run}/{component_id}/playlist.m3u8": "streamed outputs; none here",
    "GET /gradio_api/stream/{session_hash}/{run}/{component_id}/{segment_id}.{ext}": "streamed outputs; none here",
    "GET /gradio_api/stream/{session_hash}/{run}/{component_id}/playlist-file": "streamed outputs; none here",
    "POST /gradio_api/reset": "resets generator events; none here", "POST /gradio_api/reset/": "resets generator events",
    "POST /gradio_api/cancel": "no event is cancellable here",
    "POST /gradio_api/api/{api_name}": "runs events outside the queue", "POST /gradio_api/api/{api_name}/":
        "runs events outside the queue",
    "POST /gradio_api/run/{api_name}/": "the page posts without the slash",
    "POST /gradio_api/call/v2/{api_name}": "second REST protocol; the first is served",
    "POST /gradio_api/call/v2/{api_name}/": "second REST protocol; the first is served",
    "GET /gradio_api/call/v2/{api_name}/{event_id}": "second REST protocol; the first is served",
    "GET /gradio_api/queue/status": _UNUSED,
    "POST /gradio_api/process_recording": "webcam recordings; uploads nothing counts",
    **{f"{method} /gradio_api/{route}{slash}": "AI code editing of the app"
       for method, route in (("POST", "vibe-edit"), ("POST", "undo-vibe-edit"), ("GET", "vibe-code"),
                             ("POST", "vibe-code"), ("POST", "vibe-starter-queries")) for slash in ("", "/")},
}


def _compiled(routes) -> dict[str, list]:
    by_method: dict[str, list] = {}
    for route in routes:
        method, template = route.split(" ", 1)
        by_method.setdefault(method, []).append(compile_path(template)[0])
    return by_method


_SERVED = _compiled(SERVED_ROUTES)


NOT_SERVED = "Not Found: this app answers its page, its uploads and its queue only."


def route_served(method: str, path: str) -> bool:
    """Whether ``METHOD path`` matches one of :data:`SERVED_ROUTES`."""
    return any(pattern.match(path) for pattern in _SERVED.get(method, ()))


@dataclass(frozen=True)
class Limits:
    """Every bound of a public deployment. ``None`` turns a per-client limit off."""

    queue_size: int = 32  # requests waiting for any event, all clients together
    # Sessions whose state Gradio keeps (a copy of the page's component configs, ~15 KB each; its
    # default is 10000), least recently used dropped: far more than one model serves at once.
    session_capacity: int = 512
    max_upload_bytes: int = MAX_IMAGE_BYTES  # one upload request, or one data: URL
    # Files in one upload request: the page sends one, but a run of traces for the browser tab
    # is one request of up to as many files as the browser opens (Gradio's own bound is 1000).
    max_files_per_upload: int = TRACE_LIMITS.max_upload_files
    upload_disk_bytes: int = 512 * 2**20  # visitor files on disk, all together
    upload_min_age_s: float = 60  # a younger upload is never deleted to make room (its run may need it)
    json_bytes_in_flight: int = 64 * 2**20  # JSON request bodies being read at once
    runs_per_minute: int | None = 10  # model runs per client (cached results and examples are free)
    requests_per_minute: int | None = 120  # queued requests of any event per client
    pending_per_client: int | None = 8  # one client's requests waiting or running
    sessions_per_10_minutes: int | None = 32  # new sessions per client
    uploads_per_minute: int | None = 20  # upload requests and data: URLs per client
    proxy_hops: int = 0  # trusted proxies in front of the app, whose X-Forwarded-For entries say who is calling

    @property
    def max_json_body_bytes(self) -> int:
        """Room for one maximal upload as a base64 data: URL, plus the request's other fields."""
        return self.max_upload_bytes * 4 // 3 + 64 * 1024

    def shared_address(self) -> Limits:
        """These limits without the per-client ones: for load tests whose simulated visitors
        all come from one address."""
        return replace(self, runs_per_minute=None, requests_per_minute=None, pending_per_client=None,
                       sessions_per_10_minutes=None, uploads_per_minute=None)


class Refusal(Exception):
    """A request the guard answers itself, with an HTTP status and a message for the visitor."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


class RateLimit:
    """At most ``events`` per ``window_s`` seconds for each key (sliding window); ``events=None``
    never limits."""

    def __init__(self, events: int | None, window_s: float):
        self.events, self.window_s = events, window_s
        self.times: dict[str, deque] = {}
        self.lock = threading.Lock()

    def wait_s(self, key: str) -> float:
        """0 when ``key`` may act now (the event is counted), else the seconds until it may."""
        if self.events is None:
            return 0.0
        now = time.monotonic()
        with self.lock:
            self._forget_before(now - self.window_s)
            times = self.times.setdefault(key, deque())
            if len(times) >= self.events:
                return times[0] + self.window_s - now
            times.append(now)
            return 0.0

    def _forget_before(self, start: float) -> None:
        for key in list(self.times):
            times = self.times[key]
            while times and times[0] < start:
                times.popleft()
            if not times:
                del self.times[key]


class NewSessions:
    """Sessions each client opens, limited, so that one address cannot push every other
    visitor's session state out of Gradio's bounded store (a visitor whose state is dropped loses
    their result). A request without a session hash (``/call/...``) opens a new one each time."""

    def __init__(self, per_window: int | None, window_s: float, remembered: int = 4096):
        self.rate = RateLimit(per_window, window_s)
        self.known: OrderedDict[tuple[str, str], None] = OrderedDict()
        self.remembered = remembered

    def wait_s(self, client: str, session_hash: str | None) -> float:
        key = (client, session_hash)
        if session_hash is not None and key in self.known:
            self.known.move_to_end(key)
            return 0.0
        wait = self.rate.wait_s(client)
        if not wait and session_hash is not None:
            self.known[key] = None
            while len(self.known) > self.remembered:
                self.known.popitem(last=False)
        return wait


class ByteBudget:
    """Bytes held at once across requests; going over refuses the request that asked."""

    def __init__(self, limit: int):
        self.limit, self.used = limit, 0

    @contextmanager
    def hold(self):
        held = [0]

        def add(n: int) -> None:
            held[0] += n
            self.used += n
            if self.used > self.limit:
                raise Refusal(503, "The server is busy receiving other requests; try again in a moment.")

        try:
            yield add
        finally:
            self.used -= held[0]


FILE_OVERHEAD_BYTES = 8192  # on disk beyond a file's bytes: the folder Gradio makes for it, its last block


class UploadSpace:
    """Visitor files on disk (uploads and stored data: URLs), at most ``max_bytes`` together, each
    counted with :data:`FILE_OVERHEAD_BYTES` for the folder Gradio makes per file (999 empty files
    in one request counted 9 KB and made 999 folders). When a new one would not fit, the oldest
    are deleted first, but none younger than ``min_age_s`` (its run may be about to read it); if
    it still does not fit, it is refused.

    Gradio's cache sweep deletes old files, never their folders: :meth:`sweep` removes every
    folder a visitor or output file of this app lived in once it is empty (and older than
    ``min_age_s``, so that a folder Gradio has just made for a file being moved in is left alone),
    on each upload and every ``sweep_s`` seconds (:meth:`lifespan`). At shutdown, :meth:`clear`
    deletes every file the app put in the cache and their folders."""

    live: ClassVar[set[UploadSpace]] = set()

    def __init__(self, demo, max_bytes: int, min_age_s: float, sweep_s: float = 60):
        self.demo, self.max_bytes, self.min_age_s, self.sweep_s = demo, max_bytes, min_age_s, sweep_s
        self.incoming = 0  # bytes of uploads still being received
        self.folders: set[Path] = set()  # folders this app's files were seen in, not yet removed
        self.lock = threading.Lock()

    def tracked(self) -> list[set]:
        """Gradio's sets of the files this app wrote to its cache (uploads, outputs, examples)."""
        return [self.demo.upload_file_set, *getattr(self.demo, "temp_file_sets", [])]

    def files(self) -> list[tuple[float, int, str]]:
        """(ctime, size, path) of every visitor file still on disk, oldest first."""
        found = []
        for path in list(self.demo.upload_file_set):
            self.folders.add(Path(path).parent)
            try:
                stat = os.stat(path)
            except FileNotFoundError:
                self.demo.upload_file_set.discard(path)
                continue
            found.append((stat.st_ctime, stat.st_size + FILE_OVERHEAD_BYTES, path))
        return sorted(found)

    def sweep(self, min_age_s: float | None = None) -> int:
        """Remove the empty folders of this app's files older than ``min_age_s`` (default: the
        space's; see the class docstring); how many."""
        root = Path(self.demo.GRADIO_CACHE).resolve()
        with self.lock:
            for files in self.tracked():
                self.folders.update(Path(path).parent for path in list(files))
            removed = 0
            young = time.time() - (self.min_age_s if min_age_s is None else min_age_s)
            for folder in list(self.folders):
                try:
                    if folder.resolve().parent != root or folder.stat().st_ctime > young:
                        continue
                    folder.rmdir()
                    removed += 1
                except FileNotFoundError:
                    pass
                except OSError:  # not empty
                    continue
                self.folders.discard(folder)
            return removed

    def clear(self) -> None:
        """Delete every file this app wrote to Gradio's cache, and their folders (with the empty
        ``vibe_edit_history`` folder Gradio makes there at start-up for a route the guard shuts)."""
        for files in self.tracked():
            for path in list(files):
                self.folders.add(Path(path).parent)
                Path(path).unlink(missing_ok=True)
                files.discard(path)
        self.sweep(min_age_s=0)
        with suppress(OSError):
            (Path(self.demo.GRADIO_CACHE) / "vibe_edit_history").rmdir()

    @asynccontextmanager
    async def lifespan(self, app):
        """The server's lifetime: :meth:`sweep` every ``sweep_s`` seconds, :meth:`clear` at the end."""

        async def sweep_forever():
            while True:
                await asyncio.sleep(self.sweep_s)
                await anyio.to_thread.run_sync(self.sweep)

        UploadSpace.live.add(self)
        task = asyncio.create_task(sweep_forever())
        try:
            yield
        finally:
            task.cancel()
            UploadSpace.live.discard(self)
            self.clear()

    def make_room(self, n_bytes: int) -> None:
        files = self.files()
        used = self.incoming + sum(size for _, size, _ in files)
        young = time.time() - self.min_age_s
        for ctime, size, path in files:
            if used + n_bytes <= self.max_bytes or ctime > young:
                break
            Path(path).unlink(missing_ok=True)
            self.demo.upload_file_set.discard(path)
            used -= size
        self.sweep()
        if used + n_bytes > self.max_bytes:
            raise Refusal(503, "The server holds too many uploads right now; try again in a minute.")

    def store(self, content: bytes, name: str) -> Path:
        """``content`` as a file in Gradio's upload folder, where the queue accepts it as an upload."""
        self.make_room(len(content) + FILE_OVERHEAD_BYTES)
        folder = Path(self.demo.GRADIO_CACHE) / hashlib.sha256(content).hexdigest()
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / file_name(name)
        path.write_bytes(content)
        self.demo.upload_file_set.add(str(path))
        return path


MAX_NAME_CHARS = 255


def file_name(name: str) -> str:
    """A visitor's file name as it may be stored: its last path component, letters, digits and
    ``._- `` only, at most ``MAX_NAME_CHARS`` characters, never ``.`` or ``..`` (then "pasted").
    Linear in the name's length: Gradio's own clean-up is quadratic (a 250 000-character name held
    the server's event loop for 30 s)."""
    tail = name[-4 * MAX_NAME_CHARS:].replace("\\", "/").rsplit("/", 1)[-1]
    kept = "".join(c for c in tail if c.isascii() and (c.isalnum() or c in "._- "))[-MAX_NAME_CHARS:]
    return kept.strip(" .") or "pasted"


def client_address(scope) -> str:
    return (scope.get("client") or ("unknown",))[0]


MAX_FORWARDED_CHARS = 4096


def forwarded_client(scope, hops: int) -> str | None:
    """The address the ``hops``-th proxy from the app saw connecting to it: the ``hops``-th
    X-Forwarded-For entry from the right, of the last such header (None without one, or with fewer
    entries). Only the header's last ``MAX_FORWARDED_CHARS`` characters are read."""
    header = None
    for name, value in scope.get("headers", ()):
        if name == b"x-forwarded-for":
            header = value
    if header is None:
        return None
    entries = header[-MAX_FORWARDED_CHARS:].decode("latin-1").rsplit(",", hops)
    if len(entries) < hops:
        return None
    return entries[-hops].strip() or None


def content_length(scope) -> int | None:
    for name, value in scope["headers"]:
        if name == b"content-length":
            return int(value) if value.isdigit() else None
    return None


class Guard:
    """ASGI middleware in front of Gradio's routes (module docstring: what each check closes)."""

    def __init__(self, app, demo, limits: Limits, space: UploadSpace):
        self.app, self.demo, self.limits = app, demo, limits
        self.requests = RateLimit(limits.requests_per_minute, 60)
        self.uploads = RateLimit(limits.uploads_per_minute, 60)
        self.sessions = NewSessions(limits.sessions_per_10_minutes, 600)
        self.json_bytes = ByteBudget(limits.json_bytes_in_flight)
        self.space = space  # shared with the server's lifespan (launch_options), which sweeps and clears it
        self.joining: dict[str, int] = {}  # requests per client past check_pending, not yet in the queue

    async def __call__(self, scope, receive, send):
        if scope["type"] == "websocket":  # Gradio serves none
            return await send({"type": "websocket.close", "code": 1008})
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        if self.limits.proxy_hops:
            host = forwarded_client(scope, self.limits.proxy_hops)
            scope["client"] = (host, 0) if host else scope.get("client")
        if not route_served(scope["method"], scope["path"]):
            return await JSONResponse({"detail": NOT_SERVED}, 404)(scope, receive, send)
        if scope["method"] != "POST":
            return await self.app(scope, receive, send)
        try:
            if scope["path"] == f"{API_PREFIX}/upload":
                return await self.upload(scope, receive, send)
            return await self.json_request(scope, receive, send)
        except Refusal as refusal:
            return await JSONResponse({"detail": refusal.message}, refusal.status)(scope, receive, send)

    # ------------------------------------------------------------------ uploads
    async def upload(self, scope, receive, send):
        declared = content_length(scope)
        if declared is None:
            raise Refusal(411, "An upload must state its Content-Length.")
        if declared > self.limits.max_upload_bytes + 64 * 1024:  # one file and its multipart framing
            raise Refusal(413, f"The upload is too large ({declared / 2**20:.1f} MB; at most "
                               f"{self.limits.max_upload_bytes / 2**20:.0f} MB per request).")
        self.check_rate(self.uploads, client_address(scope), "uploads")
        self.space.make_room(declared)
        started = False

        async def tracked_send(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        self.space.incoming += declared
        try:
            await self.app(scope, counted_parts(scope, receive, self.limits.max_files_per_upload), tracked_send)
        except TypeError as error:
            # Gradio's parser takes a part without a file name for a form field, and its upload
            # route then fails on it with this TypeError (a 500).
            if started or "GradioUploadFile" not in str(error):
                raise
            raise Refusal(400, "Every uploaded file needs a file name.") from None
        finally:
            self.space.incoming -= declared

    # ------------------------------------------------------------------ JSON requests
    async def json_request(self, scope, receive, send):
        client = client_address(scope)
        path = scope["path"]
        queued = path == f"{API_PREFIX}/queue/join" or path.startswith(f"{API_PREFIX}/call/")
        event = queued or path.startswith(f"{API_PREFIX}/run/")
        if queued:
            self.check_rate(self.requests, client, "requests")
            self.check_pending(client)
        self.joining[client] = self.joining.get(client, 0) + queued
        try:
            with self.json_bytes.hold() as hold:
                body = await self.read_body(scope, receive, hold)
                if event:
                    body = self.admit(body, client, path, new_session=queued)
                await self.app(replace_length(scope, len(body)), replay(body, receive), send)
        finally:
            self.joining[client] -= queued
            if not self.joining[client]:
                del self.joining[client]

    async def read_body(self, scope, receive, hold) -> bytes:
        limit = self.limits.max_json_body_bytes
        too_large = f"The request is too large (at most {limit / 2**20:.0f} MB; upload files of up to " \
                    f"{self.limits.max_upload_bytes / 2**20:.0f} MB through the upload route)."
        if (content_length(scope) or 0) > limit:
            raise Refusal(413, too_large)
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                raise Refusal(400, "The request ended before its body did.")
            chunk = message.get("body", b"")
            size += len(chunk)
            hold(len(chunk))
            if size > limit:
                raise Refusal(413, too_large)
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)

    def admit(self, body: bytes, client: str, path: str, new_session: bool = True) -> bytes:
        """The body of an event's request once its session is admitted (``new_session``: a queued
        event may open one) and its fields are checked: links refused, data: URLs replaced by
        stored uploads (one path, whatever the route), then each field capped
        (:meth:`check_fields`), before Gradio reads or stores any of it."""
        try:
            payload = json.loads(body)
        except ValueError:
            return body  # Gradio answers malformed JSON itself
        except RecursionError:
            raise Refusal(413, "The request's fields are nested too deeply.") from None
        if not isinstance(payload, dict):
            return body
        wait = self.sessions.wait_s(client, payload.get("session_hash")) if new_session else 0
        if wait:
            raise Refusal(429, f"Too many new sessions from your address: try again in {math.ceil(wait)} s.")
        files: list[dict] = []
        client_utils.traverse(payload.get("data"), files.append, client_utils.is_file_obj_with_meta)
        stored = [self.admit_file(file, client) for file in files]
        self.check_fields(payload, path)
        return json.dumps(payload).encode() if any(stored) else body

    def check_fields(self, payload: dict, path: str) -> None:
        """Refuse, in words, fields that no input of this app needs: a string over
        ``MAX_FIELD_CHARS`` characters anywhere, or more than ``MAX_DATA_CHARS`` of JSON for the
        fields together (files count as their short FileData, their bytes are uploads). Gradio
        keeps every input of a session in its state: these bound what an admitted request leaves
        there, and a refused one leaves nothing."""
        data = payload.get("data")
        if not isinstance(data, list):
            return
        for index, value in enumerate(data):
            longest = longest_string(value)
            if longest > MAX_FIELD_CHARS:
                raise Refusal(413, f"{self.field_name(payload, path, index)} is too long ({longest:,} characters; "
                                   f"at most {MAX_FIELD_CHARS:,}).")
        total = len(json.dumps(data))
        if total > MAX_DATA_CHARS:
            raise Refusal(413, f"The request's fields are too large together ({total:,} characters; at most "
                               f"{MAX_DATA_CHARS:,}): send files as uploads.")

    def field_name(self, payload: dict, path: str, index: int) -> str:
        """How the page labels input ``index`` of the request's event ("Input N" if unknown)."""
        api_name = path.rstrip("/").rsplit("/", 1)[-1] if "/call/" in path or "/run/" in path else None
        for fn_index, fn in self.demo.fns.items():
            if fn_index == payload.get("fn_index") or (api_name and fn.api_name == api_name):
                inputs = fn.inputs
                label = getattr(inputs[index], "label", None) if index < len(inputs) else None
                if label:
                    return f"“{label}”"
        return f"Input {index + 1}"

    def admit_file(self, file: dict, client: str) -> bool:
        """Refuse a link; store a data: URL as an upload and point ``file`` at it (True)."""
        if client_utils.is_http_url_like(file["path"]):
            raise Refusal(400, "Files are not fetched from links: upload the file itself.")
        url = file.get("url") or ""
        if not url.startswith("data:"):
            return False
        self.check_rate(self.uploads, client, "uploads")
        path = self.space.store(decode_data_url(url, self.limits.max_upload_bytes), str(file.get("orig_name") or ""))
        file.update(path=str(path), url=None, size=path.stat().st_size, orig_name=path.name)
        return True

    # ------------------------------------------------------------------ per-client checks
    def check_rate(self, rate: RateLimit, client: str, what: str) -> None:
        wait = rate.wait_s(client)
        if wait:
            raise Refusal(429, f"Too many {what} from your address: try again in {math.ceil(wait)} s.")

    def check_pending(self, client: str) -> None:
        """Refuse a client that already has ``pending_per_client`` requests in the queue or on
        their way into it (their bodies still being read), so that one address cannot fill the
        queue that every visitor shares."""
        limit = self.limits.pending_per_client
        if limit is None:
            return
        events = list(self.demo._queue.event_ids_to_events.values())
        pending = self.joining.get(client, 0) + sum(
            1 for event in events
            if event.request is not None and event.request.client is not None and event.request.client.host == client)
        if pending >= limit:
            raise Refusal(429, f"You have {pending} requests waiting already: wait for them to finish.")


MAX_FIELD_CHARS = 4 * MAX_QUESTION_CHARS  # any one string of a request; the app's own checks say more below it
MAX_FIELD_DEPTH = 16
MAX_DATA_CHARS = 128 * 1024  # an event's fields together, as JSON: 200 trace files' FileData fit


def longest_string(value, depth: int = 0) -> int:
    """The length of the longest string in a JSON value (dict keys included), refused when
    nested deeper than ``MAX_FIELD_DEPTH``."""
    if isinstance(value, str):
        return len(value)
    if depth > MAX_FIELD_DEPTH:
        raise Refusal(413, "The request's fields are nested too deeply.")
    if isinstance(value, dict):
        value = [*value.keys(), *value.values()]
    if isinstance(value, list):
        return max((longest_string(v, depth + 1) for v in value), default=0)
    return 0


def decode_data_url(url: str, max_bytes: int) -> bytes:
    """The bytes of a base64 ``data:`` URL, its size checked (:func:`model.inputs.check_size`,
    as for uploads) from the URL's length before anything is decoded."""
    header, _, data = url.partition(",")
    if not header.endswith(";base64"):
        raise Refusal(400, "Only base64 data: URLs are accepted.")
    try:
        check_size(len(data) * 3 // 4 - data[-2:].count("="), "uploaded", max_bytes)
        return base64.b64decode(data, validate=True)
    except InputError as error:
        raise Refusal(413, str(error)) from None
    except binascii.Error:
        raise Refusal(400, "The data: URL is not valid base64.") from None


def counted_parts(scope, receive, max_parts: int):
    """``receive`` for a multipart upload that fails the upload (Gradio answers 400 with the
    message, and deletes the parts it had written) as soon as the body has begun more than
    ``max_parts`` parts: each part begins with the boundary, as does the closing delimiter."""
    boundary = None
    for name, value in scope["headers"]:
        if name == b"content-type" and b"boundary=" in value:
            boundary = b"--" + value.split(b"boundary=", 1)[1].split(b";")[0].strip(b'" ')
    if not boundary:
        return receive  # Gradio refuses it itself
    seen, tail = 0, b""

    async def receive_counted():
        nonlocal seen, tail
        message = await receive()
        window = tail + message.get("body", b"")
        seen += window.count(boundary)  # the tail is too short to hold one already counted
        tail = window[-(len(boundary) - 1):]
        if seen > max_parts + 1:
            raise MultiPartException(f"At most {max_parts} files per upload.")
        return message

    return receive_counted


def replace_length(scope, n_bytes: int):
    """``scope`` with its Content-Length set to the (possibly rewritten) body's length."""
    headers = [(k, v) for k, v in scope["headers"] if k != b"content-length"]
    return {**scope, "headers": headers + [(b"content-length", str(n_bytes).encode())]}


def replay(body: bytes, receive):
    """An ASGI ``receive`` that hands ``body`` over once, then defers to the real one."""
    sent = False

    async def receive_again():
        nonlocal sent
        if sent:
            return await receive()
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    return receive_again


def launch_options(demo, limits: Limits) -> dict:
    """``demo.launch`` keyword arguments that apply ``limits`` (``build_demo`` sets the queue)."""
    space = UploadSpace(demo, limits.upload_disk_bytes, limits.upload_min_age_s)
    return dict(max_file_size=limits.max_upload_bytes, state_session_capacity=limits.session_capacity,
                app_kwargs={"middleware": [Middleware(Guard, demo=demo, limits=limits, space=space)],
                            "lifespan": space.lifespan})
