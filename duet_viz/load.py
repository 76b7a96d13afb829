"""``python -m duet_viz.load``: drive the app with concurrent API sessions on loopback.

Starts the app as its own process (``python app.py`` on 127.0.0.1, a free port, so the memory
measured is the server's alone), then N client threads each send a
bounded number of requests, mixing valid runs with invalid ones (unknown method, out-of-range
budget, empty question, non-image upload). A valid request succeeds when it returns an answer;
an invalid one succeeds when it is refused with a message. Reports the success rate, latency
p50/p95 per kind, and the server's resident memory (sampled every 0.2 s) at the start, peak,
end, and peak per quarter of the run, so a leak shows as a climbing RSS. Everything is bounded:
``--sessions`` x ``--requests`` calls and ``--timeout`` s. Each session is its own visitor
address (``X-Forwarded-For`` from loopback, which uvicorn trusts), so the app's per-address
limits apply as they would to that many visitors.

``--hostile`` runs the attacks of issue 26 instead (:mod:`duet_viz.hostile`): per case, the
outcomes by kind, the server's peak RSS (and its rise during the case) and the growth of the
disk the app writes to (its upload folder and work folder); at the end the server gets SIGTERM
and the report says whether its work folder was removed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from . import hostile
from .page import ASSETS

ROOT = Path(__file__).resolve().parent.parent

VALID_QUESTIONS = ["what color is the triangle ?", "what animal is this ?", "how many circles are there ?"]


def rss_mb(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except FileNotFoundError:
        pass
    return float("nan")


def folder_mb(folder: Path | None) -> float:
    """Bytes of the files under ``folder``, in MB (files vanishing meanwhile are skipped)."""
    total = 0
    for path in (folder.rglob("*") if folder else ()):
        try:
            total += path.stat().st_size if path.is_file() else 0
        except FileNotFoundError:
            continue
    return total / 2**20


class Sampler:
    """The server's RSS (and the disk under ``folder``) every ``period_s``, in a thread; with
    ``url``, also how long a GET of it takes, back to back in another thread (how long any other
    request waits while the case runs: the event loop's stalls)."""

    def __init__(self, pid: int, folder: Path | None = None, period_s: float = 0.2, url: str | None = None):
        self.pid, self.folder, self.period_s, self.url = pid, folder, period_s, url
        self.rss, self.disk = [rss_mb(pid)], [folder_mb(folder)]
        self.latency: list[float] = []
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self.sample, daemon=True)]
        if url:
            self.threads.append(threading.Thread(target=self.time_requests, daemon=True))

    def sample(self) -> None:
        while not self.stop.wait(self.period_s):
            self.rss.append(rss_mb(self.pid))
            self.disk.append(folder_mb(self.folder))

    def time_requests(self) -> None:
        while not self.stop.wait(0.05):
            started = time.perf_counter()
            try:
                urllib.request.urlopen(self.url, timeout=60).read()
            except OSError:
                pass
            self.latency.append(time.perf_counter() - started)

    def __enter__(self) -> Sampler:  # noqa: PYI034
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join()


