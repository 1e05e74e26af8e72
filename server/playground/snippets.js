// "Copy as curl" and "copy as Python (openai SDK)": the request that makes one gallery image again, with
// its own seed and n=1. An edit's input image and mask are referenced by the names the gallery downloads
// them as. The key is never written out: the commands read it from $SDSERVE_API_KEYS, the variable
// a server reads its keys from (set it to your key).

import { apiBase, apiKey } from "./api.js";

const OPENAI_FIELDS = new Set(["model", "prompt", "n", "size"]);

function shellQuote(text) {
  return `'${String(text).replaceAll("'", `'\\''`)}'`;
}

function pyValue(value) {
  if (value === null || value === undefined) return "None";
  if (typeof value === "boolean") return value ? "True" : "False";
  if (typeof value === "number") return String(value);
  if (typeof value === "string") return JSON.stringify(value);
  if (Array.isArray(value)) return `[${value.map(pyValue).join(", ")}]`;
  const items = Object.entries(value).map(([k, v]) => `${JSON.stringify(k)}: ${pyValue(v)}`);
  return `{${items.join(", ")}}`;
}

function formValue(value) {
  return typeof value === "object" ? JSON.stringify(value) : String(value);
}

export function curlCommand(entry) {
  const lines = [`curl -sS ${shellQuote(`${apiBase()}/images/${entry.route}`)}`];
  if (apiKey()) lines.push(`-H "Authorization: Bearer $SDSERVE_API_KEYS"`);
  if (entry.route === "generations") {
    lines.push(`-H 'Content-Type: application/json'`);
    lines.push(`-d ${shellQuote(JSON.stringify(entry.fields))}`);
  } else {
    lines.push(`-F ${shellQuote(`image=@${entry.files.image}`)}`);
    if (entry.files.mask) lines.push(`-F ${shellQuote(`mask=@${entry.files.mask}`)}`);
    for (const [name, value] of Object.entries(entry.fields)) {
      lines.push(`--form-string ${shellQuote(`${name}=${formValue(value)}`)}`);
    }
  }
  return lines.join(" \\\n  ");
}

export function pythonCode(entry) {
  const args = [];
  const extra = {};
  if (entry.route === "edits") {
    args.push(`image=open(${pyValue(entry.files.image)}, "rb")`);
    if (entry.files.mask) args.push(`mask=open(${pyValue(entry.files.mask)}, "rb")`);
  }
  for (const [name, value] of Object.entries(entry.fields)) {
    if (OPENAI_FIELDS.has(name)) args.push(`${name}=${pyValue(value)}`);
    else extra[name] = value;
  }
  args.push(`response_format="b64_json"`);
  if (Object.keys(extra).length) args.push(`extra_body=${pyValue(extra)}`);
  const call = entry.route === "generations" ? "generate" : "edit";
  const key = apiKey() ? `os.environ["SDSERVE_API_KEYS"]` : `"not-needed"`;
  return [
    "import base64",
    ...(apiKey() ? ["import os"] : []),
    "",
    "from openai import OpenAI",
    "",
    `client = OpenAI(base_url=${pyValue(apiBase())}, api_key=${key})`,
    `result = client.images.${call}(`,
    ...args.map((arg) => `    ${arg},`),
    ")",
    `with open(${pyValue(entry.files.output)}, "wb") as f:`,
    "    f.write(base64.b64decode(result.data[0].b64_json))",
    "",
  ].join("\n");
}
