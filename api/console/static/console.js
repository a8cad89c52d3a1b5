// Follows a running job: server-sent events from /console/jobs/{id}/progress update the
// progress bar, the state and the stage timeline in place; when the stage changes or the job
// ends the page reloads to show what the server recorded (scores before, the expert map,
// results). Without JavaScript the page refreshes itself (a <noscript> meta refresh).
(function () {
  "use strict";
  var live = document.getElementById("live");
  if (!live || !live.dataset.stream || !window.EventSource) return;
  var bar = document.getElementById("progress");
  var text = document.getElementById("progress-text");
  var state = document.getElementById("job-state");
  var source = new EventSource(live.dataset.stream);
  function fmt(x) { return typeof x === "number" ? x.toFixed(3) : "-"; }
  function show(d) {
    if (d.max_steps) bar.max = d.max_steps;
    bar.value = d.step;
    bar.textContent = d.step + " of " + d.max_steps;
    var t = "step " + d.step + " of " + d.max_steps;
    if (d.loss !== null && d.loss !== undefined) t += ", loss " + fmt(d.loss);
    if (d.forget_accuracy !== null && d.forget_accuracy !== undefined) {
      t += ", forget accuracy " + fmt(d.forget_accuracy);
    }
    text.textContent = t;
    state.textContent = String(d.state).toLowerCase();
    state.className = "badge " + d.state;
    (d.stages || []).forEach(function (s) {
      var li = document.querySelector('#timeline li[data-stage="' + s.name + '"]');
      if (!li) return;
      li.className = "stage " + s.status.replace(" ", "-");
      li.querySelector(".status").textContent = s.status;
    });
  }
  var stage = live.dataset.stage || "";
  source.addEventListener("progress", function (e) {
    var d = JSON.parse(e.data);
    show(d);
    if (d.stage && d.stage !== stage) { source.close(); window.location.reload(); }
  });
  source.addEventListener("end", function (e) {
    source.close();
    var d = JSON.parse(e.data);
    if (d.signed_out) { window.location.href = "/console/login"; return; }
    show(d);
    window.location.reload();
  });
})();
