// The playground: the form, one render at a time (streamed when asked), the result, and the gallery.

import { ApiError, apiKey, listModels, render, setApiKey } from "./api.js";
import { Gallery } from "./gallery.js";
import { MaskPainter } from "./mask.js";

const $ = (id) => document.getElementById(id);
const OPENAI_SIZES = ["256x256", "512x512", "1024x1024", "1536x1024", "1024x1536", "1792x1024", "1024x1792"];
// Error params that name a control under another id.
const PARAM_CONTROL = { "image[]": "image", images: "image" };
const EXTENSIONS = { "image/png": "png", "image/jpeg": "jpg", "image/webp": "webp" };

const state = { models: new Map(), lastSeed: null, running: null, retry: null, strengthSet: false,
                loraScale: null, strengths: null, masked: false };
const painter = new MaskPainter($("picture"), $("mask-canvas"), $("brush"));
const gallery = new Gallery($("gallery"), $("gallery-empty"), { onReuse: reuse, onStatus: say });

function say(text) {
  $("status").textContent = text;
}

function mode() {
  return document.querySelector("input[name=mode]:checked").value;
}

// -- models ----------------------------------------------------------------------------------------

async function loadModels() {
  clearTimeout(state.retry);
  try {
    const models = await listModels();
    $("key-box").hidden = !apiKey();
    $("api-key-error").textContent = "";
    if (!models.length) {
      say("No model is ready yet (still loading?); trying again…");
      state.retry = setTimeout(loadModels, 2000);
      return;
    }
    fillModels(models);
    say("Ready.");
  } catch (error) {
    if (error instanceof ApiError && error.status === 401) {
      askForKey(error.message);
      return;
    }
    say(`Could not list the models (${error.message}); trying again…`);
    state.retry = setTimeout(loadModels, 5000);
  }
}

function askForKey(message) {
  $("key-box").hidden = false;
  $("api-key-error").textContent = apiKey() ? message : "This server needs an API key.";
  say("Type the API key to continue.");
  $("api-key").focus();
}

function fillModels(models) {
  const select = $("model");
  const previous = select.value;
  state.models = new Map(models.map((m) => [m.id, m]));
  select.replaceChildren(...models.map((m) => new Option(`${m.id} (${m.family})`, m.id)));
  if (state.models.has(previous)) select.value = previous;
  applyModel(state.models.get(select.value));
}

function sizeChoices(card) {
  const choices = ["auto"];
  const range = card.sizes;
  if (range) {
    const stride = Math.ceil(64 / range.step) * range.step; // a short list; any multiple of step works
    for (let side = range.min; side <= range.max; side += stride) choices.push(`${side}x${side}`);
    for (const size of OPENAI_SIZES) {
      const [w, h] = size.split("x").map(Number);
      const fits = [w, h].every((s) => s >= range.min && s <= range.max && s % range.step === 0);
      if (fits && !choices.includes(size)) choices.push(size);
    }
  }
  return choices;
}

// A model's sizes, defaults, samplers and LoRA adapters into the form.
function applyModel(card) {
  if (!card) return;
  $("sizes").replaceChildren(...sizeChoices(card).map((size) => new Option(size, size)));
  $("size").value = card.default_size || "auto";
  $("steps").value = card.default_steps || "";
  $("guidance_scale").value = card.default_guidance_scale ?? "";
  const samplers = card.samplers?.length ? card.samplers : [card.default_sampler].filter(Boolean);
  $("sampler").replaceChildren(...samplers.map((s) => new Option(s, s)));
  if (card.default_sampler) $("sampler").value = card.default_sampler;
  applyLimits(card);
  applyAdapters(card.adapters || []);
}

// The request bounds the server enforces (the card's `limits`), on the controls; the untouched strength
// slider shows the server's own default.
function applyLimits(card) {
  const limits = card.limits;
  if (!limits) return;
  const bound = (id, min, max) => Object.assign($(id), { min: String(min), max: String(max) });
  bound("n", 1, limits.max_images);
  bound("steps", limits.min_steps, limits.max_steps);
  bound("guidance_scale", limits.min_guidance, limits.max_guidance);
  bound("seed", 0, limits.max_seed);
  $("strength").max = String(limits.max_strength);
  state.loraScale = limits.max_lora_scale;
  state.strengths = card.default_strength || state.strengths;
  defaultStrength(state.masked);
}

// LoRA controls only when the model lists adapters (entries are names or {name, …}).
function applyAdapters(adapters) {
  const rows = adapters.map((adapter, i) => {
    const name = typeof adapter === "string" ? adapter : adapter.name;
    const row = document.createElement("div");
    row.className = "row lora-row";
    row.innerHTML = `<label class="check"><input type="checkbox" id="lora-use-${i}"> <span></span></label>
      <label for="lora-scale-${i}">scale</label>
      <input type="number" id="lora-scale-${i}" min="${-state.loraScale}" max="${state.loraScale}" step="0.05"
       value="1">`;
    row.querySelector("span").textContent = name;
    row.dataset.name = name;
    return row;
  });
  $("lora-list").replaceChildren(...rows);
  $("lora-box").hidden = rows.length === 0;
}

