# -*- coding: utf-8 -*-
# vim: ft=sls
# The Docker engine, and the Python modules our execution and state modules
# import, where the Python that runs Salt finds them: mtproxy.bootstrap, as
# part of every apply. Where they cannot go in during this apply (salt-ssh
# with the system python3 before the bootstrap), map.jinja stops the render
# first (mtproxy_bootstrap.check), before anything on the host changes.
include:
  - .bootstrap
