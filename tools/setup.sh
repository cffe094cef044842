#!/usr/bin/env bash
# Installs what Tessera needs on Debian bookworm (only what is missing), then builds everything.
# Idempotent; uses sudo when not root.
set -euo pipefail
cd "$(dirname "$0")/.."

packages=(
  bazel-bootstrap pkg-config
  libgrpc++-dev protobuf-compiler-grpc libprotobuf-dev protobuf-compiler
  libisal-dev libspdlog-dev libfmt-dev libgtest-dev libgmock-dev libabsl-dev
  libtomlplusplus-dev libcpp-httplib-dev libsystemd-dev
  libssl-dev    # HMAC-SHA256 of membership datagrams (daemon/membership/udp_heartbeats.h)
  openssl       # tools/make-cluster-certs.sh: certificates for mutual TLS (and its tests)
  python3 python3-numpy python3-torch python3-pytest
  python3-yaml  # tests/cli:deploy_test reads deploy/kubernetes/*.yaml
  spin gcc      # model/check.sh: the commit protocol's model check (tools/run-tests.sh)
  clang-14 libclang-rt-14-dev  # tools/fuzz.sh: the libFuzzer targets of fuzz/ (tools/run-tests.sh)
)
# Intel's AES-GCM for the encrypted data path, about twice OpenSSL's rate on CPUs with VAES
# (amd64 only; elsewhere the build uses OpenSSL alone).
if [ "$(dpkg --print-architecture)" = amd64 ]; then packages+=(libipsec-mb-dev); fi
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  echo "setup: installing ${missing[*]}"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
if [ ! -e "${TESSERA_CUDA_PATH:-/usr/local/cuda}/include/cuda_runtime.h" ]; then
  echo "setup: no CUDA toolkit at ${TESSERA_CUDA_PATH:-/usr/local/cuda}; install it or set TESSERA_CUDA_PATH" >&2
  exit 1
fi
echo "setup: building (bazel build //...)"
bazel build //... --show_result=0
