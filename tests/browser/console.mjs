// Drives the console as a person would: sign in, create a source, watch an
// event arrive live, run a funnel, read the success-metrics report.
//
// node console.mjs --console URL --token T --tracking URL --artifacts DIR
// Prints one JSON line with what it saw; exits non-zero on failure.
import { mkdirSync } from "node:fs";
import { join } from "node:path";
import { args, finish, launch, sleep } from "./common.mjs";

const opt = args();
const result = { steps: [], screenshots: [] };
const started = Date.now();
const mark = (step) => result.steps.push(`${step} at ${Date.now() - started} ms`);
const { context, blocked, consoleLines, close } = await launch();
mkdirSync(opt.artifacts, { recursive: true });
const page = await context.newPage();
page.setDefaultTimeout(10_000);

async function shot(name) {
  const path = join(opt.artifacts, `console-${name}.png`);
  await page.screenshot({ path, fullPage: true });
  result.screenshots.push(path);
}

async function post(writeKey, path, body) {
  return fetch(`${opt.tracking}${path}`, {
    method: "POST",
    headers: {
      "Content-Type": "application/json",
      Authorization: "Basic " + Buffer.from(`${writeKey}:`).toString("base64"),
    },
    body: typeof body === "string" ? body : JSON.stringify(body),
  });
}

/** The gateway picks up a new key within about a second: retry a bounded number of times. */
async function postUntilAccepted(writeKey, path, body) {
  const deadline = Date.now() + 8000;
  for (let attempt = 0; attempt < 40 && Date.now() < deadline; attempt++) {
    const response = await post(writeKey, path, body);
    if (response.status === 200) return attempt;
    await sleep(200);
  }
  throw new Error(`the new write key was not accepted at ${path}`);
}

