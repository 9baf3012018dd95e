#!/usr/bin/env bash
# Create a private CA and one server certificate for the SuperLink, its Fleet gateway and the
# split service.
# Usage: deploy/make_certs.sh [SAN ...]      e.g. deploy/make_certs.sh IP:10.0.0.5 DNS:fl.example.org
# The certificate always covers IP:127.0.0.1, DNS:localhost and $SUPERLINK_HOST. An existing CA
# is reused (so clients keep trusting it); the server certificate is re-issued every time.
# Output: $DEPLOY_DIR/certs/ca.crt (public: copy to every client), server.pem (public) and
# server.key (server only, mode 600); the CA's private key goes to $CA_DIR (default
# $DEPLOY_DIR/ca-private, mode 700), NOT next to the server's files: move that folder to offline
# storage after this script (a USB key, a vault) and bring it back, or point CA_DIR at it, only to
# issue a new server certificate. Whoever holds ca.key can impersonate the server to every client.
set -euo pipefail
umask 077  # every file below is created owner-only; the public ones are opened up explicitly
source "$(dirname "$0")/common.sh"
CA_DIR="$(realpath -m "${CA_DIR:-$DEPLOY_DIR/ca-private}")"
mkdir -p "$CERTS" "$CA_DIR"
chmod 700 "$CA_DIR"
cd "$CERTS"
if [[ -f ca.key ]]; then  # an older layout kept the CA key beside the server's files: move it away
  mv ca.key "$CA_DIR/ca.key"
  [[ -f ca.srl ]] && mv ca.srl "$CA_DIR/ca.srl"
  echo "moved the CA private key to $CA_DIR (keep it offline)" >&2
fi

sans="IP:127.0.0.1,DNS:localhost"
if [[ "$SUPERLINK_HOST" =~ ^[0-9.]+$ ]]; then host_san="IP:$SUPERLINK_HOST"; else host_san="DNS:$SUPERLINK_HOST"; fi
[[ ",$sans," == *",$host_san,"* ]] || sans="$sans,$host_san"
for san in "$@"; do sans="$sans,$san"; done

if [[ ! -f "$CA_DIR/ca.key" ]]; then
  if [[ -f ca.crt ]]; then
    echo "error: ca.crt exists but its key is not in $CA_DIR; set CA_DIR to where you keep ca.key offline" >&2
    exit 2
  fi
  openssl req -x509 -newkey rsa:2048 -nodes -days 3650 -keyout "$CA_DIR/ca.key" -out ca.crt \
    -subj "/CN=FELLRec deployment CA" \
    -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" 2>/dev/null
fi
openssl req -newkey rsa:2048 -nodes -keyout server.key -out server.csr -subj "/CN=$SUPERLINK_HOST" 2>/dev/null
# Extensions strict TLS clients (Python >= 3.13, browsers) expect on a server certificate.
cat > server.ext <<EXT
subjectAltName=$sans
basicConstraints=critical,CA:FALSE
keyUsage=critical,digitalSignature,keyEncipherment
extendedKeyUsage=serverAuth
subjectKeyIdentifier=hash
authorityKeyIdentifier=keyid,issuer
EXT
openssl x509 -req -in server.csr -CA ca.crt -CAkey "$CA_DIR/ca.key" -CAserial "$CA_DIR/ca.srl" -CAcreateserial \
  -days 825 -out server.pem -extfile server.ext 2>/dev/null
rm -f server.csr server.ext
chmod 644 ca.crt server.pem
chmod 600 server.key "$CA_DIR/ca.key"
echo "CA: $CERTS/ca.crt   server certificate: $CERTS/server.pem (SANs: $sans)"
echo "CA private key: $CA_DIR/ca.key -- move $CA_DIR offline now; it is needed only to re-issue server.pem"
