/* cgidm web app: plain JavaScript, no library, no build step.
 *
 * The pages hold no data; this script asks the JSON API with the API key the person signed in
 * with. The key lives in sessionStorage: this tab only, gone when it closes. */
"use strict";

const KEY_STORE = "cgidm-api-key";
const POLL_MS = 1000;
const TERMINAL = ["succeeded", "failed", "cancelled"];
const IMAGE_TYPES = /^image\/(png|jpe?g|webp|gif|bmp|tiff)$/;
const IMAGE_SUFFIX = /\.(png|jpe?g|webp|gif|bmp|tiff?)$/i;

const $ = (sel, root = document) => root.querySelector(sel);
const keysRequired = () => document.body.dataset.keysRequired === "true";
const apiKey = () => sessionStorage.getItem(KEY_STORE);

class ApiProblem extends Error {
  constructor(status, details) {
    super(details.map((d) => d.msg).join("; ") || `HTTP ${status}`);
    this.status = status;
    this.details = details;
  }
}

async function api(path, options = {}) {
  const headers = new Headers(options.headers || {});
  if (apiKey()) headers.set("Authorization", `Bearer ${apiKey()}`);
  const response = await fetch(path, { ...options, headers });
  if (response.ok) return response;
  let details = [];
  try {
    const body = await response.json();
    details = Array.isArray(body.detail) ? body.detail : [{ msg: String(body.detail) }];
  } catch (_) {
    details = [{ msg: `the service answered ${response.status} ${response.statusText}` }];
  }
  if (response.status === 401 && keysRequired()) {
    sessionStorage.removeItem(KEY_STORE);
    showSignIn("Your API key was not accepted (unknown, revoked or expired). Sign in again.");
  }
  throw new ApiProblem(response.status, details);
}

const CUT_OFF = "The upload was cut off before the service answered. If your files are large, the " +
  "service may refuse them as too large: try fewer or smaller files, or try again.";

/* POST with upload progress (fetch cannot report it); errors as api() reports them. */
function upload(path, body, onProgress, cutOff = CUT_OFF) {
  return new Promise((resolve, reject) => {
    const xhr = new XMLHttpRequest();
    xhr.open("POST", path);
    if (apiKey()) xhr.setRequestHeader("Authorization", `Bearer ${apiKey()}`);
    xhr.upload.addEventListener("progress", (event) => {
      if (event.lengthComputable) onProgress(event.loaded / event.total);
    });
    xhr.addEventListener("load", () => {
      let answer = null;
      try { answer = JSON.parse(xhr.responseText); } catch (_) { answer = null; }
      if (xhr.status >= 200 && xhr.status < 300) { resolve(answer); return; }
      const details = answer && Array.isArray(answer.detail) ? answer.detail
        : [{ msg: `the service answered ${xhr.status} ${xhr.statusText}` }];
      if (xhr.status === 401 && keysRequired()) {
        sessionStorage.removeItem(KEY_STORE);
        showSignIn("Your API key was not accepted (unknown, revoked or expired). Sign in again.");
      }
      reject(new ApiProblem(xhr.status, details));
    });
    xhr.addEventListener("error", () => reject(new ApiProblem(0, [{ msg: cutOff }])));
    xhr.send(body);
  });
}

function show(el, visible) { if (el) el.hidden = !visible; }

function setError(box, problem, leadText = "Please fix these:") {
  if (!box) return;
  box.replaceChildren();
  if (!problem) { box.hidden = true; return; }
  const details = problem.details || [{ msg: String(problem.message || problem) }];
  if (details.length === 1) {
    box.textContent = details[0].msg;
  } else {
    const lead = document.createElement("p");
    lead.textContent = leadText;
    const list = document.createElement("ul");
    for (const d of details) {
      const li = document.createElement("li");
      li.textContent = d.msg;
      list.append(li);
    }
    box.append(lead, list);
  }
  box.hidden = false;
}

/* ---------------------------------------------------------------- sign-in */

function showSignIn(message) {
  show($("#sign-in"), true);
  show($("#app-content"), false);
  show($("#sign-out"), false);
  const err = $("#sign-in-error");
  if (message) { err.textContent = message; err.hidden = false; }
  $("#api-key").focus();
}

