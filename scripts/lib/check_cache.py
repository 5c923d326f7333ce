"""What nginx's micro-cache (deploy/nginx/) keeps in front of a running seckill, and what it
must never keep. Used by scripts/check-deploy.

Usage: check_cache.py BASE_URL PRODUCT_ID SHOPPER_JWT   (BASE_URL: nginx, not seckill)
Exits non-zero naming the first thing that is wrong.
"""

import re
import sys
import time
import urllib.error
import urllib.request


def get(url, headers=None, method="GET", body=None):
    req = urllib.request.Request(url, headers=headers or {}, method=method, data=body)
    try:
        with urllib.request.urlopen(req, timeout=10) as res:
            return res.status, res.headers, res.read()
    except urllib.error.HTTPError as e:
        return e.code, e.headers, e.read()


def fail(why):
    print(f"check_cache: {why}", file=sys.stderr)
    sys.exit(1)


def expect(cond, why):
    if not cond:
        fail(why)


def main(base, product, jwt):
    view = f"{base}/api/v1/products/{product}"
    s1, h1, b1 = get(view)
    expect(s1 == 200, f"view: {s1}")
    expect("max-age=1" in h1.get("Cache-Control", ""), f"view Cache-Control: {h1}")
    etag = h1.get("ETag")
    expect(etag, "view without an ETag")
    s2, h2, b2 = get(view)
    expect(s2 == 200 and h2.get("X-Cache-Status") == "HIT", f"second view within its second: {s2} {h2.get('X-Cache-Status')}")
    expect(b2 == b1, "a cached view differs from the one it kept")
    s3, h3, _ = get(view, {"If-None-Match": etag})
    expect(s3 == 304, f"view with its own ETag: {s3}, not 304")
    # A made-up query string is the same entry: it cannot bust the cache.
    s4, h4, _ = get(f"{view}?bust={time.time()}")
    expect(h4.get("X-Cache-Status") == "HIT", f"view with a query: {h4.get('X-Cache-Status')}")
    # Past its second: answered (stale while it is refreshed, or refreshed), still a view.
    time.sleep(1.3)
    s5, h5, _ = get(view)
    expect(s5 == 200 and h5.get("X-Cache-Status") in ("STALE", "UPDATING", "EXPIRED", "REVALIDATED", "HIT"), f"view after max-age: {s5} {h5.get('X-Cache-Status')}")
    print(f"view: kept ({h2.get('X-Cache-Status')}), 304 on its ETag, {h5.get('X-Cache-Status')} after a second")

    sp, hp, page = get(f"{base}/p/{product}")
    expect(sp == 200 and "X-Cache-Status" not in hp, f"page: {sp}, through the cache: {hp.get('X-Cache-Status')}")
    expect(hp.get("Cache-Control") == "no-cache" and hp.get("ETag"), f"page headers: {hp}")
    s, _, _ = get(f"{base}/p/{product}", {"If-None-Match": hp["ETag"]})
    expect(s == 304, f"page with its own ETag: {s}")
    assets = re.findall(r'"/assets/([a-z]+\.[0-9a-f]{12}\.(?:js|css))"', page.decode())
    expect(len(assets) == 4, f"hashed assets in the page (3 files and the proof-of-work worker): {assets}")
    for a in assets:
        get(f"{base}/assets/{a}")
        sa, ha, _ = get(f"{base}/assets/{a}")
        expect(sa == 200 and ha.get("X-Cache-Status") == "HIT", f"{a}: {sa} {ha.get('X-Cache-Status')}")
        expect("immutable" in ha.get("Cache-Control", ""), f"{a}: {ha.get('Cache-Control')}")
    print(f"page: revalidated (304), its {len(assets)} hashed assets kept")

    auth = {"Authorization": f"Bearer {jwt}"}
    for _ in range(2):
        sm, hm, _ = get(f"{view}/reservations/me", auth)
        expect("X-Cache-Status" not in hm, f"/me went through the cache: {hm.get('X-Cache-Status')}")
        expect(hm.get("Cache-Control") == "private, no-store", f"/me Cache-Control: {hm.get('Cache-Control')} ({sm})")
    st, ht, _ = get(f"{view}/token", auth, method="POST", body=b"")
    expect("X-Cache-Status" not in ht, f"a token went through the cache ({st})")
    sr, hr, _ = get(f"{view}/reservations", {**auth, "Content-Type": "application/json"}, method="POST", body=b'{"token":"x"}')
    expect("X-Cache-Status" not in hr, f"a purchase went through the cache ({sr})")
    print("/me, a token and a purchase: passed through, never kept")


if __name__ == "__main__":
    main(*sys.argv[1:4])