// -- the request -------------------------------------------------------------------------------------

function numberField(fields, id) {
  const raw = $(id).value.trim();
  if (raw !== "") fields[id] = Number.isFinite(Number(raw)) ? Number(raw) : raw;
}

// The fields a render sends (and a gallery entry keeps), in the order the snippets print them.
function collect() {
  const fields = { model: $("model").value, prompt: $("prompt").value };
  if ($("negative_prompt").value.trim()) fields.negative_prompt = $("negative_prompt").value;
  fields.size = $("size").value.trim() || "auto";
  for (const id of ["n", "seed", "steps", "guidance_scale"]) numberField(fields, id);
  if ($("sampler").value) fields.sampler = $("sampler").value;
  if (mode() === "edit") numberField(fields, "strength");
  const lora = [...$("lora-list").children]
    .filter((row) => row.querySelector("input[type=checkbox]").checked)
    .map((row) => ({ name: row.dataset.name, scale: Number(row.querySelector("input[type=number]").value) }));
  if (lora.length) fields.lora = lora;
  return fields;
}

function streamFields() {
  if (!$("stream").checked) return {};
  const partials = {};
  numberField(partials, "partial_images");
  return { stream: true, ...partials };
}

// {body, image, mask}: JSON for a generation; multipart for an edit, with the painted mask if any.
async function requestBody(fields) {
  const extra = { ...streamFields(), response_format: "b64_json" };
  if (mode() === "generate") return { body: { ...fields, ...extra } };
  const form = new FormData();
  const image = $("image").files[0];
  if (image) form.append("image", image);
  const mask = image ? await painter.maskBlob() : null;
  if (mask) form.append("mask", mask, "mask.png");
  for (const [name, value] of Object.entries({ ...fields, ...extra })) {
    form.append(name, typeof value === "object" ? JSON.stringify(value) : String(value));
  }
  return { body: form, image, mask };
}

// -- running -------------------------------------------------------------------------------------------

function clearErrors() {
  for (const node of document.querySelectorAll(".field-error")) node.textContent = "";
  for (const node of document.querySelectorAll("[aria-invalid]")) node.removeAttribute("aria-invalid");
}

// An API error next to the control its `param` names; otherwise (queue full, no model ready…) under the
// button.
function showError(error) {
  if (error.status === 401) {
    askForKey(error.message);
    return;
  }
  const id = PARAM_CONTROL[error.param] || error.param;
  const slot = id && $(`${id}-error`);
  const visible = slot && !slot.closest("[hidden]");
  const text = visible || !error.param ? error.message : `${error.param}: ${error.message}`;
  (visible ? slot : $("form-error")).textContent = text;
  const control = visible && $(id);
  if (control) {
    control.setAttribute("aria-invalid", "true");
    control.focus();
  }
  say(`Error ${error.status || ""}: ${error.message}`);
}

function imageBlob(b64) {
  const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
  return new Blob([bytes], { type: "image/png" });
}

function timeText(result) {
  const total = result.timings.total;
  if (total === undefined) return `${result.elapsed.toFixed(2)} s (measured in the browser)`;
  const queue = result.timings.queue ? `, queued ${result.timings.queue.toFixed(2)} s` : "";
  return `${total.toFixed(2)} s render${queue}`;
}

function showPartial(event) {
  const img = new Image();
  img.src = `data:image/png;base64,${event.b64_json}`;
  img.alt = `Image ${event.index + 1}, partial ${event.partial_image_index + 1}`;
  img.dataset.kind = "partial";
  const caption = document.createElement("figcaption");
  caption.textContent = img.alt;
  const figure = document.createElement("figure");
  figure.append(img, caption);
  $("partials").append(figure);
  say(`Partial image ${event.partial_image_index + 1} of image ${event.index + 1}…`);
}

// One gallery entry per image: its own seed and n=1, so that each can be made again alone.
function galleryEntry(fields, request, image, time) {
  const seed = image.seed ?? (fields.seed ?? 0) + image.index;
  const files = { output: `sdserve-${seed}.png` };
  const blobs = { output: imageBlob(image.b64) };
  if (request.image) {
    files.image = `sdserve-${seed}-input.${EXTENSIONS[request.image.type] || "png"}`;
    blobs.image = request.image;
  }
  if (request.mask) [files.mask, blobs.mask] = [`sdserve-${seed}-mask.png`, request.mask];
  const route = mode() === "generate" ? "generations" : "edits";
  const src = `data:image/png;base64,${image.b64}`;
  return { route, fields: { ...fields, n: 1, seed }, files, blobs, src, seed, timeText: time };
}

function resultFigure(entry) {
  const img = Object.assign(new Image(), { src: entry.src, alt: `Result, seed ${entry.seed}` });
  img.dataset.kind = "final";
  img.dataset.seed = String(entry.seed);
  const caption = document.createElement("figcaption");
  caption.textContent = `seed ${entry.seed} · ${entry.timeText}`;
  const figure = document.createElement("figure");
  figure.append(img, caption);
  return figure;
}

