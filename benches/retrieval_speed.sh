#!/usr/bin/env bash
# Retrieval speed of the embedded store (#11): p50/p99 of lexical, dense and hybrid top-10 and
# recall@10 of the int8 path against exact, at 10k and 100k synthetic chunks (add 1M with
# RETRIEVAL_SIZES=10000,100000,1000000). Prints a Markdown table; stores are built once under
# target/retrieval-speed/ and reused. Knobs: see benches/retrieval_speed.rs.
#
#   bash benches/retrieval_speed.sh
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
echo "machine: $(nproc) cores, $(uname -r), load $(cut -d' ' -f1-3 /proc/loadavg)" >&2
exec cargo bench --locked --bench retrieval_speed
