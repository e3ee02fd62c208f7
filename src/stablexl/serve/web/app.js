// stablexl web page: plain JS against the native API (/v1). No build step.
"use strict";

const $ = (id) => document.getElementById(id);
const form = $("gen-form");
const state = { models: [], limits: null, job: null, imageLoaded: false, painting: false, last: null };

// ---- HTTP ---------------------------------------------------------------------------------------

function headers(extra = {}) {
  const key = $("api_key").value.trim();
  return key ? { ...extra, Authorization: `Bearer ${key}` } : extra;
}

async function api(path, options = {}) {
  const r = await fetch(path, { ...options, headers: headers(options.headers || {}) });
  if (r.status === 401) {
    $("auth").open = true;
    $("api_key").focus();
    throw new Error("This server needs an API key: enter it under \"API key\".");
  }
  return r;
}

// FastAPI-style {"detail": [{loc, msg}]} or {"detail": "text"} -> readable lines; marks the named fields
function explain(body) {
  const detail = body && body.detail;
  if (!Array.isArray(detail)) return String(detail || "request failed");
  return detail.map((d) => {
    const field = (d.loc || []).filter((p) => p !== "body").join(".");
    markInvalid(field);
    return field ? `${field}: ${d.msg}` : d.msg;
  }).join("\n");
}

const FIELD_INPUTS = { init_image: "init_image", mask: "mask-canvas", original_size: "original_w",
  target_size: "target_w", crop: "crop_top", negative_prompt: "negative_prompt" };

function markInvalid(field) {
  const id = FIELD_INPUTS[field] || field;
  const el = $(id);
  if (el) el.setAttribute("aria-invalid", "true");
}

function clearInvalid() {
  form.querySelectorAll("[aria-invalid]").forEach((el) => el.removeAttribute("aria-invalid"));
  $("form-error").hidden = true;
}

function showError(message) {
  const el = $("form-error");
  el.textContent = message;
  el.hidden = false;
  const bad = form.querySelector("[aria-invalid='true']");
  if (bad) bad.focus();
}

// ---- setup ----------------------------------------------------------------------------------------

function option(value, label) {
  const o = document.createElement("option");
  o.value = value;
  o.textContent = label;
  return o;
}

async function loadServer() {
  try {
    const [models, samplers, info] = await Promise.all(
      ["/v1/models", "/v1/samplers", "/v1/server"].map(async (p) => {
        const r = await api(p);
        if (!r.ok) throw new Error(`${p}: HTTP ${r.status}`);
        return r.json();
      }));
    state.models = models;
    state.limits = info.limits;
    $("model").replaceChildren(...models.map((m) => option(m.name, `${m.name} (${m.family})`)));
    $("refiner").replaceChildren(option("", "none"), ...models.map((m) => option(m.name, m.name)));
    $("sampler").replaceChildren(option("", "model default"),
      ...samplers.samplers.map((s) => option(s.name, s.a1111_name ? `${s.a1111_name} (${s.name})` : s.name)));
    $("schedule").replaceChildren(option("", "model default"),
      ...samplers.schedules.map((s) => option(s.name, s.a1111_name ? `${s.a1111_name} (${s.name})` : s.name)));
    const def = models.find((m) => m.default) || models[0];
    if (def) $("model").value = def.name;
    applyLimits();
    applyModelDefaults();
    $("server-info").textContent = `stablexl ${info.version} · max ${info.limits.max_width}×${info.limits.max_height}, ` +
      `${info.limits.max_steps} steps, ${info.limits.max_batch} images per request`;
  } catch (e) {
    $("server-info").textContent = `Cannot reach the server: ${e.message}`;
  }
}

function applyLimits() {
  const lim = state.limits;
  $("width").max = lim.max_width;
  $("height").max = lim.max_height;
  $("steps").max = lim.max_steps;
  $("batch").max = lim.max_batch;
  for (const o of $("size_preset").querySelectorAll("option")) {
    if (o.value === "custom") continue;
    const [w, h] = o.value.split("x").map(Number);
    o.disabled = w > lim.max_width || h > lim.max_height;
  }
}

