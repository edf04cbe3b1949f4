# -*- coding: utf-8 -*-
# vim: ft=sls
# Removes everything mtproxy (init.sls) created: containers, return-path
# rules, config and run folders, the sysctl config file, the boot and watchdog
# units (the watchdog is stopped before the rules go). The Docker engine,
# the Python packages, the kernel's current sysctl values and the generated
# secret (secret_file, so a redeploy keeps its links) stay.
{%- set tplroot = tpldir.split('/')[0] %}
{%- from tplroot ~ "/map.jinja" import mtproxy with context %}
{%- set replicas = (salt['mtproxy.existing_replicas']() + mtproxy.replica_list | map(attribute='name') | list)
                   | unique %}

HAProxy container is removed:
  docker_container.absent:
    - name: {{ mtproxy.haproxy.container }}
    - force: true

{%- for name in replicas %}

Replica {{ name }} is removed:
  docker_container.absent:
    - name: {{ name }}
    - force: true
    - require:
      - docker_container: HAProxy container is removed
{%- endfor %}

{%- if mtproxy.boot.enable and salt['file.directory_exists']('/run/systemd/system') %}

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

Return-path rules and routes are removed:
  tproxy.absent:
    - name: mtproxy
    - table: {{ mtproxy.tproxy.table }}
    - require:
{%- for name in replicas %}
      - docker_container: Replica {{ name }} is removed
{%- endfor %}

{%- if mtproxy.boot.enable and salt['file.directory_exists']('/run/systemd/system') %}

Return-path boot unit is disabled:
  service.disabled:
    - name: {{ mtproxy.boot.unit_name }}
    - require_in:
      - file: Return-path boot unit is removed
{%- endif %}

Return-path boot unit is removed:
  file.absent:
    - name: {{ mtproxy.boot.unit_dir }}/{{ mtproxy.boot.unit_name }}

{%- for folder in (mtproxy.config_dir, mtproxy.run_dir, mtproxy.sysctl_config) %}

{{ folder }} of mtproxy is removed:
  file.absent:
    - name: {{ folder }}
    - require:
      - tproxy: Return-path rules and routes are removed
{%- endfor %}
