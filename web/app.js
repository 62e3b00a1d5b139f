// duplex web client: one page, no build step, no dependencies.
//
// Talks only to the documented endpoints:
//   GET    /api/info            engine, voices, role prompt presets, limits
//   GET    /api/ice             STUN/TURN servers for this call's peer (bearer token)
//   POST   /api/offer           SDP offer (non-trickle) → SDP answer, session id and resource
//   PATCH  <resource>           ICE restart on a network change: offer → answer, same session
//   DELETE <resource>           hang up
// (the resource, /api/sessions/<key>, is unguessable: only this page can restart or end its call)
// plus the WebRTC data channel "events" (ready, text, stats, error).
//
// The agent's audio plays through an <audio> element so the browser's echo canceller hears it;
// Web Audio is used only to measure levels and to record, never connected to the speakers.

const ICE_GATHERING_CAP_MS = 3000;
const CONNECT_TIMEOUT_MS = 20000;
// How long a live call may stay disconnected before the page restarts ICE, and how often.
const ICE_RESTART_DELAY_MS = 1500;
const MAX_ICE_RESTARTS = 5;
const STATS_INTERVAL_MS = 1000;
const TRANSCRIPT_TURN_GAP_MS = 1500;
const RECORDER_TIMESLICE_MS = 1000;
const METER_FLOOR_DB = -60;
const TOKEN_STORAGE_KEY = "duplex.token";
const VOICE_STORAGE_KEY = "duplex.voice";
const CUSTOM_PROMPT_VALUE = "__custom__";

const MIC_CONSTRAINTS = {
  audio: { echoCancellation: true, noiseSuppression: true, autoGainControl: true, channelCount: 1 },
  video: false,
};

const STATE_LABELS = {
  idle: "Idle",
  connecting: "Connecting…",
  connected: "Connected",
  failed: "Failed",
  closed: "Closed",
};

const ui = {
  engineChip: byId("engine-chip"),
  engineLabel: byId("engine-label"),
  engineName: byId("engine-name"),
  status: byId("status"),
  statusText: byId("status-text"),
  notice: byId("notice"),
  noticeText: byId("notice-text"),
  setup: byId("setup"),
  voice: byId("voice"),
  preset: byId("preset"),
  personaSummary: byId("persona-summary"),
  prompt: byId("prompt"),
  promptCounter: byId("prompt-counter"),
  tokenField: byId("token-field"),
  token: byId("token"),
  error: byId("error"),
  errorText: byId("error-text"),
  connect: byId("connect"),
  connectLabel: byId("connect-label"),
  connectHint: byId("connect-hint"),
  sessionId: byId("session-id"),
  meterAgent: byId("meter-agent"),
  meterAgentDb: byId("level-agent-db"),
  meterMic: byId("meter-mic"),
  meterMicDb: byId("level-mic-db"),
  transcript: byId("transcript"),
  transcriptPlaceholder: byId("transcript-placeholder"),
  recordingStatus: byId("recording-status"),
  download: byId("download"),
  metricRtt: byId("m-rtt"),
  metricJitter: byId("m-jitter"),
  metricLoss: byId("m-loss"),
  metricPackets: byId("m-packets"),
  metricEnergy: byId("m-energy"),
  metricJitterBuffer: byId("m-jb"),
  serverStats: byId("server-stats"),
  serverStatsEmpty: byId("server-stats-empty"),
  version: byId("version"),
  agentAudio: byId("agent-audio"),
};

// What tests (and curious humans in the console) read. Kept current as things change.
const duplex = {
  state: "idle",
  session: null,
  info: null,
  lastStats: null, // last {"type":"stats"} event from the server
  link: null, // last summary of pc.getStats(): rttMs, jitterMs, packetsReceived, …
  inboundAudioEnergy: 0, // inbound-rtp totalAudioEnergy of the agent's audio
  inboundPacketsReceived: 0,
  transcript: "", // every text piece, concatenated as received
  error: null,
  recording: null, // { url, mimeType, bytes, durationMs } once a recording is ready
  iceRestarts: 0, // ICE restarts in this call (a network change), each answered on the same session
  lastIceRestart: null, // "answered" or "failed: why"
  restartIce: () => call && restartIce(call),
};
window.duplex = duplex;

// The current call's resources; null when there is none.
let call = null;
let info = null;
let recordingUrl = null;

// ───────────────────────────── startup ─────────────────────────────

function boot() {
  setState("idle");
  ui.connect.addEventListener("click", onConnectButton);
  // Enter in the token field starts a conversation; nothing ever navigates away.
  ui.setup.addEventListener("submit", (event) => {
    event.preventDefault();
    if (!call && !ui.connect.disabled) connect();
  });
  ui.preset.addEventListener("change", onPresetChange);
  ui.prompt.addEventListener("input", onPromptInput);
  ui.voice.addEventListener("change", () => safeStore(VOICE_STORAGE_KEY, ui.voice.value));
  ui.token.value = safeLoad(TOKEN_STORAGE_KEY) ?? "";
  ui.token.addEventListener("input", () => safeStore(TOKEN_STORAGE_KEY, ui.token.value.trim()));
  window.addEventListener("pagehide", hangUpOnUnload);
  loadInfo();
}

async function loadInfo() {
  try {
    const response = await fetch("/api/info", { headers: { Accept: "application/json" } });
    if (!response.ok) throw await errorFromResponse(response);
    info = await response.json();
  } catch (err) {
    showError(`Couldn't load the server's settings: ${err.message} Retrying…`);
    setTimeout(loadInfo, 3000);
    return;
  }
  duplex.info = info;
  clearError();
  renderInfo(info);
}

