# -*- coding: utf-8 -*-
# vim: ft=sls
# Tell the operator how clients connect. The secret is masked here (state
# output ends up in logs and job caches); `salt-call mtproxy.links` prints
# the full links.
{%- set tplroot = tpldir.split('/')[0] %}
{%- from tplroot ~ "/map.jinja" import mtproxy with context %}
{%- set links = salt['mtproxy.build_links'](mtproxy.public_host, mtproxy.haproxy.frontend_port,
                                             mtproxy.secret, mtproxy.tls_domain) %}

Clients connect through {{ mtproxy.public_host }}:{{ mtproxy.haproxy.frontend_port }}:
  test.show_notification:
    - text: |
{%- for link in links %}
        {{ link.mode }}: {{ salt['mtproxy.mask'](link.tg, mtproxy.secret) }}
{%- endfor %}
        Full links (they contain the secret): salt-call mtproxy.links
        Stats: http://{{ mtproxy.haproxy.stats_bind }}:{{ mtproxy.haproxy.stats_port }}/stats
