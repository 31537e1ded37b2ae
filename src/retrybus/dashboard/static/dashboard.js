// The dashboard works without this file; it only adds "select all" to the dead letter table,
// and shows the service chosen in the top bar's selector at once.
"use strict";
document.addEventListener("DOMContentLoaded", function () {
  document.querySelectorAll("[data-select-all]").forEach(function (all) {
    var form = all.closest("form");
    var boxes = function () { return form.querySelectorAll('input[name="ids"]'); };
    var count = form.querySelector("[data-selected-count]");
    var update = function () {
      var checked = Array.prototype.filter.call(boxes(), function (b) { return b.checked; }).length;
      all.checked = checked > 0 && checked === boxes().length;
      all.indeterminate = checked > 0 && checked < boxes().length;
      if (count) { count.textContent = checked ? checked + " selected" : "none selected"; }
    };
    all.addEventListener("change", function () {
      boxes().forEach(function (b) { b.checked = all.checked; });
      update();
    });
    form.addEventListener("change", function (event) {
      if (event.target !== all) { update(); }
    });
    update();
  });
  document.querySelectorAll("select[data-autosubmit]").forEach(function (select) {
    select.addEventListener("change", function () { select.form.submit(); });
  });
});