function signedIn() {
  show($("#sign-in"), false);
  show($("#app-content"), true);
  show($("#sign-out"), keysRequired());
  startPage();
}

function setUpSignIn() {
  $("#sign-in-form").addEventListener("submit", async (event) => {
    event.preventDefault();
    const input = $("#api-key");
    const key = input.value.trim();
    const err = $("#sign-in-error");
    if (!key) { err.textContent = "Enter your API key."; err.hidden = false; return; }
    const response = await fetch("/models", { headers: { Authorization: `Bearer ${key}` } });
    if (response.status === 401) {
      err.textContent = "That API key was not accepted. Check it, or ask the operator for a new one.";
      err.hidden = false;
      input.select();
      return;
    }
    err.hidden = true;
    sessionStorage.setItem(KEY_STORE, key);
    input.value = "";
    if (started) window.location.reload();  // signed in again after a refused key
    else signedIn();
  });
  $("#sign-out").addEventListener("click", () => {
    sessionStorage.removeItem(KEY_STORE);
    window.location.assign("/");
  });
}

/* ---------------------------------------------------------------- downloads */

async function download(path, filename) {
  const response = await api(path);
  const blob = await response.blob();
  const url = URL.createObjectURL(blob);
  const link = document.createElement("a");
  link.href = url;
  link.download = filename;
  document.body.append(link);
  link.click();
  link.remove();
  setTimeout(() => URL.revokeObjectURL(url), 10000);
}

function downloadLink(link, errorBox) {
  link.addEventListener("click", async (event) => {
    event.preventDefault();  // the key travels in a header, which a plain link cannot send
    try {
      await download(link.getAttribute("href"), link.getAttribute("download"));
    } catch (problem) {
      setError(errorBox, problem);
    }
  });
}

/* ---------------------------------------------------------------- new check */

function isImageFile(file) {
  return IMAGE_TYPES.test(file.type) || (!file.type && IMAGE_SUFFIX.test(file.name));
}

function describeFiles(input) {
  const list = $(`#${input.id}-list`);
  list.replaceChildren();
  for (const file of input.files) {
    const li = document.createElement("li");
    const name = document.createElement("span");
    name.textContent = file.name;
    name.title = file.name;
    if (isImageFile(file)) {
      const thumb = document.createElement("img");
      thumb.alt = "";  // the name beside it says which file it is
      thumb.src = URL.createObjectURL(file);
      thumb.addEventListener("load", () => URL.revokeObjectURL(thumb.src), { once: true });
      li.append(thumb, name);
    } else {
      li.classList.add("bad");
      name.textContent = `${file.name}: not an image`;
      li.append(name);
    }
    list.append(li);
  }
}

function setUpDrop(zone) {
  const input = $(`#${zone.dataset.for}`);
  input.addEventListener("change", () => { describeFiles(input); setError($("#form-error"), null); });
  for (const type of ["dragenter", "dragover"]) {
    zone.addEventListener(type, (event) => { event.preventDefault(); zone.classList.add("dragging"); });
  }
  for (const type of ["dragleave", "drop"]) {
    zone.addEventListener(type, () => zone.classList.remove("dragging"));
  }
  zone.addEventListener("drop", (event) => {
    event.preventDefault();
    const merged = new DataTransfer();
    for (const file of input.files) merged.items.add(file);
    for (const file of event.dataTransfer.files) merged.items.add(file);
    input.files = merged.files;
    input.dispatchEvent(new Event("change"));
  });
}

/* The models jobs may name: the registry's and this key's uploads (GET /models), kept so that an
 * upload made on this page joins the suspect list without asking the service again. */
let knownModels = [];

function modelLabel(m) {
  if (m.uploaded) {
    const size = m.size_bytes ? `, ${formatBytes(m.size_bytes)}` : "";
    return `${m.name || m.filename || m.id} \u2013 yours (uploaded ${m.kind}${size})`;
  }
  return m.description ? `${m.id} \u2013 ${m.description}` : m.id;
}

