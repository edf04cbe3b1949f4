# -*- coding: utf-8 -*-
# vim: ft=sls
# Roll `mtproxy` across the fleet one host at a time, on the master:
#   salt-run state.orchestrate mtproxy.orchestrate.rolling [test=True]
#     [pillar='{"mtproxy_roll": {"targets": ["cell-1", "cell-2"]}}']
# Per host, in order: sync our modules to it, apply mtproxy, then wait until
# its cell serves (mtproxy_fleet.wait_serving: mtproxy.status on the minion,
# TCP connections from the master to its frontend). A host that fails its
# apply or does not serve stops the roll: the hosts after it keep their old
# state. Settings (all optional), under the pillar key mtproxy_roll:
#   targets: minion ids, in roll order (default: every minion matching tgt
#            that answers and has an mtproxy pillar, sorted)
#   tgt, tgt_type: where to look for them (default '*', glob)
#   pillar: a pillar passed to each host's apply, e.g. {"mtproxy": {"replicas": 3}}
#   timeout: seconds a host's cell has to serve after its apply (default 180)
#   addresses: {minion id: address} the master probes instead of the cell's public host
{%- set roll = salt['pillar.get']('mtproxy_roll', {}) %}
{%- set targets = roll.get('targets') %}
{%- if not targets %}
{%-   set targets = salt['saltutil.runner']('mtproxy_fleet.targets', tgt=roll.get('tgt', '*'),
                                            tgt_type=roll.get('tgt_type', 'glob')) %}
{%- endif %}
{%- set addresses = roll.get('addresses', {}) %}

{%- if targets is string or targets is mapping or not targets %}

No host to roll mtproxy over:
  test.fail_without_changes:
{%-   if targets %}
    - comment: {{ ("mtproxy_roll:targets is " ~ targets ~ ": use a list of minion ids") | json }}
{%-   else %}
    - comment: {{ ("No minion matching " ~ roll.get('tgt', '*') ~ " answered with an mtproxy pillar") | json }}
{%-   endif %}
{%- else %}

Roll mtproxy over {{ targets | join(', ') }}, one host at a time:
  test.succeed_without_changes:
    - comment: {{ ("Order: " ~ targets | join(', ')) | json }}

{%-   for minion in targets %}
{%-     set previous = targets[loop.index0 - 1] if not loop.first else none %}

Modules on {{ minion }} are synced from the master:
  salt.function:
    - name: saltutil.sync_all
    - tgt: {{ minion | json }}
    - require:
      - test: Roll mtproxy over {{ targets | join(', ') }}, one host at a time
{%-     if previous %}
      - salt: Cell on {{ previous }} serves
{%-     endif %}

mtproxy is applied on {{ minion }}:
  salt.state:
    - tgt: {{ minion | json }}
    - sls: mtproxy
{%-     if roll.get('pillar') %}
    - pillar: {{ roll.pillar | json }}
{%-     endif %}
    - require:
      - salt: Modules on {{ minion }} are synced from the master

Cell on {{ minion }} serves:
  salt.runner:
    - name: mtproxy_fleet.wait_serving
    - minion: {{ minion | json }}
    - timeout: {{ roll.get('timeout', 180) | int }}
{%-     if minion in addresses %}
    - address: {{ addresses[minion] | json }}
{%-     endif %}
    - require:
      - salt: mtproxy is applied on {{ minion }}

{#-     Under test=True the checks do not run, and onfail would take their None for a failure. #}
{%-     if not opts.get('test') %}

The roll stops at {{ minion }} when it fails there:
  test.fail_without_changes:
    - comment: {{ ("The roll stopped at " ~ minion ~ ": its sync, apply or serving check failed (see above)."
                   " Not touched: " ~ (targets[loop.index:] | join(', ') or 'none') ~ "."
                   " Done before it: " ~ (targets[:loop.index0] | join(', ') or 'none') ~ "."
                   " Fix it, then roll again.") | json }}
    - onfail:
      - salt: Modules on {{ minion }} are synced from the master
      - salt: mtproxy is applied on {{ minion }}
      - salt: Cell on {{ minion }} serves
{%-       if previous %}
    # Not when the roll stopped before this host (onfail alone would fire then).
    - require:
      - salt: Cell on {{ previous }} serves
{%-       endif %}
{%-     endif %}
{%-   endfor %}
{%- endif %}