function currentModel() {
  return state.models.find((m) => m.name === $("model").value);
}

function applyModelDefaults() {
  const m = currentModel();
  if (!m) return;
  $("steps").value = Math.min(m.defaults.steps, state.limits ? state.limits.max_steps : m.defaults.steps);
  $("cfg").value = m.defaults.cfg;
  // "model default" names what the model will use (e.g. a Turbo model's trailing schedule)
  $("sampler").options[0].textContent = `model default (${m.defaults.sampler})`;
  $("schedule").options[0].textContent = `model default (${m.defaults.schedule})`;
  setSize(m.resolution, m.resolution);
}

function setSize(w, h) {
  $("width").value = w;
  $("height").value = h;
  const preset = `${w}x${h}`;
  const match = [...$("size_preset").options].find((o) => o.value === preset && !o.disabled);
  $("size_preset").value = match ? preset : "custom";
}

// ---- images and the mask --------------------------------------------------------------------------

function mode() {
  return form.querySelector("input[name=mode]:checked").value;
}

function updateMode() {
  const m = mode();
  $("image-inputs").hidden = m === "txt2img";
  $("mask-tools").hidden = m !== "inpaint";
  $("mask-canvas").hidden = m !== "inpaint";
  $("canvas-wrap").hidden = m === "txt2img" || !state.imageLoaded;
}

function loadInitImage(file) {
  if (!file) return;
  const img = new Image();
  img.onload = () => {
    const c = $("image-canvas");
    const mask = $("mask-canvas");
    c.width = mask.width = img.naturalWidth;
    c.height = mask.height = img.naturalHeight;
    c.getContext("2d").drawImage(img, 0, 0);
    mask.getContext("2d").clearRect(0, 0, mask.width, mask.height);
    state.imageLoaded = true;
    URL.revokeObjectURL(img.src);
    const lim = state.limits || { max_width: 1e9, max_height: 1e9 };
    const w = Math.max(8, Math.min(lim.max_width, Math.floor(img.naturalWidth / 8) * 8));
    const h = Math.max(8, Math.min(lim.max_height, Math.floor(img.naturalHeight / 8) * 8));
    setSize(w, h);
    updateMode();
  };
  img.onerror = () => showError("init_image: the file is not an image the browser can read");
  img.src = URL.createObjectURL(file);
}

function maskPoint(ev) {
  const c = $("mask-canvas");
  const r = c.getBoundingClientRect();
  return [(ev.clientX - r.left) * (c.width / r.width), (ev.clientY - r.top) * (c.height / r.height)];
}

function paint(ev) {
  const c = $("mask-canvas");
  const ctx = c.getContext("2d");
  const [x, y] = maskPoint(ev);
  const size = Number($("brush").value) || 12;
  ctx.fillStyle = ctx.strokeStyle = "#fff";
  ctx.lineWidth = size;
  ctx.lineCap = "round";
  if (state.last) {
    ctx.beginPath();
    ctx.moveTo(...state.last);
    ctx.lineTo(x, y);
    ctx.stroke();
  }
  ctx.beginPath();
  ctx.arc(x, y, size / 2, 0, 2 * Math.PI);
  ctx.fill();
  state.last = [x, y];
}

function setupMask() {
  const c = $("mask-canvas");
  c.addEventListener("pointerdown", (ev) => {
    state.painting = true;
    state.last = null;
    c.setPointerCapture(ev.pointerId);
    paint(ev);
  });
  c.addEventListener("pointermove", (ev) => { if (state.painting) paint(ev); });
  const stop = () => { state.painting = false; state.last = null; };
  c.addEventListener("pointerup", stop);
  c.addEventListener("pointercancel", stop);
  $("mask-clear").addEventListener("click", () => c.getContext("2d").clearRect(0, 0, c.width, c.height));
  $("mask-fill").addEventListener("click", () => {
    const ctx = c.getContext("2d");
    ctx.fillStyle = "#fff";
    ctx.fillRect(0, 0, c.width, c.height);
  });
}

