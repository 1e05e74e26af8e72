// The public API as the page uses it: /v1 models, generations and edits, plain or streamed
// (OpenAI's server-sent events). Paths are relative to the page, so a proxy prefix keeps working.

const KEY_STORE = "sdserve-api-key";

export class ApiError extends Error {
  constructor(status, message, param = null, code = null) {
    super(message);
    this.status = status;
    this.param = param;
    this.code = code;
  }
}

export function apiKey() {
  return sessionStorage.getItem(KEY_STORE) || "";
}

export function setApiKey(key) {
  if (key) sessionStorage.setItem(KEY_STORE, key);
  else sessionStorage.removeItem(KEY_STORE);
}

export function apiBase() {
  return new URL("v1", document.baseURI).href;
}

function headers(extra = {}) {
  const key = apiKey();
  return key ? { ...extra, Authorization: `Bearer ${key}` } : extra;
}

async function failure(response) {
  let detail = null;
  try {
    detail = (await response.json()).error;
  } catch {
    // not an OpenAI error body (a proxy's page): the status line says what happened
  }
  const retry = response.headers.get("retry-after");
  let message = detail?.message || `${response.status} ${response.statusText}`;
  if (retry) message += ` (retry in ${retry} s)`;
  return new ApiError(response.status, message, detail?.param ?? null, detail?.code ?? null);
}

export async function listModels() {
  const response = await fetch("v1/models", { headers: headers() });
  if (!response.ok) throw await failure(response);
  return (await response.json()).data;
}

// "queue;dur=1.2, unet;dur=300" → {queue: 0.0012, unet: 0.3} (seconds)
export function parseServerTiming(header) {
  const stages = {};
  for (const part of (header || "").split(",")) {
    const [name, ...params] = part.trim().split(";");
    const dur = params.map((p) => p.trim()).find((p) => p.startsWith("dur="));
    if (name && dur) stages[name] = Number(dur.slice(4)) / 1000;
  }
  return stages;
}

// POST a generation (JSON) or an edit (FormData). `onPartial(event)` sees each partial image of a stream.
// Resolves to {images: [{b64, seed, index}], timings, elapsed} whether the server streamed or not.
export async function render(route, body, { onPartial = () => {}, signal } = {}) {
  const started = performance.now();
  const json = !(body instanceof FormData);
  const response = await fetch(`v1/images/${route}`, {
    method: "POST",
    headers: headers(json ? { "Content-Type": "application/json" } : {}),
    body: json ? JSON.stringify(body) : body,
    signal,
  });
  if (!response.ok) throw await failure(response);
  const timings = parseServerTiming(response.headers.get("server-timing"));
  const streamed = (response.headers.get("content-type") || "").startsWith("text/event-stream");
  const images = streamed ? await readStream(response, onPartial) : plainImages(await response.json());
  return { images, timings, streamed, elapsed: (performance.now() - started) / 1000 };
}

function plainImages(reply) {
  return reply.data.map((item, index) => ({ b64: item.b64_json, seed: item.seed, index }));
}

async function readStream(response, onPartial) {
  const images = [];
  for await (const event of serverEvents(response.body)) {
    if (event.type === "error") {
      const e = event.error || {};
      throw new ApiError(response.status, e.message || "the render failed", e.param ?? null, e.code ?? null);
    }
    const index = event.index ?? images.length;
    if (event.type.endsWith(".partial_image")) onPartial({ ...event, index });
    else if (event.type.endsWith(".completed")) images.push({ b64: event.b64_json, seed: event.seed, index });
  }
  if (!images.length) throw new ApiError(response.status, "the stream ended before the image was complete");
  return images;
}

// Server-sent events: blocks separated by a blank line; `event:` and `data:` fields; `:` lines are
// keep-alive comments. The JSON payload's own `type` wins over the event name.
export async function* serverEvents(stream) {
  const reader = stream.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (value) buffer += value;
    const blocks = buffer.replace(/\r\n?/g, "\n").split("\n\n");
    buffer = done ? "" : blocks.pop();
    for (const block of blocks) {
      const event = parseEvent(block);
      if (event) yield event;
    }
    if (done) return;
  }
}

function parseEvent(block) {
  let name = "message";
  const data = [];
  for (const line of block.split("\n")) {
    if (!line || line.startsWith(":")) continue;
    const colon = line.indexOf(":");
    const field = colon < 0 ? line : line.slice(0, colon);
    const value = colon < 0 ? "" : line.slice(colon + 1).replace(/^ /, "");
    if (field === "event") name = value;
    else if (field === "data") data.push(value);
  }
  if (!data.length) return null;
  const payload = JSON.parse(data.join("\n"));
  return { ...payload, type: payload.type || name };
}
