#!/usr/bin/env bash
# The README's tour of the API with curl, runnable top to bottom:
#
#   make run                       # in another terminal (access control off)
#   scripts/tour.sh [BASE_URL]     # default: $FHIR_BASE_URL, else http://127.0.0.1:8000/4_0_0
#
# Every request names the status it expects; the tour prints each answer (cut at 400
# characters) and stops with exit status 1 at the first other one. It may run again on the
# same server: the two patients are created conditionally (If-None-Exist), and each run
# makes a Group of its own. With access control on, FHIR_TOKEN=<bearer token> is sent on
# every request. The test suite runs it against a live server (tests/test_tour.py).
set -euo pipefail

B=${1:-${FHIR_BASE_URL:-http://127.0.0.1:8000/4_0_0}}
J='Content-Type: application/fhir+json'
JP='Content-Type: application/json-patch+json'
auth=()
[ -n "${FHIR_TOKEN:-}" ] && auth=(-H "Authorization: Bearer $FHIR_TOKEN")
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT

# expect STATUSES METHOD PATH [curl options...]: one request; any status not in the
# comma-separated STATUSES fails the tour.
expect() {
    local want=$1 method=$2 path=$3 got
    shift 3
    got=$(curl -sS -g -X "$method" "${auth[@]}" -D "$out/headers" -o "$out/body" \
        -w '%{http_code}' "$@" "$B$path") || {
        echo "tour: FAILED: $method $path: curl could not reach $B" >&2
        exit 1
    }
    echo "--- $method $path -> $got"
    head -c 400 "$out/body"
    echo
    if [[ ",$want," != *",$got,"* ]]; then
        echo "tour: FAILED: $method $path answered $got, expected $want" >&2
        exit 1
    fi
}
# header NAME: a header of the last answer.
header() { tr -d '\r' <"$out/headers" | sed -n "s/^$1: *//Ip" | head -n 1; }
# new_id: the id in the last answer's Location (Content-Location when If-None-Exist matched).
new_id() {
    { header Location; header Content-Location; } |
        sed -nE 's#.*/[A-Za-z]+/([^/]+)/_history/.*#\1#p' | head -n 1
}

# --- tour ---
# create (201; 200 when If-None-Exist finds the patient of an earlier run), read, search
expect 201,200 POST /Patient -H "$J" -H 'If-None-Exist: identifier=urn:mrn|42' \
    -d '{"resourceType":"Patient","identifier":[{"system":"urn:mrn","value":"42"}],
         "name":[{"family":"Chalmers","given":["Peter"]}],"gender":"male","birthDate":"1974-12-25"}'
PID=$(new_id)
expect 200 GET "/Patient/$PID"
VERSION=$(header ETag) # W/"1" the first time: the version just read
expect 200 GET "/Patient?family=chal&birthdate=ge1970&_count=10"

# patch with a version check: If-Match names the version you read; once it moved on, 412
expect 200 PATCH "/Patient/$PID" -H "$JP" -H "If-Match: $VERSION" \
    -d '[{"op":"add","path":"/name/-","value":{"use":"nickname","given":["Pete"]}}]'
expect 412 PATCH "/Patient/$PID" -H "$JP" -H "If-Match: $VERSION" \
    -d '[{"op":"replace","path":"/gender","value":"other"}]'
expect 200 GET "/Patient/$PID/_history" # every version, newest first

# a Group, then one more member: one event, one new version
expect 201,200 POST /Patient -H "$J" -H 'If-None-Exist: identifier=urn:mrn|43' \
    -d '{"resourceType":"Patient","identifier":[{"system":"urn:mrn","value":"43"}],
         "name":[{"family":"Baker","given":["Ann"]}]}'
OTHER=$(new_id)
expect 201 POST /Group -H "$J" -H 'Prefer: return=minimal' \
    -d '{"resourceType":"Group","type":"person","actual":true,
         "member":[{"entity":{"reference":"Patient/'"$PID"'"}}]}'
GID=$(new_id)
expect 200 PATCH "/Group/$GID" -H "$JP" -H 'Prefer: return=minimal' \
    -d '[{"op":"add","path":"/member/-","value":{"entity":{"reference":"Patient/'"$OTHER"'"}}}]'
expect 200 GET "/Group/$GID/\$members?_count=1000" # the roster, page by page
expect 200 GET "/Group/$GID/\$members?_count=0"    # only how many (quantity)
expect 200 GET "/Group?member=Patient/$OTHER"      # the Groups this patient is in

# operations: discharge and enrol by identifier, never by building a reference
expect 200 POST "/Group/$GID/\$remove-member" -H "$J" \
    -d '{"resourceType":"Parameters","parameter":[
          {"name":"identifier","valueIdentifier":{"system":"urn:mrn","value":"42"}}]}'
expect 200 POST "/Group/$GID/\$add-member" -H "$J" \
    -d '{"resourceType":"Parameters","parameter":[{"name":"patient","resource":{
          "resourceType":"Patient","identifier":[{"system":"urn:mrn","value":"44"}],
          "name":[{"family":"Okafor","given":["Chi"]}]}}]}' # matched, or created if new
expect 200 GET "/Patient/$OTHER/\$group-memberships"

# delete: a read then answers 410 Gone; the history keeps every version
expect 204 DELETE "/Group/$GID"
expect 410 GET "/Group/$GID"
expect 200 GET "/Group/$GID/_history"
# --- end of tour ---
echo "tour: every step answered as expected"
