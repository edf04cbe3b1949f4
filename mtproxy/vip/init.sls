# -*- coding: utf-8 -*-
# vim: ft=sls
# Floating addresses between hosts (VRRP): keepalived from Debian in the
# container vip:container, on the host network like the rest of the cell.
# Each host holds the addresses it owns (vip:addresses:<n>:owner is its
# minion id) and backs up its peers'; a host whose cell does not serve gives
# every address up. The config is checked by keepalived itself before it
# replaces the live file, and a change reloads keepalived (SIGHUP): the
# addresses stay where they are. With vip:enabled false this removes it all.
{%- set tplroot = tpldir.split('/')[0] %}
{%- from tplroot ~ "/map.jinja" import mtproxy with context %}
{%- set vip = mtproxy.vip %}
{%- set folder = mtproxy.config_dir ~ '/keepalived' %}
{%- set check_dir = mtproxy.config_dir ~ '/keepalived-check' %}
{%- if not vip.enabled %}

include:
  - .clean
{%- else %}
{%-   if vip.interface not in grains.get('ip_interfaces', {}) %}
{%-     do salt['mtproxy_schema.fail']('vip:interface', vip.interface,
                                      'this host has no such interface; use one of '
                                      ~ (grains.get('ip_interfaces', {}) | sort | join(', '))) %}
{%-   endif %}
{%-   set docker = ['docker'] + (['-H', mtproxy.docker_host] if mtproxy.docker_host else []) %}

Keepalived check folder exists and is root-only:
  file.directory:
    - name: {{ check_dir }}
    - makedirs: true
    - mode: '0700'
    - user: root
    - group: root

Keepalived config is valid and in place:
  file.managed:
    - name: {{ folder }}/keepalived.conf
    # TOFS: an operator's own template for this minion, else the formula's.
    - source:
      - salt://{{ tplroot }}/files/{{ grains['id'] }}/keepalived.conf.jinja
      - salt://{{ tplroot }}/files/default/keepalived.conf.jinja
    - template: jinja
    - context:
        tpldir: {{ tplroot }}
    - makedirs: true
    - dir_mode: '0700'
    - mode: '0600'
    - user: root
    - group: root
    # With a VRRP password the file holds it: no diff in the output then.
    - show_changes: {{ not vip.password }}
    # A candidate keepalived rejects never replaces the live file.
    - tmp_dir: {{ check_dir }}
    - check_cmd: >-
        {{ docker | join(' ') }} run --rm --network host -v {{ check_dir }}:{{ check_dir }}:ro
        {{ vip.image }} keepalived --config-test --use-file
    - require:
      - file: Keepalived check folder exists and is root-only

Keepalived is running:
  docker_container.running:
    - name: {{ vip.container }}
    - image: {{ vip.image }}
    - network_mode: host
    # Addresses and VRRP sockets, and the check script as keepalived_script.
    - cap_drop:
      - ALL
    - cap_add:
      - NET_ADMIN
      - NET_RAW
      - NET_BROADCAST
      - SETUID
      - SETGID
      - KILL
    - restart_policy: always
    - command: keepalived --dont-fork --log-console --vrrp --use-file /etc/keepalived/mtproxy/keepalived.conf
    # The folder, not the file: file.managed replaces the inode. Not on
    # /etc/keepalived: keepalived needs the package's files there.
    - binds:
      - {{ folder }}:/etc/keepalived/mtproxy:ro
    - labels:
      - mtproxy-formula.role=keepalived
    # keepalived re-reads its config on SIGHUP; instances keep their state.
    - watch_action: SIGHUP
    - watch:
      - file: Keepalived config is valid and in place
{%- endif %}
