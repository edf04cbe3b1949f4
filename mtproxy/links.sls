# -*- coding: utf-8 -*-
# vim: ft=sls
# Tell the operator how clients connect. The secret is masked here (state
# output ends up in logs and job caches); `salt-call mtproxy.links` prints
# the full links.
{%- set tplroot = tpldir.split('/')[0] %}
{%- set mtproxy = salt['mtproxy.settings'](show_secrets=True, tplroot=tplroot) %}
{%- set links = salt['mtproxy.links'](masked=True, cell=mtproxy) %}

Clients connect through {{ mtproxy.public_host }}:{{ mtproxy.haproxy.frontend_port }}:
  test.show_notification:
    - text: |
{%- for link in links %}
        secret {{ link.secret }}, {{ link.mode }}: {{ link.tg }}
{%- endfor %}
        Full links (they contain the secret): salt-call mtproxy.links
        Stats: http://{{ mtproxy.haproxy.stats_bind }}:{{ mtproxy.haproxy.stats_port }}/stats