function fillSuspects() {
  const base = $("#pretrained");
  const suspect = $("#finetuned");
  const previous = suspect.value;
  const option = (m) => {
    const o = document.createElement("option");
    o.value = m.id;
    o.textContent = modelLabel(m);
    return o;
  };
  const tuned = knownModels.filter((m) => m.finetuned_from === base.value);
  const choices = tuned.length ? tuned : knownModels.filter((m) => m.finetuned_from);
  suspect.replaceChildren(...choices.map(option));
  if (!choices.length) {
    const none = document.createElement("option");
    none.value = "";
    none.textContent = "No fine-tuned model of this base is registered";
    suspect.append(none);
  }
  if (choices.some((m) => m.id === previous)) suspect.value = previous;
  const yours = knownModels.filter((m) => m.uploaded).length;
  $("#model-source").textContent =
    `${knownModels.length - yours} models registered on this service` +
    (yours ? ` and ${yours} uploaded by you` : "") +
    "; the suspect list shows the fine-tunes of the chosen base.";
}

function fillModels(models) {
  knownModels = models;
  const base = $("#pretrained");
  const bases = models.filter((m) => !m.finetuned_from);
  base.replaceChildren(...(bases.length ? bases : models).map((m) => {
    const o = document.createElement("option");
    o.value = m.id;
    o.textContent = modelLabel(m);
    return o;
  }));
  base.addEventListener("change", fillSuspects);
  fillSuspects();
}

function formatBytes(bytes) {
  if (bytes < 1024) return `${bytes} B`;
  const units = ["kB", "MB", "GB", "TB"];
  let value = bytes;
  let unit = -1;
  do { value /= 1024; unit += 1; } while (value >= 1024 && unit < units.length - 1);
  return `${value.toFixed(value < 10 ? 1 : 0)} ${units[unit]}`;
}

/* Where the service's answer about an upload field points on this page. */
const UPLOAD_FIELDS = { file: "model-file", prompt: "model-prompt", finetuned_from: "pretrained",
                        kind: "model-file", name: "model-file" };

/* The suspect model's own file: POST /models with progress, then chosen as the suspect. */
function setUpModelUpload() {
  const fileInput = $("#model-file");
  const promptInput = $("#model-prompt");
  const button = $("#model-upload-button");
  const bar = $("#model-upload-progress");
  const status = $("#model-upload-status");
  const errorBox = $("#form-error");
  fileInput.addEventListener("change", () => { setError(errorBox, null); status.textContent = ""; });
  promptInput.addEventListener("keydown", (event) => {
    if (event.key === "Enter") { event.preventDefault(); button.click(); }  // not the check's submit
  });
  button.addEventListener("click", async () => {
    const file = fileInput.files[0];
    const base = $("#pretrained").value;
    if (!file || !base) {
      const msg = !file ? "Choose the suspect model's .safetensors file to upload."
        : "Choose the base model the suspect model was fine-tuned from.";
      setError(errorBox, { details: [{ msg }] });
      (file ? $("#pretrained") : fileInput).focus();
      return;
    }
    setError(errorBox, null);
    const body = new FormData();
    body.append("finetuned_from", base);  // before the file: a wrong base is refused at once
    if (promptInput.value.trim()) body.append("prompt", promptInput.value.trim());
    body.append("file", file, file.name);
    button.disabled = true;
    $("#submit").disabled = true;
    bar.value = 0;
    bar.hidden = false;
    status.textContent = `Uploading ${file.name}\u2026`;
    try {
      const model = await upload("/models", body, (fraction) => {
        bar.value = fraction;
        status.textContent = fraction < 1
          ? `Uploading ${file.name}\u2026 ${Math.round(fraction * 100)}%`
          : "Uploaded; the service is checking the file\u2026";
      }, `The upload of ${file.name} was cut off before the service answered: the file may be ` +
         "larger than this service accepts, or the connection dropped. Try again, or ask the " +
         "operator about the model size limit (CGIDM_MAX_MODEL_BYTES).");
      const entry = { ...model, uploaded: true };
      const again = knownModels.some((m) => m.id === entry.id);
      knownModels = [...knownModels.filter((m) => m.id !== entry.id), entry];
      $("#pretrained").value = entry.finetuned_from;
      fillSuspects();
      $("#finetuned").value = entry.id;
      const prompt = entry.prompt ? ` Prompt: \u201c${entry.prompt}\u201d.` : "";
      status.textContent = `${entry.name || file.name} ${again ? "was uploaded before" : "uploaded"} (${entry.kind}, ` +
        `${formatBytes(entry.size_bytes)}) and chosen as the suspect model.${prompt}`;
      fileInput.value = "";
      $("#finetuned").focus();
    } catch (problem) {
      status.textContent = problem.status === 401 ? "" : "Not uploaded: the reason is below the form.";
      if (problem.status !== 401) {
        for (const d of problem.details || []) {  // refused by its Content-Length: name the file
          if (d.type === "request_too_large") d.msg = `${file.name} is too large to upload here: ${d.msg}`;
        }
        setError(errorBox, problem);
        const field = (problem.details || []).map((d) => Array.isArray(d.loc) ? d.loc[1] : null)
          .find((name) => name in UPLOAD_FIELDS);
        document.getElementById(UPLOAD_FIELDS[field] || "model-file").focus();
      }
    } finally {
      bar.hidden = true;
      button.disabled = false;
      $("#submit").disabled = false;
    }
  });
}

