# -*- coding: utf-8 -*-
# vim: ft=sls
# Removes the cell exporter: its unit (stopped first), settings and scripts.
# Used by mtproxy.clean, and by mtproxy itself with exporter:enable false.
{%- set tplroot = tpldir.split('/')[0] %}
{%- from tplroot ~ "/map.jinja" import mtproxy with context %}
{%- set bin = mtproxy.config_dir ~ '/bin' %}

{%- if salt['file.directory_exists']('/run/systemd/system') %}

Cell exporter is stopped:
  service.dead:
    - name: {{ mtproxy.exporter.unit_name }}
    - enable: false
    - require_in:
      - file: Cell exporter unit is removed
{%- endif %}

Cell exporter unit is removed:
  file.absent:
    - name: {{ mtproxy.boot.unit_dir }}/{{ mtproxy.exporter.unit_name }}

Cell exporter settings and scripts are removed:
  file.absent:
    - names:
      - {{ mtproxy.config_dir }}/exporter.json
      - {{ bin }}/mtproxy_exporter.py
      - {{ bin }}/haproxy_runtime.py
{%- if mtproxy.client_ip != 'tproxy' %}
      # The return-path boot script imports it too.
      - {{ bin }}/mtproxy_common.py
{%- endif %}
    - require:
      - file: Cell exporter unit is removed
