"""Entry point of an mtprotoproxy replica (mtproxy-formula): runs mtprotoproxy
unchanged and serves its per-user counters as JSON on 127.0.0.1, for the
cell exporter (mtproxy/exporter).

mtprotoproxy 1.0.6 keeps them in a module global, ``stats`` (user ->
Counter of connects, curr_connects, octets, msgs), and otherwise only prints
them every STATS_PRINT_PERIOD seconds, rounded to 10 kB. This runs its code
in a namespace we keep, and a thread answers ``GET /stats`` from it::

    python3 stats.py STATS_PORT /usr/local/bin/mtprotoproxy /etc/mtprotoproxy/config.py

The answer names users (tg, tg2, ...), never their secrets. ``process`` is
new for every start: a counter that restarts from 0 is told from one that
went backwards. Runs on the image's Python (3.9).
"""

import json
import sys
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

FIELDS = ("connects", "curr_connects", "octets", "msgs")


def snapshot(scope, process, started):
    users = {}
    for _ in range(10):
        try:  # the event loop may add a user while we copy
            users = {
                name: {key: int(counter[key]) for key in FIELDS}
                for name, counter in list(scope.get("stats", {}).items())
            }
            break
        except RuntimeError:
            time.sleep(0.01)
    return {"process": process, "started": started, "users": users}


def serve(port, scope, process, started):
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            if self.path != "/stats":
                self.send_error(404)
                return
            body = json.dumps(snapshot(scope, process, started)).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    warned = False
    while True:  # the port may still be held a moment by the replica this one replaces
        try:
            server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        except OSError as exc:
            if not warned:
                print(f"stats: cannot listen on 127.0.0.1:{port} ({exc}); retrying", file=sys.stderr, flush=True)
                warned = True
            time.sleep(2)
            continue
        server.daemon_threads = True
        server.serve_forever()


def main():
    port, program, config = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    with open(program) as source:
        code = compile(source.read(), program, "exec")
    scope = {"__name__": "__main__", "__file__": program, "__builtins__": __builtins__}
    threading.Thread(target=serve, args=(port, scope, uuid.uuid4().hex, time.time()), daemon=True).start()
    sys.argv = [program, config]
    exec(code, scope)


if __name__ == "__main__":
    main()
