// Where a LoRA's trigger word goes: the prompt text of the CLIP Text Encode its CLIP output feeds.
import { app } from "../../scripts/app.js";

function linkById(graph, id) {
  return graph.getLink ? graph.getLink(id) : graph.links?.[id];
}

// [target node, input name] for every link leaving the node's outputs of `type` (all types if null).
function downstream(node, type) {
  const out = [];
  for (const output of node.outputs ?? []) {
    if (type && output.type !== type) continue;
    for (const id of output.links ?? []) {
      const link = linkById(node.graph, id);
      const target = link && node.graph.getNodeById(link.target_id);
      if (target) out.push([target, target.inputs?.[link.target_slot]?.name]);
    }
  }
  return out;
}

function textWidget(node) {
  return node.widgets?.find((w) => w.name === "text" && typeof w.value === "string");
}

// Text encoders reached through CLIP links (passing through CLIP-to-CLIP nodes such as another LoRA).
function encodersFed(loraNode) {
  const found = [];
  const seen = new Set([loraNode.id]);
  let frontier = [loraNode];
  while (frontier.length) {
    const next = [];
    for (const node of frontier) {
      for (const [target] of downstream(node, "CLIP")) {
        if (seen.has(target.id)) continue;
        seen.add(target.id);
        if (textWidget(target)) found.push(target);
        else next.push(target);
      }
    }
    frontier = next;
  }
  return found;
}

// True when the encoder's conditioning reaches a sampler's "positive" input (through any nodes).
function feedsPositive(encoder) {
  const seen = new Set();
  let frontier = [encoder];
  while (frontier.length) {
    const next = [];
    for (const node of frontier) {
      for (const [target, input] of downstream(node, null)) {
        if (input === "positive") return true;
        if (!seen.has(target.id)) {
          seen.add(target.id);
          next.push(target);
        }
      }
    }
    frontier = next;
  }
  return false;
}

export function promptTarget(loraNode) {
  let candidates = encodersFed(loraNode);
  if (!candidates.length) candidates = (loraNode.graph?.nodes ?? []).filter((n) => textWidget(n));
  return candidates.find(feedsPositive) ?? (candidates.length === 1 ? candidates[0] : null);
}

export function appendWord(text, word) {
  const items = text.split(",").map((s) => s.trim());
  if (items.includes(word)) return text;
  const kept = text.replace(/[\s,]+$/, "");
  return kept ? `${kept}, ${word}` : word;
}

// Adds `word` to the positive prompt this LoRA feeds; returns the node changed, or null.
export function addTriggerWord(loraNode, word) {
  const target = promptTarget(loraNode);
  const widget = target && textWidget(target);
  if (!widget) return null;
  widget.value = appendWord(widget.value, word);
  widget.callback?.(widget.value, app.canvas, target);
  target.graph?.setDirtyCanvas(true, true);
  return target;
}
