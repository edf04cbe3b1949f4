# -*- coding: utf-8 -*-
# vim: ft=sls
# The return path stays up: a long-running systemd unit runs the boot unit's
# script in `watch` mode. Every boot:watch_interval seconds it checks the
# rules, rule priorities and the local route of return-path.json and restores
# what is missing (a firewall reload, a network restart), logging each repair
# and writing run_dir/return-path.status (read by mtproxy.status). Enabled
# and started only where systemd is PID 1 and boot:enable is true.
{%- set tplroot = tpldir.split('/')[0] %}
{%- from tplroot ~ "/map.jinja" import mtproxy with context %}
{%- set boot = mtproxy.boot %}
{%- set return_path = salt['mtproxy.return_path'](mtproxy) %}

include:
  - .boot
{%- if mtproxy.client_ip == 'tproxy' %}

Return-path watchdog unit is in place:
  file.managed:
    - name: {{ return_path.watchdog_unit }}
    - makedirs: true
    - mode: '0644'
    - user: root
    - group: root
    - contents: |
        # Managed by Salt (mtproxy-formula): local changes are overwritten.
        [Unit]
        Description=mtproxy-formula: restore lost return-path rules for HAProxy transparent mode
        After={{ boot.unit_name }}

        [Service]
        Type=simple
        Restart=always
        RestartSec=2
        ExecStart={{ return_path.watch }}

        [Install]
        WantedBy=multi-user.target
    - require:
      - file: Return-path boot settings are in place
      - file: Return-path boot script is in place

{%- if boot.enable and salt['file.directory_exists']('/run/systemd/system') %}

Return-path watchdog is running:
  service.running:
    - name: {{ boot.watchdog_unit_name }}
    - enable: true
    - watch:
      - file: Return-path watchdog unit is in place
      - file: Return-path boot script is in place
{%- endif %}
{%- endif %}
