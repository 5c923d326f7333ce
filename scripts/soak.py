#!/usr/bin/env python3
"""The load of scripts/soak: a mixed, hostile-ish flash-sale load against one seckill for N
minutes, sampling the server's resources, and a verdict on whether any of them grows without
bound. Started by scripts/soak (which runs the server); Python's standard library only.

Load (each its own thread(s)): sales that start, sell out and end one after another; shoppers
buying (some pay, some cancel, the rest let the order expire); pollers of product views (real
and unknown ids) and of /me; SSE streams opened and dropped; bad inputs (malformed JSON, bad
JWTs, bad ids, oversized bodies); slow bodies trickled a byte a second.

Samples every --sample seconds: the server's RSS and open fds (/proc), Redis used memory and
the number of keys under the instance's prefix (but the self-expiring rate windows), the depth of its queue. Verdict: a series
grows without bound when the last third of the run rises above the middle third by more
than its slack (the first third is warm-up).
"""

import argparse
import base64
import csv
import http.client
import json
import os
import random
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from datetime import datetime, timedelta, timezone

STOP = threading.Event()
COUNTS = Counter()
COUNTS_LOCK = threading.Lock()


def count(key):
    with COUNTS_LOCK:
        COUNTS[key] += 1


def iso(dt):
    return dt.strftime("%Y-%m-%dT%H:%M:%SZ")


class Api:
    """One keep-alive connection per thread and listener."""

    def __init__(self, port, kind):
        self.port, self.kind, self.conn = port, kind, None

    def call(self, method, path, body=None, headers=None, raw=None):
        hdrs = dict(headers or {})
        data = raw
        if body is not None:
            data = json.dumps(body).encode()
            hdrs["content-type"] = "application/json"
        for attempt in range(2):
            try:
                if self.conn is None:
                    self.conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
                self.conn.request(method, path, body=data, headers=hdrs)
                res = self.conn.getresponse()
                payload = res.read()
                if res.getheader("connection", "").lower() == "close":
                    self.conn.close()
                    self.conn = None
                status = res.status
                count(f"{self.kind} {status // 100}xx")
                if status >= 500 and status != 503:
                    count(f"{self.kind} 5xx-not-503")
                try:
                    return status, json.loads(payload) if payload else None
                except ValueError:
                    return status, None
            except (OSError, http.client.HTTPException):
                if self.conn is not None:
                    self.conn.close()
                self.conn = None
                if attempt == 1:
                    count(f"{self.kind} transport-error")
                    return 0, None
        return 0, None


class Sales:
    """Products on sale: a new one every --sale-every seconds, each live for --sale-secs."""

    def __init__(self, args):
        self.args = args
        self.lock = threading.Lock()
        self.products = []  # (id, ends_at_epoch)

    def live(self):
        now = time.time()
        with self.lock:
            ids = [p for p, end in self.products if end > now]
            return random.choice(ids) if ids else None

    def any(self):
        with self.lock:
            return random.choice(self.products)[0] if self.products else None

    def run(self):
        api = Api(self.args.admin_port, "admin")
        auth = {"authorization": f"Bearer {self.args.admin_token}"}
        while not STOP.is_set():
            now = datetime.now(timezone.utc)
            body = {
                "name": "soak",
                "stock": self.args.stock,
                "price_cents": 100,
                "starts_at": iso(now + timedelta(seconds=2)),
                "ends_at": iso(now + timedelta(seconds=self.args.sale_secs)),
            }
            status, created = api.call("POST", "/api/v1/admin/products", body, auth)
            if status == 201 and created:
                pid = created["product_id"]
                api.call("POST", f"/api/v1/admin/products/{pid}/preheat", headers=auth)
                with self.lock:
                    self.products.append((pid, time.time() + self.args.sale_secs))
                    del self.products[:-200]
                count("sales")
            STOP.wait(self.args.sale_every)


