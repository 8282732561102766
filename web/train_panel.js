// The "Train LoRA" sidebar panel: a kohya LoRA run (the TrainLora node) queued like any prompt.
// The form is built from the node's own definition (/object_info/TrainLora: kohya_ss GUI defaults),
// the dataset list from GET /nodegraph/train/datasets. While the run goes on, the server's
// websocket messages drive it: `progress` (one per optimizer step) and interim `executed` outputs
// (step, loss, the loss plot, the newest samples); an interrupt cancels it. When it finishes, the
// LoRA combos are re-read, so the new file is in every LoRA list without a restart.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";
import { listLoras } from "./lora_api.js";

const NODE_CLASS = "TrainLora";
const NODE_ID = "nodegraph_train"; // no canvas node has this id, so the frontend draws nothing for it
const TAB_ID = "nodegraph-train";

const state = { promptId: null, running: false, log: [], datasets: [] };
let panel = null; // built once; the sidebar mounts the same element each time it is opened

function el(tag, className, text) {
  const e = document.createElement(tag);
  if (className) e.className = className;
  if (text !== undefined) e.textContent = text;
  return e;
}

function viewUrl(image, rand) {
  const q = new URLSearchParams({ filename: image.filename, subfolder: image.subfolder ?? "", type: image.type });
  q.set("rand", String(rand));
  return api.apiURL(`/view?${q}`);
}

// ---- the form -----------------------------------------------------------------------------
function field(name, spec) {
  const [kind, opts = {}] = spec;
  let input;
  if (Array.isArray(kind)) {
    input = el("select");
    for (const choice of kind) input.append(new Option(choice, choice));
    input.value = opts.default ?? kind[0] ?? "";
  } else if (kind === "BOOLEAN") {
    input = el("input");
    input.type = "checkbox";
    input.checked = Boolean(opts.default);
  } else if (kind === "INT" || kind === "FLOAT") {
    input = el("input");
    input.type = "number";
    for (const key of ["min", "max"]) if (opts[key] !== undefined) input[key] = String(opts[key]);
    input.step = kind === "INT" ? "1" : "any";
    input.value = String(opts.default ?? 0);
  } else if (opts.multiline) {
    input = el("textarea");
    input.rows = 2;
    input.value = opts.default ?? "";
  } else {
    input = el("input");
    input.type = "text";
    input.value = opts.default ?? "";
  }
  input.name = name;
  input.dataset.kind = Array.isArray(kind) ? "COMBO" : kind;
  const label = el("label", "nodegraph-train-field");
  label.title = opts.tooltip ?? "";
  label.append(el("span", null, name), input);
  return { label, input };
}

function readForm() {
  const inputs = {};
  for (const input of panel.form.querySelectorAll("[name]")) {
    const kind = input.dataset.kind;
    if (kind === "BOOLEAN") inputs[input.name] = input.checked;
    else if (kind === "INT") inputs[input.name] = parseInt(input.value, 10);
    else if (kind === "FLOAT") inputs[input.name] = parseFloat(input.value);
    else inputs[input.name] = input.value;
  }
  return inputs;
}

function setChoices(select, names, keep) {
  const before = select.value;
  select.replaceChildren(...[...keep, ...names].map((n) => new Option(n, n)));
  if ([...keep, ...names].includes(before)) select.value = before;
}

async function loadDatasets() {
  const response = await api.fetchApi("/nodegraph/train/datasets");
  if (!response.ok) throw new Error(`datasets: HTTP ${response.status}`);
  const found = await response.json();
  state.datasets = found.datasets;
  const names = found.datasets.map((d) => d.name);
  setChoices(panel.form.querySelector("[name=dataset]"), names.length ? names : ["none"], []);
  setChoices(panel.form.querySelector("[name=reg_dataset]"), names, ["none"]);
  panel.inputDir = found.input_dir;
  describeDataset();
}

function describeDataset() {
  const name = panel.form.querySelector("[name=dataset]").value;
  const found = state.datasets.find((d) => d.name === name);
  if (!found) {
    panel.dataset.textContent = `No kohya dataset under ${panel.inputDir ?? "input/"}: make img/10_name class/ there.`;
    return;
  }
  const parts = found.subsets.map(
    (s) => `${s.folder}: ${s.images} images × ${s.repeats}${s.captions < s.images ? ` (${s.images - s.captions} without caption)` : ""}`
  );
  const problems = found.problems.length ? ` ⚠ ${found.problems.join("; ")}` : "";
  panel.dataset.textContent = `${parts.join(" · ")} → ${found.images_per_epoch} images per epoch${problems}`;
}

