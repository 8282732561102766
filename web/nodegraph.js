// nodegraph's canvas extension for ComfyUI's frontend (1.58.x; 1.27.x too), loaded through GET /extensions.
// It uses only the frontend's public extension API (app.registerExtension, api events, DOM widgets):
//   - our SD1.5 + LoRA default workflow replaces the stock one on first start,
//   - LoraLoader nodes show trigger words (click one to add it to the prompt), base model, rank and preview,
//   - a searchable LoRA picker,
//   - rgthree's Power Lora Loader gets its rows (on/off, LoRA, strength), add and toggle-all (power_lora.js),
//   - the server's "nodegraph.warning" messages (e.g. LoRA key coverage) on the node and as a toast,
//   - the "Train LoRA" sidebar panel (train_panel.js).
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";
import { connectedCheckpoint, openLoraPicker } from "./lora_picker.js";
import { addTriggerWord } from "./prompt_target.js";
import { listLoras, loraInfo } from "./lora_api.js";
import { POWER_LORA, addPowerLoraRow, setUpPowerLora } from "./power_lora.js";
import { registerTrainPanel } from "./train_panel.js";

const LORA_NODES = new Set(["LoraLoader", "LoraLoaderModelOnly"]);
const warnings = new Map(); // node id (string) -> {message, details}

// ---- default workflow ------------------------------------------------------------------------
// The frontend loads `window.comfyAPI.defaultGraph.defaultGraph` when a user has no saved graph
// (and for "Load Default"), resetting combo values the server does not offer to its first choice,
// so the graph opens on whichever checkpoint and LoRA the model folders hold. Replacing the object's
// contents in place reaches every place that holds a reference to it.
async function installDefaultGraph() {
  const holder = window.comfyAPI?.defaultGraph?.defaultGraph;
  if (!holder) return;
  // The server's copy names the installed models; the static file is the same graph without that.
  let response = await api.fetchApi("/nodegraph/default_workflow");
  if (!response.ok) response = await fetch(new URL("./default_workflow.json", import.meta.url));
  if (!response.ok) throw new Error(`default workflow: HTTP ${response.status}`);
  const ours = await response.json();
  for (const key of Object.keys(holder)) delete holder[key];
  Object.assign(holder, ours);
}

try {
  await installDefaultGraph();
} catch (error) {
  console.warn("nodegraph: keeping the stock default workflow:", error);
}

function el(tag, className, text) {
  const e = document.createElement(tag);
  if (className) e.className = className;
  if (text !== undefined) e.textContent = text;
  return e;
}

function loraWidget(node) {
  return node.widgets?.find((w) => w.name === "lora_name");
}

// The panel below a LoraLoader's widgets: picker button, facts, trigger words, preview, warning.
function buildPanel(node) {
  const root = el("div", "nodegraph-lora-panel");
  const pick = el("button", "nodegraph-pick", "Pick LoRA…");
  pick.addEventListener("click", (event) => {
    event.stopPropagation();
    openLoraPicker((name) => setLora(node, name), connectedCheckpoint(node));
  });
  const facts = el("div", "nodegraph-facts");
  const words = el("div", "nodegraph-words");
  const preview = el("img", "nodegraph-preview");
  preview.alt = "";
  preview.hidden = true;
  const warning = el("div", "nodegraph-warning");
  warning.hidden = true;
  root.append(pick, facts, words, preview, warning);
  return { root, facts, words, preview, warning, shown: null };
}

function setLora(node, name) {
  const widget = loraWidget(node);
  if (!widget) return;
  widget.value = name;
  widget.callback?.(name, app.canvas, node);
  node.graph?.setDirtyCanvas(true, true);
}

async function showInfo(node, panel, name) {
  panel.shown = name;
  panel.facts.textContent = name ? "reading LoRA…" : "no LoRA selected";
  panel.words.replaceChildren();
  panel.preview.hidden = true;
  if (!name) return;
  const info = await loraInfo(name);
  if (panel.shown !== name) return; // the user picked another one meanwhile
  const rank = info.rank ?? "?";
  panel.facts.textContent = info.error
    ? `⚠ ${info.error}`
    : `base: ${info.base_model} · rank ${rank}${info.alpha ? ` · alpha ${info.alpha}` : ""}`;
  for (const word of info.trigger_words ?? []) {
    const chip = el("button", "nodegraph-word", word);
    chip.title = "Add to the prompt this LoRA's CLIP feeds";
    chip.addEventListener("click", (event) => {
      event.stopPropagation();
      const target = addTriggerWord(node, word);
      chip.classList.toggle("nodegraph-word-used", Boolean(target));
      if (!target) toast("warn", "No prompt to add to", "Connect this LoRA's CLIP output to a CLIP Text Encode.");
    });
    panel.words.append(chip);
  }
  if (!info.trigger_words?.length && !info.error) panel.words.append(el("span", "nodegraph-muted", "no trigger words"));
  if (info.preview_url) {
    panel.preview.onload = () => fitNode(node);
    panel.preview.src = api.apiURL(info.preview_url);
    panel.preview.hidden = false;
  }
  fitNode(node);
}

// Grow the node when the panel's content needs more room; never shrink what the user sized.
function fitNode(node) {
  const wanted = node.computeSize?.();
  if (!wanted) return;
  if (wanted[1] > node.size[1]) node.setSize([node.size[0], wanted[1]]);
  node.graph?.setDirtyCanvas(true, true);
}

function showWarning(node) {
  const panel = node.nodegraphPanel;
  const warning = warnings.get(String(node.id));
  if (panel) {
    panel.warning.hidden = !warning;
    panel.warning.textContent = warning ? `⚠ ${warning.message}` : "";
    panel.warning.title = warning?.details ?? "";
    fitNode(node);
  }
  node.graph?.setDirtyCanvas(true, true);
}