const FIELD_LABELS = { images: "Your images", controls: "Controls" };

function formProblems(form) {
  const problems = [];
  const images = form.elements.images.files;
  if (!images.length) problems.push({ loc: ["body", "images"], msg: "Choose at least one image of yours." });
  for (const field of ["images", "controls"]) {
    for (const file of form.elements[field].files) {
      if (!isImageFile(file)) {
        problems.push({ loc: ["body", field],
          msg: `${file.name} is not an image (${FIELD_LABELS[field]}). Choose PNG, JPEG, WebP, GIF, BMP or TIFF files.` });
      }
    }
  }
  return problems;
}

function focusField(details) {
  const field = details.find((d) => Array.isArray(d.loc) && d.loc.length > 1);
  const reference = $("#finetuned-ref");
  const id = field && field.loc[1] === "finetuned" && reference && reference.value.trim()
    ? "finetuned-ref" : field && String(field.loc[1]);
  const el = id && document.getElementById(id);
  if (el) el.focus();
}

function setUpForm() {
  const form = $("#check-form");
  for (const zone of document.querySelectorAll(".drop")) setUpDrop(zone);
  setUpModelUpload();
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const errorBox = $("#form-error");
    const problems = formProblems(form);
    if (problems.length) {
      setError(errorBox, { details: problems });
      focusField(problems);
      return;
    }
    setError(errorBox, null);
    const body = new FormData();
    for (const el of form.elements) {
      if (!el.name || el.type === "submit") continue;
      if (el.type === "file") {
        for (const file of el.files) body.append(el.name, file, file.name);
      } else if (el.value.trim() !== "") {
        body.append(el.name, el.value.trim());
      }
    }
    const reference = $("#finetuned-ref");  // a hub address, when given, is the suspect
    if (reference && reference.value.trim()) body.set("finetuned", reference.value.trim());
    const button = $("#submit");
    const status = $("#submit-status");
    button.disabled = true;
    status.textContent = "Uploading\u2026";
    try {
      const accepted = await upload("/authenticate", body, (fraction) => {
        status.textContent = fraction < 1 ? `Uploading\u2026 ${Math.round(fraction * 100)}%`
          : "Uploaded; checking the files\u2026";
      });
      if (accepted.warnings && accepted.warnings.length) {
        sessionStorage.setItem(`cgidm-warnings-${accepted.job_id}`, JSON.stringify(accepted.warnings));
      }
      window.location.assign(`/checks/${accepted.job_id}`);
    } catch (problem) {
      status.textContent = "";
      button.disabled = false;
      if (problem.status !== 401) {
        setError(errorBox, problem);
        focusField(problem.details || []);
      }
    }
  });
}

function formatWhen(iso) {
  const date = new Date(iso);
  return date.toLocaleString(undefined, { dateStyle: "medium", timeStyle: "short" });
}