// the painted strokes (white, transparent elsewhere) over black: white = repaint
function maskPNG() {
  const src = $("mask-canvas");
  const out = document.createElement("canvas");
  out.width = src.width;
  out.height = src.height;
  const ctx = out.getContext("2d");
  ctx.fillStyle = "#000";
  ctx.fillRect(0, 0, out.width, out.height);
  ctx.drawImage(src, 0, 0);
  return out.toDataURL("image/png");
}

// ---- building the request -----------------------------------------------------------------------

function num(id) {
  const v = $(id).value.trim();
  return v === "" ? null : Number(v);
}

function pair(a, b) {
  const x = num(a), y = num(b);
  return x === null || y === null ? null : [x, y];
}

function requestBody() {
  const body = {
    prompt: $("prompt").value,
    negative_prompt: $("negative_prompt").value || null,
    model: $("model").value || null,
    sampler: $("sampler").value || null,
    schedule: $("schedule").value || null,
    steps: num("steps"),
    cfg: num("cfg"),
    seed: $("random_seed").checked ? null : num("seed"),
    width: num("width"),
    height: num("height"),
    batch: num("batch") || 1,
    guidance_rescale: num("guidance_rescale") || 0,
    aesthetic_score: num("aesthetic_score") ?? 6,
    negative_aesthetic_score: num("negative_aesthetic_score") ?? 2.5,
  };
  if ($("refiner").value) {
    body.refiner = $("refiner").value;
    body.refiner_mode = $("refiner_mode").value;
    if (body.refiner_mode === "sdedit") body.refiner_strength = num("refiner_strength");
    else body.refiner_switch_at = num("refiner_switch_at");
  }
  // SDXL micro-conditioning: the API takes (height, width) and (top, left) pairs
  const orig = pair("original_h", "original_w");
  const target = pair("target_h", "target_w");
  if (orig) body.original_size = orig;
  if (target) body.target_size = target;
  body.crop = [num("crop_top") || 0, num("crop_left") || 0];
  const m = mode();
  if (m === "txt2img" && $("hires_enable").checked) {
    body.hires = {
      scale: num("hires_scale") ?? 2,
      upscaler: $("hires_upscaler").value,
      steps: num("hires_steps"),
      strength: num("hires_strength") ?? 0.7,
    };
  }
  if (m !== "txt2img") {
    if (!state.imageLoaded) {
      markInvalid("init_image");
      throw new Error("init_image: choose an image to start from");
    }
    body.init_image = $("image-canvas").toDataURL("image/png");
    body.strength = num("strength");
    if (m === "inpaint") {
      body.mask = maskPNG();
      body.mask_blur = num("mask_blur") || 0;
      body.mask_invert = $("mask_invert").checked;
    }
  }
  return body;
}

// ---- running a job ----------------------------------------------------------------------------------

function setBusy(busy) {
  $("generate").disabled = busy;
  $("cancel").disabled = !busy;
  form.setAttribute("aria-busy", String(busy));
}

function showProgress(job) {
  const p = job.progress;
  $("progress").value = p.fraction;
  let text = job.state;
  if (job.state === "queued" && job.queue_position !== null) text += ` (${job.queue_position} ahead)`;
  if (job.state === "running") {
    text = `step ${p.step}/${p.total}`;
    if (job.eta_seconds !== null) text += `, about ${Math.ceil(job.eta_seconds)} s left`;
  }
  $("status").textContent = text;
  if (job.preview) {
    $("preview").src = `data:image/png;base64,${job.preview}`;
    $("preview").hidden = false;
  }
}