function attachPanel(node) {
  const panel = buildPanel(node);
  node.nodegraphPanel = panel;
  const widget = node.addDOMWidget("nodegraph_lora_info", "nodegraph-lora", panel.root, {
    serialize: false,
    hideOnZoom: false,
    // Room for what the panel holds now (trigger words wrap, the preview appears once loaded).
    getMinHeight: () => Math.max(60, panel.root.scrollHeight + 4),
  });
  // A display, not an input: it never enters widgets_values or the API prompt.
  widget.serialize = false;
  widget.serializeValue = () => undefined;
  const draw = node.onDrawForeground;
  // Every way the LoRA can change (combo, picker, paste, workflow load, undo) ends in a redraw.
  node.onDrawForeground = function (...args) {
    const name = loraWidget(this)?.value ?? null;
    if (name !== panel.shown) void showInfo(this, panel, name);
    return draw?.apply(this, args);
  };
  void showInfo(node, panel, loraWidget(node)?.value ?? null);
}

// ---- loader classes the frontend expects -------------------------------------------------------
// Frontend 1.27 maps each model folder to these loader classes when it starts; a class missing from
// /object_info throws a TypeError there, and every loader then loads as a red "missing" node
// (shared/reference/canvas.md, pitfall 1). nodegraph does not offer all of them, so the canvas gets
// placeholders, marked deprecated so the node search hides them; /object_info itself stays truthful.
const FRONTEND_LOADERS = {
  CheckpointLoaderSimple: "ckpt_name",
  ImageOnlyCheckpointLoader: "ckpt_name",
  LoraLoader: "lora_name",
  LoraLoaderModelOnly: "lora_name",
  VAELoader: "vae_name",
  ControlNetLoader: "control_net_name",
  UNETLoader: "unet_name",
  UpscaleModelLoader: "model_name",
  StyleModelLoader: "style_model",
  GLIGENLoader: "gligen_name",
};

function addPlaceholderLoaders(defs) {
  for (const [name, key] of Object.entries(FRONTEND_LOADERS)) {
    if (defs[name]) continue;
    defs[name] = {
      name,
      display_name: `${name} (not available in nodegraph)`,
      description: "nodegraph does not implement this node; the canvas only needs to know its name.",
      category: "nodegraph/unavailable",
      python_module: "nodegraph.placeholder",
      input: { required: { [key]: [[], {}] } },
      input_order: { required: [key] },
      output: [],
      output_is_list: [],
      output_name: [],
      output_node: false,
      deprecated: true,
    };
  }
}

// ---- warnings from the server ----------------------------------------------------------------
function toast(severity, summary, detail) {
  const toasts = app.extensionManager?.toast;
  if (toasts?.add) toasts.add({ severity, summary, detail, life: 8000 });
  else console.warn(`${summary}: ${detail}`);
}

// `details` is free text or a structured report (e.g. the LoRA coverage figures); both fit a tooltip.
function detailText(details) {
  if (details === undefined || details === null || details === "") return "";
  return typeof details === "string" ? details : JSON.stringify(details, null, 1);
}

function onWarning(event) {
  const { node: id, message, details } = event.detail ?? {};
  if (id === undefined || id === null || !message) return;
  warnings.set(String(id), { message, details: detailText(details) });
  const node = app.graph?.getNodeById(id);
  if (node) showWarning(node);
  const title = node ? `${node.title} (#${id})` : `node ${id}`;
  const extra = typeof details === "string" && details.length < 300 ? `\n${details}` : "";
  toast("warn", title, message + extra);
}

function onExecutionStart() {
  const ids = [...warnings.keys()];
  warnings.clear();
  for (const id of ids) {
    const node = app.graph?.getNodeById(id);
    if (node) showWarning(node);
  }
}

// Nodes without a panel show their warning as a line above the title.
function drawWarning(node, ctx) {
  const warning = warnings.get(String(node.id));
  if (!warning || node.nodegraphPanel) return;
  ctx.save();
  ctx.font = "12px sans-serif";
  ctx.fillStyle = "#e0b000";
  const titleHeight = window.LiteGraph?.NODE_TITLE_HEIGHT ?? 30;
  ctx.fillText(`⚠ ${warning.message}`, 4, -titleHeight - 6);
  ctx.restore();
}

function addStyles() {
  const style = document.createElement("link");
  style.rel = "stylesheet";
  style.href = new URL("./nodegraph.css", import.meta.url).href;
  document.head.append(style);
}

app.registerExtension({
  name: "nodegraph.Canvas",
  async setup() {
    addStyles();
    api.addEventListener("nodegraph.warning", onWarning);
    api.addEventListener("execution_start", onExecutionStart);
    window.nodegraph.train = registerTrainPanel();
  },
  async afterConfigureGraph() {
    warnings.clear(); // they belong to the graph that ran; node ids repeat across workflows
  },
  async addCustomNodeDefs(defs) {
    addPlaceholderLoaders(defs);
  },
  async beforeRegisterNodeDef(nodeType) {
    const draw = nodeType.prototype.onDrawForeground;
    nodeType.prototype.onDrawForeground = function (ctx, ...rest) {
      const result = draw?.call(this, ctx, ...rest);
      drawWarning(this, ctx);
      return result;
    };
  },
  async nodeCreated(node) {
    if (LORA_NODES.has(node.comfyClass)) attachPanel(node);
    if (node.comfyClass === POWER_LORA) setUpPowerLora(node);
  },
});

// For tests and for other extensions: what this module knows.
window.nodegraph = { warnings, loraInfo, listLoras, addTriggerWord, openLoraPicker, addPowerLoraRow };
