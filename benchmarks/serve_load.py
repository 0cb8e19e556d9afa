"""Load benchmark of the HTTP API over a 100,000-item catalogue.

    python benchmarks/serve_load.py --workdir /tmp/serve_load            # trains once, then measures
    python benchmarks/serve_load.py --run runs/big --requests 400 --soak 10000 --modes two_stage

1. A model with a retrieval task over a synthetic world with `--items` items (few users and
   impressions, small dimensions, one epoch), or the run given with `--run`.
2. In process: recommend top-10 latency (p50/p95) through the serving code, two-stage (retrieval
   of the run's `recommend.candidates`, or `--retrieval`, items by the retrieval vectors, then the
   multi-task heads: the default of a run with a retrieval task) and ranking the whole catalogue
   exactly, and how many of the exact top-10 the two-stage top-10 keeps (overlap = recall@10).
3. Over HTTP: `mtlrec.serve.serve_command` in a subprocess on 127.0.0.1; `--requests` recommend
   requests from 1, 8 and 32 concurrent clients (httpx, asyncio): throughput, p50/p95/p99, errors.
   Server configurations (`--modes`): two-stage (the run's default), and the whole catalogue
   ranked exactly (`MTLREC_RETRIEVAL_CANDIDATES=0`).
4. Memory: the server's RSS before and after `--soak` more requests at concurrency 8 (on the
   two-stage configuration when it is loaded, else the exact one).

Every request count is bounded by the arguments; traffic stays on loopback.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from mtlrec.memory import rss_mb

KEY = "benchmark-key-0123456789abcdef"
SMALL = ["train.epochs=1", "train.progress=false", "model.embedding_dim=8", "model.encoder_dim=16",
         "model.expert_hidden=[16]", "model.tower_hidden=[8]", "model.head_hidden=[8]"]


def build_run(workdir: Path, n_items: int, n_users: int) -> Path:
    """Train (once) a small model with a retrieval task over a synthetic world with `n_items` items."""
    import mtlrec
    from mtlrec.data.synthetic import make_world

    run = workdir / f"run-{n_items}-retrieval"
    if (run / "weights.safetensors").is_file():
        return run
    start = time.perf_counter()
    world = make_world(n_users=n_users, n_items=n_items, impressions_per_user=20, n_pairs=2000, seed=0)
    config = world.write(workdir / f"world-{n_items}", retrieval=True)
    mtlrec.train(config, run, SMALL)
    print(f"trained {run} in {time.perf_counter() - start:.0f} s", flush=True)
    return run


def percentiles(seconds: list[float]) -> dict[str, float]:
    ms = np.asarray(seconds) * 1000.0
    return {"p50_ms": float(np.percentile(ms, 50)), "p95_ms": float(np.percentile(ms, 95)),
            "p99_ms": float(np.percentile(ms, 99))}


def in_process(run: Path, retrieval: int | None, calls: int) -> dict[str, Any]:
    """Recommend latency through `ServingService`, two-stage and whole-catalogue."""
    import mtlrec
    from mtlrec.serve.schemas import RecommendRequest
    from mtlrec.serve.service import ServingService
    from mtlrec.serve.settings import ServeSettings

    predictor = mtlrec.Predictor.load(run)
    users = [str(u) for u in predictor.schema.user_ids()]
    rng = random.Random(0)
    out: dict[str, Any] = {"items": len(predictor.schema.item_ids()), "candidates": predictor.recommender.candidates
                           if retrieval is None else retrieval}
    for name, n, count in (("two_stage", retrieval, calls), ("whole_catalogue", 0, max(10, calls // 5))):
        service = ServingService(predictor, ServeSettings(retrieval_candidates=n), run.name, "")
        picks = [rng.choice(users) for _ in range(count + 10)]
        times = []
        for i, user in enumerate(picks):
            start = time.perf_counter()
            service.recommend(RecommendRequest(user_id=user, k=10))
            if i >= 10:  # warm-up
                times.append(time.perf_counter() - start)
        out[name] = percentiles(times)
    # Overlap on the same users: how much of the exact top-10 the two-stage answer keeps.
    service_exact = ServingService(predictor, ServeSettings(retrieval_candidates=0), run.name, "")
    service_fast = ServingService(predictor, ServeSettings(retrieval_candidates=retrieval), run.name, "")
    overlap = []
    for user in users[:50]:
        exact = {i.item_id for i in service_exact.recommend(RecommendRequest(user_id=user, k=10)).items}
        fast = {i.item_id for i in service_fast.recommend(RecommendRequest(user_id=user, k=10)).items}
        overlap.append(len(exact & fast) / max(1, len(exact)))
    out["two_stage_overlap_at_10"] = float(np.mean(overlap))
    out["users"] = users
    return out


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_server(run: Path, port: int, retrieval: int | None, torch_threads: int) -> subprocess.Popen[bytes]:
    env = {**os.environ, "MTLREC_API_KEYS": KEY, "MTLREC_RATE_LIMIT_PER_SECOND": "1000000",
           "MTLREC_RATE_LIMIT_BURST": "1000000", "MTLREC_TORCH_THREADS": str(torch_threads)}
    env.pop("MTLREC_RETRIEVAL_CANDIDATES", None)
    if retrieval is not None:  # unset: the run's recommend.candidates
        env["MTLREC_RETRIEVAL_CANDIDATES"] = str(retrieval)
    code = (f"from mtlrec.serve import serve_command; from pathlib import Path; "
            f"serve_command(Path({str(run)!r}), host='127.0.0.1', port={port})")
    return subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)


async def wait_ready(base: str, timeout: float = 180.0) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    async with httpx.AsyncClient() as client:
        while time.monotonic() < deadline:
            try:
                if (await client.get(f"{base}/healthz")).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            await asyncio.sleep(0.5)
    raise RuntimeError("the server did not become ready")


async def load(base: str, users: list[str], requests: int, concurrency: int, seed: int) -> dict[str, Any]:
    """`requests` recommend calls from `concurrency` clients; latency of each, errors counted."""
    import httpx

    rng = random.Random(seed)
    bodies = [{"user_id": rng.choice(users), "k": 10} for _ in range(requests)]
    latencies: list[float] = []
    errors = 0
    queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    for body in bodies:
        queue.put_nowait(body)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    headers = {"Authorization": f"Bearer {KEY}"}

    async def worker(client: httpx.AsyncClient) -> None:
        nonlocal errors
        while not queue.empty():
            body = queue.get_nowait()
            start = time.perf_counter()
            try:
                response = await client.post(f"{base}/v1/recommend", json=body, headers=headers)
                ok = response.status_code == 200 and len(response.json()["items"]) == 10
            except httpx.HTTPError:
                ok = False
            latencies.append(time.perf_counter() - start)
            errors += 0 if ok else 1

    async with httpx.AsyncClient(limits=limits, timeout=30.0) as client:
        start = time.perf_counter()
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
        wall = time.perf_counter() - start
    return {"concurrency": concurrency, "requests": requests, "errors": errors,
            "throughput_rps": requests / wall, **percentiles(latencies)}


def over_http(run: Path, users: list[str], retrieval: int | None, torch_threads: int, requests: int,
              concurrencies: list[int], soak: int) -> dict[str, Any]:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    server = start_server(run, port, retrieval, torch_threads)
    try:
        asyncio.run(wait_ready(base))
        asyncio.run(load(base, users, 50, 4, seed=99))  # warm-up
        rows = [asyncio.run(load(base, users, requests, c, seed=c)) for c in concurrencies]
        before = rss_mb(server.pid)
        soak_row = asyncio.run(load(base, users, soak, 8, seed=7)) if soak else None
        after = rss_mb(server.pid)
    finally:
        server.terminate()
        try:
            server.wait(timeout=15)
        except subprocess.TimeoutExpired:
            server.kill()
    return {"rows": rows, "soak": soak_row, "rss_before_mb": before, "rss_after_mb": after}


def print_table(title: str, http: dict[str, Any]) -> None:
    print(f"\n{title}\n")
    print("| clients | requests | throughput (req/s) | p50 (ms) | p95 (ms) | p99 (ms) | errors |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for row in http["rows"] + ([http["soak"]] if http["soak"] else []):
        print(f"| {row['concurrency']} | {row['requests']:,} | {row['throughput_rps']:.0f} | {row['p50_ms']:.1f} | "
              f"{row['p95_ms']:.1f} | {row['p99_ms']:.1f} | {row['errors']} |")
    if http["soak"]:
        growth = http["rss_after_mb"] - http["rss_before_mb"]
        print(f"\nserver RSS before/after {http['soak']['requests']:,} more requests: {http['rss_before_mb']:.0f} MB / "
              f"{http['rss_after_mb']:.0f} MB ({growth:+.1f} MB)")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, help="serve this run instead of training one")
    parser.add_argument("--workdir", type=Path, default=Path("runs/serve_load"), help="where to train the model")
    parser.add_argument("--items", type=int, default=100_000)
    parser.add_argument("--users", type=int, default=500)
    parser.add_argument("--retrieval", type=int, help="items retrieved before ranking (default: the run's "
                        "recommend.candidates)")
    parser.add_argument("--torch-threads", type=int, default=1, help="torch threads of the server")
    parser.add_argument("--calls", type=int, default=200, help="in-process recommend calls")
    parser.add_argument("--requests", type=int, default=400, help="HTTP requests per concurrency level (two-stage)")
    parser.add_argument("--exact-requests", type=int, default=100,
                        help="HTTP requests per concurrency level when the whole catalogue is ranked")
    parser.add_argument("--modes", nargs="+", choices=["two_stage", "exact"], default=["two_stage", "exact"],
                        help="server configurations to load; two-stage gets the memory soak when loaded")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--soak", type=int, default=10_000, help="requests between the two RSS readings")
    parser.add_argument("--out", type=Path, help="also write the figures as JSON here")
    args = parser.parse_args(argv)

    import torch

    torch.set_num_threads(args.torch_threads)
    run = args.run or build_run(args.workdir, args.items, args.users)
    local = in_process(run, args.retrieval, args.calls)
    users = local.pop("users")
    print(f"catalogue: {local['items']:,} items; torch threads: {args.torch_threads}")
    print(f"in-process recommend top-10, two-stage (retrieve {local['candidates']}, rank): "
          f"p50 {local['two_stage']['p50_ms']:.1f} ms, p95 {local['two_stage']['p95_ms']:.1f} ms")
    print(f"in-process recommend top-10, whole catalogue ranked: p50 {local['whole_catalogue']['p50_ms']:.1f} ms, "
          f"p95 {local['whole_catalogue']['p95_ms']:.1f} ms")
    print(f"two-stage top-10 overlap with the whole-catalogue top-10 (recall@10 of the exact answer, 50 users): "
          f"{local['two_stage_overlap_at_10']:.2f}")
    results: dict[str, Any] = {"in_process": local}
    if "two_stage" in args.modes:
        http = over_http(run, users, args.retrieval, args.torch_threads, args.requests, args.concurrency, args.soak)
        print_table(f"HTTP, two-stage (retrieve {local['candidates']}, rank):", http)
        results["http_two_stage"] = http
    if "exact" in args.modes:
        soak = 0 if "two_stage" in args.modes else args.soak
        http = over_http(run, users, 0, args.torch_threads, args.exact_requests, args.concurrency, soak)
        print_table("HTTP, whole catalogue ranked:", http)
        results["http_exact"] = http
    if args.out:
        results["args"] = {k: str(v) for k, v in vars(args).items()}
        args.out.write_text(json.dumps(results, indent=2))

if __name__ == "__main__":
    main()