// server-sent events over fetch (EventSource cannot send the Authorization header)
async function follow(id) {
  const r = await api(`/v1/jobs/${id}/events`);
  if (!r.ok || !r.body) return null;
  const reader = r.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return null;
    buffer += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const chunk = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      let kind = "message", data = "";
      for (const line of chunk.split("\n")) {
        if (line.startsWith("event: ")) kind = line.slice(7);
        else if (line.startsWith("data: ")) data += line.slice(6);
      }
      if (!data) continue;
      const job = JSON.parse(data);
      showProgress(job);
      if (kind === "done") return job;
    }
  }
}

async function poll(id) {  // fallback when the stream breaks off
  for (;;) {
    const r = await api(`/v1/jobs/${id}`);
    if (!r.ok) throw new Error(explain(await r.json()));
    const job = await r.json();
    showProgress(job);
    if (["succeeded", "failed", "cancelled"].includes(job.state)) return job;
    await new Promise((ok) => setTimeout(ok, 500));
  }
}

async function generate() {
  clearInvalid();
  if (!$("prompt").value.trim() && mode() === "txt2img") {
    markInvalid("prompt");
    showError("prompt: write what the picture should show");
    return;
  }
  let body;
  try {
    body = requestBody();
  } catch (e) {
    showError(e.message);
    return;
  }
  setBusy(true);
  $("status").textContent = "submitting";
  $("progress").value = 0;
  try {
    const r = await api("/v1/generate", { method: "POST", headers: { "Content-Type": "application/json" },
      body: JSON.stringify(body) });
    const answer = await r.json();
    if (r.status === 429) throw new Error(`The queue is full; try again in ${r.headers.get("Retry-After")} s.`);
    if (!r.ok) throw new Error(explain(answer));
    state.job = answer.id;
    showProgress(answer);
    let job = null;
    try {
      job = await follow(answer.id);
    } catch (e) {
      job = null;
    }
    if (!job) job = await poll(answer.id);
    finish(job);
  } catch (e) {
    $("status").textContent = "failed";
    showError(e.message);
  } finally {
    state.job = null;
    setBusy(false);
    $("preview").hidden = true;
  }
}

function finish(job) {
  if (job.state === "failed") {
    $("status").textContent = "failed";
    showError(job.error);
    return;
  }
  if (job.state === "cancelled") {
    $("status").textContent = "cancelled";
    return;
  }
  $("progress").value = 1;
  $("status").textContent = `done: ${job.images.length} image${job.images.length === 1 ? "" : "s"}`;
  job.images.forEach((img) => addResult(img, job.settings));
}

async function cancel() {
  if (!state.job) return;
  $("status").textContent = "cancelling";
  await api(`/v1/jobs/${state.job}`, { method: "DELETE" });
}

// ---- gallery -------------------------------------------------------------------------------------------

function addResult(img, settings) {
  const li = document.createElement("li");
  li.className = "result";
  const fig = document.createElement("figure");
  const pic = document.createElement("img");
  pic.src = `data:image/png;base64,${img.image}`;
  pic.alt = `Generated image, seed ${img.seed}: ${settings.prompt}`;
  pic.width = img.width;
  pic.height = img.height;
  const cap = document.createElement("figcaption");
  const text = document.createElement("pre");
  text.className = "infotext";
  text.textContent = img.infotext;
  const buttons = document.createElement("div");
  buttons.className = "buttons";
  const download = document.createElement("a");
  download.className = "button download";
  download.href = pic.src;
  download.download = `stablexl-${img.seed}.png`;
  download.textContent = "Download";
  download.setAttribute("aria-label", `Download image with seed ${img.seed}`);
  const reuse = document.createElement("button");
  reuse.type = "button";
  reuse.className = "reuse";
  reuse.textContent = "Reuse these settings";
  reuse.setAttribute("aria-label", `Reuse the settings of the image with seed ${img.seed}`);
  reuse.addEventListener("click", () => reuseSettings({ ...settings, seed: img.seed }));
  buttons.append(download, reuse);
  cap.append(text, buttons);
  fig.append(pic, cap);
  li.append(fig);
  $("gallery").prepend(li);
  $("gallery-empty").hidden = true;
}