def jwt(secret, user, ttl=3600):
    import hashlib
    import hmac

    def b64(b):
        return base64.urlsafe_b64encode(b).rstrip(b"=").decode()

    head = b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    body = b64(json.dumps({"sub": str(user), "exp": int(time.time()) + ttl}).encode())
    sig = hmac.new(secret.encode(), f"{head}.{body}".encode(), hashlib.sha256).digest()
    return f"{head}.{body}.{b64(sig)}"


NEXT_USER = [1_000]
NEXT_USER_LOCK = threading.Lock()


def new_user():
    with NEXT_USER_LOCK:
        NEXT_USER[0] += 1
        return NEXT_USER[0]


def shopper(args, sales, winners):
    api = Api(args.http_port, "shop")
    while not STOP.is_set():
        pid = sales.live()
        if pid is None:
            STOP.wait(0.5)
            continue
        user = new_user()
        auth = {"authorization": f"Bearer {jwt(args.jwt_secret, user)}"}
        status, tok = api.call("POST", f"/api/v1/products/{pid}/token", headers=auth)
        if status != 200 or not tok:
            continue
        status, res = api.call("POST", f"/api/v1/products/{pid}/reservations", {"token": tok["token"]}, auth)
        count(f"purchase {status}")
        if status == 202:
            with winners[1]:
                winners[0].append((pid, user))
                del winners[0][:-2_000]
                winners[2].append((pid, user))
                del winners[2][:-500]
        STOP.wait(args.think)


def settler(args, winners):
    """Pays or cancels some winners once their order exists; the rest expire."""
    api = Api(args.http_port, "shop")
    while not STOP.is_set():
        with winners[1]:
            pick = winners[0].pop(0) if winners[0] else None
        if pick is None:
            STOP.wait(0.2)
            continue
        pid, user = pick
        auth = {"authorization": f"Bearer {jwt(args.jwt_secret, user)}"}
        for _ in range(20):
            status, view = api.call("GET", f"/api/v1/products/{pid}/reservations/me", headers=auth)
            if status == 200 and view and view.get("order_id"):
                roll = random.random()
                if roll < 0.5:
                    api.call("POST", f"/api/v1/orders/{view['order_id']}/pay", headers=auth)
                    count("paid")
                elif roll < 0.7:
                    api.call("POST", f"/api/v1/orders/{view['order_id']}/cancel", headers=auth)
                    count("cancelled")
                break
            if STOP.wait(0.5):
                return


def poller(args, sales):
    api = Api(args.http_port, "poll")
    while not STOP.is_set():
        pid = sales.any() if random.random() < 0.7 else random.randint(10**9, 10**12)
        if pid is not None:
            api.call("GET", f"/api/v1/products/{pid}")
            auth = {"authorization": f"Bearer {jwt(args.jwt_secret, random.randint(1, 10**6))}"}
            api.call("GET", f"/api/v1/products/{pid}/reservations/me", headers=auth)
        STOP.wait(0.01)


def streams(args, winners):
    """Opens a winner's SSE stream, reads it for a few seconds, drops it; a few at a time."""
    while not STOP.is_set():
        with winners[1]:
            pick = random.choice(winners[2]) if winners[2] else None
        if pick is None:
            STOP.wait(0.5)
            continue
        pid, user = pick
        auth = {"authorization": f"Bearer {jwt(args.jwt_secret, user)}"}
        try:
            conn = http.client.HTTPConnection("127.0.0.1", args.http_port, timeout=5)
            conn.request("GET", f"/api/v1/products/{pid}/reservations/me/events", headers=auth)
            res = conn.getresponse()
            count(f"sse {res.status}")
            deadline = time.time() + random.uniform(1, 6)
            while time.time() < deadline and not STOP.is_set():
                if not res.fp.readline():
                    break
            conn.close()
        except (OSError, http.client.HTTPException):
            count("sse transport-error")