function renderInfo(serverInfo) {
  ui.engineLabel.textContent = serverInfo.model ? "model" : "engine";
  ui.engineName.textContent = serverInfo.model ?? serverInfo.engine;
  ui.engineChip.title = serverInfo.model ? `Engine ${serverInfo.engine}, model ${serverInfo.model}` : `Engine ${serverInfo.engine}`;
  document.body.dataset.engine = serverInfo.engine;
  ui.version.textContent = serverInfo.version ? `duplex v${serverInfo.version}` : "duplex";
  renderNotice(serverInfo.notice);
  renderVoices(serverInfo.voices ?? [], serverInfo.default_voice);
  renderPresets(serverInfo.prompts ?? []);
  ui.tokenField.hidden = !serverInfo.auth_required;
  updatePromptCounter();
  document.body.dataset.info = "loaded";
  updateControls();
}

function renderNotice(notice) {
  ui.notice.hidden = !notice;
  if (notice) ui.noticeText.replaceChildren(...textWithInlineCode(notice));
}

// Turns "run `duplex fetch`" into text and <code> nodes, never parsing HTML.
function textWithInlineCode(text) {
  return text.split("`").map((part, partIdx) => {
    if (partIdx % 2 === 0) return document.createTextNode(part);
    const code = document.createElement("code");
    code.textContent = part;
    return code;
  });
}

function renderVoices(voices, defaultVoice) {
  if (voices.length === 0) {
    ui.voice.replaceChildren(new Option("No voices for this engine", ""));
    ui.voice.disabled = true;
    return;
  }
  ui.voice.replaceChildren(...voices.map((name) => new Option(name, name)));
  const remembered = safeLoad(VOICE_STORAGE_KEY);
  ui.voice.value = voices.includes(remembered) ? remembered : defaultVoice ?? voices[0];
  ui.voice.disabled = false;
}

function renderPresets(prompts) {
  const options = prompts.map((preset, presetIdx) => new Option(preset.name, String(presetIdx)));
  options.push(new Option("Custom", CUSTOM_PROMPT_VALUE));
  ui.preset.replaceChildren(...options);
  ui.preset.disabled = false;
  if (prompts.length > 0) {
    ui.preset.value = "0";
    ui.prompt.value = prompts[0].text;
  } else {
    ui.preset.value = CUSTOM_PROMPT_VALUE;
  }
}

function onPresetChange() {
  const preset = info?.prompts?.[Number(ui.preset.value)];
  if (preset) ui.prompt.value = preset.text;
  updatePromptCounter();
  updateControls();
}

function onPromptInput() {
  const selected = info?.prompts?.[Number(ui.preset.value)];
  if (selected && selected.text !== ui.prompt.value) ui.preset.value = CUSTOM_PROMPT_VALUE;
  updatePromptCounter();
  updateControls();
}

// Counted in code points, as the server counts Unicode characters.
function promptLength() {
  return [...ui.prompt.value].length;
}

function promptTooLong() {
  const maxChars = info?.max_prompt_chars;
  return Boolean(maxChars) && promptLength() > maxChars;
}

function updatePromptCounter() {
  const maxChars = info?.max_prompt_chars;
  const length = promptLength();
  ui.promptCounter.textContent = maxChars ? `${formatInteger(length)} / ${formatInteger(maxChars)}` : formatInteger(length);
  ui.promptCounter.classList.toggle("over", promptTooLong());
}

// ───────────────────────────── state ─────────────────────────────

function setState(state) {
  duplex.state = state;
  document.body.dataset.state = state;
  ui.statusText.textContent = STATE_LABELS[state] ?? state;
  updateControls();
}

function updateControls() {
  const state = duplex.state;
  const inCall = state === "connecting" || state === "connected";
  ui.voice.disabled = inCall || !info || (info.voices ?? []).length === 0;
  ui.preset.disabled = inCall || !info;
  ui.prompt.disabled = inCall;
  ui.token.disabled = inCall;

  if (state === "connecting") {
    ui.connect.dataset.action = "cancel";
    ui.connectLabel.textContent = "Cancel";
  } else if (state === "connected") {
    ui.connect.dataset.action = "disconnect";
    ui.connectLabel.textContent = "End conversation";
  } else {
    ui.connect.dataset.action = "connect";
    ui.connectLabel.textContent = "Start conversation";
  }
  ui.connect.disabled = !info || (!inCall && promptTooLong());
  ui.connectHint.textContent = connectHint(state);
}

function connectHint(state) {
  if (!inCallState(state) && promptTooLong()) return `The role prompt is limited to ${formatInteger(info.max_prompt_chars)} characters.`;
  if (state === "connecting") return "Setting up a secure audio link…";
  if (state === "connected") return "Just talk — the agent listens while it speaks.";
  return "Uses your microphone. Headphones give the best full-duplex experience.";
}

function inCallState(state) {
  return state === "connecting" || state === "connected";
}

function onConnectButton() {
  if (call) disconnect();
  else connect();
}

// ───────────────────────────── connect ─────────────────────────────

