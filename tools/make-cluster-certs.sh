#!/usr/bin/env bash
# Makes the certificates for mutual TLS on the peer port (cluster.tls_*): a CA, and one
# certificate per name given, issued by it (EC P-256 keys, valid DAYS days, default 365).
#
#   tools/make-cluster-certs.sh OUTDIR NAME... [--days N] [--ca-from DIR]
#
# Writes OUTDIR/ca.crt and OUTDIR/ca.key (keep the key off the nodes), and for each NAME
# OUTDIR/NAME.crt and OUTDIR/NAME.key (mode 0600). Each certificate names NAME as its subject
# and DNS name. --ca-from DIR issues with the CA already in DIR (ca.crt, ca.key) instead of a
# new one: what a rotation of the daemons' certificates does. To rotate the CA itself, put the
# old and the new CA certificates in one ca.crt on every node first, then the new daemon
# certificates, then drop the old CA (deploy/OPERATIONS.md, "Mutual TLS").
set -euo pipefail
usage() { echo "usage: $0 OUTDIR NAME... [--days N] [--ca-from DIR]" >&2; exit 2; }
[ $# -ge 2 ] || usage
out=$1; shift
days=365 ca_from="" names=()
while [ $# -gt 0 ]; do
  case $1 in
    --days) days=${2:?--days needs a number}; shift 2 ;;
    --ca-from) ca_from=${2:?--ca-from needs a directory}; shift 2 ;;
    -*) usage ;;
    *) names+=("$1"); shift ;;
  esac
done
[ ${#names[@]} -ge 1 ] || usage
case $days in ''|*[!0-9]*) echo "--days must be a positive number, got '$days'" >&2; exit 2 ;; esac
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
for name in "${names[@]}"; do
  openssl req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -subj "/CN=$name" \
    -keyout "$out/$name.key" -out "$out/$name.csr" 2>/dev/null
  printf 'subjectAltName=DNS:%s\nextendedKeyUsage=serverAuth,clientAuth\n' "$name" > "$out/$name.ext"
  openssl x509 -req -in "$out/$name.csr" -CA "$out/ca.crt" -CAkey "$out/ca.key" -CAcreateserial \
    -days "$days" -extfile "$out/$name.ext" -out "$out/$name.crt" 2>/dev/null
  rm -f "$out/$name.csr" "$out/$name.ext"
done
chmod 0644 "$out/ca.crt"
for name in "${names[@]}"; do chmod 0644 "$out/$name.crt"; done
echo "CA: $out/ca.crt; certificates: ${names[*]/#/$out/} (.crt and .key)"
