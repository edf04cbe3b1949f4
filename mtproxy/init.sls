# -*- coding: utf-8 -*-
# vim: ft=sls
# An active-active MTProxy cell: replicas behind HAProxy in transparent mode.
include:
  - .engine
  - .host
  - .replicas
  - .haproxy
  - .boot
  - .watchdog
  - .exporter
  - .links