async function connect() {
  clearError();
  resetTranscript();
  resetServerStats();
  resetLinkMetrics();
  clearRecording();

  // Created inside the click so the autoplay policy lets it run.
  const thisCall = {
    audioContext: createAudioContext(),
    pc: null,
    channel: null,
    micStream: null,
    micSource: null,
    agentStream: null,
    agentSource: null,
    meters: [],
    meterFrame: 0,
    recording: null,
    statsTimer: 0,
    connectTimer: 0,
    restartTimer: 0,
    restarts: 0,
    restarting: false,
    sessionId: null,
    resource: null,
    ending: false,
  };
  call = thisCall;
  duplex.session = null;
  duplex.iceRestarts = 0;
  duplex.lastIceRestart = null;
  ui.personaSummary.textContent = personaSummary();
  setState("connecting");

  try {
    thisCall.micStream = await openMicrophone();
    ensureCurrent(thisCall);
    addMicMeter(thisCall);

    const ice = await fetchIceConfig();
    ensureCurrent(thisCall);
    const pc = createPeerConnection(thisCall, ice);
    const micTrack = thisCall.micStream.getAudioTracks()[0];
    pc.addTransceiver(micTrack, { direction: "sendrecv", streams: [thisCall.micStream] });
    thisCall.channel = openEventChannel(thisCall);

    await pc.setLocalDescription(await pc.createOffer());
    await waitForIceGatheringComplete(pc, ICE_GATHERING_CAP_MS);
    ensureCurrent(thisCall);
    if (!/^a=candidate:/m.test(pc.localDescription.sdp) && ice.iceTransportPolicy === "relay") {
      throw new Error("The server relays every call through its TURN server, and that server gave this browser no relay address. It may be unreachable from this network.");
    }

    const answer = await postOffer({
      sdp: pc.localDescription.sdp,
      type: "offer",
      voice: ui.voice.value || info?.default_voice || null,
      prompt: ui.prompt.value,
    });
    thisCall.sessionId = answer.session ?? null;
    thisCall.resource = sessionResource(answer);
    if (call !== thisCall) {
      // Cancelled while the server was answering: it now holds a session nobody will use.
      if (thisCall.resource) deleteSession(thisCall.resource);
      return;
    }
    duplex.session = thisCall.sessionId;
    showSessionId(thisCall.sessionId);

    await pc.setRemoteDescription({ type: "answer", sdp: answer.sdp });
    ensureCurrent(thisCall);
    thisCall.connectTimer = setTimeout(() => onConnectTimeout(thisCall), CONNECT_TIMEOUT_MS);
  } catch (err) {
    if (call !== thisCall) {
      // Cancelled mid-way: release what arrived after the call was torn down (a late microphone).
      thisCall.micStream?.getTracks().forEach((track) => track.stop());
      return;
    }
    failCall(thisCall, err.message || String(err));
  }
}

class CallCancelled extends Error {}

// "NATF0 · Assistant", shown instead of the form on small screens during a call.
function personaSummary() {
  const role = ui.preset.value === CUSTOM_PROMPT_VALUE ? "Custom role" : ui.preset.selectedOptions[0]?.text;
  return [ui.voice.value, role].filter(Boolean).join(" · ");
}

function ensureCurrent(thisCall) {
  if (call !== thisCall || thisCall.ending) throw new CallCancelled("cancelled");
}

function createAudioContext() {
  try {
    const audioContext = new AudioContext({ latencyHint: "interactive" });
    audioContext.resume().catch(() => {});
    return audioContext;
  } catch {
    return null; // levels and recording are extras; the call works without them
  }
}

async function openMicrophone() {
  if (!navigator.mediaDevices?.getUserMedia) {
    throw new Error(
      "This page can't use the microphone here: open it over https:// or from http://localhost (browsers only allow microphones on secure pages).",
    );
  }
  try {
    return await navigator.mediaDevices.getUserMedia(MIC_CONSTRAINTS);
  } catch (err) {
    throw new Error(microphoneErrorMessage(err));
  }
}

function microphoneErrorMessage(err) {
  switch (err?.name) {
    case "NotAllowedError":
    case "SecurityError":
      return "Microphone access was blocked. Allow it for this site (the icon in the address bar) and try again.";
    case "NotFoundError":
    case "OverconstrainedError":
      return "No microphone was found. Plug one in and try again.";
    case "NotReadableError":
    case "AbortError":
      return "The microphone is busy or unavailable (another app may be using it).";
    default:
      return `Couldn't open the microphone: ${err?.message || err}`;
  }
}

// The server's STUN/TURN servers (`serve --ice-server`), with TURN credentials minted for this
// call; none: the server's answer carries a candidate this browser can reach directly.
function fetchIceConfig() {
  return requestJson("/api/ice", { cache: "no-store" });
}

function createPeerConnection(thisCall, ice) {
  const pc = new RTCPeerConnection({ iceServers: ice.iceServers, iceTransportPolicy: ice.iceTransportPolicy });
  thisCall.pc = pc;
  pc.addEventListener("track", (event) => onAgentTrack(thisCall, event));
  pc.addEventListener("connectionstatechange", () => onConnectionStateChange(thisCall));
  return pc;
}

function waitForIceGatheringComplete(pc, capMs) {
  if (pc.iceGatheringState === "complete") return Promise.resolve();
  return new Promise((resolve) => {
    const timer = setTimeout(finish, capMs);
    pc.addEventListener("icegatheringstatechange", onChange);
    function onChange() {
      if (pc.iceGatheringState === "complete") finish();
    }
    function finish() {
      clearTimeout(timer);
      pc.removeEventListener("icegatheringstatechange", onChange);
      resolve();
    }
  });
}

async function postOffer(offer) {
  const answer = await requestJson("/api/offer", { method: "POST", body: JSON.stringify(offer) });
  if (!answer || typeof answer.sdp !== "string") throw new Error("The server's answer wasn't a valid SDP answer.");
  return answer;
}

// A signaling request with the access token: its JSON answer (null when unreadable), or an
// error that reads well and carries the HTTP status.
async function requestJson(url, init = {}) {
  const headers = { Accept: "application/json", ...authHeaders() };
  if (init.body) headers["Content-Type"] = "application/json";
  let response;
  try {
    response = await fetch(url, { ...init, headers });
  } catch {
    throw new Error("Couldn't reach the server. Is duplex still running?");
  }
  if (!response.ok) {
    const err = await errorFromResponse(response);
    err.status = response.status;
    throw err;
  }
  return response.json().catch(() => null);
}