BAD_INPUTS = [
    ("POST", "/api/v1/products/1/reservations", b"{not json", "jwt"),
    ("POST", "/api/v1/products/1/reservations", b'{"token": 7}', "jwt"),
    ("POST", "/api/v1/products/1/reservations", b"x" * 20_000, "jwt"),
    ("POST", "/api/v1/products/-5/token", b"", "jwt"),
    ("GET", "/api/v1/products/99999999999999999999999", None, None),
    ("GET", "/api/v1/products/%00%ff", None, None),
    ("POST", "/api/v1/products/1/token", b"", "bad"),
    ("POST", "/api/v1/orders/not-a-uuid/pay", b"", "jwt"),
    ("BREW", "/api/v1/products/1", None, None),
    ("GET", "/api/v1/nowhere/" + "a" * 3_000, None, None),
]


def bad_inputs(args):
    api = Api(args.http_port, "bad")
    good = f"Bearer {jwt(args.jwt_secret, 77)}"
    while not STOP.is_set():
        method, path, raw, who = random.choice(BAD_INPUTS)
        headers = {"content-type": "application/json"}
        if who == "jwt":
            headers["authorization"] = good
        elif who == "bad":
            headers["authorization"] = "Bearer e30.e30.bad"
        status, _ = api.call(method, path, raw=raw, headers=headers)
        if status and status < 400:
            count("bad input accepted")
        STOP.wait(0.02)


def slow_bodies(args):
    """A body trickled one byte a second: the server must cut it off, not keep it forever."""
    while not STOP.is_set():
        started = time.time()
        try:
            s = socket.create_connection(("127.0.0.1", args.http_port), timeout=5)
            s.sendall(
                b"POST /api/v1/products/1/reservations HTTP/1.1\r\nHost: x\r\n"
                b"content-type: application/json\r\ncontent-length: 1000\r\n"
                + f"authorization: Bearer {jwt(args.jwt_secret, 78)}\r\n\r\n".encode()
            )
            held = True
            while held and time.time() - started < 60 and not STOP.is_set():
                try:
                    s.sendall(b" ")
                    s.settimeout(1)
                    if s.recv(4096) == b"":
                        held = False
                except socket.timeout:
                    pass
                except OSError:
                    held = False
            s.close()
            secs = time.time() - started
            count("slow body cut" if secs < 60 else "slow body held 60s")
        except OSError:
            count("slow body transport-error")


def redis(*cmd):
    out = subprocess.run(["redis-cli", *cmd], capture_output=True, text=True, timeout=30)
    return out.stdout


def sample(args, started):
    status = open(f"/proc/{args.pid}/status").read()
    rss_kib = int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmRSS:")))
    fds = len(os.listdir(f"/proc/{args.pid}/fd"))
    mem = next(
        int(line.split(":")[1]) for line in redis("info", "memory").splitlines() if line.startswith("used_memory:")
    )
    # The shoppers' rate-window keys (`:rl:`) expire by themselves within seconds; the rest
    # (per-product state, buyers, statuses, outbox, the products set) must not pile up.
    keys = sum(1 for k in redis("--scan", "--pattern", f"{args.prefix}:*").split() if ":rl:" not in k)
    q = subprocess.run(
        ["rabbitmqctl", "-q", "list_queues", "name", "messages"], capture_output=True, text=True, timeout=30
    ).stdout
    depth = sum(int(parts[1]) for parts in (l.split() for l in q.splitlines()) if len(parts) == 2 and parts[0].startswith(args.queue) and parts[1].isdigit())
    return {
        "t": round(time.time() - started),
        "rss_mib": round(rss_kib / 1024, 1),
        "fds": fds,
        "redis_mib": round(mem / 2**20, 1),
        "keys": keys,
        "queue": depth,
    }


# Slack per series: (relative, absolute) rise allowed from the middle third to the last.
SLACK = {"rss_mib": (0.15, 16), "fds": (0.25, 32), "redis_mib": (0.20, 8), "keys": (0.10, 50), "queue": (0.0, 2_000)}


