#!/usr/bin/env bash
# Makes the certificates for mutual TLS on the peer port (cluster.tls_*): a CA, one certificate
# per node, and client certificates for the CLI (EC P-256 keys, valid DAYS days, default 365).
#
#   tools/make-cluster-certs.sh OUTDIR NODE_ID... [--client NAME]... [--days N] [--ca-from DIR]
#
# Writes OUTDIR/ca.crt and OUTDIR/ca.key (keep the key off the nodes), and for each NODE_ID
# OUTDIR/NODE_ID.crt and OUTDIR/NODE_ID.key (mode 0600): a daemon's certificate, naming the node
# as its subject, its DNS name and the subjectAltName URI tessera-node:NODE_ID. A daemon speaks
# only for the node its certificate names: it refuses to start unless that is its node.id, and
# its peers refuse every call that claims another node. Give each node its own certificate and
# key, and only that node its key. --client NAME writes NAME.crt and NAME.key naming no node: an
# operator's certificate for `tessera --tls-cert`, which reaches the admin calls only.
# --ca-from DIR issues with the CA already in DIR (ca.crt, ca.key) instead of a new one: what a
# rotation of the daemons' certificates does. To rotate the CA itself, put the old and the new
# CA certificates in one ca.crt on every node first, then the new daemon certificates, then drop
# the old CA (deploy/OPERATIONS.md, "Mutual TLS").
set -euo pipefail
usage() {
  echo "usage: $0 OUTDIR NODE_ID... [--client NAME]... [--days N] [--ca-from DIR]" >&2
  exit 2
}
[ $# -ge 2 ] || usage
out=$1; shift
days=365 ca_from="" nodes=() clients=()
while [ $# -gt 0 ]; do
  case $1 in
    --days) days=${2:?--days needs a number}; shift 2 ;;
    --ca-from) ca_from=${2:?--ca-from needs a directory}; shift 2 ;;
    --client) clients+=("${2:?--client needs a name}"); shift 2 ;;
    -*) usage ;;
    *) nodes+=("$1"); shift ;;
  esac
done
[ $((${#nodes[@]} + ${#clients[@]})) -ge 1 ] || usage
case $days in ''|*[!0-9]*) echo "--days must be a positive number, got '$days'" >&2; exit 2 ;; esac
# As node.id: 1 to 64 characters from A-Z a-z 0-9 . _ - (and a file name here).
for name in ${nodes[@]+"${nodes[@]}"} ${clients[@]+"${clients[@]}"}; do
  if ! [[ $name =~ ^[A-Za-z0-9._-]{1,64}$ ]] || [ "$name" = . ] || [ "$name" = .. ] ||
     [ "$name" = ca ]; then
    echo "'$name' is not a node id or name: 1 to 64 characters from A-Z a-z 0-9 . _ -," \
         "other than '.', '..' and 'ca'" >&2
    exit 2
  fi
done
command -v openssl >/dev/null || { echo "openssl is not installed (apt-get install openssl)" >&2; exit 1; }
mkdir -p "$out"
umask 077
if [ -n "$ca_from" ]; then
  [ -f "$ca_from/ca.crt" ] && [ -f "$ca_from/ca.key" ] ||
    { echo "--ca-from $ca_from: ca.crt and ca.key must both be there" >&2; exit 2; }
  [ "$(cd "$ca_from" && pwd)" = "$(cd "$out" && pwd)" ] || cp "$ca_from/ca.crt" "$ca_from/ca.key" "$out/"
else
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days "$days" \
    -subj "/CN=tessera cluster CA" -keyout "$out/ca.key" -out "$out/ca.crt" 2>/dev/null
fi
# issue NAME SUBJECT_ALT_NAMES EXTENDED_KEY_USAGE
issue() {
  openssl req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -subj "/CN=$1" \
    -keyout "$out/$1.key" -out "$out/$1.csr" 2>/dev/null
  printf 'subjectAltName=%s\nextendedKeyUsage=%s\n' "$2" "$3" > "$out/$1.ext"
  openssl x509 -req -in "$out/$1.csr" -CA "$out/ca.crt" -CAkey "$out/ca.key" -CAcreateserial \
    -days "$days" -extfile "$out/$1.ext" -out "$out/$1.crt" 2>/dev/null
  rm -f "$out/$1.csr" "$out/$1.ext"
  chmod 0644 "$out/$1.crt"
}
for node in ${nodes[@]+"${nodes[@]}"}; do
  issue "$node" "DNS:$node,URI:tessera-node:$node" serverAuth,clientAuth
done
for client in ${clients[@]+"${clients[@]}"}; do
  issue "$client" "DNS:$client" clientAuth
done
chmod 0644 "$out/ca.crt"
echo "CA: $out/ca.crt; nodes: ${nodes[*]-none}; clients: ${clients[*]-none}" \
     "(in $out, .crt and .key)"
