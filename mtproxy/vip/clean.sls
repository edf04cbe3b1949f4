# -*- coding: utf-8 -*-
# vim: ft=sls
# Removes mtproxy.vip: keepalived is stopped first (SIGTERM: it drops the
# addresses it holds and tells its peers, which take them over at once),
# then its container and config go. Used by mtproxy.clean, and by
# mtproxy.vip itself with vip:enabled false.
{%- set tplroot = tpldir.split('/')[0] %}
{%- from tplroot ~ "/map.jinja" import mtproxy with context %}
{%- set vip = mtproxy.vip %}

Keepalived is stopped and gives its addresses up:
  docker_container.stopped:
    - name: {{ vip.container }}
    - error_on_absent: false
    - stop_timeout: 10

Keepalived container is removed:
  docker_container.absent:
    - name: {{ vip.container }}
    - require:
      - docker_container: Keepalived is stopped and gives its addresses up

Keepalived config is removed:
  file.absent:
    - names:
      - {{ mtproxy.config_dir }}/keepalived
      - {{ mtproxy.config_dir }}/keepalived-check
    - require:
      - docker_container: Keepalived container is removed
