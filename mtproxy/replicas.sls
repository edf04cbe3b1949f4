# -*- coding: utf-8 -*-
# vim: ft=sls
# MTProxy replicas mtproxy_1..N on the host network, one port each. How each
# runs depends on mtproxy:flavor (_modules/mtproxy_flavor.py).
{%- set tplroot = tpldir.split('/')[0] %}
{%- from tplroot ~ "/map.jinja" import mtproxy with context %}

{%- set existing = salt['mtproxy.existing_replicas'](mtproxy.base_port, mtproxy.backend_address) %}
{#- One at a time, in an order where no replica's new port is still taken by
    another (a refused port change fails the render here). #}
{%- set rollout = salt['mtproxy.rollout'](mtproxy, existing) %}
{#- A client_ip switch, or a change that recreates HAProxy without
    haproxy:allow_restart, fails the render here: nothing has changed yet. #}
{%- do salt['mtproxy.refuse_live_restart'](mtproxy) %}

include:
  - .host

{%- for replica in rollout %}
{%-   set spec = salt['mtproxy_flavor.replica'](mtproxy, replica) %}
{#-   Where it listens, as a label: a new port or address replaces it (drained). #}
{%-   do spec.labels.append(salt['mtproxy.listen_label'](mtproxy.backend_address, replica.port)) %}
{#-   Its extra files' digests, as labels: a new version replaces it (drained). #}
{%-   for file, source in spec.files | dictsort %}
{%-     do spec.labels.append('mtproxy-formula.' ~ file ~ '=' ~ salt['cp.hash_file'](source)['hsum'][:16]) %}
{%-   endfor %}

Replica {{ replica.name }} has its config:
  file.managed:
    - name: {{ spec.config_file }}
    - contents: {{ spec.config | json }}
    - makedirs: true
    - dir_mode: '0700'
    - mode: '0600'
    - user: root
    - group: root
    # The file holds the secret: never print it.
    - show_changes: false
{%-   for file, source in spec.files | dictsort %}

Replica {{ replica.name }} has its {{ file }}:
  file.managed:
    - name: {{ replica.config_dir }}/{{ file }}
    - source: {{ source }}
    - makedirs: true
    - dir_mode: '0700'
    - mode: '0644'
    - user: root
    - group: root
{%-   endfor %}

# A change that replaces the container (image, options, port, address)
# drains it first and waits until it serves and is UP again: one replica at
# a time, never all capacity. A replica that does not come back stops the
# rollout: the next ones keep running as they are.
Replica {{ replica.name }} is drained before it is replaced:
  haproxy_server.drained:
    - name: {{ replica.name }}
    - backend: {{ mtproxy.haproxy.backend }}
    - timeout: {{ mtproxy.drain_timeout }}
    - master_socket: {{ mtproxy.haproxy.master_socket }}
    - admin_socket: {{ mtproxy.haproxy.admin_socket }}
    - prereq:
      - docker_container: Replica {{ replica.name }} is running on port {{ replica.port }}
{%- if not loop.first %}
    - require:
      - haproxy_server: Replica {{ loop.previtem.name }} is back in HAProxy
{%- endif %}

Replica {{ replica.name }} is running on port {{ replica.port }}:
  docker_container.running:
    - name: {{ replica.name }}
    - image: {{ spec.image }}
    - network_mode: host
    # Without an init, mtprotoproxy ignores SIGTERM: every stop took 10 s.
    - init: true
    - restart_policy: always
{%-   if spec.entrypoint %}
    - entrypoint: {{ spec.entrypoint | json }}
{%-   endif %}
    - command: {{ spec.command | json }}
    - binds: {{ spec.binds | json }}
    - environment: {{ spec.environment | json }}
    # Flavors that cannot reload carry their config's digest here: a config
    # change replaces the container, drained first like an image change.
    - labels: {{ spec.labels | json }}
    # Hardening and limits of this flavor (mtproxy_flavor.replica).
{%-   for option, value in spec.container_options | dictsort %}
    - {{ option }}: {{ value | json }}
{%-   endfor %}
{%-   if spec.reload_signal %}
    # The replica re-reads its config on this signal: no restart, no drop.
    - watch_action: {{ spec.reload_signal }}
    - watch:
      - file: Replica {{ replica.name }} has its config
{%-   endif %}
    - require:
      - file: Replica {{ replica.name }} has its config
{%-   for file in spec.files | sort %}
      - file: Replica {{ replica.name }} has its {{ file }}
{%-   endfor %}
{%-   if mtproxy.client_ip == 'tproxy' %}
      - tproxy: Replica replies are routed back to HAProxy
{%-   endif %}
{%-   if not loop.first %}
      # The rollout stops at a replica that does not come back.
      - haproxy_server: Replica {{ loop.previtem.name }} is back in HAProxy
{%-   endif %}

# A crash-looping container can look running at the instant Docker is asked.
Replica {{ replica.name }} accepts connections on port {{ replica.port }}:
  mtproxy.serving:
    - name: {{ replica.name }}
    - address: {{ mtproxy.backend_address }}
    - port: {{ replica.port }}
    - require:
      - docker_container: Replica {{ replica.name }} is running on port {{ replica.port }}

# At its new address and port (HAProxy's config gets them after the whole
# rollout), ready, UP. Also after a drain that replaced nothing.
Replica {{ replica.name }} is back in HAProxy:
  haproxy_server.ready:
    - name: {{ replica.name }}
    - backend: {{ mtproxy.haproxy.backend }}
    - address: {{ mtproxy.backend_address }}
    - port: {{ replica.port }}
    - timeout: {{ mtproxy.haproxy.reload_timeout }}
    - master_socket: {{ mtproxy.haproxy.master_socket }}
    - admin_socket: {{ mtproxy.haproxy.admin_socket }}
    - require:
      - mtproxy: Replica {{ replica.name }} accepts connections on port {{ replica.port }}
      - haproxy_server: Replica {{ replica.name }} is drained before it is replaced
{%- endfor %}
