"""rclip's own indexing in one process, timed from inside; run by ``bench_rclip.py`` with rclip's Python.

    RCLIP_DATADIR=/tmp/x /path/to/venv-rclip/bin/python benchmarks/_rclip_driver.py FOLDER [BATCH_SIZE]

It calls ``rclip.main.init_rclip`` exactly as the ``rclip`` command does before it searches (open the database in
``$RCLIP_DATADIR``, check the model files, ``RClip.ensure_index(FOLDER)``), and no search. A few wrappers time
``ensure_index`` (walk, hash, decode + preprocess in rclip's loader threads, ONNX forward, SQLite), the ONNX
session loads inside it (rclip opens its visual model lazily, at the first batch) and count the images encoded.
The last line on stdout is ``RCLIP_DRIVER {json}``. Only the standard library and rclip are imported: this file
must not import cocatk, torch or the benchmark helpers.
"""

from __future__ import annotations

import json
import os
import sys
import time


def main() -> None:
    t_start = time.perf_counter()
    folder = os.path.abspath(sys.argv[1])
    batch_size = int(sys.argv[2]) if len(sys.argv) > 2 else 8  # rclip's --indexing-batch-size default

    from rclip import main as rclip_main
    from rclip import model as rclip_model
    from rclip import model_download

    t_imported = time.perf_counter()
    timings = {"session_load_s": 0.0, "ensure_index_s": 0.0, "index_images_s": 0.0, "model_s": 0.0}
    counts = {"encoded": 0, "batches": 0}

    load_session = model_download._load_onnx_session

    def timed_load_session(path: str):  # type: ignore[no-untyped-def]
        t = time.perf_counter()
        session = load_session(path)
        timings["session_load_s"] += time.perf_counter() - t
        return session

    model_download._load_onnx_session = timed_load_session

    def timed(method_name: str, key: str) -> None:
        cls = rclip_main.RClip
        original = getattr(cls, method_name)

        def wrapper(self, *args, **kwargs):  # type: ignore[no-untyped-def]
            t = time.perf_counter()
            try:
                return original(self, *args, **kwargs)
            finally:
                timings[key] += time.perf_counter() - t

        setattr(cls, method_name, wrapper)

    timed("ensure_index", "ensure_index_s")
    timed("_index_images", "index_images_s")

    features = rclip_model.Model.compute_preprocessed_image_features

    def counted_features(self, images, *args, **kwargs):  # type: ignore[no-untyped-def]
        t = time.perf_counter()
        out = features(self, images, *args, **kwargs)
        timings["model_s"] += time.perf_counter() - t
        counts["encoded"] += len(images)
        counts["batches"] += 1
        return out

    rclip_model.Model.compute_preprocessed_image_features = counted_features

    rclip, model_instance, database = rclip_main.init_rclip(folder, batch_size)
    in_db = database._con.execute("SELECT COUNT(*) FROM images WHERE deleted IS NULL").fetchone()[0]
    rclip.close()
    model_instance.close()
    database.close()

    import onnxruntime

    result = {
        **timings,
        # model_s includes the lazy session load of the first batch; this is the forward passes alone.
        "model_s": timings["model_s"] - timings["session_load_s"],
        **counts,
        "in_database": in_db,
        "batch_size": batch_size,
        "import_s": t_imported - t_start,
        "process_s": time.perf_counter() - t_start,
        "datadir": os.environ.get("RCLIP_DATADIR"),
        "onnxruntime": onnxruntime.__version__,
        "intra_op_threads": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
    }
    print("RCLIP_DRIVER " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
