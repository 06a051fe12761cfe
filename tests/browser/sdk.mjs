// Loads a browser SDK from node_modules in a test page and makes it send
// identify, track and page to headwater.
//
// node sdk.mjs --sdk segment|rudderstack --tracking URL --write-key KEY --run ID
//              --artifacts DIR
// The page comes from a loopback static server started here; the SDK is
// bundled from npm with esbuild (no CDN). Prints one JSON line.
import { createServer } from "node:http";
import { mkdirSync } from "node:fs";
import { join } from "node:path";
import { build } from "esbuild";
import { args, finish, launch } from "./common.mjs";

const opt = args();

// Each entry exposes the SDK's constructor to the page and nothing else: the
// page script below does what an application would.
const ENTRIES = {
  segment: 'import { AnalyticsBrowser } from "@segment/analytics-next"; window.AnalyticsBrowser = AnalyticsBrowser;',
  // The "bundled" build has its plugins compiled in, so nothing is fetched from
  // pluginsSDKBaseURL; the plain build loads them from a CDN at run time.
  rudderstack: 'import { RudderAnalytics } from "@rudderstack/analytics-js/bundled"; window.RudderAnalytics = RudderAnalytics;',
};

const SEGMENT_PAGE = `
async function run(cfg) {
  const host = new URL(cfg.tracking).host;
  const [analytics] = await window.AnalyticsBrowser.load(
    { writeKey: cfg.writeKey, cdnURL: cfg.tracking },
    { integrations: { "Segment.io": { apiHost: host + "/v1", protocol: "http" } } },
  );
  await analytics.identify("ajs-user-" + cfg.run, { email: "ann@example.com", plan: "pro", seats: 3 });
  await analytics.track("Order Completed " + cfg.run, { orderId: "o-1", revenue: 42.5, items: [{ sku: "s-1", qty: 2 }] });
  await analytics.page("Docs", "Install " + cfg.run, { section: "install" });
  return { version: analytics.VERSION || null };
}`;

const RUDDER_PAGE = `
function run(cfg) {
  return new Promise((resolve, reject) => {
    const analytics = new window.RudderAnalytics();
    const timer = setTimeout(() => reject(new Error("RudderStack SDK never became ready")), 10000);
    analytics.load(cfg.writeKey, cfg.tracking, {
      configUrl: cfg.tracking,
      // Only what this page needs, all compiled into the bundled build.
      plugins: ["XhrQueue", "StorageEncryption", "StorageMigrator"],
      polyfillIfRequired: false,
      logLevel: "WARN",
    });
    analytics.ready(() => {
      clearTimeout(timer);
      analytics.identify("rs-user-" + cfg.run, { email: "bo@example.com", plan: "team", seats: 5 });
      analytics.track("Order Completed " + cfg.run, { orderId: "o-2", revenue: 17.25, items: [{ sku: "s-2", qty: 1 }] });
      analytics.page("Docs", "Install " + cfg.run, { section: "install" });
      resolve({ version: analytics.getVersion ? analytics.getVersion() : null });
    });
  });
}`;

function page(sdk) {
  return `<!doctype html><html><head><meta charset="utf-8"><title>${sdk} test page</title>
<script src="/sdk.js"></script>
<script>${sdk === "segment" ? SEGMENT_PAGE : RUDDER_PAGE}</script>
</head><body><h1>${sdk} test page</h1></body></html>`;
}

async function bundle(sdk) {
  const out = await build({
    stdin: { contents: ENTRIES[sdk], resolveDir: process.cwd(), loader: "js" },
    bundle: true,
    write: false,
    format: "iife",
    platform: "browser",
    target: "es2020",
    logLevel: "silent",
  });
  return out.outputFiles[0].contents;
}

function serve(files) {
  return new Promise((resolve) => {
    const server = createServer((req, res) => {
      const path = new URL(req.url, "http://127.0.0.1").pathname;
      const file = files[path];
      if (!file) {
        res.writeHead(404).end();
        return;
      }
      res.writeHead(200, { "Content-Type": file.type, "Cache-Control": "no-store" }).end(file.body);
    });
    server.listen(0, "127.0.0.1", () => resolve(server));
  });
}

const result = { sdk: opt.sdk, requests: [] };
let browser;
let site;
try {
  const started = Date.now();
  const code = await bundle(opt.sdk);
  result.bundleMs = Date.now() - started;
  site = await serve({
    "/": { type: "text/html; charset=utf-8", body: page(opt.sdk) },
    "/sdk.js": { type: "text/javascript", body: code },
    "/favicon.ico": { type: "image/x-icon", body: "" },
  });
  const origin = `http://127.0.0.1:${site.address().port}`;
  browser = await launch();
  const tab = await browser.context.newPage();
  tab.on("request", (r) => {
    if (r.url().startsWith(opt.tracking)) result.requests.push(`${r.method()} ${r.url().slice(opt.tracking.length)}`);
  });
  const answered = [];
  tab.on("response", (r) => {
    if (r.url().startsWith(opt.tracking)) answered.push(r.status());
  });
  const url = `${origin}/?run=${opt.run}`;
  await tab.goto(url);
  result.pageUrl = url;
  result.loaded = await tab.evaluate(
    (cfg) => run(cfg),
    { tracking: opt.tracking, writeKey: opt["write-key"], run: opt.run },
  );
  // Events leave asynchronously: wait (bounded) until three sends were answered.
  const sends = () => result.requests.filter((r) => r.startsWith("POST ") && !r.endsWith("/m")).length;
  const deadline = Date.now() + 10000;
  while (Date.now() < deadline && (sends() < 3 || answered.length < result.requests.length)) {
    await tab.waitForTimeout(50);
  }
  result.statuses = answered;
  mkdirSync(opt.artifacts, { recursive: true });
  const shot = join(opt.artifacts, `sdk-${opt.sdk}.png`);
  await tab.screenshot({ path: shot });
  result.screenshot = shot;
  result.blocked = browser.blocked;
  result.console = browser.consoleLines;
  await browser.close();
  site.close();
  finish(result);
} catch (err) {
  result.error = String(err && err.stack ? err.stack : err);
  if (browser) {
    result.blocked = browser.blocked;
    result.console = browser.consoleLines;
    await browser.close();
  }
  if (site) site.close();
  finish(result, 1);
}
