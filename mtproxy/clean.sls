# -*- coding: utf-8 -*-
# vim: ft=sls
# Removes everything mtproxy (init.sls) created: containers, return-path
# rules, config and run folders, the sysctl config file, the boot and watchdog
# units (the watchdog is stopped before the rules go), the cell exporter's
# unit. The Docker engine,
# the Python packages, the kernel's current sysctl values and the generated
# secret (secret_file, so a redeploy keeps its links) stay.
{%- set tplroot = tpldir.split('/')[0] %}
{%- from tplroot ~ "/map.jinja" import mtproxy with context %}
{%- set existing = salt['mtproxy.existing_replicas']() | map(attribute='name') | list %}
{%- set replicas = (existing + mtproxy.replica_list | map(attribute='name') | list) | unique %}

include:
  - .return_path.clean
  - .exporter.clean
  - .vip.clean

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
    # Its clients keep their return path until it is gone.
    - require_in:
      - tproxy: Return-path rules and routes are removed
{%- endfor %}

{%- for folder in (mtproxy.config_dir, mtproxy.run_dir, mtproxy.sysctl_config) %}

{{ folder }} of mtproxy is removed:
  file.absent:
    - name: {{ folder }}
    - require:
      - tproxy: Return-path rules and routes are removed
{%- endfor %}