// The training size follows the checkpoint's family (1024,1024 for SDXL, 512,512 otherwise: kohya's
// model-spec sizes, the kohya_ss GUI's field and SDXL presets) until the user types one.
let familyAsk = 0;
async function applyFamilyDefaults() {
  const resolution = panel.form.querySelector("[name=resolution]");
  const checkpoint = panel.form.querySelector("[name=ckpt_name]")?.value;
  if (!resolution || resolution.dataset.userSet) return;
  const ask = ++familyAsk;
  const query = checkpoint ? `?checkpoint=${encodeURIComponent(checkpoint)}` : "";
  const response = await api.fetchApi(`/nodegraph/train/defaults${query}`);
  if (!response.ok || ask !== familyAsk || resolution.dataset.userSet) return;
  const found = await response.json();
  if (ask !== familyAsk || resolution.dataset.userSet) return;
  resolution.value = found.resolution;
  resolution.title = `${found.kind === "other" ? "SD1.x" : "SDXL"} default; type W,H to change it`;
}

// ---- running --------------------------------------------------------------------------------
function setStatus(text, kind = "") {
  panel.status.textContent = text;
  panel.status.className = `nodegraph-train-status ${kind}`;
}

function setRunning(running) {
  state.running = running;
  panel.start.disabled = running;
  panel.cancel.disabled = !running;
}

async function start() {
  const inputs = readForm();
  state.log = [];
  panel.plot.hidden = true;
  panel.samples.replaceChildren();
  panel.bar.value = 0;
  setStatus("queueing…");
  const body = { client_id: api.clientId ?? api.initialClientId ?? "", prompt: { [NODE_ID]: { class_type: NODE_CLASS, inputs } }, extra_data: {} };
  const response = await api.fetchApi("/prompt", { method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body) });
  const reply = await response.json().catch(() => ({}));
  if (!response.ok) {
    const errors = Object.values(reply.node_errors ?? {}).flatMap((n) => n.errors ?? []);
    const text = errors.map((e) => `${e.details || e.message}`).join("; ") || reply.error?.message || `HTTP ${response.status}`;
    setStatus(`not started: ${text}`, "error");
    return;
  }
  state.promptId = reply.prompt_id;
  setRunning(true);
  setStatus("waiting for the queue…");
}

async function cancel() {
  if (!state.promptId) return;
  await api.fetchApi("/queue", { method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify({ delete: [state.promptId] }) });
  await api.interrupt(state.promptId);
  setStatus("cancelling after the current step…");
}

function mine(event) {
  return state.promptId && event.detail?.prompt_id === state.promptId;
}

function onProgress(event) {
  if (!mine(event) || event.detail.node !== NODE_ID) return;
  panel.bar.max = event.detail.max;
  panel.bar.value = event.detail.value;
}

function onExecuted(event) {
  if (!mine(event) || event.detail.node !== NODE_ID) return;
  const output = event.detail.output ?? {};
  const train = output.train?.[0] ?? {};
  const images = output.images ?? [];
  const plot = images.find((i) => i.filename === "loss.png");
  const samples = images.filter((i) => i !== plot);
  if (plot) {
    panel.plot.src = viewUrl(plot, train.plotted_at_step ?? train.step ?? 0);
    panel.plot.hidden = false;
  }
  const shown = samples.map((s) => s.filename).join("|");
  if (shown !== panel.samples.dataset.shown) {
    panel.samples.dataset.shown = shown;
    panel.samples.replaceChildren(...samples.map((s) => Object.assign(el("img"), { src: viewUrl(s, s.filename), title: s.filename })));
  }
  if (train.max_steps) {
    const loss = train.loss === undefined ? "" : ` · loss ${train.loss.toFixed(4)} (average ${train.average.toFixed(4)})`;
    setStatus(`epoch ${train.epoch}/${train.num_epochs} · step ${train.step}/${train.max_steps}${loss}`);
  }
  panel.saved.textContent = train.saved?.length ? `saved: ${train.saved.join(", ")}` : "";
  state.log.push({ step: train.step ?? 0, max_steps: train.max_steps ?? 0, plot: Boolean(plot), samples: samples.length, done: Boolean(train.done) });
}

async function finished(text, kind) {
  setRunning(false);
  setStatus(text, kind);
  // The new LoRA files: every LoRA combo and the picker read the folder again.
  try {
    await app.refreshComboInNodes?.();
    await listLoras();
  } catch (error) {
    console.warn("nodegraph: could not refresh the LoRA lists:", error);
  }
}

