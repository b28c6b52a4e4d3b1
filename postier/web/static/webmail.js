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
// Compose: the optional rich-text editor (bold, italic, lists, links). Its HTML goes in the hidden
// "html" field and its text in "text"; the server sanitizes the HTML again before sending.
(function () {
  var form = document.getElementById("compose-form");
  var toggle = document.getElementById("rich-toggle");
  var editor = document.getElementById("editor");
  var html = document.getElementById("html");
  var text = document.getElementById("text");
  var buttons = document.getElementById("rich-buttons");
  if (!form || !toggle || !editor || !html || !text || !buttons) return;
  var on = false;
  function escape(s) {
    return s.replace(/&/g, "&amp;").replace(/</g, "&lt;").replace(/>/g, "&gt;");
  }
  function set(rich) {
    on = rich;
    toggle.setAttribute("aria-pressed", rich ? "true" : "false");
    buttons.hidden = !rich;
    editor.hidden = !rich;
    text.hidden = rich;
    var label = document.querySelector("label[for=text]");
    if (label) label.hidden = rich;
    if (rich) {
      if (html.value) editor.innerHTML = html.value;  // shown again after an error (the server cleans it on send)
      else editor.innerHTML = escape(text.value).replace(/\n/g, "<br>");
    } else {
      text.value = editor.innerText;
      html.value = "";
    }
  }
  toggle.addEventListener("click", function () { set(!on); });
  Array.prototype.forEach.call(buttons.querySelectorAll("button[data-cmd]"), function (b) {
    b.addEventListener("click", function () {
      var cmd = b.getAttribute("data-cmd");
      var arg = null;
      if (cmd === "createLink") {
        arg = window.prompt("Link address (https://...)");
        if (!arg || !/^(https?:|mailto:)/i.test(arg)) return;
      }
      editor.focus();
      document.execCommand(cmd, false, arg);
    });
  });
  form.addEventListener("submit", function () {
    if (!on) { html.value = ""; return; }
    html.value = editor.innerHTML;
    text.value = editor.innerText;
  });
  if (document.getElementById("rich-tools").getAttribute("data-rich") === "1") set(true);
})();
