#!/usr/bin/env bash
# Create a private CA and one server certificate for the SuperLink and the split service.
# Usage: deploy/make_certs.sh [SAN ...]      e.g. deploy/make_certs.sh IP:10.0.0.5 DNS:fl.example.org
# The certificate always covers IP:127.0.0.1, DNS:localhost and $SUPERLINK_HOST. An existing CA
# is reused (so clients keep trusting it); the server certificate is re-issued every time.
# Output in $DEPLOY_DIR/certs: ca.crt (copy to every client), ca.key, server.pem, server.key (server only).
set -euo pipefail
source "$(dirname "$0")/common.sh"
mkdir -p "$CERTS" && cd "$CERTS"
umask 077  # private keys readable by the owner only

sans="IP:127.0.0.1,DNS:localhost"
if [[ "$SUPERLINK_HOST" =~ ^[0-9.]+$ ]]; then host_san="IP:$SUPERLINK_HOST"; else host_san="DNS:$SUPERLINK_HOST"; fi
[[ ",$sans," == *",$host_san,"* ]] || sans="$sans,$host_san"
for san in "$@"; do sans="$sans,$san"; done

if [[ ! -f ca.key ]]; then
  openssl req -x509 -newkey rsa:2048 -nodes -days 3650 -keyout ca.key -out ca.crt -subj "/CN=FELLRec deployment CA" \
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
openssl x509 -req -in server.csr -CA ca.crt -CAkey ca.key -CAcreateserial -days 825 -out server.pem \
  -extfile server.ext 2>/dev/null
rm -f server.csr server.ext
chmod 644 ca.crt server.pem
echo "CA: $CERTS/ca.crt   server certificate: $CERTS/server.pem (SANs: $sans)"