def start_server(model: str | None, port: int, start_timeout_s: float = 180, env: dict | None = None,
                 root: Path = ROOT, extra: tuple[str, ...] = ()) -> subprocess.Popen:
    """``python app.py`` (of the checkout at ``root``, with ``extra`` arguments) on loopback,
    returned once it answers HTTP."""
    command = [sys.executable, str(root / "app.py"), "--host", "127.0.0.1", "--port", str(port), "--device", "cpu",
               "--cache-examples", "lazy"] + (["--model", str(model)] if model else []) + list(extra)
    log = tempfile.TemporaryFile()  # not a pipe: a full pipe would stall the server
    server = subprocess.Popen(command, cwd=root, stdout=log, stderr=subprocess.STDOUT,
                              env={**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", **(env or {})})
    deadline = time.time() + start_timeout_s
    while time.time() < deadline:
        if server.poll() is not None:
            log.seek(0)
            raise RuntimeError(f"the app exited during start-up: {log.read().decode()[-2000:]}")
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2)
            return server
        except OSError:
            time.sleep(0.3)
    server.kill()
    raise RuntimeError(f"the app did not answer within {start_timeout_s} s")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def request(kind: str, rng: random.Random, junk: Path) -> tuple[list, str | None]:
    """Arguments of one /run call and the message expected back (None: an answer)."""
    from gradio_client import handle_file

    image = handle_file(str(ASSETS / rng.choice(["scene-shapes.png", "chelsea.jpg", "coffee.jpg"])))
    method, budget, question = rng.choice(["duet", "visionzip", "fastv", "pyramiddrop"]), "64", rng.choice(VALID_QUESTIONS)
    expected = None
    if kind == "bad-method":
        method, expected = "teleport", "not in the list of choices"
    elif kind == "bad-budget":
        budget, expected = "4096", "not in the list of choices"
    elif kind == "empty-question":
        question, expected = "   ", "Type a question"
    elif kind == "not-an-image":
        image, expected = handle_file(str(junk)), "not an image"
    compare = ["full"] if kind == "valid" and rng.random() < 0.3 else []
    return [image, question, method, budget, 96, compare, None, None, 4, "", "", "", 4, 0, None, 8], expected


def session(url: str, index: int, n_requests: int, deadline: float, junk: Path, invalid_share: float) -> list[dict]:
    from gradio_client import Client

    rng = random.Random(index)
    client = Client(url, verbose=False, headers={"X-Forwarded-For": f"10.1.{index // 250}.{index % 250 + 1}"})
    results = []
    for _ in range(n_requests):
        if time.time() > deadline:
            break
        kind = "valid" if rng.random() >= invalid_share else rng.choice(
            ["bad-method", "bad-budget", "empty-question", "not-an-image"])
        args, expected = request(kind, rng, junk)
        started = time.perf_counter()
        try:
            out = client.predict(*args, api_name="/run")
            ok = expected is None and bool(out[4]["data"][0][3] is not None)
        except Exception as error:
            ok = expected is not None and expected in str(error)
        results.append({"kind": kind, "ok": ok, "ms": (time.perf_counter() - started) * 1e3})
    return results


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def run_load(model: str | None, sessions: int, requests: int, timeout_s: float, invalid_share: float) -> dict:
    port = free_port()
    server = start_server(model, port)
    url = f"http://127.0.0.1:{port}/"
    started = time.time()
    try:
        with Sampler(server.pid) as sampler, tempfile.TemporaryDirectory() as tmp:
            junk = Path(tmp) / "notes.png"
            junk.write_text("definitely not a picture\n")
            deadline = started + timeout_s
            with ThreadPoolExecutor(sessions) as pool:
                futures = [pool.submit(session, url, i, requests, deadline, junk, invalid_share)
                           for i in range(sessions)]
                results = [r for f in futures for r in f.result()]
    finally:
        server.terminate()
        server.wait(30)
    samples = sampler.rss
    kinds = sorted({r["kind"] for r in results})
    quarter = max(1, len(samples) // 4)
    return {
        "sessions": sessions, "requests": len(results), "wall_s": round(time.time() - started, 1),
        "success_rate": sum(r["ok"] for r in results) / max(1, len(results)),
        "by_kind": {k: {"n": len(v), "ok": sum(r["ok"] for r in v),
                        "p50_ms": round(statistics.median(r["ms"] for r in v), 1),
                        "p95_ms": round(percentile([r["ms"] for r in v], 0.95), 1)}
                    for k in kinds for v in [[r for r in results if r["kind"] == k]]},
        "rss_mb": {"start": round(samples[0], 1), "peak": round(max(samples), 1), "end": round(samples[-1], 1),
                   "quarter_peaks": [round(max(samples[i:i + quarter]), 1) for i in range(0, quarter * 4, quarter)]},
    }


def run_hostile(model: str | None, root: Path = ROOT, cases: list[str] | None = None) -> dict:
    """The hostile mix against ``python app.py`` of the checkout at ``root``, in a fresh
    temporary folder (its uploads and work folder), then SIGTERM."""
    port = free_port()
    with tempfile.TemporaryDirectory() as tmp:
        env = {"TMPDIR": tmp, "GRADIO_TEMP_DIR": str(Path(tmp) / "gradio")}
        server = start_server(model, port, env=env, root=root)
        try:
            with Sampler(server.pid, Path(tmp), url=f"http://127.0.0.1:{port}/favicon.ico") as sampler:
                probe = hostile.Probe(f"http://127.0.0.1:{port}/")
                rows = [run_case(name, probe, sampler) for name in cases or hostile.CASES]
        finally:
            server.send_signal(signal.SIGTERM)
            exit_code = server.wait(60)
        left = sorted(p.name for p in Path(tmp).glob("duet-viz-*"))
        cache_left = sum(1 for _ in (Path(tmp) / "gradio").rglob("*"))
    return {"cases": rows, "rss_mb": {"start": round(sampler.rss[0], 1), "peak": round(max(sampler.rss), 1)},
            "disk_mb": {"start": round(sampler.disk[0], 1), "peak": round(max(sampler.disk), 1)},
            "sigterm": {"exit_code": exit_code, "work_folders_left": left, "cache_entries_left": cache_left}}


def run_case(name: str, probe: hostile.Probe, sampler: Sampler) -> dict:
    first, first_timed, started = len(sampler.rss), len(sampler.latency), time.time()
    case = hostile.Case(name)
    hostile.CASES[name](probe, case)
    time.sleep(2 * sampler.period_s)  # let the sampler see the case's end
    rss, disk = sampler.rss[first - 1:], sampler.disk[first - 1:]
    return {"case": name, "requests": sum(case.outcomes.values()), "outcomes": case.outcomes,
            "unexpected": case.unexpected, "seconds": round(time.time() - started, 1),
            "peak_rss_mb": round(max(rss), 1), "rss_rise_mb": round(max(rss) - rss[0], 1),
            "rss_kept_mb": round(rss[-1] - rss[0], 1), "timed_requests": len(sampler.latency) - first_timed,
            "max_stall_s": round(max(sampler.latency[first_timed:], default=0), 3),
            "disk_growth_mb": round(max(disk) - disk[0], 1)}


def machine() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    names = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines()
             if line.startswith("model name")] if cpuinfo.exists() else []
    return f"CPU ({names[0] if names else platform.processor()}), {len(os.sched_getaffinity(0))} cores"


def hostile_markdown(report: dict, command: str) -> str:
    lines = [(f"`{command}` on {machine()}; server RSS {report['rss_mb']['start']} MB at start, "
              f"{report['rss_mb']['peak']} MB peak; disk {report['disk_mb']['start']} MB at start, "
              f"{report['disk_mb']['peak']} MB peak."), "",
             "| case | requests | outcomes | unexpected | peak RSS MB | RSS rise MB | RSS kept MB | disk growth MB | "
             "longest other request s | s |", "|---|---|---|---|---|---|---|---|---|---|"]
    for row in report["cases"]:
        outcomes = ", ".join(f"{kind} × {n}" for kind, n in row["outcomes"].items())
        lines.append(f"| {row['case']} | {row['requests']} | {outcomes} | {row['unexpected']} | {row['peak_rss_mb']} | "
                     f"{row['rss_rise_mb']} | {row['rss_kept_mb']} | {row['disk_growth_mb']} | {row['max_stall_s']} | "
                     f"{row['seconds']} |")
    sigterm = report["sigterm"]
    lines += ["", (f"SIGTERM: exit code {sigterm['exit_code']}, work folders left: "
                   f"{', '.join(sigterm['work_folders_left']) or 'none'}; files and folders left in Gradio's "
                   f"cache: {sigterm['cache_entries_left']}.")]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m duet_viz.load", description=__doc__.split("\n")[0])
    parser.add_argument("--model", help="checkpoint folder (default: the shipped model)")
    parser.add_argument("--sessions", type=int, default=16)
    parser.add_argument("--requests", type=int, default=4, help="requests per session")
    parser.add_argument("--timeout", type=float, default=600, help="stop sending after this many seconds")
    parser.add_argument("--invalid-share", type=float, default=0.3)
    parser.add_argument("--hostile", action="store_true", help="the hostile mix (module docstring) instead")
    parser.add_argument("--case", action="append", choices=list(hostile.CASES), help="with --hostile: only these")
    parser.add_argument("--root", type=Path, default=ROOT, help="with --hostile: the checkout whose app.py to start")
    parser.add_argument("--markdown", type=Path, help="with --hostile: write the report as a markdown table")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    if args.hostile:
        report = run_hostile(args.model, args.root.resolve(), args.case)
        sigterm = report["sigterm"]
        ok = all(row["unexpected"] == 0 for row in report["cases"]) and not sigterm["work_folders_left"] \
            and not sigterm["cache_entries_left"]
        if args.markdown:
            command = " ".join(["python -m duet_viz.load", *(argv or sys.argv[1:])])
            args.markdown.write_text(hostile_markdown(report, command))
    else:
        report = run_load(args.model, args.sessions, args.requests, args.timeout, args.invalid_share)
        ok = report["success_rate"] == 1.0
    print(json.dumps(report, indent=1))
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
