# -*- coding: utf-8 -*-
# vim: ft=sls
# Tell the operator how clients connect. The secret is masked here (state
# output ends up in logs and job caches); `salt-call mtproxy.links` prints
# the full links.
{%- set tplroot = tpldir.split('/')[0] %}
{%- from tplroot ~ "/map.jinja" import mtproxy with context %}
{%- set links = salt['mtproxy.build_links'](mtproxy.public_host, mtproxy.haproxy.frontend_port,
                                             mtproxy.secrets, mtproxy.modes, mtproxy.tls_domain) %}

Clients connect through {{ mtproxy.public_host }}:{{ mtproxy.haproxy.frontend_port }}:
  test.show_notification:
    - text: |
{%- for link in links %}
        secret {{ link.secret }}, {{ link.mode }}: {{ salt['mtproxy.mask'](link.tg, mtproxy.secrets) }}
{%- endfor %}
        Full links (they contain the secret): salt-call mtproxy.links
        Stats: http://{{ mtproxy.haproxy.stats_bind }}:{{ mtproxy.haproxy.stats_port }}/stats
