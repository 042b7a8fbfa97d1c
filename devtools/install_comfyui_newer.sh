#!/usr/bin/env bash
# Install hiddenswitch's pip-installable ComfyUI 0.12.1 (a checkout at $1) into its own venv ($2, default
# <checkout>/.venv), as it resolves today (see the project's shared/comfyui/README.md): its protobuf<5 pin needs the
# opentelemetry packages of 2024, setuptools<81 (instrumentation imports pkg_resources) and sentencepiece 0.2.0.
# Then point the tests at it: COMFYUI_NEWER_PATH=<checkout> COMFYUI_NEWER_PYTHON=<venv>/bin/python make test.
set -euo pipefail
tree=$(cd "${1:?usage: install_comfyui_newer.sh <hiddenswitch ComfyUI checkout> [venv]}" && pwd)
venv=${2:-$tree/.venv}
python3 -m venv "$venv"
pip="$venv/bin/pip"
"$pip" install -q --upgrade pip
otel=(opentelemetry-api==1.26.0 opentelemetry-sdk==1.26.0 opentelemetry-proto==1.26.0
      opentelemetry-exporter-otlp==1.26.0 opentelemetry-exporter-otlp-proto-common==1.26.0
      opentelemetry-exporter-otlp-proto-grpc==1.26.0 opentelemetry-exporter-otlp-proto-http==1.26.0
      opentelemetry-semantic-conventions==0.47b0 opentelemetry-instrumentation==0.47b0 opentelemetry-distro==0.47b0
      opentelemetry-util-http==0.47b0 opentelemetry-processor-baggage==0.47b0
      opentelemetry-instrumentation-aio-pika==0.47b0 opentelemetry-instrumentation-requests==0.47b0
      opentelemetry-instrumentation-aiohttp-server==0.47b0 opentelemetry-instrumentation-aiohttp-client==0.47b0
      opentelemetry-instrumentation-asyncio==0.47b0 opentelemetry-instrumentation-urllib3==0.47b0)
"$pip" install -q torch==2.14.1 torchvision==0.29.1 torchaudio "setuptools<81" "protobuf<5" sentencepiece==0.2.0 \
    "${otel[@]}" -e "$tree" pytest safetensors comfyui-workflow-templates-json==0.1.123
echo "installed: COMFYUI_NEWER_PATH=$tree COMFYUI_NEWER_PYTHON=$venv/bin/python"
