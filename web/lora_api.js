// LoRA metadata from the server (nodegraph/server/routes_lora.py), cached per file name.
import { api } from "../../scripts/api.js";

const infoCache = new Map(); // lora name -> Promise<info>

export function loraInfo(name) {
  if (!infoCache.has(name)) {
    const request = api
      .fetchApi(`/nodegraph/lora_info?name=${encodeURIComponent(name)}`)
      .then((r) => (r.ok ? r.json() : r.text().then((t) => ({ name, error: t || `HTTP ${r.status}` }))))
      .catch((error) => ({ name, error: String(error) }));
    infoCache.set(name, request);
  }
  return infoCache.get(name);
}

// `checkpoint` (a ckpt_name): each entry also says whether it fits that checkpoint's family (`fits`).
export async function listLoras(checkpoint = null) {
  infoCache.clear(); // the picker is where new files appear; re-read everything once
  const query = checkpoint ? `?checkpoint=${encodeURIComponent(checkpoint)}` : "";
  const response = await api.fetchApi(`/nodegraph/loras${query}`);
  if (!response.ok) throw new Error(`could not list LoRAs: HTTP ${response.status}`);
  const list = await response.json();
  for (const info of list) infoCache.set(info.name, Promise.resolve(info));
  return list;
}

