// A searchable LoRA picker: filter by file name, trigger word or base model; Enter or click picks.
// Given the checkpoint the node is wired to, it marks the LoRAs made for that family (SD1.5 / SDXL)
// and those that are not (the server refuses them at run time), and lists the fitting ones first.
import { listLoras } from "./lora_api.js";

const FAMILY = { sd15: "SD1.5", sd2: "SD2", sdxl: "SDXL", sdxl_refiner: "SDXL refiner" };

function fitText(info) {
  if (info.fits === true) return `✓ fits this ${FAMILY[info.checkpoint_family] ?? ""} checkpoint`;
  if (info.fits === false) return `✗ not for this ${FAMILY[info.checkpoint_family] ?? ""} checkpoint`;
  return "";
}

function matches(info, words) {
  const haystack = [info.name, info.base_model, ...(info.trigger_words ?? [])].join(" ").toLowerCase();
  return words.every((w) => haystack.includes(w));
}

function row(info, onPick) {
  const item = document.createElement("li");
  item.className = "nodegraph-picker-item";
  item.dataset.name = info.name;
  const name = document.createElement("div");
  name.className = "nodegraph-picker-name";
  name.textContent = info.name;
  const meta = document.createElement("div");
  meta.className = "nodegraph-picker-meta";
  const words = (info.trigger_words ?? []).slice(0, 6).join(", ");
  meta.textContent = `${info.base_model ?? "?"} · rank ${info.rank ?? "?"}${words ? ` · ${words}` : ""}`;
  item.append(name, meta);
  if (info.fits === true || info.fits === false) {
    item.classList.add(info.fits ? "nodegraph-picker-fits" : "nodegraph-picker-misfit");
    item.dataset.fits = String(info.fits);
    item.append(Object.assign(document.createElement("div"), { className: "nodegraph-picker-fit", textContent: fitText(info) }));
  }
  item.addEventListener("click", () => onPick(info.name));
  return item;
}

// `checkpoint`: the ckpt_name the LoRA node is wired to (see connectedCheckpoint), or null.
export async function openLoraPicker(onPick, checkpoint = null) {
  document.querySelector(".nodegraph-picker")?.remove();
  const overlay = document.createElement("div");
  overlay.className = "nodegraph-picker";
  const box = document.createElement("div");
  box.className = "nodegraph-picker-box";
  const search = document.createElement("input");
  search.type = "search";
  search.placeholder = "Search LoRAs by name, trigger word or base model";
  const list = document.createElement("ul");
  box.append(search, list);
  overlay.append(box);
  document.body.append(overlay);

  const close = () => overlay.remove();
  const pick = (name) => {
    close();
    onPick(name);
  };
  overlay.addEventListener("click", (event) => event.target === overlay && close());
  overlay.addEventListener("keydown", (event) => {
    event.stopPropagation(); // keep canvas shortcuts away while typing
    if (event.key === "Escape") close();
    if (event.key === "Enter") list.querySelector("li")?.click();
  });

  let loras = [];
  const render = () => {
    const words = search.value.toLowerCase().split(/\s+/).filter(Boolean);
    const shown = loras.filter((info) => matches(info, words));
    list.replaceChildren(...shown.map((info) => row(info, pick)));
    if (!shown.length) list.append(Object.assign(document.createElement("li"), { textContent: "no match" }));
  };
  search.addEventListener("input", render);
  search.focus();
  try {
    loras = await listLoras(checkpoint);
    loras.sort((a, b) => Number(b.fits === true) - Number(a.fits === true)); // stable: fitting first
  } catch (error) {
    list.replaceChildren(Object.assign(document.createElement("li"), { textContent: String(error) }));
    return;
  }
  render();
}

// The checkpoint a node's model (else clip) input comes from, following chained LoRA nodes upstream.
export function connectedCheckpoint(node) {
  const seen = new Set();
  let current = node;
  while (current && !seen.has(current.id)) {
    seen.add(current.id);
    const ckpt = current.widgets?.find((w) => w.name === "ckpt_name" || w.name === "model_path");
    if (ckpt) return ckpt.value ?? null;
    const input =
      current.inputs?.find((i) => i.name === "model" && i.link != null) ??
      current.inputs?.find((i) => i.name === "clip" && i.link != null);
    if (!input) return null;
    const graph = current.graph;
    const link = graph?.getLink?.(input.link) ?? graph?.links?.get?.(input.link) ?? graph?.links?.[input.link];
    current = link ? graph.getNodeById(link.origin_id) : null;
  }
  return null;
}