// Builds a readable error from a {"error": "..."} response (or whatever the body is).
async function errorFromResponse(response) {
  const bodyText = await response.text().catch(() => "");
  let serverMessage = "";
  try {
    serverMessage = JSON.parse(bodyText)?.error ?? "";
  } catch {
    serverMessage = bodyText.length < 300 ? bodyText.trim() : "";
  }
  serverMessage = serverMessage || `${response.status} ${response.statusText}`.trim();
  const sentence = endWithPeriod(capitalize(serverMessage));

  if (response.status === 401 || response.status === 403) {
    ui.tokenField.hidden = false;
    return new Error(`Not authorized. ${sentence} Enter a valid access token and try again.`);
  }
  if (response.status === 503) {
    const retryAfter = formatRetryAfter(response.headers.get("Retry-After"));
    return new Error(`The server is busy. ${sentence}${retryAfter ? ` Try again in ${retryAfter}.` : " Try again shortly."}`);
  }
  if (response.status === 400) return new Error(`The server couldn't accept this request. ${sentence}`);
  return new Error(sentence);
}

// Retry-After is either delta-seconds or an HTTP date.
function formatRetryAfter(header) {
  if (!header) return "";
  const seconds = /^\d+$/.test(header.trim()) ? Number(header) : (Date.parse(header) - Date.now()) / 1000;
  if (!Number.isFinite(seconds) || seconds < 0) return "";
  if (seconds < 90) return `${Math.max(1, Math.round(seconds))} s`;
  return `${Math.round(seconds / 60)} min`;
}

function authHeaders() {
  const token = ui.token.value.trim();
  return token ? { Authorization: `Bearer ${token}` } : {};
}

function onConnectionStateChange(thisCall) {
  if (call !== thisCall || thisCall.ending) return;
  const connectionState = thisCall.pc.connectionState;
  if (connectionState === "connected") {
    clearTimeout(thisCall.connectTimer);
    clearTimeout(thisCall.restartTimer);
    ui.status.title = "";
    if (duplex.state !== "connected") onConnected(thisCall);
    ui.statusText.textContent = STATE_LABELS.connected;
  } else if (connectionState === "disconnected") {
    ui.statusText.textContent = "Reconnecting…";
    ui.status.title = "No media from the server for a moment";
    // A network change (Wi-Fi to cellular) looks like this: find a new path if it lasts.
    scheduleIceRestart(thisCall, ICE_RESTART_DELAY_MS);
  } else if (connectionState === "failed") {
    if (duplex.state === "connected" && thisCall.restarts < MAX_ICE_RESTARTS) {
      restartIce(thisCall);
      return;
    }
    failCall(thisCall, "The audio link to the server failed. If the server is remote, check that its UDP ports are reachable.");
  } else if (connectionState === "closed") {
    endCall(thisCall, "closed");
  }
}

function onConnectTimeout(thisCall) {
  if (call !== thisCall || duplex.state === "connected") return;
  failCall(
    thisCall,
    "The server answered but no audio link came up. Its UDP port may be blocked, or it advertised an address this browser can't reach.",
  );
}

function onConnected(thisCall) {
  setState("connected");
  startStatsPolling(thisCall);
  startRecording(thisCall);
}

function onAgentTrack(thisCall, event) {
  if (call !== thisCall || event.track.kind !== "audio") return;
  const agentStream = event.streams[0] ?? new MediaStream([event.track]);
  thisCall.agentStream = agentStream;
  // Played by the element (not Web Audio) so the browser's echo canceller knows what is coming out.
  ui.agentAudio.srcObject = agentStream;
  ui.agentAudio.play().catch((err) => console.warn("agent audio did not autoplay:", err.message));
  addAgentMeter(thisCall);
}

// ───────────────────────────── events channel ─────────────────────────────

function openEventChannel(thisCall) {
  const channel = thisCall.pc.createDataChannel("events");
  channel.addEventListener("message", (event) => onChannelMessage(thisCall, event.data));
  channel.addEventListener("close", () => onChannelClose(thisCall));
  return channel;
}

function onChannelMessage(thisCall, data) {
  if (call !== thisCall || typeof data !== "string") return;
  let event;
  try {
    event = JSON.parse(data);
  } catch {
    console.warn("events: not JSON:", data.slice(0, 200));
    return;
  }
  switch (event.type) {
    case "ready":
      if (event.session && !duplex.session) {
        duplex.session = event.session;
        showSessionId(event.session);
      }
      break;
    case "text":
      appendTranscript(String(event.text ?? ""));
      break;
    case "stats":
      duplex.lastStats = event;
      renderServerStats(event);
      break;
    case "error":
      appendTranscriptNote(event.message || "The server reported an error.", "error");
      showError(event.message || "The server reported an error.");
      break;
    default:
      break; // newer servers may send more; ignore what we don't know
  }
}

// When the server closes the channel itself, it has ended the session.
function onChannelClose(thisCall) {
  if (call !== thisCall || thisCall.ending || duplex.state !== "connected") return;
  appendTranscriptNote("The server ended the session.");
  endCall(thisCall, "closed");
}

// ───────────────────────────── disconnect ─────────────────────────────

function disconnect() {
  if (!call) return;
  endCall(call, "closed");
}

function failCall(thisCall, message) {
  if (call !== thisCall) return;
  showError(message);
  endCall(thisCall, "failed");
  duplex.error = message;
}

function endCall(thisCall, finalState) {
  if (call !== thisCall || thisCall.ending) return;
  thisCall.ending = true;
  call = null;
  if (thisCall.resource) deleteSession(thisCall.resource);
  releaseCall(thisCall);
  setState(finalState);
}

