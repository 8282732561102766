// A searchable LoRA picker: filter by file name, trigger word or base model; Enter or click picks.
import { listLoras } from "./lora_api.js";

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
  item.addEventListener("click", () => onPick(info.name));
  return item;
}

export async function openLoraPicker(onPick) {
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
    loras = await listLoras();
  } catch (error) {
    list.replaceChildren(Object.assign(document.createElement("li"), { textContent: String(error) }));
    return;
  }
  render();
}
