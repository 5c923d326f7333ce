// Simulated storefront pages polling one product's view, for scripts/bench-views.
//
//   node scripts/lib/viewers.mjs URL VIEWERS SECONDS SCHEDULE
//     URL       the view, e.g. http://127.0.0.1:8080/api/v1/products/7
//     SCHEDULE  page:   web/common.js's own nextPoll (loaded from the file, not copied), each
//                       page revalidating with If-None-Match as `fetch(…, {cache: "no-cache"})`
//                       does in a browser;
//               before: the page before issue 28 — every second, 4× a second in the last 2 s
//                       before the start, `cache: "no-store"` (no If-None-Match).
// Every page is already open when the run starts: its first request comes at a random moment
// of the first 5 s. Prints a live line per second and, at the end, one JSON line: requests
// made, answers by status, transport errors, p50/p99 latency (ms), requests per viewer per
// minute. Loopback only; stops by itself after SECONDS.

import fs from "node:fs";
import http from "node:http";
import path from "node:path";
import vm from "node:vm";

const [url, viewersArg, secondsArg, schedule] = process.argv.slice(2);
const viewers = Number(viewersArg);
const seconds = Number(secondsArg);
if (!url || !(viewers > 0) || !(seconds > 0) || !["page", "before"].includes(schedule)) {
  console.error("usage: viewers.mjs URL VIEWERS SECONDS page|before");
  process.exit(2);
}
const target = new URL(url);
if (!["127.0.0.1", "localhost", "[::1]"].includes(target.hostname)) {
  console.error("viewers.mjs: loopback targets only");
  process.exit(2);
}

// The page's own schedule, from web/common.js itself.
const here = path.dirname(new URL(import.meta.url).pathname);
const source = fs.readFileSync(path.join(here, "../../web/common.js"), "utf8");
const context = vm.createContext({});
vm.runInContext(`${source}\n;globalThis.nextPoll = seckill.nextPoll;`, context);
const pageNext = context.nextPoll;

function beforeNext(view, now) {
  const nearStart = view && view.state === "upcoming" && view.starts - now < 2000;
  return nearStart ? 250 : view ? 1000 : 5000;
}

const agent = new http.Agent({ keepAlive: true, maxSockets: 512 });
const latencies = [];
const byStatus = {};
let made = 0;
let errors = 0;
let stopping = false;

function get(headers) {
  return new Promise((resolve) => {
    const req = http.request(target, { agent, headers }, (res) => {
      const chunks = [];
      res.on("data", (c) => chunks.push(c));
      res.on("end", () => resolve({ status: res.statusCode, headers: res.headers, body: Buffer.concat(chunks) }));
    });
    req.on("error", () => resolve(null));
    req.setTimeout(10_000, () => req.destroy());
    req.end();
  });
}

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

async function viewer(deadline) {
  let view = null;
  let etag = null;
  let failures = 0;
  await sleep(Math.random() * Math.min(5000, deadline - Date.now()));
  while (!stopping && Date.now() < deadline) {
    const headers = schedule === "page" && etag ? { "if-none-match": etag } : {};
    const sent = performance.now();
    const res = await get(headers);
    made += 1;
    if (res === null) {
      errors += 1;
      failures += 1;
    } else {
      latencies.push(performance.now() - sent);
      byStatus[res.status] = (byStatus[res.status] || 0) + 1;
      if (res.status === 200) {
        const body = JSON.parse(res.body.toString());
        view = { ...body, starts: Date.parse(body.starts_at), ends: Date.parse(body.ends_at) };
        etag = res.headers.etag || null;
        failures = 0;
      } else if (res.status === 304) {
        failures = 0;
      } else {
        failures += 1;
      }
    }
    const delay = schedule === "page" ? pageNext(view, Date.now(), failures, Math.random()) : beforeNext(view, Date.now());
    if (delay === null || Date.now() + delay >= deadline) return;
    await sleep(delay);
  }
}

const began = Date.now();
const deadline = began + seconds * 1000;
let last = 0;
const ticker = setInterval(() => {
  const t = Math.round((Date.now() - began) / 1000);
  console.error(`viewers: ${t}s ${made - last} req/s, ${made} in all, ${errors} errors`);
  last = made;
}, 1000);
await Promise.all(Array.from({ length: viewers }, () => viewer(deadline)));
stopping = true;
clearInterval(ticker);
agent.destroy();
latencies.sort((a, b) => a - b);
const q = (p) => (latencies.length ? Number(latencies[Math.min(latencies.length - 1, Math.floor(p * latencies.length))].toFixed(2)) : null);
console.log(
  JSON.stringify({
    schedule,
    viewers,
    seconds,
    requests: made,
    by_status: byStatus,
    errors,
    p50_ms: q(0.5),
    p99_ms: q(0.99),
    per_viewer_per_minute: Number(((made / viewers) * (60 / seconds)).toFixed(2)),
  }),
);