// Finds a new path for a live call (the network changed): an offer with new ICE credentials,
// answered by the server on the same session (PATCH), which keeps its slot and its audio.
function scheduleIceRestart(thisCall, delayMs) {
  clearTimeout(thisCall.restartTimer);
  thisCall.restartTimer = setTimeout(() => {
    const linkState = thisCall.pc.connectionState;
    if (call === thisCall && (linkState === "disconnected" || linkState === "failed")) restartIce(thisCall);
  }, delayMs);
}

async function restartIce(thisCall) {
  if (thisCall.restarting || !thisCall.resource) return;
  if (thisCall.restarts >= MAX_ICE_RESTARTS) {
    if (thisCall.pc.connectionState === "failed") failCall(thisCall, "The audio link was lost and could not be restored.");
    return;
  }
  clearTimeout(thisCall.restartTimer);
  thisCall.restarting = true;
  thisCall.restarts += 1;
  duplex.iceRestarts = thisCall.restarts;
  const pc = thisCall.pc;
  try {
    await pc.setLocalDescription(await pc.createOffer({ iceRestart: true }));
    await waitForIceGatheringComplete(pc, ICE_GATHERING_CAP_MS);
    ensureCurrent(thisCall);
    const answer = await patchSession(thisCall.resource, pc.localDescription.sdp);
    ensureCurrent(thisCall);
    await pc.setRemoteDescription({ type: "answer", sdp: answer.sdp });
    duplex.lastIceRestart = "answered";
  } catch (err) {
    if (call !== thisCall) return;
    duplex.lastIceRestart = `failed: ${err.message}`;
    console.warn("ICE restart failed:", err.message);
    // Back to the last agreed description, so the call goes on where it still can.
    if (pc.signalingState === "have-local-offer") await pc.setLocalDescription({ type: "rollback" }).catch(() => {});
    if (err.status === 404) {
      failCall(thisCall, "The call ended on the server while the link was down.");
    } else if (pc.connectionState === "failed" && thisCall.restarts >= MAX_ICE_RESTARTS) {
      failCall(thisCall, `The audio link was lost and could not be restored: ${err.message}`);
    } else {
      // The network may still be changing hands: try again a little later.
      scheduleIceRestart(thisCall, ICE_RESTART_DELAY_MS * 2 ** thisCall.restarts);
    }
  } finally {
    thisCall.restarting = false;
  }
}

// The answer's resource when it is one of this server's session paths, else null (no restarts,
// no DELETE: the server's idle timeout ends the call).
function sessionResource(answer) {
  const resource = answer.resource;
  return typeof resource === "string" && /^\/api\/sessions\/[0-9a-f]+$/.test(resource) ? resource : null;
}

async function patchSession(resource, sdp) {
  const answer = await requestJson(resource, { method: "PATCH", body: JSON.stringify({ sdp, type: "offer" }) });
  if (!answer || typeof answer.sdp !== "string") throw new Error("The server's answer to the ICE restart wasn't a valid SDP answer.");
  return answer;
}

function deleteSession(resource) {
  fetch(resource, {
    method: "DELETE",
    headers: authHeaders(),
    keepalive: true,
  }).catch((err) => console.warn("DELETE session failed:", err.message));
}

function hangUpOnUnload() {
  if (call?.resource) deleteSession(call.resource);
}

function releaseCall(thisCall) {
  clearTimeout(thisCall.connectTimer);
  clearTimeout(thisCall.restartTimer);
  clearInterval(thisCall.statsTimer);
  cancelAnimationFrame(thisCall.meterFrame);
  thisCall.meters.forEach((meter) => meter.reset());
  const recorderStopped = stopRecording(thisCall);
  try {
    thisCall.channel?.close();
  } catch {}
  thisCall.pc?.close();
  thisCall.micStream?.getTracks().forEach((track) => track.stop());
  ui.agentAudio.srcObject = null;
  // The recorder's last chunk needs the audio graph alive until it has stopped.
  recorderStopped.finally(() => thisCall.audioContext?.close().catch(() => {}));
}

// ───────────────────────────── levels ─────────────────────────────

function addMicMeter(thisCall) {
  if (!thisCall.audioContext) return;
  thisCall.micSource = thisCall.audioContext.createMediaStreamSource(thisCall.micStream);
  thisCall.meters.push(createLevelMeter(thisCall.audioContext, thisCall.micSource, ui.meterMic, ui.meterMicDb));
  runMeters(thisCall);
}

function addAgentMeter(thisCall) {
  if (!thisCall.audioContext || thisCall.agentSource) return;
  thisCall.agentSource = thisCall.audioContext.createMediaStreamSource(thisCall.agentStream);
  thisCall.meters.push(createLevelMeter(thisCall.audioContext, thisCall.agentSource, ui.meterAgent, ui.meterAgentDb));
}

// An AnalyserNode fed by a stream source; never connected to the speakers.
function createLevelMeter(audioContext, source, fillElement, dbElement) {
  const analyser = audioContext.createAnalyser();
  analyser.fftSize = 1024;
  source.connect(analyser);
  const samples = new Float32Array(analyser.fftSize);
  let shownLevel = 0;
  let frameCount = 0;

  return {
    update() {
      analyser.getFloatTimeDomainData(samples);
      const db = rmsDb(samples);
      const level = clamp((db - METER_FLOOR_DB) / -METER_FLOOR_DB, 0, 1);
      shownLevel = Math.max(level, shownLevel * 0.9); // fast attack, slow release
      fillElement.style.transform = `scaleX(${shownLevel.toFixed(3)})`;
      const shownDb = Math.round(METER_FLOOR_DB * (1 - shownLevel));
      if (++frameCount % 6 === 0) dbElement.textContent = shownLevel > 0.02 ? `${shownDb} dB` : "silent";
    },
    reset() {
      source.disconnect(analyser);
      fillElement.style.transform = "scaleX(0)";
      dbElement.textContent = "—";
    },
  };
}