function reuseSettings(s) {
  $("prompt").value = s.prompt;
  $("negative_prompt").value = s.negative_prompt || "";
  if (s.model) $("model").value = s.model;
  $("sampler").value = s.sampler || "";
  $("schedule").value = s.schedule || "";
  $("steps").value = s.steps;
  $("cfg").value = s.cfg;
  $("random_seed").checked = false;
  $("seed").disabled = false;
  $("seed").value = s.seed;
  setSize(s.width, s.height);
  $("batch").value = 1;
  $("guidance_rescale").value = s.guidance_rescale || 0;
  $("refiner").value = s.refiner || "";
  if (s.refiner) {
    $("refiner_mode").value = s.refiner_mode || "handoff";
    if (s.refiner_switch_at != null) $("refiner_switch_at").value = s.refiner_switch_at;
    if (s.refiner_strength != null) $("refiner_strength").value = s.refiner_strength;
  }
  $("aesthetic_score").value = s.aesthetic_score ?? 6;
  $("negative_aesthetic_score").value = s.negative_aesthetic_score ?? 2.5;
  const [oh, ow] = s.original_size || ["", ""];
  const [th, tw] = s.target_size || ["", ""];
  const [ct, cl] = s.crop || [0, 0];
  Object.entries({ original_h: oh, original_w: ow, target_h: th, target_w: tw, crop_top: ct, crop_left: cl })
    .forEach(([id, v]) => { $(id).value = v; });
  if (s.strength !== null && s.strength !== undefined) $("strength").value = s.strength;
  $("hires_enable").checked = Boolean(s.hires);
  if (s.hires) {
    $("hires_scale").value = s.hires.scale;
    $("hires_upscaler").value = s.hires.upscaler;
    $("hires_steps").value = s.hires.steps ?? "";
    $("hires_strength").value = s.hires.strength;
  }
  $("prompt").focus();
  $("status").textContent = `settings of seed ${s.seed} loaded`;
}

// ---- wiring ---------------------------------------------------------------------------------------------

function init() {
  $("api_key").value = localStorage.getItem("stablexl-api-key") || "";
  $("api_key").addEventListener("change", () => {
    localStorage.setItem("stablexl-api-key", $("api_key").value.trim());
    loadServer();
  });
  form.addEventListener("submit", (ev) => {
    ev.preventDefault();
    if (!state.job) generate();
  });
  form.addEventListener("keydown", (ev) => {
    if (ev.key === "Enter" && (ev.ctrlKey || ev.metaKey)) {
      ev.preventDefault();
      if (!state.job) generate();
    } else if (ev.key === "Escape" && state.job) {
      ev.preventDefault();
      cancel();
    }
  });
  $("cancel").addEventListener("click", cancel);
  $("random_seed").addEventListener("change", () => {
    $("seed").disabled = $("random_seed").checked;
    if (!$("seed").disabled && !$("seed").value) $("seed").value = Math.floor(Math.random() * 2 ** 31);
  });
  $("size_preset").addEventListener("change", () => {
    const v = $("size_preset").value;
    if (v === "custom") return;
    const [w, h] = v.split("x").map(Number);
    setSize(w, h);
  });
  for (const id of ["width", "height"]) {
    $(id).addEventListener("input", () => setSize(num("width"), num("height")));
  }
  $("model").addEventListener("change", applyModelDefaults);
  form.querySelectorAll("input[name=mode]").forEach((r) => r.addEventListener("change", updateMode));
  $("init_image").addEventListener("change", () => loadInitImage($("init_image").files[0]));
  form.addEventListener("input", (ev) => ev.target.removeAttribute && ev.target.removeAttribute("aria-invalid"));
  setupMask();
  updateMode();
  loadServer();
}

init();
