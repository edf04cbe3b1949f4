# -*- coding: utf-8 -*-
# vim: ft=sls
# Removes the return path: the watchdog (stopped first, so it puts nothing
# back), the rules and routes, and the boot unit with its settings. Used by
# mtproxy.clean, and by mtproxy itself with client_ip: proxy_protocol, which
# needs no kernel rules.
{%- set tplroot = tpldir.split('/')[0] %}
{%- from tplroot ~ "/map.jinja" import mtproxy with context %}
{%- set systemd = mtproxy.boot.enable and salt['file.directory_exists']('/run/systemd/system') %}
{%- set return_path = salt['mtproxy.return_path'](mtproxy) %}

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
    - name: {{ return_path.watchdog_unit }}

Return-path watchdog status is removed:
  file.absent:
    - name: {{ return_path.status }}
    - require:
      - file: Return-path watchdog unit is removed

Return-path rules and routes are removed:
  tproxy.absent:
    - name: {{ return_path.arguments.name }}
    - table: {{ return_path.arguments.table }}

{%- if systemd %}

Return-path boot unit is disabled:
  service.disabled:
    - name: {{ mtproxy.boot.unit_name }}
    - require_in:
      - file: Return-path boot unit is removed
{%- endif %}

Return-path boot unit is removed:
  file.absent:
    - name: {{ return_path.unit }}

# mtproxy_common.py stays while the cell exporter is on: its haproxy_runtime.py imports it too.
Return-path boot settings and script are removed:
  file.absent:
    - names:
      - {{ return_path.config }}
      - {{ return_path.script }}
{%- if not mtproxy.exporter.enable %}
      - {{ return_path.shared }}
{%- endif %}
    - require:
      - file: Return-path boot unit is removed
      - file: Return-path watchdog unit is removed
