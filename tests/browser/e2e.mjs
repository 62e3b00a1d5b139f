#!/usr/bin/env node
// End-to-end check of the duplex web client against a running `duplex serve`, in headless Chromium.
//
//   node tests/browser/e2e.mjs --url http://127.0.0.1:PORT/ --wav /abs/speech48k.wav \
//        --screenshot /abs/out.png [--timeout-ms 30000] [--energy-threshold 1e-4] [--min-packets 50]
//
// Chromium's fake microphone plays the WAV (looped). The script opens the page, waits for
// /api/info to render, connects, waits for `connected` and for the agent's audio to arrive non-silent
// (inbound-rtp totalAudioEnergy and packetsReceived, as the page publishes them on window.duplex),
// takes a full-page screenshot, disconnects, waits for `closed`, and prints one JSON line on stdout.
// On failure it still screenshots if it can, prints {"ok":false,...} and exits 1.
// Uses the system Chromium (CHROMIUM env, default /usr/bin/chromium); downloads no browser.

import { existsSync } from "node:fs";
import path from "node:path";
import process from "node:process";
import { chromium } from "playwright-core";

const USAGE =
  "usage: node e2e.mjs --url http://127.0.0.1:PORT/ --wav /abs/speech48k.wav --screenshot /abs/out.png " +
  "[--timeout-ms 30000] [--energy-threshold 1e-4] [--min-packets 50] [--restart-ice yes]";
const CONSOLE_LINES_KEPT = 50;

const options = parseArgs(process.argv.slice(2));
const consoleLines = [];
const startedAt = Date.now();
const deadline = startedAt + options.timeoutMs;

let browser = null;
let page = null;
let step = "start";
const hangUps = []; // the page's DELETEs and the server's answers: {path, status}

main().then(
  (code) => process.exit(code),
  (err) => {
    // Only reached if reporting itself failed.
    process.stderr.write(`e2e: ${err?.stack || err}\n`);
    process.exit(2);
  },
);

async function main() {
  const watchdog = setTimeout(() => {
    // A hung browser call must not hang CI: report and leave.
    printResult({ ok: false, error: `overall timeout after ${options.timeoutMs} ms (at step: ${step})`, console: consoleLines });
    process.exit(1);
  }, options.timeoutMs + 15000);

  try {
    const result = await run();
    printResult(result);
    return 0;
  } catch (err) {
    const snapshot = await pageSnapshot();
    const screenshot = await takeScreenshot();
    printResult({
      ok: false,
      error: `${step}: ${shortMessage(err)}`,
      state: snapshot?.state ?? null,
      pageError: snapshot?.error ?? null,
      inboundAudioEnergy: snapshot?.inboundAudioEnergy ?? null,
      packetsReceived: snapshot?.inboundPacketsReceived ?? null,
      transcript: snapshot?.transcript ?? null,
      screenshot,
      console: consoleLines,
    });
    return 1;
  } finally {
    clearTimeout(watchdog);
    await closeBrowser();
  }
}

