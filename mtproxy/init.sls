# -*- coding: utf-8 -*-
# vim: ft=sls
# An active-active MTProxy cell: replicas behind HAProxy in transparent mode,
# and its floating address when mtproxy:vip is enabled (absent otherwise).
# map.jinja first: a refused apply (bad pillar, salt-ssh before
# mtproxy.bootstrap) ends here in one error, before any include renders.
{%- from tpldir ~ "/map.jinja" import mtproxy with context %}
include:
  - .engine
  - .host
  - .replicas
  - .haproxy
  - .boot
  - .watchdog
  - .exporter
  - .vip
  - .links
