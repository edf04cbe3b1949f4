# -*- coding: utf-8 -*-
# vim: ft=sls
# What the formula's modules need, on a bare host too: the Docker engine, and
# the Docker SDK, pyroute2 and saltext-dockermod where the Python running Salt
# finds them (mtproxy_bootstrap.plan): pip-installed into Salt's own Python,
# or into a dedicated venv when that Python is the system's (salt-ssh on
# Debian: PEP 668). A salt-ssh target runs this once, before the formula:
#   salt-ssh HOST state.apply mtproxy.bootstrap
# (map.jinja generates no secret while this renders.)
{%- set tplroot = tpldir.split('/')[0] %}
{%- from tplroot ~ "/map.jinja" import mtproxy with context %}
{%- set packages = mtproxy.python_packages %}

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

{%- if packages.install %}
{%-   set plan = salt['mtproxy_bootstrap.plan'](packages) %}
{%-   if plan.target == 'venv' %}
{%-     if packages.venv_packages %}

Debian can make the venv of the formula's Python modules:
  pkg.installed:
    - pkgs: {{ packages.venv_packages | json }}
{%-     endif %}

# Salt comes with salt-ssh's thin: extensions go in without dependencies.
The formula's Python modules are in their venv:
  mtproxy_bootstrap.venv_present:
    - name: {{ plan.venv }}
    - base_python: {{ plan.base_python }}
    - pkgs: {{ plan.pkgs | json }}
    - extensions: {{ plan.extensions | json }}
    - find_links: {{ packages.find_links | json }}
    # Running in the venv already: load what was missing in this apply.
    - reload_modules: true
{%-     if packages.venv_packages %}
    - require:
      - pkg: Debian can make the venv of the formula's Python modules
{%-     endif %}
{%-   else %}

Python modules for Docker and netlink are installed for Salt:
  pip.installed:
    - pkgs: {{ packages.pkgs | json }}
    - reload_modules: true
{%-   endif %}
{%- endif %}
