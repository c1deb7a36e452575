// The showo-mlx page: plain JS, no build step, no outside resources. It talks only to the
// server's OpenAI-compatible endpoints: /health, /v1/images/generations, /v1/images/edits and
// /v1/chat/completions (streamed as server-sent events).
"use strict";

const $ = (id) => document.getElementById(id);
const keyBox = $("api-key");
keyBox.value = sessionStorage.getItem("showo-api-key") || "";
keyBox.addEventListener("change", () => { sessionStorage.setItem("showo-api-key", keyBox.value); refreshHealth(); });

function authHeaders(extra = {}) {
  const key = keyBox.value.trim();
  return key ? { ...extra, Authorization: "Bearer " + key } : extra;
}

function setStatus(id, text, isError = false) {
  const el = $(id);
  el.textContent = text;
  el.classList.toggle("error", isError);
}

function numberOrUndefined(id) {
  const v = $(id).value.trim();
  return v === "" ? undefined : Number(v);
}

async function errorText(response) {
  try {
    const body = await response.json();
    return (body.error && body.error.message) || response.statusText;
  } catch (e) {
    return response.status + " " + response.statusText;
  }
}

// Read a text/event-stream body; calls onEvent(eventName, data) for each event ("[DONE]" ends it).
async function readEvents(response, onEvent) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      let event = "message", data = "";
      for (const line of block.split("\n")) {
        if (line.startsWith("event:")) event = line.slice(6).trim();
        else if (line.startsWith("data:")) data += line.slice(5).trim();
      }
      if (!data) continue;
      if (data === "[DONE]") return;
      onEvent(event, JSON.parse(data));
    }
  }
}

async function refreshHealth() {
  try {
    const r = await fetch("/health", { headers: authHeaders() });
    if (!r.ok) { $("model").textContent = await errorText(r); return; }
    const h = await r.json();
    $("model").textContent = `${h.model} · ${h.resolution}px · queue ${h.queue.waiting}`;
  } catch (e) {
    $("model").textContent = "server unreachable";
  }
}

// Show a streamed image job: partial images go to `previewId`, the final one to `resultId`.
async function runImageStream(response, prefix, previewId, resultId, statusId) {
  const preview = $(previewId);
  let partials = 0, finished = false;
  await readEvents(response, (event, data) => {
    if (data.error) throw new Error(data.error.message);
    if (data.type === prefix + ".partial_image") {
      partials += 1;
      preview.src = "data:image/png;base64," + data.b64_json;
      preview.dataset.partials = String(partials);
      setStatus(statusId, `step ${data.step} of ${data.steps}…`);
    } else if (data.type === prefix + ".completed" && data.image_index === 0) {
      $(resultId).src = data.url || "data:image/png;base64," + data.b64_json;
      $(resultId).dataset.seed = data.seed;
      finished = true;
      setStatus(statusId, `done (seed ${data.seed}${data.warnings ? "; " + data.warnings.join("; ") : ""})`);
    }
  });
  if (!finished) throw new Error("the stream ended without an image");
}

// -- generate ---------------------------------------------------------------------------------
$("gen-button").addEventListener("click", async () => {
  const body = {
    prompt: $("gen-prompt").value,
    steps: numberOrUndefined("gen-steps"),
    guidance: numberOrUndefined("gen-guidance"),
    seed: numberOrUndefined("gen-seed"),
    greedy: $("gen-greedy").checked,
    stream: true,
    partial_images: numberOrUndefined("gen-partials") ?? 0,
  };
  $("gen-button").disabled = true;
  $("gen-preview").dataset.partials = "0";
  $("gen-result").removeAttribute("src");
  setStatus("gen-status", "waiting for the model…");
  try {
    const r = await fetch("/v1/images/generations", {
      method: "POST", headers: authHeaders({ "Content-Type": "application/json" }), body: JSON.stringify(body),
    });
    if (!r.ok) throw new Error(await errorText(r));
    await runImageStream(r, "image_generation", "gen-preview", "gen-result", "gen-status");
  } catch (e) {
    setStatus("gen-status", e.message, true);
  } finally {
    $("gen-button").disabled = false;
  }
});

// -- ask --------------------------------------------------------------------------------------
let askImage = null; // a data: URI
$("ask-file").addEventListener("change", () => {
  const file = $("ask-file").files[0];
  if (!file) return;
  const reader = new FileReader();
  reader.onload = () => { askImage = reader.result; $("ask-thumb").src = askImage; };
  reader.readAsDataURL(file);
});

