// rgthree's Power Lora Loader, drawn by nodegraph: a row per LoRA (on/off, file, strength; model and
// clip strengths in "Separate Model & Clip" mode), "Toggle all" and "Add LoRA".
//
// The server declares the node with only its model/clip sockets (rgthree's flexible inputs), so the
// rows are ours to keep. They are saved as rgthree saves them, so a file moves between nodegraph and
// a ComfyUI with rgthree-comfy either way:
//   widgets_values: [{}, {type: "PowerLoraLoaderHeaderWidget"}, {on, lora, strength, strengthTwo}..., {}, ""]
//   API prompt:     lora_1, lora_2, ... = {on, lora, strength[, strengthTwo]} (strengthTwo only when separate)
// Each row is one hidden widget named lora_N (so graphToPrompt sends it under that name); one DOM
// widget shows them all.
import { connectedCheckpoint, openLoraPicker } from "./lora_picker.js";

export const POWER_LORA = "Power Lora Loader (rgthree)";
const SHOW = "Show Strengths";
const SEPARATE = "Separate Model & Clip";
const HEADER = { type: "PowerLoraLoaderHeaderWidget" };

function el(tag, className, text) {
  const e = document.createElement(tag);
  if (className) e.className = className;
  if (text !== undefined) e.textContent = text;
  return e;
}

const separate = (node) => node.properties?.[SHOW] === SEPARATE;
const rowWidgets = (node) => (node.widgets ?? []).filter((w) => w.nodegraphPowerRow);

// A row: a widget the canvas neither draws nor sizes, whose value is rgthree's row object.
function addRow(node, value) {
  const widget = {
    name: "", // renamed by renumber()
    type: "nodegraph_power_lora_row",
    row: { on: true, lora: null, strength: 1, strengthTwo: null, ...value },
    // The canvas (1.58) writes saved widgets_values into serialisable widgets by position after
    // onConfigure; rgthree's layout ({}, header, rows..., {}, "") does not line up with our rows,
    // so outside writes are ignored: rows are built from widgets_values in onConfigure only.
    get value() {
      return this.row;
    },
    set value(_ignored) {},
    nodegraphPowerRow: true,
    options: { serialize: true },
    draw() {},
    computeSize: () => [0, -4],
    serializeValue() {
      const row = { ...this.value };
      if (separate(node)) row.strengthTwo = row.strengthTwo ?? 1;
      else delete row.strengthTwo;
      return row;
    },
  };
  node.addCustomWidget(widget);
  renumber(node);
  return widget;
}

function renumber(node) {
  rowWidgets(node).forEach((w, i) => (w.name = `lora_${i + 1}`));
}

function removeRow(node, widget) {
  node.widgets.splice(node.widgets.indexOf(widget), 1);
  renumber(node);
}

function numberInput(value, onChange) {
  const input = el("input", "nodegraph-power-strength");
  input.type = "number";
  input.step = "0.05";
  input.value = String(value);
  input.addEventListener("change", () => onChange(Number(input.value)));
  return input;
}

function rowElement(node, widget, redraw) {
  const row = el("div", "nodegraph-power-row");
  const v = widget.value;
  const on = el("input");
  on.type = "checkbox";
  on.checked = Boolean(v.on);
  on.title = "Use this LoRA";
  on.addEventListener("change", () => ((v.on = on.checked), redraw()));
  const name = el("button", "nodegraph-power-name", v.lora || "None");
  name.title = "Pick a LoRA";
  name.addEventListener("click", (e) => {
    e.stopPropagation();
    openLoraPicker((picked) => ((v.lora = picked), redraw()), connectedCheckpoint(node));
  });
  const model = numberInput(v.strength ?? 1, (x) => (v.strength = x));
  model.title = separate(node) ? "Model strength" : "Strength";
  const remove = el("button", "nodegraph-power-remove", "✕");
  remove.title = "Remove this LoRA";
  remove.addEventListener("click", (e) => (e.stopPropagation(), removeRow(node, widget), redraw()));
  row.append(on, name, model);
  if (separate(node)) {
    const clip = numberInput(v.strengthTwo ?? v.strength ?? 1, (x) => (v.strengthTwo = x));
    clip.title = "Clip strength";
    row.append(clip);
  }
  row.append(remove);
  row.classList.toggle("nodegraph-power-off", !v.on);
  return row;
}

function render(node, root) {
  const redraw = () => render(node, root);
  const header = el("div", "nodegraph-power-header");
  const all = el("input");
  all.type = "checkbox";
  const rows = rowWidgets(node);
  all.checked = rows.length > 0 && rows.every((w) => w.value.on);
  all.title = "Toggle all";
  all.addEventListener("change", () => (rows.forEach((w) => (w.value.on = all.checked)), redraw()));
  const mode = el("label", "nodegraph-power-mode");
  const both = el("input");
  both.type = "checkbox";
  both.checked = separate(node);
  both.addEventListener("change", () => {
    node.properties[SHOW] = both.checked ? SEPARATE : "Single Strength";
    for (const w of rows) if (both.checked) w.value.strengthTwo = w.value.strengthTwo ?? w.value.strength ?? 1;
    redraw();
  });
  mode.append(both, " model & clip");
  header.append(all, el("span", "", "Toggle all"), mode);
  const add = el("button", "nodegraph-power-add", "➕ Add Lora");
  add.addEventListener("click", (e) => {
    e.stopPropagation();
    openLoraPicker((picked) => (addRow(node, { lora: picked }), redraw()), connectedCheckpoint(node));
  });
  root.replaceChildren(header, ...rows.map((w) => rowElement(node, w, redraw)), add);
  const wanted = node.computeSize?.();
  if (wanted && wanted[1] > node.size[1]) node.setSize([node.size[0], wanted[1]]);
  node.graph?.setDirtyCanvas(true, true);
}

export function setUpPowerLora(node) {
  node.properties ??= {};
  node.properties[SHOW] ??= "Single Strength";
  node.serialize_widgets = true;
  const root = el("div", "nodegraph-power-lora");
  const panel = node.addDOMWidget("nodegraph_power_lora", "nodegraph-power", root, {
    serialize: false,
    hideOnZoom: false,
    getValue: () => undefined,
    setValue: () => {}, // configure() writes widgets_values by index; the rows are rebuilt below
    getMinHeight: () => Math.max(40, root.scrollHeight + 4),
  });
  panel.serialize = false;
  node.nodegraphPowerRender = () => render(node, root);
  const configure = node.onConfigure;
  node.onConfigure = function (info) {
    configure?.apply(this, arguments);
    for (const w of rowWidgets(this)) removeRow(this, w);
    // rgthree's own rule: every saved entry with a `lora` key is a row, in order
    for (const value of info.widgets_values ?? []) if (value?.lora !== undefined) addRow(this, value);
    render(this, root);
  };
  const serialize = node.onSerialize;
  node.onSerialize = function (o) {
    serialize?.apply(this, arguments);
    o.widgets_values = [{}, HEADER, ...rowWidgets(this).map((w) => ({ strengthTwo: null, ...w.value })), {}, ""];
  };
  render(node, root);
}

// For tests: add a row as the "Add Lora" button does after a pick.
export function addPowerLoraRow(node, lora, strength = 1) {
  const widget = addRow(node, { lora, strength });
  node.nodegraphPowerRender?.();
  return widget;
}
