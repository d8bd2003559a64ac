#!/bin/sh
# The vgpu-bootstrap Job (deploy/bootstrap/), in the scheduler image as /usr/local/bin/vgpu-bootstrap:
# makes what an install needs and no admin should have to make by hand, only where it is missing, so
# running it again (every apply) changes nothing that exists:
#   - Secret vgpu-seal-key (key `key`): the placement-seal key the scheduler and the agents share;
#   - unless VGPU_BOOTSTRAP_CERT=cert-manager: Secret vgpu-scheduler-tls (a CA of its own and the
#     webhook's serving certificate, 10 years) and that CA as caBundle of both webhook configurations.
# Talks to the API server with the pod's service account token (curl); openssl makes the keys.
set -eu
NS="${VGPU_NAMESPACE:-vgpu-system}"
API="${VGPU_API:-https://kubernetes.default.svc}"
SA="${VGPU_SA_DIR:-/var/run/secrets/kubernetes.io/serviceaccount}"
SERVICE="${VGPU_WEBHOOK_SERVICE:-vgpu-scheduler}"
WEBHOOKS="${VGPU_WEBHOOK_CONFIGURATION:-vgpu-scheduler}"
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT

say() { echo "vgpu-bootstrap: $*"; }
die() { echo "vgpu-bootstrap: $*" >&2; exit 1; }

# api METHOD PATH [BODY-FILE CONTENT-TYPE]: prints the HTTP status; the answer is in $TMP/out.
api() {
    set -- "$@" "" ""
    curl -sS -o "$TMP/out" -w '%{http_code}' -X "$1" --cacert "$SA/ca.crt" \
        -H "Authorization: Bearer $(cat "$SA/token")" -H "Accept: application/json" \
        ${3:+--data-binary "@$3"} ${4:+-H "Content-Type: $4"} "$API$2" ||
        die "cannot reach the API server at $API (curl failed above)"
}

# create_secret NAME TYPE FILE-WITH-DATA-JSON: 201 made, 409 someone else made it first.
create_secret() {
    printf '{"apiVersion":"v1","kind":"Secret","metadata":{"name":"%s","namespace":"%s","labels":{"app.kubernetes.io/part-of":"vgpu"}},"type":"%s","data":%s}' \
        "$1" "$NS" "$2" "$(cat "$3")" >"$TMP/secret.json"
    code=$(api POST "/api/v1/namespaces/$NS/secrets" "$TMP/secret.json" application/json)
    case "$code" in
    201) say "made Secret $NS/$1" ;;
    409) say "Secret $NS/$1 was made meanwhile; kept" ;;
    *) die "creating Secret $NS/$1: HTTP $code: $(cat "$TMP/out")" ;;
    esac
}

b64() { base64 -w0 "$@"; }

seal_key() {
    code=$(api GET "/api/v1/namespaces/$NS/secrets/vgpu-seal-key")
    case "$code" in
    200) say "Secret $NS/vgpu-seal-key exists; kept"; return ;;
    404) ;;
    *) die "reading Secret $NS/vgpu-seal-key: HTTP $code: $(cat "$TMP/out")" ;;
    esac
    # Hex text: the scheduler takes the file's bytes as they are and the agent trims whitespace,
    # so a key must have no whitespace at its ends for both to agree.
    key=$(head -c 32 /dev/urandom | od -An -vtx1 | tr -d ' \n')
    printf '{"key":"%s"}' "$(printf %s "$key" | b64)" >"$TMP/data.json"
    create_secret vgpu-seal-key Opaque "$TMP/data.json"
}

make_cert() {
    host="$SERVICE.$NS.svc"
    openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 3650 \
        -subj "/CN=vgpu-webhook-ca" -keyout "$TMP/ca.key" -out "$TMP/ca.crt" \
        -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" 2>/dev/null
    openssl req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -subj "/CN=$host" \
        -keyout "$TMP/tls.key" -out "$TMP/tls.csr" 2>/dev/null
    printf 'subjectAltName=DNS:%s,DNS:%s.cluster.local\nbasicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\n' \
        "$host" "$host" >"$TMP/ext"
    openssl x509 -req -in "$TMP/tls.csr" -CA "$TMP/ca.crt" -CAkey "$TMP/ca.key" -CAcreateserial \
        -days 3650 -extfile "$TMP/ext" -out "$TMP/tls.crt" 2>/dev/null
    printf '{"tls.crt":"%s","tls.key":"%s","ca.crt":"%s"}' \
        "$(b64 "$TMP/tls.crt")" "$(b64 "$TMP/tls.key")" "$(b64 "$TMP/ca.crt")" >"$TMP/data.json"
    create_secret vgpu-scheduler-tls kubernetes.io/tls "$TMP/data.json"
}

# Prints the base64 CA of Secret vgpu-scheduler-tls, making the Secret first if it is missing.
webhook_ca() {
    code=$(api GET "/api/v1/namespaces/$NS/secrets/vgpu-scheduler-tls")
    case "$code" in
    200) ;;
    404)
        make_cert >&2
        code=$(api GET "/api/v1/namespaces/$NS/secrets/vgpu-scheduler-tls")
        [ "$code" = 200 ] || die "reading Secret $NS/vgpu-scheduler-tls after making it: HTTP $code"
        ;;
    *) die "reading Secret $NS/vgpu-scheduler-tls: HTTP $code: $(cat "$TMP/out")" ;;
    esac
    ca=$(jq -r '.data["ca.crt"] // empty' "$TMP/out")
    [ -n "$ca" ] || die "Secret $NS/vgpu-scheduler-tls has no ca.crt, so the API server cannot be told which CA to trust; delete it (kubectl -n $NS delete secret vgpu-scheduler-tls) and run this Job again, or use deploy/with-cert-manager/"
    echo "$ca"
}

# Sets caBundle on every webhook of one configuration; `test` ops make a concurrent change fail
# the patch instead of landing on the wrong webhook.
patch_ca() {
    path="/apis/admissionregistration.k8s.io/v1/$1/$WEBHOOKS"
    code=$(api GET "$path")
    [ "$code" = 200 ] || die "reading $1/$WEBHOOKS: HTTP $code: $(cat "$TMP/out")"
    jq -c --arg ca "$2" '[.webhooks | to_entries[]
        | select(.value.clientConfig.caBundle != $ca)
        | {op: "test", path: "/webhooks/\(.key)/name", value: .value.name},
          {op: "add", path: "/webhooks/\(.key)/clientConfig/caBundle", value: $ca}]' \
        "$TMP/out" >"$TMP/patch.json"
    if [ "$(cat "$TMP/patch.json")" = "[]" ]; then
        say "$1/$WEBHOOKS already trusts the webhook's CA"
        return
    fi
    code=$(api PATCH "$path" "$TMP/patch.json" application/json-patch+json)
    [ "$code" = 200 ] || die "setting caBundle on $1/$WEBHOOKS: HTTP $code: $(cat "$TMP/out")"
    say "set caBundle on $1/$WEBHOOKS"
}

seal_key
if [ "${VGPU_BOOTSTRAP_CERT:-}" = cert-manager ]; then
    say "the webhook certificate and caBundle are cert-manager's (VGPU_BOOTSTRAP_CERT=cert-manager)"
else
    ca=$(webhook_ca)
    patch_ca mutatingwebhookconfigurations "$ca"
    patch_ca validatingwebhookconfigurations "$ca"
fi
say "done"