def verdict(samples):
    third = len(samples) // 3
    middle, last = samples[third : 2 * third], samples[2 * third :]
    if not middle or not last:
        return ["too short to judge: run at least 3 sampling periods"]
    grown = []
    for key, (rel, absolute) in SLACK.items():
        before = max(s[key] for s in middle)
        after = max(s[key] for s in last)
        if after > before * (1 + rel) + absolute:
            grown.append(f"{key} grew: max {before} in the middle third, {after} in the last")
    return grown


def main():
    p = argparse.ArgumentParser()
    for name, typ in [("minutes", float), ("http-port", int), ("admin-port", int), ("pid", int)]:
        p.add_argument(f"--{name}", type=typ, required=True)
    p.add_argument("--prefix", required=True)
    p.add_argument("--queue", required=True)
    p.add_argument("--jwt-secret", default="seckill-dev-jwt-secret-do-not-use-in-production")
    p.add_argument("--admin-token", default="seckill-dev-admin-token")
    p.add_argument("--shoppers", type=int, default=6)
    p.add_argument("--stock", type=int, default=300)
    p.add_argument("--sale-every", type=float, default=10)
    p.add_argument("--sale-secs", type=float, default=30)
    p.add_argument("--think", type=float, default=0.005)
    p.add_argument("--sample", type=float, default=10)
    p.add_argument("--csv", required=True)
    args = p.parse_args()

    sales = Sales(args)
    # To settle (taken once each), the lock, and recent winners (for SSE streams).
    winners = ([], threading.Lock(), [])
    threads = [threading.Thread(target=sales.run)]
    threads += [threading.Thread(target=shopper, args=(args, sales, winners)) for _ in range(args.shoppers)]
    threads += [threading.Thread(target=settler, args=(args, winners)) for _ in range(2)]
    threads += [threading.Thread(target=poller, args=(args, sales)) for _ in range(2)]
    threads += [threading.Thread(target=streams, args=(args, winners)) for _ in range(4)]
    threads += [threading.Thread(target=bad_inputs, args=(args,))]
    threads += [threading.Thread(target=slow_bodies, args=(args,)) for _ in range(2)]
    for t in threads:
        t.daemon = True
        t.start()

    started = time.time()
    end = started + args.minutes * 60
    samples = []
    with open(args.csv, "w", newline="") as f:
        out = csv.DictWriter(f, fieldnames=["t", *SLACK])
        out.writeheader()
        while time.time() < end:
            time.sleep(min(args.sample, max(0, end - time.time())))
            s = sample(args, started)
            samples.append(s)
            out.writerow(s)
            f.flush()
            with COUNTS_LOCK:
                c = dict(COUNTS)
            print(
                f"t={s['t']:>5}s rss={s['rss_mib']}MiB fds={s['fds']} redis={s['redis_mib']}MiB "
                f"keys={s['keys']} queue={s['queue']} | sales={c.get('sales', 0)} "
                f"202={c.get('purchase 202', 0)} 410={c.get('purchase 410', 0)} "
                f"paid={c.get('paid', 0)} sse={c.get('sse 200', 0)} slow-cut={c.get('slow body cut', 0)} "
                f"5xx!={c.get('shop 5xx-not-503', 0) + c.get('poll 5xx-not-503', 0) + c.get('bad 5xx-not-503', 0)}",
                flush=True,
            )
    STOP.set()

    print("\ncounts:", json.dumps(dict(sorted(COUNTS.items()))))
    problems = verdict(samples)
    server_errors = sum(v for k, v in COUNTS.items() if k.endswith("5xx-not-503"))
    if server_errors:
        problems.append(f"{server_errors} answers were 5xx other than 503")
    if COUNTS.get("bad input accepted"):
        problems.append(f"{COUNTS['bad input accepted']} bad inputs were accepted")
    if COUNTS.get("slow body held 60s"):
        problems.append(f"{COUNTS['slow body held 60s']} trickled bodies held a connection for 60 s")
    if not COUNTS.get("purchase 202"):
        problems.append("no purchase won: the load did not reach the sale")
    for line in problems:
        print("FAIL:", line)
    if not problems:
        print("PASS: nothing grew without bound")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
