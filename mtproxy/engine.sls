# -*- coding: utf-8 -*-
# vim: ft=sls
# The Docker engine, and the Python modules our execution and state modules
# import, installed into the Python that runs Salt.
{%- set tplroot = tpldir.split('/')[0] %}
{%- from tplroot ~ "/map.jinja" import mtproxy with context %}

{%- if mtproxy.docker.install %}

Docker engine is installed:
  pkg.installed:
    - pkgs: {{ mtproxy.docker.packages | json }}

Docker engine is running and enabled at boot:
  service.running:
    - name: {{ mtproxy.docker.service }}
    - enable: true
    - require:
      - pkg: Docker engine is installed
{%- endif %}

{%- if mtproxy.python_packages.install %}

Python modules for Docker and netlink are installed for Salt:
  pip.installed:
    - pkgs: {{ mtproxy.python_packages.pkgs | json }}
    - reload_modules: true
{%- endif %}
