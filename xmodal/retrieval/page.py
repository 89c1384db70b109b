"""The search page `xmodal serve` shows at ``/``: one HTML document with its CSS and script inline (no build step,
no external requests; the server sends hashes of both in its Content-Security-Policy). A text search is kept in the
address (``/?q=a+red+car&k=5``), so a link to it runs the same search."""

PAGE_CSS = """
*{box-sizing:border-box}
body{font-family:system-ui,-apple-system,"Segoe UI",sans-serif;margin:0;background:#f5f6f8;color:#1f2328}
header{padding:12px 20px;background:#1f2937;color:#fff;display:flex;gap:18px;align-items:baseline;flex-wrap:wrap}
header h1{font-size:18px;margin:0}
#info{font-size:13px;opacity:.85}
main{padding:16px 20px;max-width:1280px;margin:0 auto}
form{display:flex;gap:8px;flex-wrap:wrap;align-items:center}
#q{flex:1;min-width:240px;padding:8px 10px;font-size:16px;border:1px solid #c4c9d0;border-radius:6px}
select,button{font-size:15px;padding:7px 10px;border-radius:6px;border:1px solid #c4c9d0;background:#fff}
button{background:#2563eb;color:#fff;border-color:#2563eb;cursor:pointer}
#drop{margin-top:10px;border:2px dashed #9aa3ae;border-radius:8px;padding:14px;text-align:center;color:#4b5563;
  background:#fff;display:flex;gap:12px;justify-content:center;align-items:center;flex-wrap:wrap}
#drop.over{border-color:#2563eb;background:#eef4ff}
#preview{max-height:64px;max-width:96px}
#status{margin:12px 0;min-height:1.3em;font-size:14px}
#status.error{color:#b42318;font-weight:600}
#results{display:grid;grid-template-columns:repeat(auto-fill,minmax(180px,1fr));gap:12px}
.hit{background:#fff;border-radius:8px;box-shadow:0 1px 3px rgba(0,0,0,.14);padding:8px;font-size:13px;overflow:hidden}
.hit img{display:block;width:100%;height:160px;object-fit:contain;background:#fafafa;border-radius:4px}
.score{font-weight:600;margin-top:6px}
.meta{color:#57606a;word-break:break-all}
.text{margin-top:4px;max-height:5.4em;overflow:hidden}
"""

PAGE_JS = """
"use strict";
const $ = (id) => document.getElementById(id);
let info = null;

function setStatus(message, isError) {
  const s = $("status");
  s.textContent = message;
  s.className = isError ? "error" : "";
}

async function loadInfo() {
  try {
    const r = await fetch("/api/info");
    info = await r.json();
    $("info").textContent = info.size + " " + info.modality + " items \\u00b7 " + info.kind + " index \\u00b7 " +
      "queries: " + info.query_modalities.join(", ");
    $("q").maxLength = info.limits.max_query_chars;
    if (!info.query_modalities.includes("text")) { $("q").disabled = true; $("q").placeholder = "no text tower"; }
    if (!info.query_modalities.includes("image")) { $("drop").hidden = true; }
  } catch (e) {
    $("info").textContent = "cannot reach the server";
  }
}

function render(data) {
  const grid = $("results");
  grid.replaceChildren();
  for (const h of data.hits) {
    const card = document.createElement("div");
    card.className = "hit";
    card.dataset.indexId = h.index_id;
    if (h.thumb) {
      const img = document.createElement("img");
      img.className = "thumb";
      img.alt = h.label || h.id || "";
      img.src = h.thumb;
      card.append(img);
    }
    const score = document.createElement("div");
    score.className = "score";
    score.textContent = "#" + h.rank + " \\u00b7 " + h.score.toFixed(4);
    const meta = document.createElement("div");
    meta.className = "meta";
    meta.textContent = (h.id != null ? h.id : h.index_id) + (h.label != null ? " \\u00b7 " + h.label : "");
    card.append(score, meta);
    const textValue = h.text != null ? h.text : (h.modality === "text" ? h.value : null);
    if (textValue != null) {
      const text = document.createElement("div");
      text.className = "text";
      text.textContent = textValue;
      card.append(text);
    }
    grid.append(card);
  }
}

async function search(body) {
  setStatus("searching\\u2026", false);
  let r, data;
  try {
    r = await fetch("/api/search", {method: "POST", headers: {"Content-Type": "application/json"},
                                    body: JSON.stringify(body)});
    data = await r.json();
  } catch (e) {
    setStatus("request failed: " + e, true);
    return;
  }
  if (!r.ok) {
    setStatus("error " + r.status + ": " + (data && data.error), true);
    return;
  }
  render(data);
  setStatus(data.hits.length + " results in " + Math.round(data.took_ms) + " ms", false);
}

function k() { return parseInt($("k").value, 10); }

$("form").addEventListener("submit", (e) => {
  e.preventDefault();
  const text = $("q").value.trim();
  if (!text) { setStatus("type a query first", true); return; }
  shareable(text);
  search({text: text, k: k()});
});

// The address bar holds a text query (?q=...&k=...): a link to this page with it runs the same search.
function shareable(text) {
  history.replaceState(null, "", text ? "?" + new URLSearchParams({q: text, k: k()}) : location.pathname);
}

function fromAddress() {
  const params = new URLSearchParams(location.search);
  const text = (params.get("q") || "").trim();
  const want = params.get("k");
  let kOption = Array.from($("k").options).find((o) => o.text === want);
  if (!kOption && /^[1-9][0-9]{0,5}$/.test(want || "")) {  // a k the list lacks (?k=7): added; the server checks it
    kOption = new Option(want);
    $("k").add(kOption);
  }
  if (kOption) $("k").value = kOption.text;
  if (text && !$("q").disabled) { $("q").value = text; search({text: text, k: k()}); }
}

function searchFile(file) {
  if (!file) return;
  if (file.type && !file.type.startsWith("image/")) { setStatus(file.name + " is not an image", true); return; }
  if (info && file.size * 4 / 3 > info.limits.max_body_bytes) {
    setStatus(file.name + " is too large (" + file.size + " bytes)", true);
    return;
  }
  const reader = new FileReader();
  reader.onload = () => {
    const url = reader.result;
    $("preview").src = url;
    $("preview").hidden = false;
    shareable("");  // an image query has no address
    search({image_base64: url.slice(url.indexOf(",") + 1), k: k()});
  };
  reader.onerror = () => setStatus("cannot read " + file.name, true);
  reader.readAsDataURL(file);
}

$("file").addEventListener("change", (e) => searchFile(e.target.files[0]));
const drop = $("drop");
drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", (e) => {
  e.preventDefault();
  drop.classList.remove("over");
  searchFile(e.dataTransfer.files[0]);
});
loadInfo().then(fromAddress);
"""

PAGE = f"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>xmodal search</title>
<style>{PAGE_CSS}</style>
</head>
<body>
<header><h1>xmodal search</h1><span id="info">loading\u2026</span></header>
<main>
<form id="form">
  <input id="q" type="search" placeholder="Describe what you are looking for\u2026" autocomplete="off" autofocus>
  <label>k <select id="k">
    <option>1</option><option>5</option><option selected>10</option><option>20</option><option>50</option>
    <option>100</option></select></label>
  <button id="search" type="submit">Search</button>
</form>
<div id="drop">Drop an image here, or <input id="file" type="file" accept="image/*"><img id="preview" alt="query image"
  hidden></div>
<div id="status" role="status"></div>
<div id="results"></div>
</main>
<script>{PAGE_JS}</script>
</body>
</html>
"""
