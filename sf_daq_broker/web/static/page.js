// The page's own script: live rows from the broker (Server-Sent Events), the choices that
// submit themselves, and fragments loaded after the page (PV values).
"use strict";

function liveRows(body) {
  const pgroup = body.dataset.pgroup;
  if (!pgroup || !window.EventSource) return;
  const indicator = document.getElementById("live");
  const filter = body.dataset.filter || "";
  const stream = new EventSource("/page/events?pgroup=" + encodeURIComponent(pgroup));
  let opened = false;
  stream.onopen = () => {
    if (opened) location.reload(); // reconnected: updates may have been missed
    opened = true;
    indicator.classList.add("on");
  };
  stream.onerror = () => indicator.classList.remove("on");
  stream.addEventListener("run", (message) => {
    const update = JSON.parse(message.data);
    const template = document.createElement("template");
    template.innerHTML = update.html.trim();
    const row = template.content.firstElementChild;
    const wanted = !filter || row.dataset.filter.split(" ").includes(filter);
    const old = document.getElementById(row.id);
    if (old) {
      const finished = old.dataset.final === "no" && row.dataset.final === "yes";
      if (wanted) old.replaceWith(row); else old.remove();
      if (finished && body.dataset.run) location.reload(); // show completeness and previews
      return;
    }
    const table = document.querySelector("tbody[data-live=insert]");
    const newest = table && table.querySelector("tr.run");
    if (wanted && table && (!newest || Number(row.dataset.run) > Number(newest.dataset.run))) {
      table.prepend(row);
      document.querySelectorAll("p.empty").forEach((note) => note.remove());
    }
  });
}

document.addEventListener("DOMContentLoaded", () => {
  liveRows(document.body);
  document.querySelectorAll("select[data-submit]").forEach((select) =>
    select.addEventListener("change", () => select.form.submit()));
  document.querySelectorAll("[data-fragment]").forEach(async (element) => {
    const reply = await fetch(element.dataset.fragment);
    element.innerHTML = reply.ok ? await reply.text() : "PV values: " + (await reply.json()).message;
  });
});
