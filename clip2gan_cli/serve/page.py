"""The page of `clip2gan serve`: one HTML document, no external fonts, scripts or styles.

It only sends requests to the server that served it (server.py's routes) and shows what they return.
"""

PAGE = r"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>clip2gan</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
 body{font-family:system-ui,sans-serif;margin:0;background:#f6f6f7;color:#222}
 header{background:#23252b;color:#fff;padding:8px 16px;display:flex;gap:16px;align-items:center}
 header b{font-size:18px} nav button{background:none;border:0;color:#ccc;font-size:15px;padding:6px 10px;cursor:pointer}
 nav button.active{color:#fff;border-bottom:2px solid #f90}
 main{padding:16px;max-width:1100px} section{display:none} section.active{display:block}
 label{display:inline-block;margin:4px 12px 4px 0} textarea{width:100%;max-width:600px;height:70px}
 input[type=number]{width:80px} .row{margin:6px 0} button.go{background:#f90;border:0;padding:6px 16px;font-weight:bold;cursor:pointer}
 .gallery{display:flex;flex-wrap:wrap;gap:10px;margin-top:10px}
 figure{margin:0;background:#fff;padding:6px;border:1px solid #ddd;text-align:center;font-size:12px}
 figure img, .pair img{width:128px;height:128px;image-rendering:pixelated;display:block;margin:auto}
 .pair{display:flex;gap:16px;margin-top:10px} .status{min-height:1.2em;margin:6px 0;font-size:14px}
 .error{color:#b00020} .warning{color:#a15c00} pre{background:#fff;border:1px solid #ddd;padding:8px;white-space:pre-wrap}
 .edit-row input[type=range]{width:260px;vertical-align:middle} table td{padding:2px 10px 2px 0;font-size:14px}
</style></head>
<body>
<header><b>clip2gan</b><nav>
 <button data-tab="generate" class="active">Generate</button><button data-tab="edit">Edit</button>
 <button data-tab="interpolate">Interpolate</button><button data-tab="model">Model</button></nav></header>
<main>
<section id="tab-generate" class="active">
 <div class="row"><textarea id="gen-prompts" placeholder="one prompt per line">a red circle</textarea></div>
 <div class="row"><label>n <input id="gen-n" type="number" min="1" max="64" value="8"></label>
  <label>seed <input id="gen-seed" type="number" min="0" value="0"></label>
  <label>prior <select id="gen-prior"></select></label>
  <label>truncation <input id="gen-truncation" type="number" step="0.05" value="1"></label>
  <button class="go" id="gen-run">Generate</button></div>
 <div class="status" id="gen-status"></div>
 <div class="gallery" id="gen-gallery"></div>
 <pre class="command" id="gen-command"></pre>
</section>
<section id="tab-edit">
 <div class="row"><label>image <input id="edit-upload" type="file" accept="image/*"></label>
  <span id="edit-source-name"></span></div>
 <div id="edit-rows"></div>
 <div class="row"><button id="edit-add">+ edit text</button></div>
 <div class="row"><label>neutral <select id="edit-neutral"><option>auto</option><option>none</option><option>text</option></select></label>
  <input id="edit-neutral-text" placeholder="neutral text" style="display:none">
  <label>direction <select id="edit-direction"></select></label>
  <label>W+ rows <input id="edit-layers" size="6"></label>
  <button class="go" id="edit-run">Edit</button></div>
 <div class="status" id="edit-status"></div>
 <div class="pair">
  <figure><img id="edit-source" alt=""><figcaption>input</figcaption></figure>
  <figure><img id="edit-reconstruction" alt=""><figcaption>reconstruction</figcaption></figure>
  <figure><img id="edit-edited" alt=""><figcaption>edited<br><a id="edit-download" download>PNG</a>
   <a id="edit-latent" download>latent</a></figcaption></figure></div>
 <pre class="command" id="edit-command"></pre>
</section>
<section id="tab-interpolate">
 <div class="row"><label>A <select id="interp-a-kind"><option value="text">prompt</option><option value="edit">the image in Edit</option>
  <option value="upload">an image file</option></select></label> <input id="interp-a" value="a red circle">
  <input id="interp-a-file" type="file" accept="image/*" style="display:none"></div>
 <div class="row"><label>B <select id="interp-b-kind"><option value="text">prompt</option><option value="edit">the image in Edit</option>
  <option value="upload">an image file</option></select></label> <input id="interp-b" value="a blue square">
  <input id="interp-b-file" type="file" accept="image/*" style="display:none"></div>
 <div class="row"><label>frames <input id="interp-frames" type="number" min="2" max="120" value="12"></label>
  <label>fps <input id="interp-fps" type="number" min="1" max="60" value="12"></label>
  <label>seed <input id="interp-seed" type="number" min="0" value="0"></label>
  <label><input type="checkbox" id="interp-spherical"> spherical</label>
  <label><input type="checkbox" id="interp-mp4" checked> MP4</label>
  <button class="go" id="interp-run">Interpolate</button></div>
 <div class="status" id="interp-status"></div>
 <div class="gallery" id="interp-frames-out"></div>
 <div class="pair"><figure><img id="interp-gif" alt=""><figcaption><a id="interp-gif-link" download>GIF</a>
  <a id="interp-mp4-link" download></a></figcaption></figure>
  <figure id="interp-video-box" style="display:none"><video id="interp-video" width="128" height="128" controls loop muted
   autoplay></video><figcaption>MP4</figcaption></figure></div>
 <pre class="command" id="interp-command"></pre>
</section>
<section id="tab-model">
 <table id="model-table"></table>
 <h4>The CLI command that reproduces the current view</h4>
 <pre id="model-command"></pre>
</section>
</main>
<script>
"use strict";
const $ = (id) => document.getElementById(id);
let model = null, sourceImage = null, lastCommand = "", editBusy = false, editAgain = false;

document.querySelectorAll("nav button").forEach((button) => button.addEventListener("click", () => {
  document.querySelectorAll("nav button").forEach((b) => b.classList.toggle("active", b === button));
  document.querySelectorAll("section").forEach((s) => s.classList.toggle("active", s.id === "tab-" + button.dataset.tab));
}));

function status(id, error, warnings, extra) {
  const box = $(id); box.textContent = ""; box.className = "status";
  if (error) { box.textContent = "Error: " + error; box.classList.add("error"); return; }
  const lines = (warnings || []).map((w) => "Warning: " + w).concat(extra || []);
  box.textContent = lines.join("\n");
  if ((warnings || []).length) box.classList.add("warning");
  box.dataset.done = String(Number(box.dataset.done || 0) + 1);
}
function setCommand(id, command) { $(id).textContent = command; lastCommand = command; $("model-command").textContent = command; }

async function call(path, payload, raw) {
  const options = {method: "POST", body: raw ? payload : JSON.stringify(payload),
                   headers: {"Content-Type": raw ? "application/octet-stream" : "application/json"}};
  let response;
  try { response = await fetch(path, options); } catch (e) { return {error: "the server did not answer (" + e + ")"}; }
  try { return await response.json(); } catch (e) { return {error: "bad answer from the server (" + response.status + ")"}; }
}

async function loadModel() {
  const response = await fetch("/api/model"); model = await response.json();
  const rows = [["pack", model.pack], ["device", model.device], ["backend", model.backend],
    ["resolution", model.resolution + " px, " + model.num_ws + " W+ rows"], ["clip2gan", model.version],
    ["MP4 encoder", model.mp4 || "none installed (pip install 'clip2gan[video]')"]];
  for (const [role, hash] of Object.entries(model.hashes)) rows.push([role + " sha256", hash]);
  $("model-table").innerHTML = "";
  for (const [key, value] of rows) {
    const tr = document.createElement("tr"); const a = document.createElement("td"); const b = document.createElement("td");
    a.textContent = key; b.textContent = value; tr.append(a, b); $("model-table").append(tr);
  }
  for (const prior of model.priors) $("gen-prior").add(new Option(prior + (prior === model.prior ? " (default)" : ""), prior, false, prior === model.prior));
  for (const d of model.directions) $("edit-direction").add(new Option(d, d, false, d === model.edit_defaults.direction));
  $("edit-neutral").value = model.edit_defaults.neutral === "auto" || model.edit_defaults.neutral === "none" ? model.edit_defaults.neutral : "text";
  if ($("edit-neutral").value === "text") $("edit-neutral-text").value = model.edit_defaults.neutral;
  $("edit-neutral-text").style.display = $("edit-neutral").value === "text" ? "" : "none";
  $("edit-layers").value = model.edit_defaults.layers;
  if (!model.mp4) { $("interp-mp4").checked = false; $("interp-mp4").disabled = true; }
  addEditRow("blue", model.edit_defaults.beta);
  $("model-command").textContent = model.command;
}

// --- Generate ---
$("gen-run").addEventListener("click", async () => {
  $("gen-run").disabled = true;
  const result = await call("/api/generate", {prompts: $("gen-prompts").value, n: $("gen-n").value,
    seed: $("gen-seed").value, prior: $("gen-prior").value, truncation: $("gen-truncation").value});
  $("gen-run").disabled = false;
  if (result.error) { status("gen-status", result.error); return; }
  $("gen-gallery").innerHTML = "";
  for (const image of result.images) {
    const figure = document.createElement("figure"); figure.className = "generated";
    const img = document.createElement("img"); img.src = image.url; img.alt = image.prompt + " #" + image.index;
    const link = document.createElement("a"); link.href = image.url; link.download = image.name; link.textContent = "PNG";
    const send = document.createElement("button"); send.textContent = "send to Edit"; send.className = "send";
    send.addEventListener("click", () => useImage(call("/api/use", {url: image.url})));
    figure.append(img, document.createElement("br"), link, document.createTextNode(" "), send);
    $("gen-gallery").append(figure);
  }
  setCommand("gen-command", result.command);
  status("gen-status", null, result.warnings, [result.images.length + " image(s)"]);
});

// --- Edit ---
function addEditRow(text, beta) {
  const row = document.createElement("div"); row.className = "row edit-row";
  const limit = model ? model.beta_limit : 10;
  row.innerHTML = '<label>edit text <input class="edit-text"></label> <label>beta <input class="edit-beta" type="range" step="0.05"></label> <output class="edit-beta-value"></output>';
  const slider = row.querySelector(".edit-beta");
  slider.min = -limit; slider.max = limit; slider.value = beta;
  row.querySelector(".edit-text").value = text;
  row.querySelector(".edit-beta-value").textContent = slider.value;
  slider.addEventListener("input", () => { row.querySelector(".edit-beta-value").textContent = slider.value; runEdit(); });
  row.querySelector(".edit-text").addEventListener("change", runEdit);
  $("edit-rows").append(row);
}
$("edit-add").addEventListener("click", () => addEditRow("", model.edit_defaults.beta));
$("edit-neutral").addEventListener("change", () => {
  $("edit-neutral-text").style.display = $("edit-neutral").value === "text" ? "" : "none"; runEdit(); });
for (const id of ["edit-direction", "edit-layers", "edit-neutral-text"]) $(id).addEventListener("change", runEdit);
$("edit-run").addEventListener("click", runEdit);

async function useImage(pending) {
  const result = await pending;
  if (result.error) { status("edit-status", result.error); return; }
  sourceImage = result;
  $("edit-source").src = result.url; $("edit-source-name").textContent = result.name;
  document.querySelector('nav button[data-tab="edit"]').click();
  runEdit();
}
$("edit-upload").addEventListener("change", async () => {
  const file = $("edit-upload").files[0]; if (!file) return;
  status("edit-status", null, [], ["uploading " + file.name + " ..."]);
  useImage(call("/api/upload?name=" + encodeURIComponent(file.name), await file.arrayBuffer(), true));
});

// One request in flight; slider moves during it are sent as one request when it returns (latest values).
async function runEdit() {
  if (!sourceImage) { status("edit-status", "no image to edit: upload one, or send one from Generate"); return; }
  if (editBusy) { editAgain = true; return; }
  editBusy = true; $("tab-edit").dataset.busy = "1";
  do {
    editAgain = false;
    const edits = [...document.querySelectorAll(".edit-row")].map((row) => ({
      text: row.querySelector(".edit-text").value, beta: row.querySelector(".edit-beta").value}));
    const result = await call("/api/edit", {image: sourceImage.image, edits, neutral: $("edit-neutral").value,
      neutral_text: $("edit-neutral-text").value, direction: $("edit-direction").value, layers: $("edit-layers").value});
    if (result.error) { status("edit-status", result.error); continue; }
    $("edit-edited").src = result.edited; $("edit-reconstruction").src = result.reconstruction;
    $("edit-download").href = result.edited; $("edit-latent").href = result.latent;
    setCommand("edit-command", result.command);
    status("edit-status", null, result.warnings, result.neutrals);
  } while (editAgain);
  editBusy = false; $("tab-edit").dataset.busy = "";
}

// --- Interpolate ---
const interpImages = {a: null, b: null};
for (const end of ["a", "b"]) {
  $("interp-" + end + "-kind").addEventListener("change", () => {
    const kind = $("interp-" + end + "-kind").value;
    $("interp-" + end).style.display = kind === "text" ? "" : "none";
    $("interp-" + end + "-file").style.display = kind === "upload" ? "" : "none";
  });
  $("interp-" + end + "-file").addEventListener("change", async () => {
    const file = $("interp-" + end + "-file").files[0]; if (!file) return;
    interpImages[end] = null;
    const result = await call("/api/upload?name=" + encodeURIComponent(file.name), await file.arrayBuffer(), true);
    if (result.error) { status("interp-status", result.error); return; }
    interpImages[end] = result.image;
    status("interp-status", null, [], [end.toUpperCase() + ": " + result.name]);
  });
}
function interpEnd(end) {
  const kind = $("interp-" + end + "-kind").value;
  if (kind === "edit") return sourceImage ? {image: sourceImage.image} : "no image in Edit: upload one there first";
  if (kind === "upload") return interpImages[end] ? {image: interpImages[end]} : "choose an image file for " + end.toUpperCase();
  return {text: $("interp-" + end).value};
}
$("interp-run").addEventListener("click", async () => {
  const a = interpEnd("a"), b = interpEnd("b");
  for (const end of [a, b]) if (typeof end === "string") { status("interp-status", end); return; }
  $("interp-run").disabled = true;
  const result = await call("/api/interpolate", {a, b, frames: $("interp-frames").value, fps: $("interp-fps").value,
    seed: $("interp-seed").value, spherical: $("interp-spherical").checked, mp4: $("interp-mp4").checked});
  $("interp-run").disabled = false;
  if (result.error) { status("interp-status", result.error); return; }
  $("interp-frames-out").innerHTML = "";
  for (const url of result.frames) {
    const figure = document.createElement("figure"); figure.className = "frame";
    const img = document.createElement("img"); img.src = url; figure.append(img); $("interp-frames-out").append(figure);
  }
  $("interp-gif").src = result.gif; $("interp-gif-link").href = result.gif;
  if (result.mp4) { $("interp-mp4-link").href = result.mp4; $("interp-mp4-link").textContent = "MP4"; $("interp-video").src = result.mp4; }
  else { $("interp-mp4-link").removeAttribute("href"); $("interp-mp4-link").textContent = ""; $("interp-video").removeAttribute("src"); }
  $("interp-video-box").style.display = result.mp4 ? "" : "none";
  setCommand("interp-command", result.command);
  status("interp-status", null, result.warnings, [result.frames.length + " frame(s)"]);
});

loadModel();
</script>
</body></html>
"""
