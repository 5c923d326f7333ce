// The operators' console: create a sale, preheat it, and watch every recent sale's figures,
// read once a second from GET /api/v1/admin/overview (behind the admin token).
"use strict";

(() => {
  const { el, setText, api, clock, duration, money } = seckill;
  const $ = (id) => document.getElementById(id);
  const TOKEN_KEY = "seckill.admin";
  let token = sessionStorage.getItem(TOKEN_KEY);

  const OUTCOMES = [
    ["won", "won"],
    ["already_reserved", "already theirs"],
    ["sold_out", "sold out"],
    ["rate_limited", "too fast"],
    ["not_started", "not started"],
    ["ended", "ended"],
    ["paused", "paused"],
    ["unknown_product", "not loaded"],
    ["went_back", "Redis went back"],
  ];
  const HISTORY = 300; // seconds of decisions/s kept for the chart

  function notice(text) {
    setText($("notice"), text);
  }

  // ---- Signing in ---------------------------------------------------------------------------
  function showSignIn() {
    $("signed-out").hidden = Boolean(token);
    $("signed-in").hidden = !token;
    $("work").hidden = !token;
  }

  $("login").addEventListener("submit", (event) => {
    event.preventDefault();
    token = $("admin-token").value.trim();
    $("admin-token").value = "";
    sessionStorage.setItem(TOKEN_KEY, token);
    showSignIn();
    notice("Signing in…");
    $("c-name").focus();
    refresh(true);
  });

  $("sign-out").addEventListener("click", () => {
    token = null;
    sessionStorage.removeItem(TOKEN_KEY);
    showSignIn();
    notice("Signed out.");
    $("admin-token").focus();
  });

  function refused(res) {
    if (res.status !== 401) return false;
    token = null;
    sessionStorage.removeItem(TOKEN_KEY);
    showSignIn();
    notice("The admin token was refused: sign in again.");
    $("admin-token").focus();
    return true;
  }

  function problem(res) {
    const b = res.body || {};
    return b.detail || b.title || `HTTP ${res.status}`;
  }

  // ---- Creating a sale ----------------------------------------------------------------------
  $("create").addEventListener("submit", async (event) => {
    event.preventDefault();
    const starts = clock.now() + Number($("c-starts").value) * 1000;
    const ends = starts + Number($("c-lasts").value) * 60000;
    const body = {
      name: $("c-name").value,
      stock: Number($("c-stock").value),
      price_cents: Number($("c-price").value),
      currency: $("c-currency").value.trim().toUpperCase() || undefined,
      starts_at: new Date(starts).toISOString(),
      ends_at: new Date(ends).toISOString(),
      waiting_room: $("c-room").checked || $("c-pow").checked,
      proof_of_work: $("c-pow").checked,
    };
    const res = await api("POST", "/api/v1/admin/products", { bearer: token, json: body }).catch(() => null);
    if (!res) return notice("The server could not be reached.");
    if (refused(res)) return;
    if (res.status === 201) {
      notice(`Created product ${res.body.product_id}, “${res.body.name}”: preheat it before it starts.`);
      $("c-name").value = "";
      refresh();
    } else {
      notice(`Not created: ${problem(res)}`);
    }
  });

  // ---- Preheat --------------------------------------------------------------------------------
  async function preheat(id, force) {
    if (force && !window.confirm(
      `Rebuild sale ${id} in Redis from Postgres now? Its purchases answer “paused” while the rebuild runs. ` +
      "Use it only to rebuild on purpose.",
    )) {
      notice(`Forced preheat of ${id} not done.`);
      return;
    }
    const res = await api("POST", `/api/v1/admin/products/${id}/preheat`, {
      bearer: token,
      json: { force },
    }).catch(() => null);
    if (!res) return notice("The server could not be reached.");
    if (refused(res)) return;
    if (res.status === 200) {
      notice(`${force ? "Rebuilt" : "Preheated"} product ${id}: ${res.body.remaining} units on sale, ${res.body.buyers} known buyers.`);
    } else if (res.body && res.body.code === "already_live") {
      notice(`Product ${id} is already on sale: only a forced preheat rebuilds it.`);
    } else {
      notice(`Preheat of ${id} failed: ${problem(res)}`);
    }
    refresh();
  }

  // ---- One card per sale ----------------------------------------------------------------------
  const cards = new Map(); // product id → {node, fields, history, last}

  function figure(label) {
    const dd = el("dd", {}, "…");
    return [el("div", {}, el("dt", {}, label), dd), dd];
  }

  function card(p) {
    const id = p.product_id;
    const title = el("h3", { id: `p${id}-title` });
    const badge = el("span", { class: "badge" });
    const fields = { title, badge };
    const dl = el("dl", { class: "figures" });
    for (const [key, label] of [
      ["remaining", "Remaining"],
      ["pending", "Pending"],
      ["in_flight", "In flight"],
      ["sold", "Orders"],
      ["stock", "Units"],
      ["price", "Price"],
      ["when", "Window"],
      ["room", "Waiting room"],
    ]) {
      const [row, dd] = figure(label);
      dd.dataset.figure = key;
      fields[key] = dd;
      dl.append(row);
    }
    const rates = el("dl", { class: "rates" });
    fields.rates = {};
    for (const [key, label] of OUTCOMES) {
      const dd = el("dd", {}, "0");
      dd.dataset.outcome = key;
      fields.rates[key] = dd;
      rates.append(el("div", {}, el("dt", {}, label), dd));
    }
    const canvas = el("canvas", { width: 600, height: 120, role: "img", class: "chart" });
    fields.canvas = canvas;
    const preheatButton = el("button", { type: "button" }, "Preheat");
    preheatButton.addEventListener("click", () => preheat(id, false));
    const forceButton = el("button", { type: "button", class: "secondary" }, "Force rebuild…");
    forceButton.addEventListener("click", () => preheat(id, true));
    const ordersButton = el("button", { type: "button", class: "secondary" }, "Orders");
    const downloadButton = el("button", { type: "button", class: "secondary" }, "Download CSV");
    const orders = el("div", { class: "orders", hidden: "" });
    ordersButton.addEventListener("click", () => showOrders(id, orders, null));
    downloadButton.addEventListener("click", () => downloadOrders(id));
    const node = el(
      "article",
      { class: "card", "data-product-id": id, "aria-labelledby": `p${id}-title` },
      el("header", {}, title, badge),
      dl,
      el("h4", {}, "Decisions per second, by outcome"),
      rates,
      canvas,
      el("div", { class: "actions" }, preheatButton, forceButton, ordersButton, downloadButton),
      orders,
    );
    ordersButton.setAttribute("aria-label", `Orders of product ${id}`);
    downloadButton.setAttribute("aria-label", `Download the orders of product ${id} as CSV`);
    preheatButton.setAttribute("aria-label", `Preheat product ${id}`);
    forceButton.setAttribute("aria-label", `Force rebuild of product ${id}`);
    return { node, fields, history: [], last: null };
  }

  // ---- Orders: a page at a time, or all of them as CSV --------------------------------------
  const ORDER_COLUMNS = [
    ["order_id", "Order"],
    ["user_id", "Shopper"],
    ["status", "Status"],
    ["created_at", "Created"],
    ["paid_at", "Paid"],
    ["payment_reference", "Payment"],
  ];

  async function showOrders(id, box, after) {
    const query = `?limit=50${after ? `&after=${encodeURIComponent(after)}` : ""}`;
    const res = await api("GET", `/api/v1/admin/products/${id}/orders${query}`, { bearer: token }).catch(() => null);
    if (!res) {
      notice("The orders could not be read; try again.");
      return;
    }
    if (refused(res)) return;
    if (res.status !== 200) {
      notice(problem(res));
      return;
    }
    const rows = res.body.orders.map((o) =>
      el("tr", {}, ...ORDER_COLUMNS.map(([key]) => el("td", {}, o[key] === undefined || o[key] === null ? "" : String(o[key])))),
    );
    const table = el(
      "table",
      { class: "orders-table" },
      el("caption", {}, `Orders of product ${id}${after ? " (next page)" : ""}: ${rows.length}`),
      el("thead", {}, el("tr", {}, ...ORDER_COLUMNS.map(([, label]) => el("th", { scope: "col" }, label)))),
      el("tbody", {}, ...rows),
    );
    const more = el("button", { type: "button", class: "secondary" }, "Next page");
    more.hidden = !res.body.next;
    more.addEventListener("click", () => showOrders(id, box, res.body.next));
    box.replaceChildren(table, more);
    box.hidden = false;
  }

  async function downloadOrders(id) {
    const res = await fetch(`/api/v1/admin/products/${id}/orders`, {
      headers: { authorization: `Bearer ${token}`, accept: "text/csv" },
      cache: "no-store",
    }).catch(() => null);
    if (!res || res.status !== 200) {
      notice(res && res.status === 401 ? "Signed out: the token was refused." : "The orders could not be downloaded; try again.");
      return;
    }
    const link = el("a", { href: URL.createObjectURL(await res.blob()), download: `product-${id}-orders.csv` });
    document.body.append(link);
    link.click();
    link.remove();
    setTimeout(() => URL.revokeObjectURL(link.href), 10_000);
  }

  function stateOf(p, now) {
    if (p.recovering) return ["recovering", "Recovering"];
    if (p.paused) return ["paused", "Paused (rebuilding)"];
    if (!p.preheated) return ["cold", "Not preheated"];
    if (now >= Date.parse(p.ends_at)) return ["ended", "Ended"];
    if (now < Date.parse(p.starts_at)) return ["upcoming", "Upcoming"];
    if ((p.remaining ?? 0) <= 0) return ["sold_out", "Sold out"];
    return ["live", "Live"];
  }

  function update(c, p, serverTime) {
    const f = c.fields;
    const now = clock.now();
    setText(f.title, `#${p.product_id} ${p.name}`);
    const [state, label] = stateOf(p, now);
    setText(f.badge, label);
    f.badge.dataset.state = state;
    c.node.dataset.state = state;
    setText(f.remaining, p.remaining ?? "—");
    setText(f.pending, p.pending ?? "—");
    // Relayed winners not yet orders: once the sale is over, any left are in the dead-letter
    // queue (or workers are down), and the sale cannot retire (alert
    // SeckillEndedSaleWinnersUnpersisted).
    setText(f.in_flight, p.in_flight ?? "—");
    f.in_flight.dataset.alarm = (p.in_flight || 0) > 0 && now >= Date.parse(p.ends_at) ? "1" : "0";
    f.in_flight.title = f.in_flight.dataset.alarm === "1"
      ? "Winners left Redis but are not orders: see the dead-letter queue (seckill dlq list)"
      : "Winners on their way to Postgres";
    setText(f.sold, p.sold);
    setText(f.stock, p.stock);
    setText(f.price, money(p.price_cents, p.currency));
    const starts = Date.parse(p.starts_at);
    const ends = Date.parse(p.ends_at);
    setText(f.when, now < starts ? `starts in ${duration(starts - now)}`
      : now < ends ? `ends in ${duration(ends - now)}` : "over");
    const r = p.room;
    setText(f.room, !p.waiting_room ? "none"
      : !r ? "open soon"
      : `${r.in_room} in line, ${r.admitted} admitted, ${r.undecided} deciding (at most ${r.admit_rate}/s, ${r.factor_percent}% of units left)${p.proof_of_work ? ", proof of work" : ""}`);
    // Decisions per second: two readings of this process's counters, by the server's clock.
    const counts = p.decisions || {};
    const total = Object.values(counts).reduce((a, b) => a + b, 0);
    if (c.last) {
      const dt = (serverTime - c.last.time) / 1000;
      if (dt > 0) {
        let all = 0;
        for (const [key] of OUTCOMES) {
          const rate = Math.max(0, ((counts[key] || 0) - (c.last.counts[key] || 0)) / dt);
          all += rate;
          setText(f.rates[key], rate.toFixed(rate >= 10 ? 0 : 1));
        }
        const won = Math.max(0, ((counts.won || 0) - (c.last.counts.won || 0)) / dt);
        c.history.push({ all, won });
        if (c.history.length > HISTORY) c.history.shift();
        draw(f.canvas, c.history);
        const peak = Math.max(...c.history.map((h) => h.all));
        f.canvas.setAttribute(
          "aria-label",
          `Decisions per second over the last ${Math.ceil(c.history.length / 60)} minutes: now ${all.toFixed(1)}, peak ${peak.toFixed(1)}.`,
        );
      }
    }
    c.last = { time: serverTime, counts, total };
  }

  function draw(canvas, history) {
    // Drawn at the size it is shown (and the screen's pixel density), so text stays sharp.
    const scale = window.devicePixelRatio || 1;
    const w = Math.max(200, canvas.clientWidth);
    const h = Math.max(60, canvas.clientHeight);
    if (canvas.width !== Math.round(w * scale)) canvas.width = Math.round(w * scale);
    if (canvas.height !== Math.round(h * scale)) canvas.height = Math.round(h * scale);
    const ctx = canvas.getContext("2d");
    ctx.setTransform(scale, 0, 0, scale, 0, 0);
    ctx.clearRect(0, 0, w, h);
    const peak = Math.max(1, ...history.map((p) => p.all));
    const x = (i) => w - (history.length - 1 - i) * (w / (HISTORY - 1));
    const y = (v) => h - 14 - (v / peak) * (h - 24);
    ctx.strokeStyle = "#d5dae1";
    ctx.lineWidth = 1;
    ctx.beginPath();
    ctx.moveTo(0, y(0));
    ctx.lineTo(w, y(0));
    ctx.stroke();
    for (const [key, color] of [["all", "#2557d6"], ["won", "#1a7f37"]]) {
      ctx.strokeStyle = color;
      ctx.lineWidth = 2;
      ctx.beginPath();
      history.forEach((p, i) => (i ? ctx.lineTo(x(i), y(p[key])) : ctx.moveTo(x(i), y(p[key]))));
      ctx.stroke();
    }
    ctx.fillStyle = "#57606a";
    ctx.font = "12px system-ui, sans-serif";
    const top = Math.max(0, ...history.map((p) => p.all));
    const peakText = `peak ${top.toFixed(top >= 10 ? 0 : 1)}/s`;
    ctx.fillText(w < 480 ? `${peakText} · all (blue), won (green)` : `${peakText} · all decisions (blue), won (green) · last 5 min`, 6, 13);
  }

  // ---- The one-second refresh -------------------------------------------------------------------
  let timer = null;
  async function refresh(first) {
    clearTimeout(timer);
    if (!token) return;
    const res = await api("GET", "/api/v1/admin/overview", { bearer: token }).catch(() => null);
    if (res && !refused(res)) {
      if (res.status === 200) {
        if (first) notice("Signed in.");
        render(res.body);
      } else {
        notice(`Figures unavailable: ${problem(res)}`);
      }
    } else if (!res) {
      notice("The server could not be reached; trying again.");
    }
    if (token) timer = setTimeout(refresh, 1000);
  }

  function render(o) {
    const lag = o.relay_lag;
    const time = Date.parse(o.server_time);
    setText($("queue-depth"), o.queue_depth ?? "unknown");
    setText($("dlq-depth"), o.dlq_depth ?? "unknown");
    $("dlq-depth").dataset.alarm = o.dlq_depth > 0 ? "1" : "0";
    if (render.lag && lag.count > render.lag.count) {
      const mean = (lag.sum_seconds - render.lag.sum_seconds) / (lag.count - render.lag.count);
      render.lastLag = `${(mean * 1000).toFixed(1)} ms`;
      setText($("relay-lag"), render.lastLag);
    } else if (render.lag) {
      setText($("relay-lag"), render.lastLag ? `idle (last ${render.lastLag})` : "idle");
    }
    render.lag = lag;
    setText($("server-time"), new Date(time).toLocaleTimeString());
    const list = $("products");
    const seen = new Set();
    o.products.forEach((p) => {
      seen.add(p.product_id);
      let c = cards.get(p.product_id);
      if (!c) {
        c = card(p);
        cards.set(p.product_id, c);
      }
      update(c, p, time);
    });
    // Newest first; a card keeps its node (and the focus inside it) across refreshes.
    const order = o.products.map((p) => cards.get(p.product_id).node);
    order.forEach((node, i) => {
      if (list.children[i] !== node) list.insertBefore(node, list.children[i] || null);
    });
    for (const [id, c] of cards) {
      if (!seen.has(id)) {
        c.node.remove();
        cards.delete(id);
      }
    }
    if (o.products.length === 0 && !list.dataset.empty) {
      list.dataset.empty = "1";
      list.append(el("p", { class: "hint", id: "no-products" }, "No sale yet: create one above."));
    } else if (o.products.length > 0 && list.dataset.empty) {
      delete list.dataset.empty;
      const hint = $("no-products");
      if (hint) hint.remove();
    }
  }

  showSignIn();
  refresh(true);
})();