async function run() {
  step = "launch chromium";
  browser = await chromium.launch({
    executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
    headless: true,
    // Playwright adds --mute-audio: the page's <audio> element still renders the agent's audio (so
    // inbound-rtp audio energy counts), it just doesn't reach the speakers of whoever runs this.
    args: [
      "--no-sandbox",
      "--disable-gpu",
      "--disable-quic",
      "--no-first-run",
      "--disable-background-networking",
      "--disable-component-update",
      "--disable-sync",
      "--use-fake-ui-for-media-stream",
      "--use-fake-device-for-media-stream",
      `--use-file-for-fake-audio-capture=${options.wav}`,
      "--autoplay-policy=no-user-gesture-required",
      "--allow-loopback-in-peer-connection",
      "--disable-features=WebRtcHideLocalIpsWithMdns",
    ],
    timeout: remainingMs(),
  });
  const context = await browser.newContext({ viewport: { width: 1280, height: 900 } });
  page = await context.newPage();
  page.on("console", onConsole);
  page.on("pageerror", (err) => remember("pageerror", err.message, true));
  page.on("response", (response) => {
    const request = response.request();
    if (request.method() === "DELETE") hangUps.push({ path: new URL(request.url()).pathname, status: response.status() });
  });
  page.on("requestfailed", (request) => {
    const failure = request.failure()?.errorText ?? "failed";
    // Aborted keepalive DELETEs at teardown are expected noise.
    if (!failure.includes("ERR_ABORTED")) remember("requestfailed", `${request.method()} ${request.url()}: ${failure}`, true);
  });

  step = "open page";
  await page.goto(options.url, { waitUntil: "domcontentloaded", timeout: remainingMs() });

  step = "wait for /api/info to render";
  await page.waitForFunction(() => window.duplex?.info && document.body.dataset.info === "loaded", null, {
    timeout: remainingMs(),
  });

  step = "connect";
  await page.click("#connect", { timeout: remainingMs() });

  step = "wait for state connected";
  const connectedState = await page.waitForFunction(
    () => {
      const state = window.duplex?.state;
      return state === "connected" || state === "failed" || state === "closed" ? state : false;
    },
    null,
    { timeout: remainingMs(), polling: 100 },
  );
  const stateAfterConnect = await connectedState.jsonValue();
  if (stateAfterConnect !== "connected") {
    const pageError = await page.evaluate(() => window.duplex?.error);
    throw new Error(`page went to "${stateAfterConnect}" instead of "connected"${pageError ? `: ${pageError}` : ""}`);
  }

  step = "wait for non-silent agent audio";
  const audioOutcome = await page.waitForFunction(
    ({ energyThreshold, minPackets }) => {
      const d = window.duplex;
      if (d.state !== "connected") return `state:${d.state}`;
      return d.inboundAudioEnergy > energyThreshold && d.inboundPacketsReceived > minPackets ? "audio" : false;
    },
    { energyThreshold: options.energyThreshold, minPackets: options.minPackets },
    { timeout: remainingMs(), polling: 200 },
  );
  const audioResult = await audioOutcome.jsonValue();
  if (audioResult !== "audio") {
    const pageError = await page.evaluate(() => window.duplex?.error);
    throw new Error(`connection ended before audio arrived (${audioResult})${pageError ? `: ${pageError}` : ""}`);
  }
  const connected = await pageSnapshot();
  const restart = options.restartIce ? await restartIceAndHearMore(connected) : null;

  step = "screenshot";
  await page.screenshot({ path: options.screenshot, fullPage: true, timeout: remainingMs() });

  step = "disconnect";
  const disconnectButton = (await page.locator("#disconnect").count()) > 0 ? "#disconnect" : "#connect";
  await page.click(disconnectButton, { timeout: remainingMs() });

  step = "wait for state closed";
  await page.waitForFunction(() => window.duplex?.state === "closed", null, { timeout: remainingMs(), polling: 100 });

  step = "wait for recording";
  const recording = await page
    .waitForFunction(() => window.duplex?.recording, null, { timeout: Math.min(3000, remainingMs()) })
    .then((handle) => handle.jsonValue())
    .catch(() => null);

  step = "wait for the hang-up's answer";
  await waitUntil(() => hangUps.length > 0, Math.min(3000, remainingMs()));

  const closed = await pageSnapshot();
  return {
    ok: true,
    state: closed.state,
    session: connected.session,
    inboundAudioEnergy: connected.inboundAudioEnergy,
    packetsReceived: connected.inboundPacketsReceived,
    transcript: closed.transcript,
    serverStats: closed.lastStats,
    link: connected.link,
    recordingBytes: recording?.bytes ?? null,
    hangUps,
    restart,
    elapsedMs: Date.now() - startedAt,
    screenshot: options.screenshot,
  };
}

// The page's ICE restart (what a network change triggers), then 5 s more of the agent's audio
// on the same session: past the server's ICE timeouts when the test sets them short.
async function restartIceAndHearMore(before) {
  step = "restart ICE";
  await page.evaluate(() => window.duplex.restartIce());
  step = "wait for more audio after the ICE restart";
  const outcome = await page.waitForFunction(
    ({ packetsBefore }) => {
      const d = window.duplex;
      if (d.state !== "connected") return `state:${d.state}`;
      if (d.lastIceRestart?.startsWith("failed")) return d.lastIceRestart;
      return d.lastIceRestart === "answered" && d.inboundPacketsReceived > packetsBefore + 250 ? "audio" : false;
    },
    { packetsBefore: before.inboundPacketsReceived },
    { timeout: remainingMs(), polling: 200 },
  );
  const result = await outcome.jsonValue();
  if (result !== "audio") throw new Error(`the call did not go on after the ICE restart (${result})`);
  const after = await pageSnapshot();
  return {
    session: after.session,
    iceRestarts: after.iceRestarts,
    lastIceRestart: after.lastIceRestart,
    packetsBefore: before.inboundPacketsReceived,
    packetsAfter: after.inboundPacketsReceived,
  };
}