async function loadRecent() {
  const table = $("#recent-table");
  try {
    const { jobs } = await (await api("/jobs?limit=20")).json();
    const body = table.tBodies[0];
    body.replaceChildren();
    for (const job of jobs) {
      const row = body.insertRow();
      const when = row.insertCell();
      const link = document.createElement("a");
      link.href = `/checks/${job.job_id}`;
      link.textContent = formatWhen(job.created_at);
      when.append(link);
      row.insertCell().textContent = `${job.finetuned} (base ${job.pretrained})`;
      row.insertCell().textContent =
        `${job.images} image${job.images === 1 ? "" : "s"}, ${job.controls} control${job.controls === 1 ? "" : "s"}`;
      const state = row.insertCell();
      state.className = `state state-${job.status}`;
      state.textContent = job.status === "running" ? `running (${Math.round(job.fraction * 100)}%)` : job.status;
    }
    show(table, jobs.length > 0);
    show($("#recent-empty"), jobs.length === 0);
  } catch (problem) {
    $("#recent-empty").textContent = `Recent checks could not be loaded: ${problem.message}`;
    show($("#recent-empty"), true);
  }
}

async function startNewCheck() {
  setUpForm();
  loadRecent();
  try {
    const { models } = await (await api("/models")).json();
    fillModels(models);
  } catch (problem) {
    setError($("#form-error"), problem);
  }
}

/* ---------------------------------------------------------------- job page */

function formatSeconds(seconds) {
  if (seconds == null || !isFinite(seconds)) return "";
  if (seconds < 60) return `${Math.max(1, Math.round(seconds))} s`;
  const minutes = Math.round(seconds / 60);
  return minutes < 90 ? `${minutes} min` : `${(seconds / 3600).toFixed(1)} h`;
}

const STATUS_WORDS = {
  queued: "Waiting for a worker\u2026",
  running: "Running",
  succeeded: "Done",
  failed: "Failed",
  cancelled: "Cancelled",
};

function renderProgress(job) {
  const p = job.progress || {};
  const pct = Math.round((p.fraction || 0) * 100);
  let words = STATUS_WORDS[job.status] || job.status;
  if (job.status === "running") words = `Running: ${pct}% done`;
  if (job.cancel_requested && !TERMINAL.includes(job.status)) words = "Cancelling\u2026";
  $("#job-status").textContent = words;
  const bar = $("#job-bar");
  bar.value = job.status === "succeeded" ? 1 : (p.fraction || 0);
  bar.textContent = `${pct}%`;
  const parts = [];
  if (p.steps_total) parts.push(`step ${p.steps_done} of ${p.steps_total}`);
  if (job.status === "running" && p.eta_seconds != null) parts.push(`about ${formatSeconds(p.eta_seconds)} left`);
  if (job.status === "queued") parts.push("it starts when a worker is free");
  $("#job-steps").textContent = parts.join(" \u00b7 ");
  const images = job.inputs.filter((i) => i.role === "image").length;
  const controls = job.inputs.length - images;
  $("#job-models").textContent =
    `Suspect ${job.settings.finetuned}, base ${job.settings.pretrained}; ` +
    `${images} image${images === 1 ? "" : "s"}, ${controls} control${controls === 1 ? "" : "s"}; ` +
    `submitted ${formatWhen(job.created_at)}`;
  show($("#cancel"), !TERMINAL.includes(job.status) && !job.cancel_requested);
  show($("#job-bar"), job.status !== "failed" && job.status !== "cancelled");
}

async function loadEvidence(jobId) {
  const response = await api(`/jobs/${jobId}/evidence.html`);
  const holder = $("#evidence");
  holder.innerHTML = await response.text();  // rendered and escaped by the server's templates
  show($("#job-downloads"), true);
}

