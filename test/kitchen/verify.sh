#!/bin/sh
# Kitchen verifier: the cell answers and reports every replica UP.
set -eu
salt-call --local mtproxy.status --out=json | grep -q '"haproxy": "UP"'
salt-call --local mtproxy.links --out=json | grep -q 'tg://proxy'