// ───────────────────────────── helpers ─────────────────────────────

function parseArgs(argv) {
  const values = {};
  for (let argIdx = 0; argIdx < argv.length; argIdx += 1) {
    const arg = argv[argIdx];
    if (arg === "--help" || arg === "-h") exitUsage(0);
    const match = /^--([a-z-]+)(?:=(.*))?$/.exec(arg);
    if (!match) exitUsage(2, `unexpected argument: ${arg}`);
    const value = match[2] ?? argv[++argIdx];
    if (value === undefined) exitUsage(2, `missing value for --${match[1]}`);
    values[match[1]] = value;
  }
  for (const required of ["url", "wav", "screenshot"]) {
    if (!values[required]) exitUsage(2, `--${required} is required`);
  }
  const wav = path.resolve(values.wav);
  if (!existsSync(wav)) exitUsage(2, `--wav: no such file: ${wav}`);
  const options = {
    url: values.url,
    wav,
    screenshot: path.resolve(values.screenshot),
    timeoutMs: Number(values["timeout-ms"] ?? 30000),
    energyThreshold: Number(values["energy-threshold"] ?? 1e-4),
    minPackets: Number(values["min-packets"] ?? 50),
    restartIce: values["restart-ice"] === "yes",
  };
  for (const [name, value] of Object.entries({ "timeout-ms": options.timeoutMs, "energy-threshold": options.energyThreshold, "min-packets": options.minPackets })) {
    if (!Number.isFinite(value) || value < 0) exitUsage(2, `--${name} must be a non-negative number`);
  }
  return options;
}

function exitUsage(code, message) {
  if (message) {
    printResult({ ok: false, error: `bad arguments: ${message}`, console: [] });
    process.stderr.write(`e2e: ${message}\n`);
  }
  process.stderr.write(`${USAGE}\n`);
  process.exit(code);
}

// Playwright messages carry ANSI colours and a multi-line call log; keep the first part.
function shortMessage(err) {
  const message = String(err?.message ?? err);
  return message.split("\nCall log:")[0].replace(/\u001b\[[0-9;]*m/g, "").trim();
}

function remainingMs() {
  return Math.max(1, deadline - Date.now());
}

function onConsole(message) {
  const isError = message.type() === "error";
  remember(message.type(), message.text(), isError);
}

function remember(kind, text, toStderr) {
  const line = `[${kind}] ${text}`;
  consoleLines.push(line);
  if (consoleLines.length > CONSOLE_LINES_KEPT) consoleLines.shift();
  if (toStderr) process.stderr.write(`page ${line}\n`);
}

async function pageSnapshot() {
  if (!page) return null;
  return page
    .evaluate(() => {
      const d = window.duplex ?? {};
      return {
        state: d.state,
        session: d.session,
        error: d.error,
        inboundAudioEnergy: d.inboundAudioEnergy,
        inboundPacketsReceived: d.inboundPacketsReceived,
        transcript: d.transcript,
        lastStats: d.lastStats,
        link: d.link,
        iceRestarts: d.iceRestarts,
        lastIceRestart: d.lastIceRestart,
      };
    })
    .catch(() => null);
}

async function takeScreenshot() {
  if (!page) return null;
  try {
    await page.screenshot({ path: options.screenshot, fullPage: true, timeout: 5000 });
    return options.screenshot;
  } catch {
    return null;
  }
}

async function closeBrowser() {
  if (!browser) return;
  const closing = browser.close().catch(() => {});
  await Promise.race([closing, new Promise((resolve) => setTimeout(resolve, 5000))]);
}

function printResult(result) {
  process.stdout.write(`${JSON.stringify(result)}\n`);
}

async function waitUntil(check, limitMs) {
  const until = Date.now() + limitMs;
  while (!check() && Date.now() < until) await new Promise((resolve) => setTimeout(resolve, 50));
}