try {
  // 1. Sign in.
  await page.goto(opt.console);
  await page.waitForSelector("#login:not([hidden])");
  await page.fill("#login-token", "not-the-token");
  await page.click("#login-form button[type=submit]");
  await page.waitForFunction(() => document.querySelector("#login-error").textContent.length > 0);
  result.wrongTokenMessage = await page.textContent("#login-error");
  await shot("signin");
  await page.fill("#login-token", opt.token);
  await page.click("#login-form button[type=submit]");
  await page.waitForSelector("#tabs:not([hidden])");
  await page.waitForSelector("#view-sources:not([hidden]) #sources-table tbody tr[data-source]");
  mark("signed in");

  // 2. Create a source, read its key and its snippets from the page.
  const name = `web-${Date.now().toString(36)}`;
  await page.fill("#source-name", name);
  await page.click("#source-form button[type=submit]");
  await page.waitForSelector(`#sources-table tr[data-source="${name}"]`);
  const writeKey = (await page.textContent(`#sources-table tr[data-source="${name}"] .key`)).trim();
  await page.waitForSelector("#snippet-code");
  await page.click('#snippets button[data-sdk="curl"]');
  const curl = await page.textContent("#snippet-code");
  result.source = { name, writeKey, curlSnippetHasKey: curl.includes(writeKey) };
  result.snippetNames = await page.$$eval("#snippets button[data-sdk]", (b) => b.map((x) => x.dataset.sdk));
  await page.click('#snippets button[data-sdk="analytics-next (npm)"]');
  await context.grantPermissions(["clipboard-read", "clipboard-write"], { origin: opt.console });
  await page.click("#snippets .view-head button:has-text('Copy')");
  await page.waitForSelector("#snippets .view-head button:has-text('Copied')");
  result.copiedSnippet = await page.evaluate(() => navigator.clipboard.readText());
  // Rotate another source's key (after confirming): the table shows the new key.
  page.once("dialog", (dialog) => dialog.accept());
  await page.click('#sources-table tr[data-source="default"] button:has-text("Rotate key")');
  await page.waitForFunction(() => document.querySelector('#sources-table tr[data-source="default"] .key').textContent !== "WRITE_KEY");
  result.rotatedKey = (await page.textContent('#sources-table tr[data-source="default"] .key')).trim();
  await shot("sources");
  mark("created source");

  // 3. Live debugger: connect, then send one event with the new key.
  await page.click('#tabs a[data-tab="live"]');
  await page.waitForFunction(() => document.querySelector("#live-state").textContent === "live");
  const attempts = await postUntilAccepted(writeKey, "/v1/track", {
    userId: "warm-up",
    event: "Key Ready",
  });
  result.keyActivationRetries = attempts;
  await page.waitForSelector("#live-list li[data-kind=event]");
  const eventName = `Live Check ${Date.now()}`;
  const sent = Date.now();
  const response = await post(writeKey, "/v1/track", {
    userId: "live-user-1",
    event: eventName,
    properties: { plan: "pro", seats: 3 },
    context: { page: { url: "https://shop.example/pricing?utm_source=news&utm_campaign=spring" } },
  });
  const acked = Date.now();
  if (response.status !== 200) throw new Error(`track returned ${response.status}`);
  await page.waitForFunction(
    (n) => [...document.querySelectorAll("#live-list li[data-kind=event]")].some((li) => li.textContent.includes(n)),
    eventName,
    { timeout: 5000, polling: 20 },
  );
  result.liveLatencyMs = Date.now() - acked;
  result.liveLatencyFromSendMs = Date.now() - sent;
  await page.click(`#live-list li[data-kind=event]:has-text("${eventName}")`);
  const payload = JSON.parse(await page.textContent("#live-payload"));
  result.livePayload = payload;
  // A refused request shows with its reason and the body that was sent.
  const bad = await post(writeKey, "/v1/identify", { traits: { plan: "pro" } });
  result.refusedStatus = bad.status;
  const refusedRow = '#live-list li[data-kind=rejection]:has-text("/v1/identify")';
  await page.waitForSelector(refusedRow, { timeout: 5000 });
  result.refusedLatencyMs = Date.now() - acked;
  result.refusedText = await page.textContent(refusedRow);
  await page.click(refusedRow);
  result.refusedDetail = await page.textContent("#live-detail");
  // Pause holds new entries back; resume shows them.
  await page.click("#live-pause");
  const before = await page.$$eval("#live-list li", (l) => l.length);
  await post(writeKey, "/v1/track", { userId: "live-user-2", event: "While Paused" });
  await page.waitForFunction(() => document.querySelector("#live-pause").textContent.includes("1 new"), null, { timeout: 5000 });
  result.pausedHeldBack = (await page.$$eval("#live-list li", (l) => l.length)) === before;
  await page.click("#live-pause");
  await page.waitForSelector('#live-list li:has-text("While Paused")');
  await page.click(`#live-list li[data-kind=event]:has-text("${eventName}")`);
  await shot("live");
  mark("live debugger");

  // 4. One event the webhook refuses for good: it becomes a dead letter.
  const refused = await post(writeKey, "/v1/track", { userId: "f-dan", event: "Reject Me", properties: { why: "test" } });
  if (refused.status !== 200) throw new Error(`track returned ${refused.status}`);

  // Data for a funnel: three people sign up, two check out, one pays.
  const now = Date.now();
  const batch = [];
  for (const [i, user] of ["f-ann", "f-bob", "f-cy"].entries()) {
    batch.push({ type: "track", userId: user, event: "Signed Up", timestamp: new Date(now - 60000).toISOString() });
    if (i < 2) batch.push({ type: "track", userId: user, event: "Checkout Started", timestamp: new Date(now - 40000).toISOString() });
    if (i < 1) batch.push({ type: "track", userId: user, event: "Order Completed", timestamp: new Date(now - 20000).toISOString(), properties: { revenue: 42 } });
  }
  const b = await post(writeKey, "/v1/batch", { batch });
  if (b.status !== 200) throw new Error(`batch returned ${b.status}`);
  await page.waitForSelector('#live-list li:has-text("Order Completed")');

  await page.click('#tabs a[data-tab="insights"]');
  // The tab's first load (suggested steps) finishes before the user edits.
  await page.waitForSelector("#users-total");
  await page.waitForSelector("#retention-table table, #retention-table p");
  const steps = ["Signed Up", "Checkout Started", "Order Completed"];
  await page.click("#funnel-add");
  const inputs = await page.$$("#funnel-steps input");
  for (const [i, step] of steps.entries()) await inputs[i].fill(step);
  await page.fill("#funnel-within", "1");
  await page.selectOption("#funnel-unit", "3600");
  await page.click("#funnel-form button[type=submit]");
  await page.waitForFunction(
    () => document.querySelectorAll("#funnel-chart svg .funnel-bar").length === 3 &&
      document.querySelector("#funnel-chart svg").textContent.includes("Order Completed"),
  );
  result.funnelText = await page.textContent("#funnel-chart svg");
  await page.fill("#retention-start", "Signed Up");
  await page.selectOption("#retention-bucket", "day");
  await page.click("#retention-form button[type=submit]");
  await page.waitForFunction(() => document.querySelector("#retention-table td.cell") !== null &&
    document.querySelector("#retention-table tbody td.num").textContent === "3");
  result.uniqueUsers = await page.textContent("#users-total");
  await shot("insights");
  mark("funnel");

  // 5. Volumes chart.
  await page.click('#tabs a[data-tab="volumes"]');
  await page.waitForSelector("#volumes-chart svg rect, #volumes-chart svg path");
  result.volumesSeries = await page.$$eval("#volumes-table tbody tr", (rows) => rows.map((r) => r.textContent));
  await shot("volumes");

  // 6. Success metrics.
  await page.click('#tabs a[data-tab="report"]');
  await page.waitForSelector('#report [data-metric="north_star"]');
  result.report = {
    levels: await page.$$eval("#report section[data-level]", (s) => s.map((x) => x.dataset.level)),
    metrics: await page.$$eval("#report [data-metric]", (m) => m.map((x) => x.dataset.metric)),
    summary: await page.textContent("#report-summary"),
    northStar: await page.textContent('#report [data-metric="north_star"]'),
    volume: await page.textContent('#report [data-metric="volume"] .value'),
    anomalies: await page.textContent("#anomalies"),
  };
  await shot("report");
  mark("report");

  // 7. Delivery per destination, then the dead letter and its replay.
  await page.click('#tabs a[data-tab="delivery"]');
  await page.waitForSelector("#delivery-source .flow");
  await page.waitForSelector(`#delivery-table tr[data-destination="${opt.destination}"]`);
  await page.waitForSelector(".discard", { timeout: 8000 });
  await page.click(".discard summary");
  result.deliveryRow = await page.$$eval(`#delivery-table tr[data-destination="${opt.destination}"] td`, (c) => c.map((x) => x.textContent));
  result.deliveryHeaders = await page.$$eval("#delivery-table th", (c) => c.map((x) => x.textContent));
  result.deliveryText = await page.textContent("#view-delivery");
  await shot("delivery");
  await page.click('#tabs a[data-tab="deadletters"]');
  await page.waitForSelector("#dead-table tbody tr.clickable");
  await page.click("#dead-table tbody tr.clickable td:nth-child(4)");
  result.deadLettersText = await page.textContent("#dead-table tbody");
  await page.check("#dead-table tbody tr.clickable input[type=checkbox]");
  await shot("deadletters");
  await page.click("#dead-replay-selected");
  await page.waitForFunction(() => document.querySelector("#dead-message").textContent.startsWith("Replayed"));
  result.replayMessage = await page.textContent("#dead-message");
  await page.waitForSelector("#dead-table tbody td.muted");
  result.deadLettersAfter = await page.textContent("#dead-table tbody");
  mark("delivery");
  // 8. Live filters, then the cap on entries kept in the page.
  await page.click('#tabs a[data-tab="live"]');
  await page.fill("#live-event", "While Paused");
  await page.click("#live-filters button[type=submit]");
  await page.waitForSelector('#live-list li:has-text("While Paused")');
  await page.waitForTimeout(400);
  result.filtered = await page.$$eval("#live-list li", (l) => l.map((x) => x.dataset.kind + ":" + x.querySelector(".what").textContent));
  await page.fill("#live-event", "");
  await page.click("#live-filters button[type=submit]");
  await page.waitForFunction(() => document.querySelector("#live-state").textContent === "live");
  // The server streams at most 200 events of each pipeline step: one batch at a time.
  for (let i = 0; i < 3; i++) {
    const flood = Array.from({ length: 200 }, (_, k) => ({ type: "track", userId: "flood", event: `Flood ${i * 200 + k}` }));
    const r = await post(writeKey, "/v1/batch", { batch: flood });
    if (r.status !== 200) throw new Error(`flood batch returned ${r.status}`);
    await page.waitForSelector(`#live-list li:has-text("Flood ${i * 200 + 199}")`, { timeout: 5000 });
  }
  result.liveEntriesAfterFlood = await page.$$eval("#live-list li", (l) => l.length);
  result.liveCountShown = await page.textContent("#live-count");
  mark("live cap");

  // 9. Sign out: the session cookie is gone.
  await page.click("#sign-out");
  await page.waitForSelector("#login:not([hidden])");
  result.statusAfterSignOut = await page.evaluate(() => fetch("/api/status").then((r) => r.status));
  result.blocked = blocked;
  result.console = consoleLines;
  await close();
  finish(result);
} catch (err) {
  result.error = String(err && err.stack ? err.stack : err);
  result.blocked = blocked;
  result.console = consoleLines;
  try {
    await shot("failure");
  } catch {
    // the page may be gone
  }
  await close();
  finish(result, 1);
}