function runMeters(thisCall) {
  const tick = () => {
    thisCall.meters.forEach((meter) => meter.update());
    thisCall.meterFrame = requestAnimationFrame(tick);
  };
  thisCall.meterFrame = requestAnimationFrame(tick);
}

function rmsDb(samples) {
  let sumSquares = 0;
  for (const sample of samples) sumSquares += sample * sample;
  const rms = Math.sqrt(sumSquares / samples.length);
  return rms > 0 ? 20 * Math.log10(rms) : -Infinity;
}

// ───────────────────────────── link stats (pc.getStats) ─────────────────────────────

function startStatsPolling(thisCall) {
  const poll = () => pollLinkStats(thisCall).catch((err) => console.warn("getStats failed:", err.message));
  poll();
  thisCall.statsTimer = setInterval(poll, STATS_INTERVAL_MS);
}

async function pollLinkStats(thisCall) {
  const report = await thisCall.pc.getStats();
  if (call !== thisCall) return;
  const link = summarizeLinkStats(report);
  duplex.link = link;
  if (link.audioEnergy !== null) duplex.inboundAudioEnergy = link.audioEnergy;
  if (link.packetsReceived !== null) duplex.inboundPacketsReceived = link.packetsReceived;
  renderLinkMetrics(link);
}

function summarizeLinkStats(report) {
  const stats = [...report.values()];
  const inbound = stats.find((s) => s.type === "inbound-rtp" && s.kind === "audio");
  const remoteInbound = stats.find((s) => s.type === "remote-inbound-rtp" && s.kind === "audio");
  const pair = selectedCandidatePair(report, stats);

  const packetsReceived = inbound?.packetsReceived ?? null;
  const packetsLost = inbound?.packetsLost ?? null;
  const expectedPackets = (packetsReceived ?? 0) + Math.max(0, packetsLost ?? 0);
  const pairRttS = pair?.currentRoundTripTime;
  const rtcpRttS = remoteInbound?.roundTripTime;
  const jitterBufferMs =
    inbound?.jitterBufferEmittedCount > 0 ? (inbound.jitterBufferDelay / inbound.jitterBufferEmittedCount) * 1000 : null;

  return {
    rttMs: pairRttS !== undefined ? pairRttS * 1000 : rtcpRttS !== undefined ? rtcpRttS * 1000 : null,
    jitterMs: inbound?.jitter !== undefined ? inbound.jitter * 1000 : null,
    packetsReceived,
    packetsLost,
    lossPercent: expectedPackets > 0 ? (100 * Math.max(0, packetsLost ?? 0)) / expectedPackets : null,
    audioEnergy: inbound?.totalAudioEnergy ?? null,
    audioLevel: inbound?.audioLevel ?? null,
    jitterBufferMs,
    concealedSamples: inbound?.concealedSamples ?? null,
    uplinkLossPercent: remoteInbound?.fractionLost !== undefined ? remoteInbound.fractionLost * 100 : null,
    uplinkJitterMs: remoteInbound?.jitter !== undefined ? remoteInbound.jitter * 1000 : null,
    uplinkRttMs: rtcpRttS !== undefined ? rtcpRttS * 1000 : null,
    // "host", "srflx", "prflx" or "relay": "relay" on either side means the audio goes through a TURN server.
    localCandidateType: report.get(pair?.localCandidateId)?.candidateType ?? null,
    remoteCandidateType: report.get(pair?.remoteCandidateId)?.candidateType ?? null,
  };
}

function linkPath(link) {
  if (link.localCandidateType === null) return "";
  const relayed = link.localCandidateType === "relay" || link.remoteCandidateType === "relay";
  return relayed ? "Audio goes through a TURN relay." : "Audio goes straight to the server.";
}

function selectedCandidatePair(report, stats) {
  const transport = stats.find((s) => s.type === "transport" && s.selectedCandidatePairId);
  if (transport) return report.get(transport.selectedCandidatePairId);
  return stats.find((s) => s.type === "candidate-pair" && s.nominated && s.state === "succeeded");
}

function renderLinkMetrics(link) {
  const rttNotes = [link.uplinkRttMs !== null ? `RTCP round trip ${link.uplinkRttMs.toFixed(0)} ms.` : "", linkPath(link)];
  setMetric(ui.metricRtt, link.rttMs, "ms", 0, rttNotes.filter(Boolean).join(" "));
  setMetric(ui.metricJitter, link.jitterMs, "ms", 1, link.uplinkJitterMs !== null ? `Server sees ${link.uplinkJitterMs.toFixed(1)} ms from you` : "");
  setMetric(
    ui.metricLoss,
    link.lossPercent,
    "%",
    1,
    [
      link.packetsLost !== null ? `${formatInteger(link.packetsLost)} packets lost from the server` : "",
      link.uplinkLossPercent !== null ? `${link.uplinkLossPercent.toFixed(1)} % lost on the way to the server` : "",
    ]
      .filter(Boolean)
      .join("; "),
  );
  setMetric(ui.metricPackets, link.packetsReceived, "", 0);
  setMetric(ui.metricEnergy, link.audioEnergy, "", -3, link.audioLevel !== null ? `Current level ${link.audioLevel.toFixed(3)}` : "");
  setMetric(ui.metricJitterBuffer, link.jitterBufferMs, "ms", 0);
  ui.metricLoss.parentElement.classList.toggle("warn", (link.lossPercent ?? 0) >= 2);
}

