"""`cocatk index --watch` under a burst: N new files written into a watched root as fast as the disk takes them.

    python benchmarks/bench_watch.py            # 10,000 files (the issue's burst), tiny random-weight model
    python benchmarks/bench_watch.py --n 2000

The watch runs in a thread over an index of the tiny test model (the model is not what is measured: the event
handling, debouncing, stability checks and incremental updates are). Files are written with no pause, then the run
waits until the index holds all of them. Reported: the time to write, the time until everything is indexed, the
batches and their sizes, and a check that every file is indexed exactly once (`Index.check()` and the counts).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
from _common import machine_info, write_record
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=10_000, help="files in the burst")
    ap.add_argument("--timeout", type=float, default=900.0, help="give up after this many seconds")
    args = ap.parse_args()

    from cocatk.retrieval import Index
    from cocatk.retrieval.watch import watch_index

    work = Path(tempfile.mkdtemp(prefix="cocatk-watch-"))
    photos, idx_dir = work / "photos", work / "idx"
    photos.mkdir()
    tiny = ROOT / "tests" / "data" / "coca_tiny.json"
    seed_file = photos / "seed.png"
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(seed_file)
    ix = Index.open(idx_dir, model=str(tiny), pretrained="none", device="cpu", create=True, lock=True)
    ix.update([photos])
    batches: list = []
    stop = threading.Event()
    thread = threading.Thread(
        target=watch_index, kwargs={"index": ix, "paths": [photos], "on_batch": batches.append, "stop": stop}
    )
    thread.start()
    time.sleep(2.0)  # the observer is armed
    rng = np.random.default_rng(0)
    t0 = time.monotonic()
    for i in range(args.n):
        sub = photos / f"d{i // 1000:02d}"
        sub.mkdir(exist_ok=True)
        arr = rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)
        Image.fromarray(arr).save(sub / f"im{i:05d}.png")
    written_s = time.monotonic() - t0
    want = args.n + 1
    count = 0
    while time.monotonic() - t0 < args.timeout:
        from cocatk.retrieval.store import Store

        store = Store.open(idx_dir)
        count = store.count()
        store.close()
        if count >= want:
            break
        time.sleep(0.5)
    indexed_s = time.monotonic() - t0
    stop.set()
    thread.join(timeout=120)
    check = ix.check()
    ix.close()
    rows = [
        {"batch": b.number, "added": b.added, "changed": b.changed, "moved": b.moved, "removed": b.removed}
        for b in batches
        if b.kind in ("batch", "catch-up")
    ]
    result = {
        "files": args.n,
        "written_s": round(written_s, 2),
        "all_indexed_s": round(indexed_s, 2),
        "indexed": count,
        "expected": want,
        "batches": rows,
        "check_ok": check.ok,
        "check_files": check.files,
        "machine": machine_info(),
    }
    print(
        f"burst of {args.n} files: written in {written_s:.1f} s, all indexed after {indexed_s:.1f} s "
        f"({count}/{want}); {len(rows)} batches, sizes {[r['added'] for r in rows]}; check ok={check.ok}"
    )
    write_record("watch", result)
    shutil.rmtree(work, ignore_errors=True)
    if count != want or not check.ok:
        sys.exit(1)


if __name__ == "__main__":
    main()
