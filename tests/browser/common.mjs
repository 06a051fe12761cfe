// Shared by the browser drivers: a headless Chromium that may only reach loopback.
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { chromium } from "playwright-core";

export const CHROMIUM = process.env.HEADWATER_CHROMIUM || "/usr/bin/chromium";

const FLAGS = [
  "--headless",
  "--no-sandbox",
  "--disable-gpu",
  "--disable-quic",
  "--no-first-run",
  "--disable-background-networking",
  "--disable-component-update",
  "--disable-sync",
];

export function isLoopback(url) {
  let host;
  try {
    host = new URL(url).hostname;
  } catch {
    return false;
  }
  return host === "127.0.0.1" || host === "[::1]" || host === "localhost";
}

/**
 * Launch Chromium with a fresh profile. Host names other than localhost do not
 * resolve, so nothing beyond loopback can be reached; every request for a
 * non-loopback URL is still recorded in `blocked`, so a test can assert that an
 * SDK never reached for a CDN. (Requests are observed, not intercepted:
 * interception would change how CORS preflights are answered.)
 */
export async function launch() {
  const profile = mkdtempSync(join(tmpdir(), "headwater-chromium-"));
  const context = await chromium.launchPersistentContext(profile, {
    executablePath: CHROMIUM,
    headless: true,
    args: [...FLAGS, "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE localhost, EXCLUDE 127.0.0.1, EXCLUDE [::1]"],
    viewport: { width: 1360, height: 900 },
    timeout: 30_000,
  });
  const blocked = [];
  const consoleLines = [];
  context.on("request", (request) => {
    const url = request.url();
    if (!isLoopback(url) && !url.startsWith("data:") && !url.startsWith("blob:")) blocked.push(url);
  });
  context.on("page", (page) => watch(page, consoleLines));
  for (const page of context.pages()) watch(page, consoleLines);
  const close = async () => {
    try {
      await context.close();
    } finally {
      rmSync(profile, { recursive: true, force: true });
    }
  };
  return { context, blocked, consoleLines, close };
}

function watch(page, lines) {
  page.on("console", (msg) => {
    if (lines.length < 200) lines.push(`${msg.type()}: ${msg.text()}`.slice(0, 500));
  });
  page.on("pageerror", (err) => {
    if (lines.length < 200) lines.push(`pageerror: ${err.message}`.slice(0, 500));
  });
}

/** Parse `--name value` pairs into an object. */
export function args() {
  const out = {};
  const argv = process.argv.slice(2);
  for (let i = 0; i < argv.length; i += 2) out[argv[i].replace(/^--/, "")] = argv[i + 1];
  return out;
}

/** Print one JSON result line for the Python side and exit. */
export function finish(result, code = 0) {
  process.stdout.write(JSON.stringify(result) + "\n");
  process.exitCode = code;
}

export function sleep(ms) {
  return new Promise((resolve) => setTimeout(resolve, ms));
}
