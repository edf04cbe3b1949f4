# -*- coding: utf-8 -*-
# vim: ft=sls
# Host preparation for transparent proxying: sysctls, and the policy routing
# that brings the replicas' replies back to HAProxy (docs/measurements.md §2).
# With client_ip: proxy_protocol none of it is needed: whatever an earlier
# transparent-mode apply left is removed.
{%- set tplroot = tpldir.split('/')[0] %}
{%- from tplroot ~ "/map.jinja" import mtproxy with context %}
{%- set existing = salt['mtproxy.existing_replicas'](mtproxy.base_port, mtproxy.backend_address) %}
{#- The new ports before any replica listens there, and the ports existing
    replicas really listen on (their labels) until they are gone: a replica
    moving to a new port, or an extra one until haproxy.sls removes it, never
    loses its clients' replies. haproxy.sls narrows it at the end. #}
{%- set return_path = salt['mtproxy.return_path'](mtproxy, existing) %}

include:
  - .boot
{%- if mtproxy.client_ip == 'tproxy' %}

{%- for key, value in mtproxy.sysctls | dictsort %}

Kernel parameter {{ key }} is {{ value }}:
  sysctl.present:
    - name: {{ key }}
    - value: {{ value }}
    - config: {{ mtproxy.sysctl_config }}
{%- endfor %}

Replica replies are routed back to HAProxy:
  tproxy.present:
{%- for key, value in return_path.arguments.items() %}
    - {{ key }}: {{ value | json }}
{%- endfor %}
    # The watchdog (watchdog.sls) restores what return-path.json names: update
    # it first, so the watchdog never puts back what this state removes.
    - require:
      - file: Return-path boot settings are in place
{%- endif %}