function showResult(fields, request, result) {
  const time = timeText(result);
  const entries = result.images.map((image) => galleryEntry(fields, request, image, time));
  for (const entry of [...entries].reverse()) gallery.add(entry); // newest first, a batch in seed order
  $("result").replaceChildren(...entries.map(resultFigure));
  state.lastSeed = entries.at(-1).seed;
  $("seed-last").disabled = false;
  say(`Done: ${entries.length} image${entries.length > 1 ? "s" : ""}, ${time}.`);
}

async function run(event) {
  event.preventDefault();
  if (state.running) return;
  clearErrors();
  const fields = collect();
  const request = await requestBody(fields);
  state.running = new AbortController();
  $("run").disabled = true;
  $("cancel").hidden = false;
  $("partials").replaceChildren();
  say("Rendering…");
  try {
    const route = mode() === "generate" ? "generations" : "edits";
    const result = await render(route, request.body, { onPartial: showPartial, signal: state.running.signal });
    showResult(fields, request, result);
  } catch (error) {
    if (error.name === "AbortError") say("Stopped.");
    else if (error instanceof ApiError) showError(error);
    else say(`Failed: ${error.message}`);
  } finally {
    state.running = null;
    $("run").disabled = false;
    $("cancel").hidden = true;
  }
}

// -- gallery: the same settings again ---------------------------------------------------------------

async function reuse(entry) {
  const edit = entry.route === "edits";
  document.querySelector(`input[name=mode][value=${edit ? "edit" : "generate"}]`).checked = true;
  setMode();
  if (state.models.has(entry.fields.model)) {
    $("model").value = entry.fields.model;
    applyModel(state.models.get(entry.fields.model));
  }
  const f = entry.fields;
  state.strengthSet = f.strength !== undefined; // kept when the restored image and mask load
  $("prompt").value = f.prompt;
  $("negative_prompt").value = f.negative_prompt || "";
  for (const id of ["size", "n", "seed", "steps", "guidance_scale", "sampler", "strength"]) {
    if (f[id] !== undefined) $(id).value = String(f[id]);
  }
  for (const row of $("lora-list").children) {
    const used = (f.lora || []).find((l) => l.name === row.dataset.name);
    row.querySelector("input[type=checkbox]").checked = Boolean(used);
    if (used) row.querySelector("input[type=number]").value = String(used.scale);
  }
  if (edit) await restoreImage(entry);
  showStrength();
  say(`Settings of seed ${entry.seed} restored.`);
  $("prompt").focus();
}

async function restoreImage(entry) {
  const files = new DataTransfer();
  files.items.add(new File([entry.blobs.image], entry.files.image, { type: entry.blobs.image.type }));
  $("image").files = files.files;
  await showImage();
  await painter.restore(entry.blobs.mask || null);
}

// -- wiring ---------------------------------------------------------------------------------------------

function setMode() {
  const edit = mode() === "edit";
  $("edit-box").hidden = !edit;
  $("run").textContent = edit ? "Edit" : "Generate";
}

// The API's own default until the user moves the slider (the card's `default_strength`: inside a mask or not).
function defaultStrength(masked) {
  state.masked = masked;
  if (state.strengthSet || !state.strengths) return;
  $("strength").value = String(masked ? state.strengths.mask : state.strengths.image);
  showStrength();
}

function showStrength() {
  $("strength-value").textContent = Number($("strength").value).toFixed(2);
}

async function showImage() {
  const file = $("image").files[0];
  $("canvas-box").hidden = !file;
  if (!file) return;
  try {
    await painter.load(file);
    defaultStrength(false);
    $("image-error").textContent = "";
  } catch {
    $("canvas-box").hidden = true;
    $("image-error").textContent = "The browser cannot show this file; the server will say whether it can read it.";
  }
}

function wire() {
  $("controls").addEventListener("submit", run);
  $("cancel").addEventListener("click", () => state.running?.abort());
  $("model").addEventListener("change", () => applyModel(state.models.get($("model").value)));
  for (const radio of document.querySelectorAll("input[name=mode]")) radio.addEventListener("change", setMode);
  $("seed-random").addEventListener("click", () => ($("seed").value = ""));
  $("seed-last").addEventListener("click", () => ($("seed").value = String(state.lastSeed)));
  $("strength").addEventListener("input", () => {
    state.strengthSet = true;
    showStrength();
  });
  $("mask-canvas").addEventListener("pointerdown", () => defaultStrength(true));
  $("stream").addEventListener("change", () => ($("partial_images").disabled = !$("stream").checked));
  $("image").addEventListener("change", showImage);
  $("clear-mask").addEventListener("click", () => {
    painter.clear();
    defaultStrength(false);
  });
  for (const id of ["prompt", "negative_prompt"]) {
    $(id).addEventListener("keydown", (e) => {
      if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) $("controls").requestSubmit();
    });
  }
  $("key-box").addEventListener("submit", (e) => {
    e.preventDefault();
    setApiKey($("api-key").value.trim());
    loadModels();
  });
  $("api-key").value = apiKey();
}

wire();
setMode();
showStrength();
loadModels();
