# -*- coding: utf-8 -*-
# vim: ft=sls
# Removes the return path: the watchdog (stopped first, so it puts nothing
# back), the rules and routes, and the boot unit with its settings. Used by
# mtproxy.clean, and by mtproxy itself with client_ip: proxy_protocol, which
# needs no kernel rules.
{%- set tplroot = tpldir.split('/')[0] %}
{%- from tplroot ~ "/map.jinja" import mtproxy with context %}
{%- set systemd = mtproxy.boot.enable and salt['file.directory_exists']('/run/systemd/system') %}

{%- if systemd %}

Return-path watchdog is stopped:
  service.dead:
    - name: {{ mtproxy.boot.watchdog_unit_name }}
    - enable: false
    - require_in:
      - tproxy: Return-path rules and routes are removed
      - file: Return-path watchdog unit is removed
{%- endif %}

Return-path watchdog unit is removed:
  file.absent:
    - name: {{ mtproxy.boot.unit_dir }}/{{ mtproxy.boot.watchdog_unit_name }}

Return-path watchdog status is removed:
  file.absent:
    - name: {{ mtproxy.run_dir }}/return-path.status
    - require:
      - file: Return-path watchdog unit is removed

Return-path rules and routes are removed:
  tproxy.absent:
    - name: mtproxy
    - table: {{ mtproxy.tproxy.table }}

{%- if systemd %}

Return-path boot unit is disabled:
  service.disabled:
    - name: {{ mtproxy.boot.unit_name }}
    - require_in:
      - file: Return-path boot unit is removed
{%- endif %}

Return-path boot unit is removed:
  file.absent:
    - name: {{ mtproxy.boot.unit_dir }}/{{ mtproxy.boot.unit_name }}

Return-path boot settings and script are removed:
  file.absent:
    - names:
      - {{ mtproxy.config_dir }}/return-path.json
      - {{ mtproxy.config_dir }}/bin/tproxy.py
    - require:
      - file: Return-path boot unit is removed
      - file: Return-path watchdog unit is removed
