// postier webmail: keyboard shortcuts for the message list (j/k/Enter) and live updates (server-sent
// events). No inline script anywhere: the pages' Content-Security-Policy allows only this file.
"use strict";
(function () {
  var rows = Array.prototype.slice.call(document.querySelectorAll("tr.msg"));
  var cur = -1;
  function select(i) {
    if (!rows.length) return;
    if (cur >= 0) rows[cur].classList.remove("current");
    cur = Math.max(0, Math.min(rows.length - 1, i));
    rows[cur].classList.add("current");
    var a = rows[cur].querySelector("a");
    if (a) a.focus();
  }
  document.addEventListener("keydown", function (e) {
    var t = e.target;
    if (t && (t.tagName === "INPUT" || t.tagName === "TEXTAREA" || t.tagName === "SELECT")) return;
    if (e.ctrlKey || e.metaKey || e.altKey) return;
    if (e.key === "j") { select(cur + 1); e.preventDefault(); }
    else if (e.key === "k") { select(cur - 1); e.preventDefault(); }
    else if (e.key === "Enter" && cur >= 0) { window.location.href = rows[cur].getAttribute("data-href"); e.preventDefault(); }
  });
  var h = document.getElementById("folder-name");
  var live = document.getElementById("live");
  if (h && live && window.EventSource) {
    var es = new EventSource("/mail/events?f=" + encodeURIComponent(h.getAttribute("data-folder")));
    es.addEventListener("change", function () { live.hidden = false; });
    es.addEventListener("open", function () { live.setAttribute("data-stream", "open"); });
  }
})();
// Compose: changing the From identity swaps the signature block ("-- " line and what follows it).
(function () {
  var from = document.getElementById("from");
  var text = document.getElementById("text");
  if (!from || !text) return;
  function sig() { var o = from.options[from.selectedIndex]; return o ? o.getAttribute("data-signature") || "" : ""; }
  var last = sig();
  from.addEventListener("change", function () {
    var next = sig();
    var v = text.value.replace(/\r\n/g, "\n");
    var oldBlock = last ? "\n-- \n" + last + "\n" : "";
    var newBlock = next ? "\n-- \n" + next + "\n" : "";
    if (oldBlock && v.indexOf(oldBlock) >= 0) v = v.replace(oldBlock, newBlock);
    else if (newBlock) v = "\n" + newBlock + v;
    text.value = v;
    last = next;
  });
})();