// digits < 0 means that many significant digits.
function setMetric(element, value, unit, digits, title = "") {
  element.title = title;
  if (value === null || value === undefined || !Number.isFinite(value)) {
    element.textContent = "—";
    return;
  }
  const text = digits < 0 ? formatSignificant(value, -digits) : digits === 0 ? formatInteger(value) : value.toFixed(digits);
  element.replaceChildren(document.createTextNode(text));
  if (unit) {
    const unitSpan = document.createElement("span");
    unitSpan.className = "unit";
    unitSpan.textContent = unit;
    element.append(unitSpan);
  }
}

function resetLinkMetrics() {
  duplex.link = null;
  duplex.inboundAudioEnergy = 0;
  duplex.inboundPacketsReceived = 0;
  for (const element of [ui.metricRtt, ui.metricJitter, ui.metricLoss, ui.metricPackets, ui.metricEnergy, ui.metricJitterBuffer]) {
    setMetric(element, null);
  }
  ui.metricLoss.parentElement.classList.remove("warn");
}

// ───────────────────────────── server stats ─────────────────────────────

const serverStatElements = new Map();

// The stats the page leads with; any other numeric field follows in the order it first arrived.
const LEADING_SERVER_STATS = ["frames", "step_ms", "underruns", "dropped_ms", "packets_lost"];

// Renders every numeric field of a stats event (one level of nesting is flattened as "a.b").
function renderServerStats(event) {
  let addedTile = false;
  for (const [key, value] of numericFields(event)) {
    let valueElement = serverStatElements.get(key);
    if (!valueElement) {
      valueElement = createServerStatTile(key);
      serverStatElements.set(key, valueElement);
      addedTile = true;
    }
    setMetric(valueElement, value, describeStatKey(key).unit, Number.isInteger(value) ? 0 : 2);
  }
  if (addedTile) orderServerStatTiles();
}

function orderServerStatTiles() {
  const rank = (key) => {
    const leadingIdx = LEADING_SERVER_STATS.indexOf(key);
    return leadingIdx === -1 ? LEADING_SERVER_STATS.length : leadingIdx;
  };
  const keys = [...serverStatElements.keys()]; // insertion order = arrival order
  const ordered = keys.map((key, arrivalIdx) => ({ key, arrivalIdx })).sort((a, b) => rank(a.key) - rank(b.key) || a.arrivalIdx - b.arrivalIdx);
  ui.serverStats.replaceChildren(...ordered.map(({ key }) => serverStatElements.get(key).parentElement));
  ui.serverStatsEmpty.hidden = true;
}

function numericFields(event) {
  const fields = [];
  for (const [key, value] of Object.entries(event)) {
    if (key === "type") continue;
    if (typeof value === "number") fields.push([key, value]);
    else if (value && typeof value === "object" && !Array.isArray(value)) {
      for (const [innerKey, innerValue] of Object.entries(value)) {
        if (typeof innerValue === "number") fields.push([`${key}.${innerKey}`, innerValue]);
      }
    }
  }
  return fields;
}

function createServerStatTile(key) {
  const tile = document.createElement("div");
  tile.className = "metric";
  tile.dataset.key = key;
  const term = document.createElement("dt");
  term.textContent = describeStatKey(key).label;
  term.title = key;
  const value = document.createElement("dd");
  tile.append(term, value);
  return value;
}

// "dropped_ms" → { label: "Dropped", unit: "ms" }; "packets_lost" → { label: "Packets lost", unit: "" }
function describeStatKey(key) {
  const units = { ms: "ms", us: "µs", s: "s", pct: "%", percent: "%", bytes: "B", hz: "Hz", samples: "samples" };
  const words = key.split(/[._]/).filter(Boolean);
  let unit = "";
  if (words.length > 1 && units[words.at(-1).toLowerCase()]) unit = units[words.pop().toLowerCase()];
  return { label: capitalize(words.join(" ")), unit };
}

function resetServerStats() {
  duplex.lastStats = null;
  serverStatElements.clear();
  ui.serverStats.replaceChildren();
  ui.serverStatsEmpty.hidden = false;
}

// ───────────────────────────── transcript ─────────────────────────────

let currentTurn = null;
let lastPieceAt = 0;

function appendTranscript(piece) {
  if (!piece) return;
  duplex.transcript += piece;
  ui.transcriptPlaceholder.hidden = true;
  const now = performance.now();
  const startsNewTurn = !currentTurn || now - lastPieceAt > TRANSCRIPT_TURN_GAP_MS;
  lastPieceAt = now;
  const stickToBottom = isScrolledToBottom(ui.transcript);
  if (startsNewTurn) {
    currentTurn = document.createElement("p");
    currentTurn.className = "turn";
    ui.transcript.append(currentTurn);
    piece = piece.trimStart();
  }
  currentTurn.append(piece);
  if (stickToBottom) ui.transcript.scrollTop = ui.transcript.scrollHeight;
}

function appendTranscriptNote(text, kind = "") {
  ui.transcriptPlaceholder.hidden = true;
  const note = document.createElement("span");
  note.className = `event ${kind}`.trim();
  note.textContent = text;
  ui.transcript.append(note);
  currentTurn = null;
  ui.transcript.scrollTop = ui.transcript.scrollHeight;
}

function resetTranscript() {
  duplex.transcript = "";
  currentTurn = null;
  ui.transcript.replaceChildren(ui.transcriptPlaceholder);
  ui.transcriptPlaceholder.hidden = false;
}

function isScrolledToBottom(element) {
  return element.scrollHeight - element.scrollTop - element.clientHeight < 40;
}

// ───────────────────────────── recording ─────────────────────────────

