"""Load the running web app through its queue: N clients for D seconds, plain HTTP.

Usage (from the repository root; a trained bundle is needed)::

    nice -n 10 .venv/bin/python bench/app_load.py --model models/bundle \\
        [--clients 50] [--duration 30] [--rounds 1] [--max-queue 32] [--same-address] \\
        [--mirror DIR] [--json out.json]

Starts ``python -m braintumor.serving.app`` on a free loopback port (its temp root in a fresh
temporary folder; ready when its output says so, read line by line), then:

1. **The direct API is closed**: one upload, then ``POST /gradio_api/run/predict`` and
   ``/gradio_api/api/predict`` must answer 404 (they would skip the queue).
2. **Load**: ``--clients`` threads, each in a loop for ``--duration`` seconds, as the page
   does: upload a file (``/gradio_api/upload``), join the queue (``/gradio_api/call/predict``)
   and read the outcome from its event stream. Each client connects from its own loopback
   address (127.0.x.y: the app's limits are per client address), or all from 127.0.0.1
   with ``--same-address``. Files: real msoud test slices, and one request in ten a food
   photograph from ``not-mri/`` that must come back as a refusal. Outcomes: ``ok``;
   ``refused_as_expected`` (the food photo); ``refused`` (an MRI slice the app refused
   with its one-line reason, e.g. the out-of-distribution check's false alarm on a slice
   far from the training ones: a correct answer of the app, not an error, counted apart
   with the files it refused); ``queue_full`` (HTTP 503: the bounded queue doing its job;
   that client waits 1 s before its next try); ``upload_limit`` (HTTP 429: that address
   has its quota of uploads waiting; it waits 1 s too); ``errors`` (anything else: an
   exception, an internal error, a food photo given a class, a missing answer). Latency:
   upload to answer, p50 and p95, over ``ok``, ``refused_as_expected`` and ``refused``.
3. **Memory**: resident memory of the app (its process tree) sampled every 0.5 s: before
   the load (after one warm request), the peak, the end; growth = end - before, and the
   growth over the second half of the run (the first half absorbs allocator warm-up).
   With ``--rounds R`` the load runs R times against the same app process, and the RSS
   after the warm-up and after each round is printed as a table: memory that levels off
   is a plateau, memory that keeps the same slope is a leak.
4. **Disk**: files left in the app's run folder after the load (every analysed upload is
   deleted; display images go after the app's cache age), and that SIGTERM removes the
   folder.

Not a test: numbers depend on the machine and its load (both printed with the results).
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import requests

from serve import free_port, tree_rss  # bench/serve.py, beside this script

REPO = Path(__file__).resolve().parents[1]
CLASSES = ("glioma", "meningioma", "notumor", "pituitary")
STARTUP_TIMEOUT_S = 300
READY = re.compile(r"Running on local URL: (\S+)")


class SourceAddressAdapter(requests.adapters.HTTPAdapter):
    """Connections that leave from ``address``: any 127.x.y.z reaches a loopback server,
    which sees another client."""

    def __init__(self, address: str) -> None:
        self.address = address
        super().__init__()

    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        kwargs["source_address"] = (self.address, 0)
        super().init_poolmanager(*args, **kwargs)


def client_session(number: int, same_address: bool) -> requests.Session:
    """A session for client ``number``: from 127.0.x.y of its own, or from 127.0.0.1."""
    session = requests.Session()
    if not same_address:
        address = f"127.0.{1 + number // 250}.{2 + number % 250}"
        session.mount("http://", SourceAddressAdapter(address))
    return session


def _mirror(path: Path | None) -> Path:
    root = path or Path(os.environ.get("BRAINTUMOR_MIRROR") or REPO.parent / "shared" / "datasets")
    if not (root / "msoud").is_dir() or not (root / "not-mri").is_dir():
        raise SystemExit(f"--mirror {root}: no msoud/ and not-mri/ folders there")
    return root


def _files(mirror: Path, count: int) -> tuple[list[Path], list[Path]]:
    """``count`` real test slices (round-robin over the classes) and 5 food photos."""
    per_class = [
        sorted(p for p in (mirror / "msoud" / "Testing" / name).iterdir() if p.is_file())
        for name in CLASSES
    ]
    slices = [per_class[i % len(CLASSES)][i // len(CLASSES)] for i in range(count)]
    food = sorted((mirror / "not-mri").glob("*.jpg"))[:5]
    return slices, food


def start_app(model: Path, max_queue: int, work: Path) -> tuple[subprocess.Popen, str, Path]:
    """The app in a subprocess; returns it, its URL and its run folder."""
    port = free_port()
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "BRAINTUMOR_APP_TEMP": str(work / "temp")}
    env.pop("GRADIO_TEMP_DIR", None)
    command = [
        sys.executable,
        "-m",
        "braintumor.serving.app",
        "--model",
        str(model),
        "--port",
        str(port),
        "--params",
        str(REPO / "params.yaml"),
        "--max-queue",
        str(max_queue),
        "--examples",
    ]
    log_path = work / "app.log"
    server = subprocess.Popen(
        command,
        cwd=work,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    ready: queue.Queue[str | None] = queue.Queue()

    def copy_output() -> None:  # for the app's whole life, so its pipe never fills
        with log_path.open("w") as log:
            for line in server.stdout or ():
                log.write(line)
                log.flush()
                if found := READY.search(line):
                    ready.put(found.group(1))
        ready.put(None)

    threading.Thread(target=copy_output, daemon=True).start()
    try:
        url = ready.get(timeout=STARTUP_TIMEOUT_S)
    except queue.Empty:
        url = None
    if url is None:
        server.kill()
        raise SystemExit(f"the app did not start:\n{log_path.read_text()[-3000:]}")
    folder = re.search(r"uploads kept in (\S+)", log_path.read_text())
    return server, url, Path(folder.group(1)) if folder else work


def upload(session: requests.Session, url: str, path: Path) -> dict[str, Any]:
    with path.open("rb") as handle:
        answer = session.post(url + "gradio_api/upload", files={"files": handle}, timeout=60)
    answer.raise_for_status()
    return {"path": answer.json()[0], "orig_name": path.name, "meta": {"_type": "gradio.FileData"}}


def analyse(session: requests.Session, url: str, path: Path) -> tuple[int, str]:
    """One request as the page makes it: (HTTP status of joining the queue, message)."""
    try:
        data = upload(session, url, path)
    except requests.HTTPError as error:
        answer = error.response
        return (answer.status_code, answer.text[:200]) if answer is not None else (0, str(error))
    joined = session.post(url + "gradio_api/call/predict", json={"data": [data, 0.4]}, timeout=60)
    if joined.status_code != 200:
        return joined.status_code, joined.text[:200]
    stream = session.get(
        f"{url}gradio_api/call/predict/{joined.json()['event_id']}", stream=True, timeout=600
    )
    event = None
    for line in stream.iter_lines(decode_unicode=True):
        if line.startswith("event: "):
            event = line.removeprefix("event: ")
        elif line.startswith("data: ") and event in ("complete", "error"):
            payload = json.loads(line.removeprefix("data: "))
            if event == "error" or not isinstance(payload, list) or len(payload) < 5:
                return 500, f"{event}: {str(payload)[:200]}"
            return 200, str(payload[4])
    return 500, "the event stream ended without an answer"


def direct_api_status(url: str, path: Path) -> dict[str, int]:
    session = requests.Session()
    data = upload(session, url, path)
    return {
        route: session.post(url + route, json={"data": [data, 0.4]}, timeout=60).status_code
        for route in ("gradio_api/run/predict", "gradio_api/api/predict")
    }


def _request(session: requests.Session, url: str, path: Path) -> tuple[int, str]:
    try:
        return analyse(session, url, path)
    except requests.RequestException as error:
        return 0, f"{type(error).__name__}: {str(error)[:150]}"


REFUSAL = "Cannot analyse this file"
ANSWERED = ("ok", "refused_as_expected", "refused")


def _outcome(status: int, message: str, bad: bool) -> str:
    """One request's outcome. A refusal (the app's one-line reason, no prediction) is an
    answer: expected for the food photo, and for an MRI slice a refusal counted apart
    (``refused``), never an error."""
    if status == 503 and "Queue is full" in message:
        return "queue_full"
    if status == 429 and "Upload refused" in message:
        return "upload_limit"
    if status == 200 and message.startswith(REFUSAL):
        return "refused_as_expected" if bad else "refused"
    if status == 200 and message.startswith("Analysed") and not bad:
        return "ok"
    return "errors"


def _record(tally: dict[str, Any], outcome: str, elapsed: float, what: str) -> None:
    """Count one outcome; the latency of an answer, the file of a refused MRI slice, the
    first 20 errors (``what``: "file: status message")."""
    tally["counts"][outcome] += 1
    if outcome in ANSWERED:
        tally["latencies"].append(elapsed)
    if outcome == "refused":
        name = what.split(": ", 1)[0]
        tally["refusals"][name] = tally["refusals"].get(name, 0) + 1
    elif outcome == "errors" and len(tally["problems"]) < 20:
        tally["problems"].append(what)


def run_load(
    url: str, process: psutil.Process, slices: list[Path], food: list[Path], args: Any
) -> dict[str, Any]:
    """``args.clients`` client threads for ``args.duration`` seconds; counts, latencies,
    RSS samples."""
    tally: dict[str, Any] = {
        "counts": dict.fromkeys((*ANSWERED, "queue_full", "upload_limit", "errors"), 0),
        "latencies": [],
        "problems": [],
        "refusals": {},  # MRI slice -> times refused
    }
    samples: list[int] = []
    lock = threading.Lock()
    stop = threading.Event()

    def client(number: int) -> None:
        session = client_session(number, args.same_address)
        index = number
        while not stop.is_set():
            bad = index % 10 == 9
            path = food[index % len(food)] if bad else slices[index % len(slices)]
            index += args.clients
            began = time.perf_counter()
            status, message = _request(session, url, path)
            elapsed = time.perf_counter() - began
            outcome = _outcome(status, message, bad)
            with lock:
                _record(tally, outcome, elapsed, f"{path.name}: {status} {message}")
            if outcome in ("queue_full", "upload_limit"):
                stop.wait(1.0)

    def sample() -> None:
        while not stop.is_set():
            samples.append(tree_rss(process))
            stop.wait(0.5)

    threads = [threading.Thread(target=client, args=(n,)) for n in range(args.clients)]
    sampler = threading.Thread(target=sample, daemon=True)
    started = time.perf_counter()
    sampler.start()
    for thread in threads:
        thread.start()
    time.sleep(args.duration)
    stop.set()
    for thread in threads:
        thread.join(timeout=600)
    wall = time.perf_counter() - started
    sampler.join(timeout=5)
    return {
        **tally,
        "rss": samples,
        "wall_s": wall,
    }


def _percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {}
    array = np.asarray(values) * 1000
    return {f"p{q}_ms": float(np.percentile(array, q)) for q in (50, 95)} | {
        "max_ms": float(array.max())
    }


def _second_half_growth(samples: list[int]) -> float:
    second = samples[len(samples) // 2 :]
    return float(max(second) - second[0]) if second else float("nan")


def summarise(load: dict[str, Any], before: int, after: int, folder: Path) -> dict[str, Any]:
    left = [p for p in folder.rglob("*") if p.is_file()] if folder.is_dir() else []
    return {
        "counts": load["counts"],
        "requests_per_s": sum(load["counts"].values()) / load["wall_s"],
        "latency": _percentiles(load["latencies"]),
        "rss_mb": {
            "before": before / 1e6,
            "peak": max(load["rss"], default=before) / 1e6,
            "end": after / 1e6,
            "growth": (after - before) / 1e6,
            # As bench/serve.py: the first half absorbs allocator warm-up; a leak would
            # keep growing through the second.
            "second_half_growth": _second_half_growth(load["rss"]) / 1e6,
        },
        "files_left": {
            "count": len(left),
            "uploads": sum(p.suffix.lower() in (".jpg", ".jpeg", ".dcm") for p in left),
            "bytes": sum(p.stat().st_size for p in left),
        },
        "problems": load["problems"],
        "refused_slices": load["refusals"],
        "wall_s": load["wall_s"],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, required=True, help="a bundle folder")
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--duration", type=float, default=30.0)
    parser.add_argument("--rounds", type=int, default=1, help="loads in a row, one app")
    parser.add_argument("--max-queue", type=int, default=32)
    parser.add_argument("--same-address", action="store_true", help="every client from 127.0.0.1")
    parser.add_argument("--mirror", type=Path)
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    if not (args.model / "bundle.json").is_file():
        raise SystemExit(f"--model {args.model}: no bundle.json there")
    slices, food = _files(_mirror(args.mirror), 40)
    with tempfile.TemporaryDirectory(prefix="app-load-") as work:
        server, url, folder = start_app(args.model, args.max_queue, Path(work))
        try:
            process = psutil.Process(server.pid)
            direct = direct_api_status(url, slices[0])
            analyse(requests.Session(), url, slices[1])  # one warm request
            before = warm = tree_rss(process)
            rounds = []
            for number in range(1, args.rounds + 1):
                load = run_load(url, process, slices, food, args)
                after = tree_rss(process)
                threads = sum(member.num_threads() for member in [process, *process.children()])
                summary = summarise(load, before, after, folder)
                rounds.append(summary | {"round": number, "threads": threads})
                before = after
        finally:
            server.send_signal(signal.SIGTERM)
            server.wait(timeout=60)
    result = {
        "rounds": rounds,
        "rss_after_warm_up_mb": warm / 1e6,
        "direct_api_status": direct,
        "folder_removed_at_exit": not folder.exists(),
        "clients": args.clients,
        "same_address": args.same_address,
        "duration_s": args.duration,
        "max_queue": args.max_queue,
        "model": str(args.model),
        "cpus": os.cpu_count(),
        "load_average": os.getloadavg(),
    }
    report(result)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    errors = sum(summary["counts"]["errors"] for summary in rounds)
    return 0 if errors == 0 and set(direct.values()) == {404} else 1


def report(result: dict[str, Any]) -> None:
    print(f"direct API (skips the queue): {result['direct_api_status']} (404 = closed)")
    print(
        f"load: {result['clients']} clients "
        f"({'one address' if result['same_address'] else 'an address each'}) for "
        f"{result['duration_s']:.0f} s x {len(result['rounds'])} round(s), queue bound "
        f"{result['max_queue']}; app RSS after warm-up {result['rss_after_warm_up_mb']:.0f} MB"
    )
    print(
        "round | ok | not-MRI refused | MRI refused | queue_full | upload_limit | errors | "
        "req/s | p50 ms | "
        "p95 ms | RSS end MB | peak MB | growth MB | threads | files left"
    )
    for summary in result["rounds"]:
        counts, latency, rss = summary["counts"], summary["latency"], summary["rss_mb"]
        print(
            f"{summary['round']:5d} | {counts['ok']} | {counts['refused_as_expected']} | "
            f"{counts['refused']} | "
            f"{counts['queue_full']} | {counts['upload_limit']} | {counts['errors']} | "
            f"{summary['requests_per_s']:.1f} | {latency.get('p50_ms', float('nan')):.0f} | "
            f"{latency.get('p95_ms', float('nan')):.0f} | {rss['end']:.0f} | "
            f"{rss['peak']:.0f} | {rss['growth']:+.0f} | {summary['threads']} | "
            f"{summary['files_left']['count']}"
        )
        for name, times in sorted(summary["refused_slices"].items()):
            print(f"  MRI slice refused (an answer, not an error): {name} x{times}")
        for problem in summary["problems"]:
            print(f"  error: {problem}")
    print(f"folder removed at exit: {result['folder_removed_at_exit']}")
    print(f"machine: {result['cpus']} CPUs, load average {result['load_average']}")


if __name__ == "__main__":
    sys.exit(main())
