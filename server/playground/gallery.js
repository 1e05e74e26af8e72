// The images made since the page was opened, newest first, each with its settings and the ways to get
// it again: the same settings in the form, a download, or the request as curl / Python.

import { curlCommand, pythonCode } from "./snippets.js";

const SHOWN = [
  ["model", "Model"], ["size", "Size"], ["seed", "Seed"], ["steps", "Steps"],
  ["guidance_scale", "Guidance"], ["sampler", "Sampler"], ["strength", "Strength"],
];

function element(tag, props = {}, children = []) {
  const node = Object.assign(document.createElement(tag), props);
  node.append(...children);
  return node;
}

async function copyText(text) {
  try {
    await navigator.clipboard.writeText(text);
    return true;
  } catch {
    // no clipboard API outside secure contexts (plain http on a LAN address): the old way
    const area = element("textarea", { value: text, readOnly: true });
    document.body.append(area);
    area.select();
    const done = document.execCommand("copy");
    area.remove();
    return done;
  }
}

function settingsList(entry) {
  const list = element("dl", { className: "settings" });
  for (const [name, label] of SHOWN) {
    if (entry.fields[name] === undefined) continue;
    list.append(element("dt", { textContent: label }), element("dd", { textContent: String(entry.fields[name]) }));
  }
  for (const lora of entry.fields.lora || []) {
    list.append(element("dt", { textContent: "LoRA" }), element("dd", { textContent: `${lora.name} × ${lora.scale}` }));
  }
  list.append(element("dt", { textContent: "Time" }), element("dd", { textContent: entry.timeText }));
  return list;
}

function download(blob, name, text) {
  return element("a", { href: URL.createObjectURL(blob), download: name, textContent: text, className: "button" });
}

export class Gallery {
  constructor(list, empty, { onReuse, onStatus }) {
    this.list = list;
    this.empty = empty;
    this.onReuse = onReuse;
    this.onStatus = onStatus;
    this.count = 0;
  }

  add(entry) {
    this.count += 1;
    const snippet = element("pre", { className: "snippet", hidden: true, tabIndex: 0 });
    const copy = (label, make) => {
      const button = element("button", { type: "button", textContent: label });
      button.addEventListener("click", async () => {
        snippet.textContent = make(entry);
        snippet.hidden = false;
        const done = await copyText(snippet.textContent);
        this.onStatus(done ? `Copied: ${label.toLowerCase()}.` : "Could not copy: select the text below.");
      });
      return button;
    };
    const reuse = element("button", { type: "button", textContent: "Use these settings again" });
    reuse.addEventListener("click", () => this.onReuse(entry));
    const links = [download(entry.blobs.output, entry.files.output, "Download")];
    if (entry.blobs.image) links.push(download(entry.blobs.image, entry.files.image, "Input image"));
    if (entry.blobs.mask) links.push(download(entry.blobs.mask, entry.files.mask, "Mask"));
    const card = element("li", { className: "card" }, [
      element("img", { src: entry.src, alt: `Gallery image ${this.count}: ${entry.fields.prompt}` }),
      element("p", { className: "prompt", textContent: entry.fields.prompt }),
      settingsList(entry),
      element("div", { className: "buttons" }, [
        reuse, ...links, copy("Copy as curl", curlCommand), copy("Copy as Python", pythonCode),
      ]),
      snippet,
    ]);
    card.dataset.seed = String(entry.seed);
    this.list.prepend(card);
    this.empty.hidden = true;
  }
}
