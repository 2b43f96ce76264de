// Markdown for model answers, built as DOM nodes: the model's text only ever becomes text nodes
// (createTextNode / textContent), never HTML, so nothing a model writes can run or load anything.
// Covers what chat models write: paragraphs, headings, lists, quotes, fenced and inline code, bold, italic.
// Links are shown as their text and address, not made clickable: the box is offline.
"use strict";

const FENCE = /^\s{0,3}(`{3,}|~{3,})\s*([\w+.#-]*)/;
const HEADING = /^\s{0,3}(#{1,6})\s+(.*?)\s*#*\s*$/;
const ITEM = /^(\s*)([-*+]|\d{1,9}[.)])\s+(.*)$/;
const QUOTE = /^\s{0,3}>\s?(.*)$/;
const RULE = /^\s{0,3}([-*_])(\s*\1){2,}\s*$/;
const INLINE = /(`+)([\s\S]*?[^`])\1(?!`)|\*\*(?=\S)([\s\S]*?\S)\*\*|(?<![\w])__(?=\S)([\s\S]*?\S)__(?![\w])|\*(?=[^\s*])([\s\S]*?[^\s*])\*|(?<![\w])_(?=[^\s_])([\s\S]*?[^\s_])_(?![\w])/g;

function el(doc, tag, className) {
  const node = doc.createElement(tag);
  if (className) node.className = className;
  return node;
}

/** Inline spans of `text` appended to `parent`: code, bold, italic; everything else as plain text. */
export function renderInline(text, parent, doc = document) {
  const pattern = new RegExp(INLINE.source, "g"); // one per call: bold and italic recurse
  let last = 0;
  for (let m; (m = pattern.exec(text)); ) {
    if (m.index > last) parent.appendChild(doc.createTextNode(text.slice(last, m.index)));
    if (m[1]) {
      const code = el(doc, "code");
      code.textContent = m[2].replace(/^ (.*) $/, "$1");
      parent.appendChild(code);
    } else {
      const strong = m[3] !== undefined || m[4] !== undefined;
      const span = el(doc, strong ? "strong" : "em");
      renderInline(strong ? (m[3] ?? m[4]) : (m[5] ?? m[6]), span, doc);
      parent.appendChild(span);
    }
    last = pattern.lastIndex;
  }
  if (last < text.length) parent.appendChild(doc.createTextNode(text.slice(last)));
  return parent;
}

function isBlockStart(line) {
  return FENCE.test(line) || HEADING.test(line) || ITEM.test(line) || QUOTE.test(line) || RULE.test(line);
}

function codeBlock(doc, body, language) {
  const pre = el(doc, "pre", "code-block");
  const code = el(doc, "code", language ? `language-${language.replace(/[^\w+-]/g, "")}` : "");
  code.textContent = body;
  pre.appendChild(code);
  if (language) pre.dataset.language = language;
  return pre;
}

/** The Markdown `text` as a DocumentFragment of safe nodes. An unfinished fence (a stream in progress) is code. */
export function renderMarkdown(text, doc = document) {
  const root = doc.createDocumentFragment();
  const lines = String(text ?? "").replace(/\r\n?/g, "\n").split("\n");
  let i = 0;
  while (i < lines.length) {
    const line = lines[i];
    const fence = line.match(FENCE);
    if (fence) {
      const body = [];
      const close = new RegExp(`^\\s{0,3}${fence[1][0] === "`" ? "`" : "~"}{${fence[1].length},}\\s*$`);
      for (i++; i < lines.length && !close.test(lines[i]); i++) body.push(lines[i]);
      i++;
      root.appendChild(codeBlock(doc, body.join("\n"), fence[2]));
      continue;
    }
    if (!line.trim()) { i++; continue; }
    if (RULE.test(line)) { root.appendChild(el(doc, "hr")); i++; continue; }
    const heading = line.match(HEADING);
    if (heading) {
      // The page's own headings are h1-h3: a model's "# Title" is shown smaller than them.
      const h = el(doc, `h${Math.min(heading[1].length + 3, 6)}`);
      renderInline(heading[2], h, doc);
      root.appendChild(h);
      i++;
      continue;
    }
    if (QUOTE.test(line)) {
      const quoted = [];
      for (; i < lines.length && QUOTE.test(lines[i]); i++) quoted.push(lines[i].match(QUOTE)[1]);
      const block = el(doc, "blockquote");
      block.appendChild(renderMarkdown(quoted.join("\n"), doc));
      root.appendChild(block);
      continue;
    }
    if (ITEM.test(line)) {
      const ordered = /\d/.test(line.match(ITEM)[2]);
      const list = el(doc, ordered ? "ol" : "ul");
      if (ordered) {
        const start = parseInt(line.match(ITEM)[2], 10);
        if (start !== 1) list.start = start;
      }
      let item = null;
      for (; i < lines.length; i++) {
        const m = lines[i].match(ITEM);
        if (m && /\d/.test(m[2]) === ordered) {
          item = el(doc, "li");
          renderInline(m[3], item, doc);
          list.appendChild(item);
        } else if (item && lines[i].trim() && /^\s+/.test(lines[i]) && !FENCE.test(lines[i])) {
          item.appendChild(doc.createTextNode(" "));
          renderInline(lines[i].trim(), item, doc); // a wrapped item's continuation
        } else break;
      }
      root.appendChild(list);
      continue;
    }
    const para = el(doc, "p");
    for (let first = true; i < lines.length && lines[i].trim() && (first || !isBlockStart(lines[i])); i++, first = false) {
      if (!first) para.appendChild(el(doc, "br"));
      renderInline(lines[i], para, doc);
    }
    root.appendChild(para);
  }
  return root;
}