function onSuccess(event) {
  if (!mine(event)) return;
  panel.bar.value = panel.bar.max;
  const last = state.log.at(-1);
  void finished(`finished: ${last?.step ?? "?"} steps`, "done");
}

function onError(event) {
  if (!mine(event)) return;
  void finished(`failed: ${event.detail.exception_message ?? "see the server log"}`, "error");
}

function onInterrupted(event) {
  if (!mine(event)) return;
  void finished("cancelled: the files saved before it stopped are kept", "error");
}

// A page reloaded mid-run finds its training again in the running queue.
async function adoptRunning() {
  const response = await api.fetchApi("/queue");
  if (!response.ok) return;
  const queue = await response.json();
  for (const [, id, prompt] of queue.queue_running ?? []) {
    if (prompt?.[NODE_ID]?.class_type === NODE_CLASS) {
      state.promptId = id;
      setRunning(true);
      setStatus("training (started before this page loaded)…");
    }
  }
}

async function build() {
  const root = el("div", "nodegraph-train");
  root.append(el("h3", null, "Train LoRA (kohya)"));
  const form = el("div", "nodegraph-train-form");
  const dataset = el("div", "nodegraph-train-dataset");
  const buttons = el("div", "nodegraph-train-buttons");
  const startButton = el("button", "nodegraph-train-start", "Start training");
  const cancelButton = el("button", "nodegraph-train-cancel", "Cancel");
  const refresh = el("button", "nodegraph-train-refresh", "Refresh folders");
  buttons.append(startButton, cancelButton, refresh);
  const bar = el("progress", "nodegraph-train-bar");
  bar.value = 0;
  const status = el("div", "nodegraph-train-status", "idle");
  const saved = el("div", "nodegraph-train-saved");
  const plot = el("img", "nodegraph-train-plot");
  plot.alt = "loss";
  plot.hidden = true;
  const samples = el("div", "nodegraph-train-samples");
  root.append(form, dataset, buttons, bar, status, saved, plot, samples);
  panel = { root, form, dataset, start: startButton, cancel: cancelButton, bar, status, saved, plot, samples };

  const response = await api.fetchApi(`/object_info/${NODE_CLASS}`);
  if (!response.ok) throw new Error(`${NODE_CLASS}: HTTP ${response.status}`);
  const spec = (await response.json())[NODE_CLASS];
  for (const name of spec.input_order?.required ?? Object.keys(spec.input.required)) {
    const { label, input } = field(name, spec.input.required[name]);
    form.append(label);
    if (name === "dataset") input.addEventListener("change", describeDataset);
    if (name === "ckpt_name") input.addEventListener("change", () => void applyFamilyDefaults().catch(() => {}));
    if (name === "resolution") {
      const mark = () => { input.dataset.userSet = input.value.trim() ? "1" : ""; };
      input.addEventListener("input", mark);
      input.addEventListener("change", mark);
    }
  }
  root.addEventListener("keydown", (event) => event.stopPropagation()); // keep canvas shortcuts out of the form
  startButton.addEventListener("click", () => void start().catch((e) => setStatus(`not started: ${e}`, "error")));
  cancelButton.addEventListener("click", () => void cancel());
  refresh.addEventListener("click", () => void loadDatasets().catch((e) => setStatus(String(e), "error")));
  setRunning(false);
  await applyFamilyDefaults().catch(() => {});
  await loadDatasets();
  await adoptRunning();
}

export function registerTrainPanel() {
  api.addEventListener("progress", onProgress);
  api.addEventListener("executed", onExecuted);
  api.addEventListener("execution_success", onSuccess);
  api.addEventListener("execution_error", onError);
  api.addEventListener("execution_interrupted", onInterrupted);
  const ready = build().catch((error) => {
    console.warn("nodegraph: the Train LoRA panel could not be built:", error);
    panel?.root.append(el("div", "nodegraph-warning", String(error)));
  });
  app.extensionManager?.registerSidebarTab?.({
    id: TAB_ID,
    icon: "pi pi-bolt",
    title: "Train LoRA",
    tooltip: "Train a LoRA on a dataset folder (kohya)",
    type: "custom",
    render: (container) => {
      void ready.then(() => {
        container.replaceChildren(panel.root);
        void loadDatasets().catch(() => {}); // folders may have been added since
      });
    },
  });
  return { state, ready, tabId: TAB_ID };
}
