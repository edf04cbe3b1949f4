# -*- coding: utf-8 -*-
# vim: ft=sls
# The cell exporter: one Prometheus endpoint (http://exporter:bind:port/metrics)
# for the whole cell, served by a long-running systemd unit like the
# return-path watchdog. On the host rather than in a container: it keeps
# serving while Docker restarts (and reports the replicas down meanwhile),
# and needs no image of its own for any flavor. It runs
# _modules/mtproxy_exporter.py as a script with haproxy_runtime.py and, in
# transparent mode, tproxy.py beside it. It re-reads exporter.json when an
# apply changes it (a scale-up, a new interval): its counters carry on.
# Enabled and started where systemd is PID 1 and exporter:enable is true.
{%- set tplroot = tpldir.split('/')[0] %}
{%- from tplroot ~ "/map.jinja" import mtproxy with context %}
{%- set exporter = mtproxy.exporter %}
{%- set python = mtproxy.boot.python or grains['pythonexecutable'] %}
{%- set bin = mtproxy.config_dir ~ '/bin' %}
{%- set settings = mtproxy.config_dir ~ '/exporter.json' %}
{%- if not exporter.enable %}

include:
  - .clean
{%- else %}

Cell exporter scripts are in place:
  file.managed:
    - names:
      - {{ bin }}/mtproxy_exporter.py:
        - source: salt://_modules/mtproxy_exporter.py
      - {{ bin }}/haproxy_runtime.py:
        - source: salt://_modules/haproxy_runtime.py
      # What the two import (the return-path boot script's too).
      - {{ bin }}/mtproxy_common.py:
        - source: salt://_utils/mtproxy_common.py
    - makedirs: true
    - dir_mode: '0700'
    - mode: '0700'
    - user: root
    - group: root

# No secret in it: replicas' stats URLs, sockets, and a digest of exporter:auth.
Cell exporter settings are in place:
  file.managed:
    - name: {{ settings }}
    - contents: {{ salt['mtproxy_exporter.config'](mtproxy) | json | json }}
    - makedirs: true
    - dir_mode: '0700'
    - mode: '0600'
    - user: root
    - group: root

Cell exporter unit is in place:
  file.managed:
    - name: {{ mtproxy.boot.unit_dir }}/{{ exporter.unit_name }}
    - makedirs: true
    - mode: '0644'
    - user: root
    - group: root
    - contents: |
        # Managed by Salt (mtproxy-formula): local changes are overwritten.
        [Unit]
        Description=mtproxy-formula: Prometheus endpoint of the MTProxy cell
        After=network-online.target docker.service

        [Service]
        Type=simple
        Restart=always
        RestartSec=2
        ExecStart={{ python }} {{ bin }}/mtproxy_exporter.py --config {{ settings }}

        [Install]
        WantedBy=multi-user.target
    - require:
      - file: Cell exporter scripts are in place
      - file: Cell exporter settings are in place

{%- if salt['file.directory_exists']('/run/systemd/system') %}

Cell exporter is running:
  service.running:
    - name: {{ exporter.unit_name }}
    - enable: true
    # Not on a settings change: it re-reads them (and restarts itself for a new address).
    - watch:
      - file: Cell exporter unit is in place
      - file: Cell exporter scripts are in place
{%- endif %}
{%- endif %}
