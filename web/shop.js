// The storefront: one product, a countdown on the server's clock, the buy button, the answer in
// plain words, then the reservation pushed live (server-sent events) until it is paid or over.
"use strict";

(() => {
  const { el, setText, api, clock, duration, money } = seckill;
  const $ = (id) => document.getElementById(id);
  const dev = document.body.dataset.dev === "1";
  // Where a winner pays (SECKILL_CHECKOUT_URL, with {order_id}); outside development mode only
  // the shop's own checkout records a payment.
  const checkout = document.body.dataset.checkout || "";
  const JWT_KEY = "seckill.jwt";

  // ---- Signing in -------------------------------------------------------------------------
  // Development mode: any shopper id, through POST /api/v1/dev/token. Production: the JWT the
  // storefront's own login issued, which that login leaves in sessionStorage["seckill.jwt"]
  // (or which a person pastes in).
  let jwt = sessionStorage.getItem(JWT_KEY);

  function userOf(token) {
    try {
      const payload = token.split(".")[1].replace(/-/g, "+").replace(/_/g, "/");
      return JSON.parse(atob(payload)).sub || "?";
    } catch (_) {
      return "?";
    }
  }

  function showSignIn() {
    $("signed-in").hidden = !jwt;
    $("dev-login").hidden = Boolean(jwt) || !dev;
    $("jwt-login").hidden = Boolean(jwt) || dev;
    if (jwt) setText($("who-text"), `Signed in as shopper ${userOf(jwt)}`);
  }

  function signedIn(token) {
    jwt = token;
    sessionStorage.setItem(JWT_KEY, token);
    showSignIn();
    setText($("login-status"), `Signed in as shopper ${userOf(token)}.`);
    // The sign-in form is gone: focus moves on to what comes next.
    (productId ? $("name") : $("pick-id")).focus();
    if (product) checkReservation();
  }

  $("dev-login").addEventListener("submit", async (event) => {
    event.preventDefault();
    const user = Number($("dev-user").value);
    const res = await api("POST", "/api/v1/dev/token", { json: { user_id: user } }).catch(() => null);
    if (res && res.status === 200) {
      signedIn(res.body.token);
    } else {
      setText($("login-status"), "Could not sign in: the development sign-in is not available.");
    }
  });

  $("jwt-login").addEventListener("submit", (event) => {
    event.preventDefault();
    const token = $("jwt-input").value.trim();
    $("jwt-input").value = "";
    if (token) signedIn(token);
  });

  $("sign-out").addEventListener("click", () => {
    jwt = null;
    sessionStorage.removeItem(JWT_KEY);
    closeStream();
    $("reservation").hidden = true;
    setText($("answer"), "");
    showSignIn();
    setText($("login-status"), "Signed out.");
    (dev ? $("dev-user") : $("jwt-input")).focus();
  });

  // ---- The product and its countdown --------------------------------------------------------
  const match = location.pathname.match(/^\/p\/([1-9][0-9]{0,18})$/);
  const productId = match ? match[1] : null;
  let product = null; // the last product view
  let coolingUntil = 0; // server time before which "too fast" holds the button
  let busy = false; // a purchase is on its way
  let holds = false; // this shopper holds a reservation of this product

  const PHASE = {
    upcoming: "Starts in",
    live: "On sale now",
    sold_out: "Sold out",
    ended: "The sale has ended",
    recovering: "Temporarily unavailable",
  };

  // Returns whether the server answered.
  async function loadProduct() {
    const res = await api("GET", `/api/v1/products/${productId}`, { cache: "no-cache" }).catch(() => null);
    if (!res) return false;
    if (res.status === 404) {
      setText($("name"), "No such product");
      $("product").dataset.state = "missing";
      $("product").hidden = false;
      if (!$("back")) {
        $("product").append(el("p", {}, el("a", { id: "back", href: "/" }, "Back to the storefront")));
      }
      product = null;
      return true;
    }
    if (res.status !== 200) return false;
    const first = product === null;
    product = res.body;
    product.starts = Date.parse(product.starts_at);
    product.ends = Date.parse(product.ends_at);
    setText($("name"), product.name);
    document.title = `${product.name} — seckill`;
    setText($("price"), money(product.price_cents, product.currency));
    setText($("remaining"), product.remaining);
    $("product").hidden = false;
    if (first) {
      announceState();
      checkReservation();
    }
    render();
    return true;
  }

  let announced = null;
  function announceState() {
    if (!product || announced === product.state) return;
    announced = product.state;
    const words = {
      upcoming: `The sale starts at ${new Date(product.starts).toLocaleTimeString()}.`,
      live: "The sale has started.",
      sold_out: "Sold out.",
      ended: "The sale has ended.",
      recovering: "The sale is temporarily unavailable.",
    }[product.state];
    if (words) setText($("sale-status"), words);
  }

  /** Where the sale stands now, on the server's clock (the view's state between two views). */
  function phase() {
    if (!product) return null;
    const now = clock.now();
    if (now >= product.ends) return "ended";
    if (product.state === "recovering") return "recovering";
    // The start is on the server's clock: the button enables then, without waiting for the
    // view to say so (the purchase's own answer is the truth if the clock was off).
    if (product.state === "upcoming") return now >= product.starts ? "live" : "upcoming";
    return product.remaining <= 0 ? "sold_out" : "live";
  }

  function render() {
    const p = phase();
    if (!p) return;
    const now = clock.now();
    setText($("phase"), PHASE[p]);
    $("product").dataset.state = p;
    if (p === "upcoming") {
      setText($("countdown"), duration(product.starts - now));
    } else if (p === "live") {
      setText($("countdown"), `ends in ${duration(product.ends - now)}`);
    } else {
      setText($("countdown"), "");
    }
    const cooling = coolingUntil > now;
    if (cooling) {
      setText($("answer"), `Too fast — try again in ${Math.ceil((coolingUntil - now) / 1000)} s.`);
    }
    const waiting = product.waiting_room && !(room && room.state === "admitted");
    $("room").hidden = !product.waiting_room || holds;
    $("join").hidden = Boolean(room) || !jwt;
    $("buy").disabled = !jwt || busy || cooling || holds || waiting || p !== "live";
    setText($("buy"), !jwt ? "Sign in to buy" : holds ? "It's yours" : "Buy now");
  }

  // The countdown ticks on the server's clock, read from the answers' `Date`; the view
  // (remaining stock, state) is asked again only now and then, each page at its own moment,
  // and a proxy or CDN may answer for the server (the view is public for a second).
  setInterval(render, 250);
  let failures = 0;
  async function poll() {
    if (document.hidden) {
      // Nobody is looking: ask again once the page is shown.
      document.addEventListener("visibilitychange", poll, { once: true });
      return;
    }
    const answered = await loadProduct();
    failures = answered ? 0 : failures + 1;
    announceState();
    const delay = seckill.nextPoll(product, clock.now(), failures, Math.random());
    if (delay !== null) setTimeout(poll, delay);
  }

  // ---- Buying -------------------------------------------------------------------------------
  const ANSWERS = {
    already_reserved: "It's already yours: you hold a reservation for this product.",
    sold_out: "Sold out: every unit has been taken.",
    ended: "The sale has ended.",
    not_started: "The sale has not started yet.",
    paused: "Unavailable for a moment — try again shortly.",
    recovering: "Unavailable for a moment — try again shortly.",
    unavailable: "Unavailable for a moment — try again shortly.",
    unauthorized: "Your sign-in has expired: please sign in again.",
    product_not_found: "This product does not exist.",
    not_admitted: "Wait for your turn in the line: the button works once you are admitted.",
  };

  function tooFast(res) {
    const secs = Number(res.headers.get("retry-after")) || 1;
    coolingUntil = clock.now() + secs * 1000;
    setText($("answer"), `Too fast — try again in ${secs} s.`);
    setTimeout(() => {
      if (clock.now() >= coolingUntil) setText($("answer"), "You can try again now.");
      render();
    }, secs * 1000 + 50);
  }

  function answerProblem(res) {
    const code = res.body && res.body.code;
    if (code === "rate_limited") return tooFast(res);
    setText($("answer"), ANSWERS[code] || `Unavailable (${res.status}) — try again shortly.`);
    if (code === "sold_out") product.remaining = 0;
  }

  /**
   * After a 503 or no answer to the purchase itself, the attempt may still have been decided (a
   * batch whose Redis call failed after its script ran, a replica wait that broke): the
   * shopper's /me says whether it won before anything is told. True when it did.
   */
  async function wonAfterAll() {
    const res = await api("GET", `/api/v1/products/${productId}/reservations/me`, { bearer: jwt }).catch(() => null);
    if (!res || res.status !== 200) return false;
    setText($("answer"), "You won! The unit is yours.");
    holds = true;
    showReservation(res.body);
    if (!TERMINAL.has(res.body.status)) openStream();
    return true;
  }

  $("buy").addEventListener("click", async () => {
    if (busy || !jwt) return;
    busy = true;
    render();
    setText($("answer"), "Sending your order…");
    let sent = false;
    try {
      const admission = room && room.admission_token ? { admission_token: room.admission_token } : undefined;
      let res = await api("POST", `/api/v1/products/${productId}/token`, { bearer: jwt, json: admission });
      if (res.status !== 200) return answerProblem(res);
      const token = res.body.token;
      sent = true;
      res = await api("POST", `/api/v1/products/${productId}/reservations`, {
        bearer: jwt,
        json: { token },
      });
      if (res.status === 202) {
        setText($("answer"), "You won! The unit is yours.");
        holds = true;
        showReservation(res.body);
        openStream();
      } else if (res.body && res.body.code === "already_reserved") {
        setText($("answer"), ANSWERS.already_reserved);
        holds = true;
        checkReservation();
      } else if (res.status >= 500 && (await wonAfterAll())) {
        // Decided after all: /me told.
      } else {
        answerProblem(res);
      }
    } catch (_) {
      if (!(sent && (await wonAfterAll()))) {
        setText($("answer"), "Unavailable — the shop could not be reached. Try again shortly.");
      }
    } finally {
      busy = false;
      render();
    }
  });

  // ---- The waiting room (a product with `waiting_room`) ---------------------------------------
  // Join once; then where this shopper stands comes over an event stream until their turn has
  // passed (when admitted, the admission token goes with the purchase-token request).
  let room = null;
  const ROOM_WORDS = {
    awaiting_draw: () => "You're in line. Places are drawn at random at the start: joining early gives no advantage.",
    waiting: (r) => `You're in line: place ${r.place}, ${r.ahead} ahead of you, about ${duration(r.estimated_wait_secs * 1000)} to wait.`,
    admitted: (r) => `It's your turn: buy before ${new Date(Date.parse(r.admitted_until) - clock.offset()).toLocaleTimeString()}.`,
    sold_out: () => "Sold out for everyone still in line (if units come back, the line moves again).",
    turn_passed: () => "Your turn has passed.",
  };

  async function roomStep(res) {
    if (!res || res.status !== 200 || !res.body) return;
    const was = room && room.state;
    room = res.body;
    setText($("room-status"), (ROOM_WORDS[room.state] || (() => room.state))(room));
    if (room.state === "admitted" && was !== "admitted") $("buy").focus();
    if (roomOver()) closeRoom();
    render();
  }

  /** A stream token for this shopper's event streams of this product (the reservation's and
   * the room's), or null when none could be had. */
  async function streamToken() {
    const res = await api("POST", `/api/v1/products/${productId}/reservations/me/stream-token`, {
      bearer: jwt,
    }).catch(() => null);
    return res && res.status === 200 ? res.body.token : null;
  }

  // Where this shopper stands is pushed over an event stream (the server's admission pass
  // wakes it when the room changed: a new state at once, the position at most once a second);
  // when the stream cannot be had, one read, and the stream again 1–3 s later.
  let roomStream = null;
  let roomAgain = null;

  // Set when the room answers that this shopper has nothing more to wait for there (the sale
  // ended, or the room is gone): no more streams or reads.
  let roomGone = false;

  function roomOver() {
    return roomGone || !product || !product.waiting_room || !jwt || holds || (room && room.state === "turn_passed");
  }

  function closeRoom() {
    clearTimeout(roomAgain);
    if (roomStream) roomStream.close();
    roomStream = null;
  }

  /** After the room's stream could not be had or ended: one read, then a new stream 1–3 s later. */
  async function roomRetry() {
    await pollRoom();
    if (!roomOver()) roomAgain = setTimeout(watchRoom, 1000 + Math.random() * 2000);
  }

  async function watchRoom() {
    closeRoom();
    if (roomOver()) return;
    const token = await streamToken();
    if (!token) {
      await roomRetry();
      return;
    }
    const url = `/api/v1/products/${productId}/room/events?token=${encodeURIComponent(token)}`;
    const source = new EventSource(url);
    roomStream = source;
    source.addEventListener("status", (event) => {
      try {
        roomStep({ status: 200, body: JSON.parse(event.data) });
      } catch (_) {
        /* a frame we cannot read: the next one will do */
      }
    });
    const again = async () => {
      if (roomStream !== source) return;
      closeRoom();
      await roomRetry();
    };
    source.addEventListener("close", again);
    source.addEventListener("error", again);
  }

  /** One read of where this shopper stands. */
  async function pollRoom() {
    if (roomOver()) return;
    const res = await api("GET", `/api/v1/products/${productId}/room/me`, { bearer: jwt }).catch(() => null);
    if (res && (res.status === 410 || res.status === 404)) {
      roomGone = true;
      closeRoom();
      return;
    }
    await roomStep(res);
  }

  /** Solves a proof-of-work challenge in a Web Worker, showing its progress; the solution. */
  function solve(challenge, bits) {
    return new Promise((resolve, reject) => {
      const worker = new Worker(document.body.dataset.pow);
      worker.onmessage = (event) => {
        if (event.data.solution !== undefined) {
          worker.terminate();
          resolve(event.data.solution);
        } else {
          setText($("room-status"), `Checking this is a person, not a bot… ${Math.round(event.data.progress * 100)}%`);
        }
      };
      worker.onerror = (e) => {
        worker.terminate();
        reject(e);
      };
      worker.postMessage({ challenge, bits });
    });
  }

  /** The join's body: for a room with proof of work, a challenge and its solution. */
  async function joinBody() {
    if (!product.proof_of_work) return undefined;
    const res = await api("POST", `/api/v1/products/${productId}/room/challenge`, { bearer: jwt });
    if (res.status !== 200) throw new Error(`challenge: ${res.status}`);
    setText($("room-status"), "Checking this is a person, not a bot…");
    const solution = await solve(res.body.challenge, res.body.difficulty);
    return { challenge: res.body.challenge, solution };
  }

  $("join").addEventListener("click", async () => {
    $("join").disabled = true;
    const res = await joinBody()
      .then((json) => api("POST", `/api/v1/products/${productId}/room`, { bearer: jwt, json }))
      .catch(() => null);
    $("join").disabled = false;
    if (!res) {
      setText($("room-status"), "Could not join the line: try again.");
      return;
    }
    if (res && res.status === 425) {
      setText($("room-status"), "The line opens a little before the start: try again then.");
      return;
    }
    roomGone = false;
    await roomStep(res);
    if (room) watchRoom();
  });

  // ---- The reservation, live ----------------------------------------------------------------
  const STATUS = {
    pending: ["Won — recording your order…", "A moment: your order is being saved."],
    confirmed: ["Confirmed — waiting for your payment.", ""],
    paid: ["Paid. Thank you!", "Your order is complete."],
    cancelled: ["Cancelled.", "The unit went back on sale."],
    expired: ["Expired: the time to pay ran out.", "The unit went back on sale."],
    rejected: ["Rejected: this win could not become an order.", ""],
  };
  const TERMINAL = new Set(["paid", "cancelled", "expired", "rejected"]);
  let reservation = null;
  let stream = null;
  let reopen = null;

  function showReservation(view) {
    reservation = view;
    const [headline, detail] = STATUS[view.status] || [view.status, ""];
    $("reservation").hidden = false;
    $("reservation").dataset.status = view.status;
    setText($("reservation-status"), headline);
    let more = detail;
    if (view.status === "confirmed" && view.expires_at) {
      more = `Pay before ${new Date(Date.parse(view.expires_at) - clock.offset()).toLocaleTimeString()}.`;
    }
    if (view.status === "rejected" && view.reason) more = view.reason;
    setText($("reservation-detail"), more);
    const payable = view.status === "confirmed" && Boolean(view.order_id);
    if (payable && !dev && !checkout) {
      setText($("reservation-detail"), `${more} Complete the payment at the shop.`);
    }
    $("pay").hidden = !payable || (!dev && !checkout);
    $("cancel").hidden = !payable;
    if (TERMINAL.has(view.status)) closeStream();
  }

  async function checkReservation() {
    if (!jwt || !productId) return;
    const res = await api("GET", `/api/v1/products/${productId}/reservations/me`, { bearer: jwt }).catch(() => null);
    if (res && res.status === 200) {
      holds = true;
      showReservation(res.body);
      if (!TERMINAL.has(res.body.status)) openStream();
    } else if (res && res.status === 401) {
      setText($("login-status"), ANSWERS.unauthorized);
    }
    render();
    // Already in this product's line (a reload): where they stand.
    if (!holds && product && product.waiting_room && !room) {
      await pollRoom();
      if (room) watchRoom();
    }
  }

  function closeStream() {
    clearTimeout(reopen);
    if (stream) stream.close();
    stream = null;
  }

  /** EventSource cannot send Authorization: a 60-second stream token goes in the URL. */
  async function openStream() {
    closeStream();
    if (!jwt) return;
    const token = await streamToken();
    if (!token) {
      reopen = setTimeout(openStream, 3000);
      return;
    }
    const url = `/api/v1/products/${productId}/reservations/me/events?token=${encodeURIComponent(token)}`;
    const source = new EventSource(url);
    stream = source;
    source.addEventListener("status", (event) => {
      try {
        showReservation(JSON.parse(event.data));
      } catch (_) {
        /* a frame we cannot read: the next one will do */
      }
    });
    // The stream ends after a terminal status, its lifetime, or a server shutdown. Unless the
    // reservation is over, open a new one with a new token (the old one may have expired).
    const again = () => {
      if (stream !== source) return;
      source.close();
      stream = null;
      if (!reservation || !TERMINAL.has(reservation.status)) {
        reopen = setTimeout(openStream, 1000 + Math.random() * 2000);
      }
    };
    source.addEventListener("close", again);
    source.addEventListener("error", again);
  }

  async function settle(action) {
    if (!reservation || !reservation.order_id) return;
    $("pay").disabled = true;
    $("cancel").disabled = true;
    const res = await api("POST", `/api/v1/orders/${reservation.order_id}/${action}`, { bearer: jwt }).catch(() => null);
    $("pay").disabled = false;
    $("cancel").disabled = false;
    if (res && res.status === 200) {
      showReservation({ ...reservation, status: res.body.status || (action === "pay" ? "paid" : "cancelled") });
      $("reservation-status").focus();
    } else if (res && res.body && res.body.code === "order_closed") {
      checkReservation();
    } else {
      setText($("reservation-detail"), "Unavailable — try again shortly.");
    }
  }
  $("pay").addEventListener("click", () => {
    if (dev) {
      settle("pay");
    } else if (checkout && reservation && reservation.order_id) {
      location.assign(checkout.replace("{order_id}", encodeURIComponent(reservation.order_id)));
    }
  });
  $("cancel").addEventListener("click", () => settle("cancel"));
  $("reservation-status").setAttribute("tabindex", "-1");
  $("name").setAttribute("tabindex", "-1");

  // ---- Start ----------------------------------------------------------------------------------
  showSignIn();
  if (productId) {
    poll();
  } else {
    $("pick").hidden = false;
    $("pick-form").addEventListener("submit", (event) => {
      event.preventDefault();
      const id = String(Number($("pick-id").value));
      if (/^[1-9][0-9]*$/.test(id)) location.assign(`/p/${id}`);
    });
    listSales();
  }

  // The sales on now or coming (GET /api/v1/products), each a link to its page.
  async function listSales() {
    const box = $("sales");
    let res;
    try {
      res = await api("GET", "/api/v1/products");
    } catch (_) {
      setText(box, "The sales could not be loaded: the server is not reachable.");
      return;
    }
    if (res.status !== 200 || !res.body || !Array.isArray(res.body.products)) {
      setText(box, "The sales could not be loaded.");
      return;
    }
    box.textContent = "";
    if (res.body.products.length === 0) {
      box.append(el("p", { class: "hint" }, "No sale is on or coming up."));
      return;
    }
    const now = Date.now() + clock.offset();
    const list = el("ul", { class: "sales", id: "sales-list" });
    for (const p of res.body.products) {
      const starts = Date.parse(p.starts_at);
      const when = starts <= now ? "on now" : `starts ${new Date(starts).toLocaleString()}`;
      list.append(
        el(
          "li",
          {},
          el("a", { href: `/p/${Number(p.product_id)}` }, p.name),
          " ",
          el("span", { class: "hint" }, `${money(p.price_cents, p.currency)} · ${when}`),
        ),
      );
    }
    box.append(list);
  }
})();
