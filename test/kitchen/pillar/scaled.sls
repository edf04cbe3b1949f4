# Kitchen suite "scaled": four replicas, sport return path.
mtproxy:
  replicas: 4
  tproxy:
    method: sport