async function followJob(jobId) {
  const warnings = sessionStorage.getItem(`cgidm-warnings-${jobId}`);
  sessionStorage.removeItem(`cgidm-warnings-${jobId}`);  // said once, after the submission
  if (warnings) {
    setError($("#job-notes"), { details: JSON.parse(warnings).map((msg) => ({ msg })) },
             "Accepted with these changes:");
  }
  for (;;) {
    let job;
    try {
      job = await (await api(`/jobs/${jobId}`)).json();
    } catch (problem) {
      if (problem.status === 401) return;
      if (problem.status === 404) {
        $("#job-status").textContent = "No such check";
        setError($("#job-error"), problem);
        show($("#job-bar"), false);
        return;
      }
      $("#job-steps").textContent = `Could not reach the service (${problem.message}); trying again\u2026`;
      await new Promise((resolve) => setTimeout(resolve, POLL_MS * 3));
      continue;
    }
    renderProgress(job);
    if (job.status === "succeeded") {
      try { await loadEvidence(jobId); } catch (problem) { setError($("#job-error"), problem); }
      return;
    }
    if (job.status === "failed") {
      const e = job.error || {};
      setError($("#job-error"), { details: [{ msg: `${e.message || "the job failed"} (${e.code || "error"})` }] });
      return;
    }
    if (job.status === "cancelled") return;
    await new Promise((resolve) => setTimeout(resolve, POLL_MS));
  }
}

function startCheckPage() {
  const jobId = document.body.dataset.jobId;
  downloadLink($("#download-report"), $("#job-error"));
  downloadLink($("#download-json"), $("#job-error"));
  $("#cancel").addEventListener("click", async () => {
    const button = $("#cancel");
    button.disabled = true;
    try {
      renderProgress(await (await api(`/jobs/${jobId}`, { method: "DELETE" })).json());
    } catch (problem) {
      setError($("#job-error"), problem);
    } finally {
      button.disabled = false;
    }
  });
  followJob(jobId);
}

/* ---------------------------------------------------------------- audit page */

/* The audit as the server renders it (the key travels in the header): fetched, shown, and the
 * Cancel button shown while it runs; returns the audit's status. */
let auditCancelled = false;  // a fragment fetched before the cancel must not bring the button back

async function renderAudit(auditId) {
  const response = await api(`/audits/${auditId}/fragment.html`);
  $("#audit-view").innerHTML = await response.text();  // rendered and escaped by the server
  const state = $("#audit-state");
  const status = state ? state.dataset.status : null;
  show($("#audit-cancel"), !auditCancelled && status !== null && !TERMINAL.includes(status));
  return status;
}

/* Again every few seconds until the audit ends. */
async function followAudit(auditId) {
  for (;;) {
    let status;
    try {
      status = await renderAudit(auditId);
    } catch (problem) {
      if (problem.status === 401) return;
      setError($("#audit-error"), problem);
      if (problem.status === 404) return;
      await new Promise((resolve) => setTimeout(resolve, POLL_MS * 3));
      continue;
    }
    if (TERMINAL.includes(status)) return;
    await new Promise((resolve) => setTimeout(resolve, POLL_MS * 2));
  }
}

/* DELETE /audits/{id} with the same key as the page's other calls; the models already done
 * stay stored, the running one stops within a few PGD steps. The page shows the cancelled
 * state at once (the API says "cancelled" as soon as it is asked), not at the next poll. */
async function cancelAudit(auditId) {
  const button = $("#audit-cancel");
  button.disabled = true;
  try {
    await api(`/audits/${auditId}`, { method: "DELETE" });
    auditCancelled = true;
    show(button, false);
    setError($("#audit-error"), null);
    await renderAudit(auditId);
  } catch (problem) {
    setError($("#audit-error"), problem);  // 409: it finished meanwhile; the next poll shows it
  } finally {
    button.disabled = false;
  }
}

function startAuditPage() {
  const auditId = document.body.dataset.auditId;
  $("#audit-cancel").addEventListener("click", () => cancelAudit(auditId));
  followAudit(auditId);
}

/* ---------------------------------------------------------------- start */

let started = false;

function startPage() {
  if (started) return;
  started = true;
  const page = document.body.dataset.page;
  if (page === "new-check") startNewCheck();
  if (page === "check") startCheckPage();
  if (page === "audit") startAuditPage();
}

document.addEventListener("DOMContentLoaded", () => {
  setUpSignIn();
  if (keysRequired() && !apiKey()) showSignIn();
  else signedIn();
});
