# -*- coding: utf-8 -*-
# vim: ft=sls
# The return path comes back at boot before clients arrive: a systemd oneshot
# unit, ordered before docker.service (so before any container), runs the
# tproxy module as a script with the same arguments as the tproxy.present
# states (mtproxy.return_path builds both, and the units' commands). Enabled
# only where systemd is PID 1 (/run/systemd/system exists). Not needed with
# client_ip: proxy_protocol (removed then).
{%- set tplroot = tpldir.split('/')[0] %}
{%- from tplroot ~ "/map.jinja" import mtproxy with context %}
{%- set boot = mtproxy.boot %}
{%- set return_path = salt['mtproxy.return_path'](mtproxy) %}
{%- if mtproxy.client_ip != 'tproxy' %}

include:
  - .return_path.clean
{%- else %}

Return-path boot settings are in place:
  file.managed:
    - name: {{ return_path.config }}
    - contents: {{ return_path.arguments | json | json }}
    - makedirs: true
    - dir_mode: '0700'
    - mode: '0600'
    - user: root
    - group: root

# With the module it imports (the stand-ins for Salt's exceptions among others).
Return-path boot script is in place:
  file.managed:
    - names:
      - {{ return_path.script }}:
        - source: salt://_modules/tproxy.py
      - {{ return_path.shared }}:
        - source: salt://_utils/mtproxy_common.py
    - makedirs: true
    - dir_mode: '0700'
    - mode: '0700'
    - user: root
    - group: root

Return-path boot unit is in place:
  file.managed:
    - name: {{ return_path.unit }}
    - makedirs: true
    - mode: '0644'
    - user: root
    - group: root
    - contents: |
        # Managed by Salt (mtproxy-formula): local changes are overwritten.
        [Unit]
        Description=mtproxy-formula: return-path rules for HAProxy transparent mode
        Before=docker.service

        [Service]
        Type=oneshot
        RemainAfterExit=yes
        ExecStart={{ return_path.ensure }}

        [Install]
        WantedBy=multi-user.target
    - require:
      - file: Return-path boot settings are in place
      - file: Return-path boot script is in place

{%- if boot.enable and salt['file.directory_exists']('/run/systemd/system') %}

Return-path boot unit is enabled:
  service.enabled:
    - name: {{ boot.unit_name }}
    - require:
      - file: Return-path boot unit is in place
{%- endif %}
{%- endif %}