// Agent on the left channel, microphone on the right, encoded by MediaRecorder.
function startRecording(thisCall) {
  const audioContext = thisCall.audioContext;
  if (!audioContext || !thisCall.agentSource || !thisCall.micSource || typeof MediaRecorder === "undefined") {
    ui.recordingStatus.textContent = "Recording isn't available in this browser.";
    return;
  }
  const merger = audioContext.createChannelMerger(2);
  thisCall.agentSource.connect(merger, 0, 0);
  thisCall.micSource.connect(merger, 0, 1);
  const destination = audioContext.createMediaStreamDestination();
  destination.channelCount = 2;
  merger.connect(destination);

  const mimeType = supportedRecordingType();
  let recorder;
  try {
    recorder = new MediaRecorder(destination.stream, mimeType ? { mimeType, audioBitsPerSecond: 128000 } : {});
  } catch (err) {
    ui.recordingStatus.textContent = `Recording isn't available: ${err.message}`;
    return;
  }
  const chunks = [];
  const startedAt = performance.now();
  recorder.addEventListener("dataavailable", (event) => {
    if (event.data.size > 0) chunks.push(event.data);
  });
  const stopped = new Promise((resolve) => {
    recorder.addEventListener("stop", () => {
      merger.disconnect();
      const blob = new Blob(chunks, { type: recorder.mimeType || mimeType || "audio/webm" });
      offerRecording(blob, performance.now() - startedAt);
      resolve();
    });
  });
  recorder.start(RECORDER_TIMESLICE_MS);
  thisCall.recording = { recorder, stopped, startedAt, timer: setInterval(() => showRecordingProgress(startedAt), 1000) };
  showRecordingProgress(startedAt);
}

function supportedRecordingType() {
  const candidates = ["audio/webm;codecs=opus", "audio/ogg;codecs=opus", "audio/webm", "audio/mp4"];
  return candidates.find((type) => MediaRecorder.isTypeSupported?.(type)) ?? "";
}

function showRecordingProgress(startedAt) {
  ui.recordingStatus.textContent = `Recording · ${formatDuration(performance.now() - startedAt)} · agent left, you right`;
}

// Resolves once the recorder has flushed its last chunk (or at once if nothing was recording).
function stopRecording(thisCall) {
  const recording = thisCall.recording;
  if (!recording) return Promise.resolve();
  clearInterval(recording.timer);
  if (recording.recorder.state !== "inactive") recording.recorder.stop();
  const timeout = new Promise((resolve) => setTimeout(resolve, 2000));
  return Promise.race([recording.stopped, timeout]);
}

function offerRecording(blob, durationMs) {
  if (blob.size === 0) {
    ui.recordingStatus.textContent = "Nothing was recorded.";
    return;
  }
  if (recordingUrl) URL.revokeObjectURL(recordingUrl);
  recordingUrl = URL.createObjectURL(blob);
  const extension = blob.type.includes("ogg") ? "ogg" : blob.type.includes("mp4") ? "m4a" : "webm";
  const stamp = new Date().toISOString().slice(0, 19).replace(/[:T]/g, "-");
  ui.download.href = recordingUrl;
  ui.download.download = `duplex-${stamp}.${extension}`;
  ui.download.hidden = false;
  ui.recordingStatus.textContent = `Recording ready · ${formatDuration(durationMs)} · ${formatBytes(blob.size)} · agent left, you right`;
  duplex.recording = { url: recordingUrl, mimeType: blob.type, bytes: blob.size, durationMs: Math.round(durationMs) };
}

function clearRecording() {
  ui.download.hidden = true;
  ui.download.removeAttribute("href");
  duplex.recording = null;
  ui.recordingStatus.textContent = "Each conversation is recorded in this browser — agent on the left channel, you on the right.";
}

// ───────────────────────────── small helpers ─────────────────────────────

function byId(id) {
  const element = document.getElementById(id);
  if (!element) throw new Error(`index.html is missing #${id}`);
  return element;
}

function showError(message) {
  duplex.error = message;
  ui.errorText.textContent = message;
  ui.error.hidden = false;
}

function clearError() {
  duplex.error = null;
  ui.error.hidden = true;
  ui.errorText.textContent = "";
}

function showSessionId(sessionId) {
  ui.sessionId.hidden = !sessionId;
  ui.sessionId.textContent = sessionId ? `session ${sessionId}` : "";
  ui.sessionId.title = sessionId ?? "";
}

function safeLoad(key) {
  try {
    return localStorage.getItem(key);
  } catch {
    return null;
  }
}

function safeStore(key, value) {
  try {
    if (value) localStorage.setItem(key, value);
    else localStorage.removeItem(key);
  } catch {}
}

function clamp(value, low, high) {
  return Math.min(high, Math.max(low, value));
}

function capitalize(text) {
  return text ? text[0].toUpperCase() + text.slice(1) : text;
}

function endWithPeriod(text) {
  return /[.!?…]$/.test(text) ? text : `${text}.`;
}

function formatInteger(value) {
  return Math.round(value).toLocaleString("en-US");
}

function formatSignificant(value, digits) {
  if (value === 0) return "0";
  return Math.abs(value) >= 10 ** digits ? formatInteger(value) : String(Number(value.toPrecision(digits)));
}

function formatDuration(ms) {
  const totalSeconds = Math.floor(ms / 1000);
  const minutes = Math.floor(totalSeconds / 60);
  return `${minutes}:${String(totalSeconds % 60).padStart(2, "0")}`;
}

function formatBytes(bytes) {
  if (bytes < 1024) return `${bytes} B`;
  if (bytes < 1024 * 1024) return `${(bytes / 1024).toFixed(0)} KB`;
  return `${(bytes / 1024 / 1024).toFixed(1)} MB`;
}

boot();
