// turnfleet console: the little behaviour the server-rendered pages need. No framework, no
// network beyond this server: the span tree's expand/collapse-all buttons, the live page's
// alert stream (EventSource) and its panels' refresh.
"use strict";

function setupTrees() {
  document.querySelectorAll(".tree-view").forEach(function (view) {
    var tools = view.querySelector(".tree-tools");
    if (!tools) return;
    tools.hidden = false; // only useful with script on: <details> work without it
    tools.addEventListener("click", function (event) {
      var button = event.target.closest("button[data-tree]");
      if (!button) return;
      var open = button.dataset.tree === "open";
      view.querySelectorAll("details").forEach(function (d) { d.open = open; });
    });
  });
}

function formatTime(iso) {
  var d = new Date(iso);
  if (isNaN(d.getTime())) return iso || "";
  return d.toISOString().replace("T", " ").slice(0, 19) + " UTC";
}

function alertItem(a) {
  var li = document.createElement("li");
  li.className = "alert sev-" + a.severity + " new";
  li.dataset.id = a.id;
  var time = document.createElement("time");
  time.dateTime = a.fired_at;
  time.textContent = formatTime(a.fired_at);
  var badge = document.createElement("span");
  badge.className = "badge sev-" + a.severity;
  badge.textContent = a.severity;
  var rule = document.createElement("strong");
  rule.className = "rule";
  rule.textContent = a.rule;
  var message = document.createElement("span");
  message.className = "message";
  message.textContent = a.message;
  li.append(time, " ", badge, " ", rule, " ", message);
  if (a.conversation_id) {
    var link = document.createElement("a");
    link.href = "/console/conversations/" + encodeURIComponent(a.conversation_id);
    link.textContent = a.conversation_id;
    li.append(" ", link);
  }
  return li;
}

function setupAlerts() {
  var list = document.getElementById("alerts");
  var status = document.getElementById("alert-status");
  if (!list || !status || !window.EventSource) return;
  var empty = document.getElementById("no-alerts");
  var received = 0;
  var source = new EventSource(status.dataset.stream);
  source.onopen = function () {
    status.textContent = "live: new alerts appear at the top";
    status.classList.remove("down");
  };
  source.addEventListener("alert", function (event) {
    var alert = JSON.parse(event.data);
    if (list.querySelector('li[data-id="' + CSS.escape(alert.id) + '"]')) return;
    list.prepend(alertItem(alert));
    if (empty) empty.hidden = true;
    received += 1;
    status.textContent = "live: " + received + " new since this page opened";
  });
  source.onerror = function () {
    status.classList.add("down");
    status.textContent = source.readyState === EventSource.CLOSED
      ? "disconnected: reload the page (or sign in again)"
      : "reconnecting…";
  };
}

function setupPanels() {
  var panels = document.getElementById("panels");
  if (!panels || !panels.dataset.refresh) return;
  var timer = setInterval(function () {
    fetch(panels.dataset.refresh, { credentials: "same-origin", redirect: "error" })
      .then(function (response) {
        if (!response.ok) { clearInterval(timer); return null; }
        return response.text();
      })
      .then(function (html) { if (html !== null) panels.innerHTML = html; })
      .catch(function () { /* the next tick tries again */ });
  }, 15000);
}

document.addEventListener("DOMContentLoaded", function () {
  setupTrees();
  setupAlerts();
  setupPanels();
});
