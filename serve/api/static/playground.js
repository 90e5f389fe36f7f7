// svd-serve playground: plain browser JavaScript, no framework, no build step.
//
// - The parameter form is generated from the service's /openapi.json (the multipart body of
//   POST /v1/videos), so defaults, ranges and enums never drift from the server.
// - The API key lives in sessionStorage only and is sent only in the Authorization header of
//   same-origin requests (never in a URL, never in localStorage or a cookie). EventSource cannot
//   send that header, so job events are read with fetch() and a streaming body reader.
// - Server data is only ever rendered with textContent / element properties (the page's CSP
//   requires Trusted Types, so an innerHTML assignment would throw).
"use strict";

(() => {
  const KEY_STORAGE = "svd-serve.api-key";
  const TERMINAL = new Set(["completed", "failed", "cancelled"]);
  // Fields of POST /v1/videos' multipart body that are not generation parameters: the image, the
  // route's own and OpenAI's (size and seconds only restate width, height and num_frames). Used
  // only when the schema publishes no GenerationParams component.
  const NOT_PARAMETERS = new Set(["image", "input_reference", "input_reference[image_url]",
    "input_reference[file_id]", "params", "webhook_url", "webhook_events", "prompt", "model", "seconds", "size"]);
  const RECENT_LIMIT = 10;
  const MAX_RECONNECTS = 5;

  const $ = (id) => document.getElementById(id);
  const el = (tag, props = {}, children = []) => {
    const node = document.createElement(tag);
    Object.assign(node, props);
    for (const child of children) node.append(child);
    return node;
  };
  const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));
  const jobPath = (id, rest = "") => `/v1/videos/${encodeURIComponent(id)}${rest}`;

  const state = {
    fields: [], // [{name, kind: "integer" | "number" | "string", input}]
    currentId: null,
    following: null, // AbortController of the events stream being read
    clipUrl: null, // blob: URL of the clip shown
    previewUrl: null,
  };

  // -- the API key ------------------------------------------------------------------------------

  function apiKey() {
    return sessionStorage.getItem(KEY_STORAGE) || "";
  }

  function setupKey() {
    const input = $("api-key");
    input.value = apiKey();
    input.addEventListener("input", () => {
      const key = input.value.trim();
      if (key) sessionStorage.setItem(KEY_STORAGE, key);
      else sessionStorage.removeItem(KEY_STORAGE);
    });
    input.addEventListener("change", () => refreshRecent());
    $("forget-key").addEventListener("click", () => {
      sessionStorage.removeItem(KEY_STORAGE);
      input.value = "";
      $("recent-jobs").replaceChildren();
    });
  }

  // -- HTTP -------------------------------------------------------------------------------------

  class ApiError extends Error {
    constructor(status, message) {
      super(message);
      this.status = status;
    }
  }

  async function errorMessage(response) {
    try {
      const body = await response.json();
      if (body && body.error && typeof body.error.message === "string") return body.error.message;
      if (body && typeof body.detail === "string") return body.detail;
    } catch (_) { /* not JSON */ }
    if (response.status === 401) return "the API key was not accepted";
    return `HTTP ${response.status} ${response.statusText}`.trim();
  }

  // Same-origin requests only: paths, never absolute URLs, so the key goes nowhere else.
  async function api(path, options = {}) {
    if (!path.startsWith("/")) throw new Error("api(): a path on this server expected");
    const key = apiKey();
    if (!key) throw new ApiError(401, "type your API key first");
    const headers = new Headers(options.headers || {});
    headers.set("Authorization", `Bearer ${key}`);
    const response = await fetch(path, { ...options, headers, credentials: "omit", cache: "no-store" });
    if (!response.ok) throw new ApiError(response.status, await errorMessage(response));
    return response;
  }

  // -- the parameter form, from the OpenAPI schema -----------------------------------------------

  function resolveRef(schema, node) {
    let current = node;
    for (let depth = 0; current && current.$ref && depth < 10; depth++) {
      const parts = current.$ref.replace(/^#\//, "").split("/");
      let target = schema;
      for (const part of parts) target = target && target[part];
      current = { ...(target || {}), ...current, $ref: undefined };
    }
    return current || {};
  }

  // One property -> {type, enum, minimum, maximum, multipleOf, default, nullable, description}.
  function describeProperty(schema, raw) {
    const prop = resolveRef(schema, raw);
    const variants = (prop.anyOf || prop.oneOf || [prop]).map((v) => resolveRef(schema, v));
    const nullable = variants.some((v) => v.type === "null");
    const main = variants.find((v) => v.type !== "null") || {};
    return {
      type: main.type || prop.type || "string",
      enum: main.enum || prop.enum || null,
      minimum: main.minimum ?? prop.minimum,
      maximum: main.maximum ?? prop.maximum,
      multipleOf: main.multipleOf ?? prop.multipleOf,
      default: prop.default ?? main.default,
      nullable,
      description: prop.description || main.description || "",
    };
  }

  // GenerationParams' properties: its own component when published, else the multipart body of
  // POST /v1/videos (each parameter is a form field there) less the fields that are not parameters.
  function generationProperties(openapi) {
    const component = openapi.components && openapi.components.schemas && openapi.components.schemas.GenerationParams;
    if (component && component.properties) return Object.entries(component.properties);
    const post = openapi.paths && openapi.paths["/v1/videos"] && openapi.paths["/v1/videos"].post;
    const content = post && post.requestBody && post.requestBody.content;
    const multipart = content && content["multipart/form-data"];
    const body = multipart ? resolveRef(openapi, multipart.schema) : null;
    if (!body || !body.properties) throw new Error("the OpenAPI schema has no request body for POST /v1/videos");
    return Object.entries(body.properties).filter(([name]) => !NOT_PARAMETERS.has(name));
  }

  function rangeHint(spec) {
    const parts = [];
    if (spec.minimum !== undefined && spec.maximum !== undefined) parts.push(`${spec.minimum}–${spec.maximum}`);
    else if (spec.minimum !== undefined) parts.push(`≥ ${spec.minimum}`);
    else if (spec.maximum !== undefined) parts.push(`≤ ${spec.maximum}`);
    if (spec.multipleOf !== undefined) parts.push(`multiple of ${spec.multipleOf}`);
    if (spec.default !== undefined && spec.default !== null) parts.push(`default ${spec.default}`);
    else if (spec.nullable) parts.push("default: automatic");
    return parts.join(", ");
  }

  function fieldInput(name, spec) {
    if (spec.enum) {
      const select = el("select", { name, id: `param-${name}` });
      if (spec.nullable || spec.default === undefined) select.append(el("option", { value: "", textContent: "(default)" }));
      for (const value of spec.enum) {
        select.append(el("option", { value: String(value), textContent: String(value),
                                     selected: value === spec.default }));
      }
      return { input: select, kind: "string" };
    }
    if (spec.type === "integer" || spec.type === "number") {
      const input = el("input", { type: "number", name, id: `param-${name}` });
      if (spec.minimum !== undefined) input.min = String(spec.minimum);
      if (spec.maximum !== undefined) input.max = String(spec.maximum);
      input.step = spec.multipleOf !== undefined ? String(spec.multipleOf) : spec.type === "integer" ? "1" : "any";
      if (spec.default !== undefined && spec.default !== null) input.value = String(spec.default);
      else input.placeholder = "auto";
      return { input, kind: spec.type };
    }
    if (spec.type === "boolean") {
      const select = el("select", { name, id: `param-${name}` }, [el("option", { value: "", textContent: "(default)" }),
        el("option", { value: "true", textContent: "true" }), el("option", { value: "false", textContent: "false" })]);
      if (typeof spec.default === "boolean") select.value = String(spec.default);
      return { input: select, kind: "boolean" };
    }
    const input = el("input", { type: "text", name, id: `param-${name}` });
    if (typeof spec.default === "string") input.value = spec.default;
    return { input, kind: "string" };
  }

  async function buildForm() {
    const container = $("param-fields");
    try {
      const response = await fetch("/openapi.json", { credentials: "omit" });
      if (!response.ok) throw new Error(`HTTP ${response.status}`);
      const openapi = await response.json();
      const nodes = [];
      state.fields = [];
      for (const [name, raw] of generationProperties(openapi)) {
        const spec = describeProperty(openapi, raw);
        const { input, kind } = fieldInput(name, spec);
        input.title = spec.description;
        state.fields.push({ name, kind, input });
        nodes.push(el("div", { className: "param" }, [
          el("label", { htmlFor: input.id, textContent: name }), input,
          el("p", { className: "hint", textContent: rangeHint(spec) }),
        ]));
      }
      container.replaceChildren(...nodes);
      $("submit").disabled = false;
    } catch (error) {
      container.replaceChildren(el("p", { className: "error", textContent: `Could not load the schema: ${error.message}` }));
    }
  }

  // The filled-in parameters, typed; empty fields are left to the service's defaults.
  function parameters() {
    const values = {};
    for (const { name, kind, input } of state.fields) {
      const raw = input.value.trim();
      if (raw === "") continue;
      if (kind === "integer" || kind === "number") values[name] = Number(raw);
      else if (kind === "boolean") values[name] = raw === "true";
      else values[name] = raw;
    }
    return values;
  }

  // -- the image --------------------------------------------------------------------------------

  function imageSource() {
    return document.querySelector('input[name="source"]:checked').value;
  }

  function setupImage() {
    for (const radio of document.querySelectorAll('input[name="source"]')) {
      radio.addEventListener("change", () => {
        const source = imageSource();
        $("image-file").hidden = source !== "file";
        $("image-url").hidden = source !== "url";
        $("prompt-text").hidden = source !== "prompt";
        $("preview").hidden = !(source === "file" && state.previewUrl);
      });
    }
    $("image-file").addEventListener("change", () => {
      if (state.previewUrl) URL.revokeObjectURL(state.previewUrl);
      const file = $("image-file").files[0];
      state.previewUrl = file ? URL.createObjectURL(file) : null;
      if (state.previewUrl) $("preview").src = state.previewUrl;
      else $("preview").removeAttribute("src");
      $("preview").hidden = !state.previewUrl;
    });
  }

  // -- submit -----------------------------------------------------------------------------------

  async function submit(event) {
    event.preventDefault();
    const errorBox = $("form-error");
    errorBox.textContent = "";
    for (const { input } of state.fields) {
      if (!input.checkValidity()) {
        errorBox.textContent = `${input.name}: ${input.validationMessage}`;
        input.focus();
        return;
      }
    }
    let request;
    if (imageSource() === "file") {
      const file = $("image-file").files[0];
      if (!file) { errorBox.textContent = "Choose an image to upload."; return; }
      const form = new FormData();
      form.append("image", file, file.name);
      for (const [name, value] of Object.entries(parameters())) form.append(name, String(value));
      request = { method: "POST", body: form };
    } else if (imageSource() === "url") {
      const url = $("image-url").value.trim();
      if (!url) { errorBox.textContent = "Paste the image's URL."; return; }
      request = { method: "POST", headers: { "Content-Type": "application/json" },
                  body: JSON.stringify({ image_url: url, ...parameters() }) };
    } else {
      // Text-to-video: a prompt and no image (the service makes the first frame from it).
      const prompt = $("prompt-text").value.trim();
      if (!prompt) { errorBox.textContent = "Describe the clip."; return; }
      request = { method: "POST", headers: { "Content-Type": "application/json" },
                  body: JSON.stringify({ prompt, ...parameters() }) };
    }
    const button = $("submit");
    button.disabled = true;
    try {
      const job = await (await api("/v1/videos", request)).json();
      openJob(job);
      refreshRecent();
    } catch (error) {
      errorBox.textContent = error.message;
    } finally {
      button.disabled = false;
    }
  }

  // -- one job ----------------------------------------------------------------------------------

  function progressOf(job) {
    const raw = job.progress;
    const detail = job.progress_detail || (raw && typeof raw === "object" ? raw : null) || {};
    let percent = typeof raw === "number" ? raw : typeof detail.percent === "number" ? detail.percent : 0;
    if (job.status === "completed") percent = 100;
    return { percent: Math.max(0, Math.min(100, percent)), stage: detail.stage, step: detail.step,
             total: detail.total_steps, segmentsDone: detail.segments_done, segments: detail.segments };
  }

  function sizeOf(job) {
    if (typeof job.size === "string" && job.size) return job.size;
    const p = job.params || {};
    return p.width && p.height ? `${p.width}x${p.height}` : p.aspect_ratio || "";
  }

  function timeOf(value) {
    if (value === null || value === undefined || value === "") return "";
    const date = new Date(typeof value === "number" ? value * 1000 : value);
    return Number.isNaN(date.getTime()) ? String(value) : date.toLocaleString();
  }

  function showJob(job) {
    if (job.id !== state.currentId) return;
    $("job").hidden = false;
    $("job-id").textContent = job.id;
    const status = $("job-status");
    status.textContent = job.status;
    status.className = `status status-${job.status}`;
    $("job-queue").textContent = job.status === "queued" && typeof job.queue_position === "number"
      ? `— queue position ${job.queue_position + 1} (${job.queue_position} ahead)` : "";
    const progress = progressOf(job);
    $("job-progress").value = progress.percent;
    const detail = [`${Math.round(progress.percent)}%`];
    if (progress.stage) detail.push(`stage ${progress.stage}`);
    if (progress.total) detail.push(`step ${progress.step || 0} of ${progress.total}`);
    if (progress.segments) detail.push(`${progress.segmentsDone || 0} of ${progress.segments} segments done`);
    if (job.params && job.params.seed !== undefined && job.params.seed !== null) detail.push(`seed ${job.params.seed}`);
    const size = sizeOf(job);
    if (size) detail.push(size);
    $("job-detail").textContent = detail.join(" · ");
    $("job-error").textContent = job.error && job.error.message ? `${job.error.code}: ${job.error.message}` : "";
    $("cancel").disabled = TERMINAL.has(job.status);
    markCurrentRow();
  }

  function resetClip() {
    for (const id of ["clip", "clip-image", "download"]) $(id).hidden = true;
    $("clip").removeAttribute("src");
    $("clip").load();
    $("clip-image").removeAttribute("src");
    if (state.clipUrl) URL.revokeObjectURL(state.clipUrl);
    state.clipUrl = null;
  }

  function openJob(job) {
    stopFollowing();
    resetClip();
    state.currentId = job.id;
    showJob(job);
    if (job.status === "completed") loadClip(job);
    else if (!TERMINAL.has(job.status)) follow(job.id);
  }

  function stopFollowing() {
    if (state.following) state.following.abort();
    state.following = null;
  }

  // Server-sent events from a fetch() response body: yields {event, data} per event.
  async function* readEvents(response, signal) {
    const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
    const onAbort = () => reader.cancel().catch(() => {});
    signal.addEventListener("abort", onAbort);
    let buffer = "";
    try {
      for (;;) {
        const { value, done } = await reader.read();
        if (done) return;
        buffer = (buffer + value).replace(/\r\n?/g, "\n");
        let end;
        while ((end = buffer.indexOf("\n\n")) >= 0) {
          const block = buffer.slice(0, end);
          buffer = buffer.slice(end + 2);
          let event = "message";
          const data = [];
          for (const line of block.split("\n")) {
            if (!line || line.startsWith(":")) continue;
            const colon = line.indexOf(":");
            const field = colon < 0 ? line : line.slice(0, colon);
            let text = colon < 0 ? "" : line.slice(colon + 1);
            if (text.startsWith(" ")) text = text.slice(1);
            if (field === "event") event = text;
            else if (field === "data") data.push(text);
          }
          if (data.length) yield { event, data: data.join("\n") };
        }
      }
    } finally {
      signal.removeEventListener("abort", onAbort);
    }
  }

  // Follows GET /v1/videos/{id}/events until the job ends; reconnects (the stream starts with the
  // job's current state) when the connection drops.
  async function follow(id) {
    const controller = new AbortController();
    state.following = controller;
    const { signal } = controller;
    let failures = 0;
    while (!signal.aborted) {
      try {
        const response = await api(jobPath(id, "/events"), { signal, headers: { Accept: "text/event-stream" } });
        for await (const { data } of readEvents(response, signal)) {
          const job = JSON.parse(data);
          failures = 0;
          showJob(job);
          if (TERMINAL.has(job.status)) {
            if (state.following === controller) state.following = null;
            finished(job);
            return;
          }
        }
      } catch (error) {
        if (signal.aborted) return;
        if (error instanceof ApiError && error.status < 500 && error.status !== 429) {
          $("job-error").textContent = error.message;
          return;
        }
        if (++failures > MAX_RECONNECTS) {
          $("job-error").textContent = `Lost the job's events: ${error.message}`;
          return;
        }
      }
      await sleep(500 * (failures + 1));
    }
  }

  function finished(job) {
    refreshRecent();
    if (job.status === "completed" && job.id === state.currentId) loadClip(job);
  }

  async function loadClip(job) {
    try {
      const response = await api(jobPath(job.id, "/content"));
      const blob = await response.blob();
      if (job.id !== state.currentId) return;
      resetClip();
      state.clipUrl = URL.createObjectURL(blob);
      const output = job.output || {};
      const type = output.content_type || blob.type || "video/mp4";
      const download = $("download");
      download.href = state.clipUrl;
      download.download = output.file_name || `${job.id}.mp4`;
      download.textContent = `Download ${download.download}`;
      download.hidden = false;
      if (type.startsWith("image/")) {
        $("clip-image").src = state.clipUrl;
        $("clip-image").hidden = false;
        return;
      }
      const video = $("clip");
      if (!video.canPlayType(type)) {
        $("job-error").textContent = `This browser cannot play ${type}: use the download link.`;
        return;
      }
      video.src = state.clipUrl;
      video.hidden = false;
      await video.play().catch(() => {}); // muted autoplay; the controls remain if a browser refuses
    } catch (error) {
      $("job-error").textContent = `Could not load the clip: ${error.message}`;
    }
  }

  async function cancel() {
    if (!state.currentId) return;
    $("cancel").disabled = true;
    try {
      const job = await (await api(jobPath(state.currentId, "/cancel"), { method: "POST" })).json();
      showJob(job);
      if (TERMINAL.has(job.status)) {
        stopFollowing();
        finished(job);
      }
    } catch (error) {
      $("job-error").textContent = error.message;
      $("cancel").disabled = false;
    }
  }

  // -- recent jobs ------------------------------------------------------------------------------

  function markCurrentRow() {
    for (const row of $("recent-jobs").rows) row.classList.toggle("current", row.dataset.id === state.currentId);
  }

  async function refreshRecent() {
    const errorBox = $("recent-error");
    if (!apiKey()) return;
    try {
      const list = await (await api(`/v1/videos?limit=${RECENT_LIMIT}`)).json();
      const rows = (list.data || []).map((job) => {
        const open = el("button", { type: "button", textContent: job.id, title: "Show this job" });
        open.addEventListener("click", () => openJob(job));
        const row = el("tr", {}, [
          el("td", {}, [open]),
          el("td", { className: `status status-${job.status}`, textContent: job.status }),
          el("td", { textContent: `${Math.round(progressOf(job).percent)}%` }),
          el("td", { textContent: sizeOf(job) }),
          el("td", { textContent: timeOf(job.created_at) }),
        ]);
        row.dataset.id = job.id;
        return row;
      });
      $("recent-jobs").replaceChildren(...rows);
      errorBox.textContent = "";
      markCurrentRow();
    } catch (error) {
      errorBox.textContent = error.message;
    }
  }

  // -- start ------------------------------------------------------------------------------------

  document.addEventListener("DOMContentLoaded", () => {
    $("submit").disabled = true;
    setupKey();
    setupImage();
    $("submit-form").addEventListener("submit", submit);
    $("cancel").addEventListener("click", cancel);
    $("refresh").addEventListener("click", refreshRecent);
    buildForm();
    refreshRecent();
  });
})();
