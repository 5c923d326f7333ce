// Shared by the storefront and the console. Every text that reaches the page goes through
// textContent (el() below): nothing received from the server or typed by a person is ever
// parsed as HTML.
"use strict";

const seckill = (() => {
  /** A new element: el("p", {class: "x", "aria-live": "polite"}, "text", child, ...). */
  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [name, value] of Object.entries(attrs || {})) {
      if (value === false || value === null || value === undefined) continue;
      node.setAttribute(name, value === true ? "" : String(value));
    }
    for (const child of children) {
      node.append(child instanceof Node ? child : document.createTextNode(String(child)));
    }
    return node;
  }

  /** Sets an element's text (a no-op when unchanged, so screen readers are not re-told). */
  function setText(node, text) {
    const value = String(text);
    if (node.textContent !== value) node.textContent = value;
  }

  /**
   * Calls the JSON API. Resolves to {status, body, headers} whatever the status (a problem
   * body is parsed too); rejects only when the server could not be reached.
   */
  async function api(method, path, options = {}) {
    const headers = {};
    if (options.bearer) headers.authorization = `Bearer ${options.bearer}`;
    let body;
    if (options.json !== undefined) {
      headers["content-type"] = "application/json";
      body = JSON.stringify(options.json);
    }
    const sent = Date.now();
    // `no-store` unless the caller lets the browser revalidate what it holds (`no-cache`: an
    // `If-None-Match`, answered `304` while the view is unchanged).
    const cache = options.cache || "no-store";
    const res = await fetch(path, { method, headers, body, cache });
    const received = Date.now();
    clock.sample(res.headers.get("date"), res.headers.get("age"), sent, received);
    let parsed = null;
    const type = res.headers.get("content-type") || "";
    if (type.includes("json")) {
      try {
        parsed = await res.json();
      } catch (_) {
        parsed = null;
      }
    }
    return { status: res.status, body: parsed, headers: res.headers };
  }

  /**
   * The server's clock, from the `Date` header of every answer. A `Date` (whole seconds, and
   * possibly a little stale) says the server's time when it answered was at least `Date` and
   * less than `Date + 1.5 s`; the answer came between `sent` and `received`. Each answer
   * narrows the bounds of (server − browser); the estimate is their middle. An answer a cache
   * kept carries `Age` (whole seconds since the server's `Date`): the time is that much later.
   */
  const clock = (() => {
    let low = -Infinity;
    let high = Infinity;
    return {
      sample(dateHeader, ageHeader, sent, received) {
        const date = Date.parse(dateHeader || "");
        if (Number.isNaN(date)) return;
        const age = Number(ageHeader) || 0;
        const lo = date + age * 1000 - received;
        const hi = date + (age ? age * 1000 + 1000 : 0) + 1500 - sent;
        // A server clock that jumped: start again from this answer alone.
        if (lo > high || hi < low) {
          low = lo;
          high = hi;
          return;
        }
        low = Math.max(low, lo);
        high = Math.min(high, hi);
      },
      /** Milliseconds to add to the browser's clock to get the server's. */
      offset() {
        if (!Number.isFinite(low) || !Number.isFinite(high)) return 0;
        return (low + high) / 2;
      },
      now() {
        return Date.now() + this.offset();
      },
    };
  })();

  /** "1 d 02:03:04", "02:03:04" or "03:04" for a number of milliseconds. */
  function duration(ms) {
    const total = Math.max(0, Math.ceil(ms / 1000));
    const d = Math.floor(total / 86400);
    const h = Math.floor((total % 86400) / 3600);
    const m = Math.floor((total % 3600) / 60);
    const s = total % 60;
    const two = (n) => String(n).padStart(2, "0");
    const hms = h > 0 || d > 0 ? `${two(h)}:${two(m)}:${two(s)}` : `${two(m)}:${two(s)}`;
    return d > 0 ? `${d} d ${hms}` : hms;
  }

  /** 1999 → "19.99" (prices are in cents of the storefront's currency, which seckill does not know). */
  /**
   * A price in its currency, as the browser's language writes it ("€19.99", "19,99 €",
   * "¥1,999"): `minor` is in the currency's minor unit (cents; yen for JPY). Without a currency
   * the bare amount in hundredths.
   */
  function money(minor, currency) {
    if (!/^[A-Z]{3}$/.test(currency || "")) return (Number(minor) / 100).toFixed(2);
    try {
      const format = new Intl.NumberFormat(undefined, { style: "currency", currency });
      const digits = format.resolvedOptions().maximumFractionDigits;
      return format.format(Number(minor) / 10 ** digits);
    } catch (_) {
      return `${(Number(minor) / 100).toFixed(2)} ${currency}`;
    }
  }

  /**
   * Milliseconds until the storefront asks for a product's view again (null: no more), so that
   * 100,000 open pages cost the origin little: every 4–6 s while the sale is on, every 12–18 s
   * before it, once 0.2–5.2 s after the start — spread over a whole period, so that pages do
   * not all come back together at the start and every 5 s after it (the buy button enables at
   * the start by the clock, not by the view) — 1–2 s while a view fetched before the start
   * still says upcoming,
   * and, after failures, 2 s doubling up to 30 s. Each page draws its own moment (`random`,
   * in [0, 1)), so pages opened together drift apart. `view` is the last view (null: none yet,
   * or no such product), `now` the server's time. scripts/bench-views replays this.
   */
  function nextPoll(view, now, failures, random) {
    const jitter = (ms) => Math.round(ms * (0.8 + 0.4 * random));
    if (failures > 0) return jitter(Math.min(30000, 2000 * 2 ** (failures - 1)));
    if (!view) return jitter(15000);
    if (now >= view.ends) return null;
    if (view.state !== "upcoming") return jitter(5000);
    const untilStart = view.starts - now;
    if (untilStart <= 0) return 1000 + Math.round(1000 * random);
    return Math.min(jitter(15000), untilStart + 200 + Math.round(5000 * random));
  }

  return { el, setText, api, clock, duration, money, nextPoll };
})();
