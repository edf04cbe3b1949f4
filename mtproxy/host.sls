# -*- coding: utf-8 -*-
# vim: ft=sls
# Host preparation for transparent proxying: sysctls, and the policy routing
# that brings the replicas' replies back to HAProxy (DESIGN.md section 2).
# With client_ip: proxy_protocol none of it is needed: whatever an earlier
# transparent-mode apply left is removed.
{%- set tplroot = tpldir.split('/')[0] %}
{%- from tplroot ~ "/map.jinja" import mtproxy with context %}
{%- set existing = salt['mtproxy.existing_replicas']() %}
{#- Until the extra replicas are gone (haproxy.sls), their ports stay routed:
    their clients must not lose the return path. #}
{%- set ports = mtproxy.ports[:] %}
{%- for name in existing %}
{%-   do ports.append(mtproxy.base_port - 1 + name[8:] | int) %}
{%- endfor %}
{%- set ports = ports | unique | sort %}

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
    - name: mtproxy
    - ports: {{ ports | json }}
    - method: {{ mtproxy.tproxy.method }}
    - mark: {{ mtproxy.tproxy.mark }}
    - table: {{ mtproxy.tproxy.table }}
    - family: {{ mtproxy.tproxy.family }}
    # The watchdog (watchdog.sls) restores what return-path.json names: update
    # it first, so the watchdog never puts back what this state removes.
    - require:
      - file: Return-path boot settings are in place
{%- endif %}
