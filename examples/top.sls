# Pillar top file (in the master's pillar_roots): every minion gets the
# `mtproxy` pillar from mtproxy.sls next to this file.
base:
  '*':
    - mtproxy
