# -*- coding: utf-8 -*-
# vim: ft=sls
# HAProxy in front of the replicas: validated config, a container that never
# restarts for a config change, and a confirmed graceful reload.
{%- set tplroot = tpldir.split('/')[0] %}
{%- from tplroot ~ "/map.jinja" import mtproxy with context %}
{%- set haproxy = mtproxy.haproxy %}
{%- set existing = salt['mtproxy.existing_replicas'](mtproxy.base_port, mtproxy.backend_address)
                   | map(attribute='name') | list %}
{%- set wanted = mtproxy.replica_list | map(attribute='name') | list %}
{#- The HAProxy config has no business with the secrets. #}
{%- set cell = mtproxy.copy() %}
{%- do cell.pop('secret') %}
{%- do cell.pop('secrets') %}

include:
  - .replicas

HAProxy run directory exists and is root-only:
  file.directory:
    - name: {{ haproxy.run_dir }}
    - makedirs: true
    - mode: '0700'
    - user: root
    - group: root

HAProxy config is valid and in place:
  file.managed:
    - name: {{ haproxy.config_file }}
    # TOFS: an operator's own template for this minion, else the formula's.
    - source:
      - salt://{{ tplroot }}/files/{{ grains['id'] }}/haproxy.cfg.jinja
      - salt://{{ tplroot }}/files/default/haproxy.cfg.jinja
    - template: jinja
    - makedirs: true
    - dir_mode: '0700'
    - mode: '0600'
    - user: root
    - group: root
    # With stats_auth the file holds a password: no diff in the output then.
    - show_changes: {{ not haproxy.stats_auth }}
    # A candidate that HAProxy rejects never replaces the live file.
    - check_cmd: {{ salt['haproxy_runtime.check_cmd'](image=haproxy.image, docker_host=mtproxy.docker_host or None) | json }}
    - context:
        mtproxy: {{ cell | json }}
    # Live only once every replica listens where it says (after the rollout):
    # a rollout that stops leaves HAProxy on the ports that still serve.
    - require:
{%- for replica in mtproxy.replica_list %}
      - haproxy_server: Replica {{ replica.name }} is back in HAProxy
{%- endfor %}

HAProxy container is running:
  docker_container.running:
    - name: {{ haproxy.container }}
    - image: {{ haproxy.image }}
    - network_mode: host
    # `usesrc clientip` needs root with NET_ADMIN/NET_RAW; nothing else.
    - user: root
    - cap_drop:
      - ALL
    - cap_add:
      - NET_ADMIN
      - NET_RAW
      - NET_BIND_SERVICE
    - restart_policy: always
    - command: >-
        haproxy -W -db -S {{ haproxy.run_mount }}/master.sock,mode,600
        -f {{ haproxy.config_mount }}/haproxy.cfg
    # The folders, not the file: file.managed replaces the inode.
    - binds:
      - {{ haproxy.config_dir }}:{{ haproxy.config_mount }}:ro
      - {{ haproxy.run_dir }}:{{ haproxy.run_mount }}:rw
    - labels:
      - mtproxy-formula.role=haproxy
    - require:
      - file: HAProxy config is valid and in place
      - file: HAProxy run directory exists and is root-only
{%- for replica in mtproxy.replica_list %}
      - docker_container: Replica {{ replica.name }} is running on port {{ replica.port }}
{%- endfor %}

{%- for name in existing if name not in wanted %}

# Before the reload drops it: no new clients, up to drain_timeout s for the
# ones it has. The result says how many sessions were left at removal.
Extra replica {{ name }} is drained:
  haproxy_server.drained:
    - name: {{ name }}
    - backend: {{ haproxy.backend }}
    - timeout: {{ mtproxy.drain_timeout }}
    - master_socket: {{ haproxy.master_socket }}
    - admin_socket: {{ haproxy.admin_socket }}
    - require:
      - docker_container: HAProxy container is running
    - require_in:
      - haproxy_runtime: HAProxy reloads gracefully when its config changes
{%- endfor %}

# Reloads whenever HAProxy may not run the file as it is: the file differs
# from the one of its last confirmed reload (loaded.json), or HAProxy was
# restarted since. A reload that fails fails here, and the next apply retries it.
HAProxy reloads gracefully when its config changes:
  haproxy_runtime.config_loaded:
    - name: {{ haproxy.config_file }}
    - master_socket: {{ haproxy.master_socket }}
    - admin_socket: {{ haproxy.admin_socket }}
    - state_file: {{ haproxy.state_file }}
    - record: {{ haproxy.run_dir }}/loaded.json
    - timeout: {{ haproxy.reload_timeout }}
    # Checked before the reload: one that cannot bind pauses the live listeners.
    - binds:
      - {{ (haproxy.frontend_bind ~ ':' ~ haproxy.frontend_port) | json }}
      - {{ (haproxy.stats_bind ~ ':' ~ haproxy.stats_port) | json }}
    # watch: under test=True, a change of either says a reload would follow.
    - watch:
      - file: HAProxy config is valid and in place
      - docker_container: HAProxy container is running

{#- A wildcard bind is checked on loopback. #}
{%- set frontend_check = {'0.0.0.0': '127.0.0.1', '::': '::1'}.get(haproxy.frontend_bind, haproxy.frontend_bind) %}

# Like the replicas: a container that crash-loops can look running.
HAProxy frontend accepts connections:
  mtproxy.serving:
    - name: {{ haproxy.container }}
    - address: {{ frontend_check | json }}
    - port: {{ haproxy.frontend_port }}
    - require:
      - haproxy_runtime: HAProxy reloads gracefully when its config changes

{%- for name in existing if name not in wanted %}

Extra replica {{ name }} is removed:
  docker_container.absent:
    - name: {{ name }}
    - force: true
    - require:
      - haproxy_runtime: HAProxy reloads gracefully when its config changes

Config of extra replica {{ name }} is removed:
  file.absent:
    - name: {{ mtproxy.config_dir }}/replicas/{{ name }}
    - require:
      - docker_container: Extra replica {{ name }} is removed
{%- endfor %}

{%- if mtproxy.client_ip == 'tproxy' %}

Return path covers exactly the replica ports:
  tproxy.present:
{%- for key, value in salt['mtproxy.return_path'](mtproxy).arguments.items() %}
    - {{ key }}: {{ value | json }}
{%- endfor %}
    - require:
      - haproxy_runtime: HAProxy reloads gracefully when its config changes
{%- for name in existing if name not in wanted %}
      - docker_container: Extra replica {{ name }} is removed
{%- endfor %}
{%- endif %}
