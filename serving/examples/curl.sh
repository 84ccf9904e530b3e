#!/usr/bin/env bash
# Classify a photo over TF Serving's REST API with curl (our server from `make serve`, or tensorflow/serving).
#
#   serving/examples/curl.sh path/to/photo.jpg               # predict: top-k class_names + scores
#   serving/examples/curl.sh path/to/photo.jpg classify      # Classify API: [[label, score], ...]
#
# HOST (default localhost:8501), MODEL (default productlens) and VERSION_PATH (e.g. /versions/3 or
# /labels/stable; default: latest) select the server and version.
set -euo pipefail
IMAGE=${1:?usage: $0 PHOTO [predict|classify]}
METHOD=${2:-predict}
HOST=${HOST:-localhost:8501}
MODEL=${MODEL:-productlens}
VERSION_PATH=${VERSION_PATH:-}
B64=$(base64 -w0 "$IMAGE")
if [[ "$METHOD" == classify ]]; then
  BODY="{\"signature_name\": \"classification\", \"examples\": [{\"image_bytes\": {\"b64\": \"$B64\"}}]}"
else
  BODY="{\"signature_name\": \"serving_default\", \"instances\": [{\"b64\": \"$B64\"}]}"
fi
# The body can be larger than a command line allows: pass it on stdin.
printf '%s' "$BODY" | curl -sS --fail-with-body -X POST -H 'Content-Type: application/json' \
  --data-binary @- "http://$HOST/v1/models/$MODEL$VERSION_PATH:$METHOD"
echo
