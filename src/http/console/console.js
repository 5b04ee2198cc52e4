// thinghub console: the only script. Pages work without it; with it, a section marked
// data-refresh reloads itself from the server (same-origin, the session cookie) every
// data-every-ms milliseconds. What it swaps in is HTML the server rendered and escaped.
"use strict";
(function () {
  function refresh(section) {
    var every = parseInt(section.getAttribute("data-every-ms"), 10) || 5000;
    var url = section.getAttribute("data-refresh");
    function tick() {
      fetch(url, { credentials: "same-origin", headers: { "Accept": "text/html" } })
        .then(function (response) {
          // Signed out (sent to the sign-in page): stop. A failed answer (a restart, a 503):
          // try again later.
          if (response.redirected) { return undefined; }
          if (!response.ok) { setTimeout(tick, every * 2); return undefined; }
          return response.text();
        })
        .then(function (html) {
          if (typeof html === "string") {
            section.innerHTML = html;
            section.setAttribute("data-refreshed", String(Date.now()));
            setTimeout(tick, every);
          }
        })
        .catch(function () { setTimeout(tick, every * 2); });
    }
    setTimeout(tick, every);
  }
  document.addEventListener("DOMContentLoaded", function () {
    document.querySelectorAll("[data-refresh]").forEach(refresh);
    // The job page's bars: each status's share of the targets as its width.
    document.querySelectorAll(".progress .bar[data-share]").forEach(function (bar) {
      bar.style.flexGrow = bar.getAttribute("data-share");
    });
  });
})();
