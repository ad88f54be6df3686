#!/usr/bin/env bash
# debug_torch.sh — the article's debug cycle ("Debugging을 위한 Shell script"): stop TorchServe,
# rebuild the MAR, start it again. Run it after every handler edit:
#
#     chmod +x torch_model/debug_torch.sh      # +x (the article's `chmod -x` REMOVES the permission)
#     torch_model/debug_torch.sh               # optional: --inference-port 8090 --management-port 8091 ...
#
# What was fixed against the 2023 script, and where each step lives now (yelp_ts.pipeline.debug):
#   - bash shebang and `set -euo pipefail`; no stray `실행하기` line (bash tried to run it as a command, printed
#     "command not found" and, without `set -e`, went on)
#   - torch-model-archiver packs model.safetensors + tokenizer.json/tokenizer_config.json (transformers 5
#     writes no pytorch_model.bin / vocab.txt) with the handler yelp_ts/handler.py, the model module it imports
#     (yelp_ts/model.py, packed beside it) and model-config.yaml,
#     `--force`, straight into torch_model/model_store/ (no `mv`)
#   - its own TMPDIR/TEMP (torch_model/tmp): `torchserve --stop` kills the pid in $TMPDIR/.model_server.pid,
#     so with the default /tmp it would stop any TorchServe on the machine
#   - `torchserve --start --ncs --model-store torch_model/model_store --models yelp=yelp.mar` with a
#     config.properties bound to 127.0.0.1 and token auth on; it waits until the model really answers
#     and prints the log tail when it does not
# The equivalent raw commands (run inside torch_model/, with TMPDIR and TEMP exported as below):
#     torchserve --stop
#     torch-model-archiver --model-name yelp --version 1.0 --serialized-file model.safetensors \
#         --handler "$(python -c 'import yelp_ts.handler as h; print(h.__file__)')" \
#         --extra-files "config.json,tokenizer.json,tokenizer_config.json,index_to_name.json,$(python -c 'import yelp_ts.model as m; print(m.__file__)')" \
#         --config-file model-config.yaml --export-path model_store --force
#     torchserve --start --ncs --ts-config config.properties --model-store model_store --models yelp=yelp.mar
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"     # .../torch_model
workdir="$(dirname "$here")"                               # the work directory that holds torch_model/
export TMPDIR="$here/tmp" TEMP="$here/tmp"
mkdir -p "$TMPDIR"

if [ -x "$workdir/.venv/bin/yelp-ts" ]; then
    exec "$workdir/.venv/bin/yelp-ts" debug --workdir "$workdir" "$@"
elif command -v yelp-ts >/dev/null 2>&1; then
    exec yelp-ts debug --workdir "$workdir" "$@"
else
    echo "debug_torch.sh: the yelp-ts command is not installed: \`pip install -e .\` in the repository" >&2
    exit 1
fi
