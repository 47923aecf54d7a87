"""p50/p99 latency of FedKit's phone routes under 30 concurrent clients.

A live Workbench (uvicorn on loopback) serves one tiny published model with a running
session; 30 client threads, each with its own HTTP connection, loop over the routes a phone
calls when it joins (``train/advertised``, ``train/server``, the model download and
``train/manifest``). Run it before and after a change to the HTTP layer and compare.

    .venv/bin/python benchmarks/http_latency.py [--clients 30] [--requests 60]
    .venv/bin/python benchmarks/http_latency.py --smoke   # 4 clients, 8 requests, one run
"""

from __future__ import annotations

import argparse
import json
import tempfile
import threading
import time
from pathlib import Path

import httpx
import keras
import numpy as np

import xflwb


def _model() -> keras.Model:
    keras.utils.set_random_seed(0)
    return keras.Sequential([keras.Input((6, 6, 1)),
                             keras.layers.Conv2D(2, 3, padding="same", activation="relu"),
                             keras.layers.Flatten(),
                             keras.layers.Dense(4, activation="softmax")])


def _client(url: str, art_id: int, path: str, n: int, out: dict[str, list[float]],
            errors: list[str]) -> None:
    calls = [("advertised", "POST", "/train/advertised",
              {"data_type": "bench-data", "tflite": True, "coreml": False}),
             ("server", "POST", "/train/server", {"id": art_id}),
             ("download", "GET", f"/{path}", None),
             ("manifest", "GET", f"/train/manifest/{art_id}", None)]
    with httpx.Client(base_url=url, timeout=60) as c:
        for i in range(n):
            name, method, route, body = calls[i % len(calls)]
            t0 = time.perf_counter()
            r = c.request(method, route, json=body)
            dt = time.perf_counter() - t0
            if r.status_code != 200:
                errors.append(f"{name}: {r.status_code}")
            out.setdefault(name, []).append(dt)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", type=int, default=30)
    ap.add_argument("--requests", type=int, default=60, help="per client")
    ap.add_argument("--repeats", type=int, default=3, help="runs; the median run is kept")
    ap.add_argument("--smoke", action="store_true",
                    help="4 clients, 8 requests each, one run: checks the benchmark runs")
    args = ap.parse_args()
    if args.smoke:
        args.clients, args.requests, args.repeats = 4, 8, 1
    with tempfile.TemporaryDirectory() as tmp:
        res = xflwb.export(_model(), name="bench", data_type="bench-data",
                           out_dir=Path(tmp) / "exports")
        wb = xflwb.Workbench(data_dir=Path(tmp) / "xfl", port=0, admin_token="t").start()
        try:
            wb.publish(res)
            session = wb.train("bench", rounds=1, min_clients=2)
            arts = httpx.post(f"{wb.url}/train/advertised",
                              json={"data_type": "bench-data", "tflite": True}).json()
            runs = []
            for _ in range(args.repeats):
                out: dict[str, list[float]] = {}
                errors: list[str] = []
                threads = [threading.Thread(target=_client, args=(
                    wb.url, arts["id"], arts["tflite_path"], args.requests, out, errors))
                    for _ in range(args.clients)]
                t0 = time.perf_counter()
                for t in threads:
                    t.start()
                for t in threads:
                    t.join()
                wall = time.perf_counter() - t0
                every = np.concatenate([np.asarray(v) for v in out.values()]) * 1000
                runs.append({
                    "requests": int(every.size), "errors": len(errors),
                    "error_kinds": sorted(set(errors))[:5],
                    "p50_ms": round(float(np.percentile(every, 50)), 2),
                    "p99_ms": round(float(np.percentile(every, 99)), 2),
                    "req_per_s": round(every.size / wall, 1),
                    "routes": {k: {"p50_ms": round(float(np.percentile(v, 50)) * 1000, 2),
                                   "p99_ms": round(float(np.percentile(v, 99)) * 1000, 2)}
                               for k, v in sorted(out.items())}})
            session.stop()
        finally:
            wb.stop()
    runs.sort(key=lambda r: r["p50_ms"])
    print(json.dumps({"clients": args.clients, "median_run": runs[len(runs) // 2],
                      "all_p50_ms": [r["p50_ms"] for r in runs],
                      "all_p99_ms": [r["p99_ms"] for r in runs]}, indent=1))


if __name__ == "__main__":
    main()
