#!/usr/bin/env bash
# Issue 24, "data in one command", shown end to end against a loopback mirror with small files:
# prefetch on a grid naming DPR's files is killed mid-download, resumes (Range), verifies and
# pins; a second prefetch with the server gone asks nothing; a corrupted download is refused.
#   bash tests/prefetch_acceptance.sh        (PY=python to use; runs in a fresh temporary folder)
set -u
REPO=$(cd "$(dirname "$0")/.." && pwd); PY="${PY:-python}"; export PYTHONPATH=$REPO
D=$(mktemp -d); cd "$D"
# 1. Small stand-ins in DPR's server layout (dl.fbaipublicfiles.com/dpr/...)
mkdir -p mirror/data/retriever local-model
$PY - <<'PY'
import gzip, json, hashlib
rec = lambda i: {"question": f"q{i}?", "answers": [f"a{i}"], "positive_ctxs": [{"title": "t", "text": f"gold {i}", "passage_id": str(i)}],
                 "negative_ctxs": [], "hard_negative_ctxs": [{"title": "h", "text": f"hard {i}", "passage_id": str(10**6 + i)}]}
for split, n in (("train", 20000), ("dev", 50)):
    data = gzip.compress(json.dumps([rec(i) for i in range(n)]).encode(), mtime=0)
    open(f"mirror/data/retriever/biencoder-nq-{split}.json.gz", "wb").write(data)
    # the stand-ins cannot match DPR's published md5s: a site catalog gives theirs (same names, same URLs)
    open("catalog.yaml", "a").write(f"dpr:nq-{split}: {{url: data/retriever/biencoder-nq-{split}.json.gz, md5: {hashlib.md5(data).hexdigest()}}}\n")
PY
printf 'name: named\ndata: {train: "dpr:nq-train", dev: "dpr:nq-dev"}\nblocks: [{name: b, encoder: ./local-model, embedding_sizes: [8]}]\n' > grid.yaml
# 2. A loopback mirror with Range support, throttled to 200 KB/s so a download can be interrupted
$PY $REPO/tests/data_server.py mirror --rate 200000 > url.txt & SERVER=$!
until [ -s url.txt ]; do sleep 0.1; done
export DPR_HPC_DATA_MIRROR=$(cat url.txt) DPR_HPC_DATA_DIR=$D/data DPR_HPC_DATA_CATALOG=$D/catalog.yaml
# 3. Fetch, killed mid-download once the .part file has bytes
$PY -m dpr_hpc prefetch grid.yaml --runs-root runs & FETCH=$!
PART=data/dpr/biencoder-nq-train.json.gz.part
until [ -s $PART ]; do sleep 0.1; done; sleep 1; kill -9 $FETCH; wait $FETCH 2>/dev/null
echo "== killed with $(stat -c %s $PART) bytes in $PART"
# 4. Resumed: asks only for the rest (Range), verifies, decompresses, pins
$PY -m dpr_hpc prefetch grid.yaml --runs-root runs; echo "exit $?"
cat data/pins.json
# 5. Offline afterwards: the server stopped, a second prefetch makes no request
kill $SERVER; $PY -m dpr_hpc prefetch grid.yaml --runs-root runs; echo "exit $?"
# 6. Corrupted: the server now sends other bytes for nq-dev; the local copy is gone
$PY -c "import sys; p='mirror/data/retriever/biencoder-nq-dev.json.gz'; b=bytearray(open(p,'rb').read()); b[100]^=255; open(p,'wb').write(b)"
$PY $REPO/tests/data_server.py mirror > url2.txt & SERVER=$!; until [ -s url2.txt ]; do sleep 0.1; done
export DPR_HPC_DATA_MIRROR=$(cat url2.txt); rm data/dpr/biencoder-nq-dev.json
$PY -m dpr_hpc prefetch grid.yaml --runs-root runs; echo "exit $?"; ls data/dpr
kill $SERVER