$("ask-button").addEventListener("click", async () => {
  const answer = $("ask-answer");
  const content = [{ type: "text", text: $("ask-question").value }];
  if (askImage) content.push({ type: "image_url", image_url: { url: askImage } });
  answer.textContent = "";
  answer.dataset.done = "0";
  $("ask-button").disabled = true;
  setStatus("ask-status", "waiting for the model…");
  try {
    const r = await fetch("/v1/chat/completions", {
      method: "POST", headers: authHeaders({ "Content-Type": "application/json" }),
      body: JSON.stringify({ messages: [{ role: "user", content }], stream: true, max_tokens: numberOrUndefined("ask-max-tokens") }),
    });
    if (!r.ok) throw new Error(await errorText(r));
    let reason = null;
    await readEvents(r, (event, data) => {
      if (data.error) throw new Error(data.error.message);
      for (const choice of data.choices || []) {
        if (choice.delta && choice.delta.content) answer.textContent += choice.delta.content;
        if (choice.finish_reason) reason = choice.finish_reason;
      }
      setStatus("ask-status", "answering…");
    });
    setStatus("ask-status", reason === "length" ? "stopped at max tokens" : "done");
    answer.dataset.done = "1";
  } catch (e) {
    setStatus("ask-status", e.message, true);
  } finally {
    $("ask-button").disabled = false;
  }
});

// -- inpaint ----------------------------------------------------------------------------------
const imageCanvas = $("edit-image"), paintCanvas = $("edit-paint");
let editFile = null, painting = false;

$("edit-file").addEventListener("change", () => {
  editFile = $("edit-file").files[0] || null;
  if (!editFile) return;
  const img = new Image();
  img.onload = () => {
    for (const c of [imageCanvas, paintCanvas]) { c.width = img.naturalWidth; c.height = img.naturalHeight; }
    imageCanvas.getContext("2d").drawImage(img, 0, 0);
    URL.revokeObjectURL(img.src);
  };
  img.src = URL.createObjectURL(editFile);
});

function paintAt(event) {
  const rect = paintCanvas.getBoundingClientRect();
  const x = (event.clientX - rect.left) * paintCanvas.width / rect.width;
  const y = (event.clientY - rect.top) * paintCanvas.height / rect.height;
  const r = Number($("edit-brush").value) * paintCanvas.width / rect.width / 2;
  const ctx = paintCanvas.getContext("2d");
  ctx.fillStyle = "rgba(255, 0, 80, 0.55)";
  ctx.beginPath();
  ctx.arc(x, y, r, 0, 2 * Math.PI);
  ctx.fill();
}
paintCanvas.addEventListener("pointerdown", (e) => { painting = true; paintCanvas.setPointerCapture(e.pointerId); paintAt(e); });
paintCanvas.addEventListener("pointermove", (e) => { if (painting) paintAt(e); });
paintCanvas.addEventListener("pointerup", () => { painting = false; });
$("edit-clear").addEventListener("click", () => paintCanvas.getContext("2d").clearRect(0, 0, paintCanvas.width, paintCanvas.height));

// OpenAI's mask convention: opaque everywhere, transparent where the brush went.
function brushMask() {
  const mask = document.createElement("canvas");
  mask.width = paintCanvas.width; mask.height = paintCanvas.height;
  const ctx = mask.getContext("2d");
  ctx.fillStyle = "#000";
  ctx.fillRect(0, 0, mask.width, mask.height);
  ctx.globalCompositeOperation = "destination-out";
  ctx.drawImage(paintCanvas, 0, 0);
  // the brush is half transparent: make every touched pixel fully transparent
  const px = ctx.getImageData(0, 0, mask.width, mask.height);
  for (let i = 3; i < px.data.length; i += 4) px.data[i] = px.data[i] < 255 ? 0 : 255;
  ctx.putImageData(px, 0, 0);
  return new Promise((resolve) => mask.toBlob(resolve, "image/png"));
}

$("edit-button").addEventListener("click", async () => {
  if (!editFile) { setStatus("edit-status", "choose an image first", true); return; }
  const form = new FormData();
  form.append("image", editFile);
  const maskFile = $("edit-mask-file").files[0];
  form.append("mask", maskFile || await brushMask(), "mask.png");
  form.append("prompt", $("edit-prompt").value);
  for (const [field, id] of [["steps", "edit-steps"], ["seed", "edit-seed"]]) {
    const v = $(id).value.trim();
    if (v !== "") form.append(field, v);
  }
  form.append("stream", "true");
  form.append("partial_images", "2");
  $("edit-button").disabled = true;
  $("edit-result").removeAttribute("src");
  setStatus("edit-status", "waiting for the model…");
  try {
    const r = await fetch("/v1/images/edits", { method: "POST", headers: authHeaders(), body: form });
    if (!r.ok) throw new Error(await errorText(r));
    await runImageStream(r, "image_edit", "edit-preview", "edit-result", "edit-status");
  } catch (e) {
    setStatus("edit-status", e.message, true);
  } finally {
    $("edit-button").disabled = false;
  }
});

refreshHealth();
