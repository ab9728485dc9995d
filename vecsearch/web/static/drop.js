// Upload by choosing or dropping a file anywhere on the page; too-large files are refused here
// before any byte is sent (the server enforces the same limit).
(function () {
  var form = document.getElementById("upload-form");
  var input = document.getElementById("upload-file");
  var overlay = document.getElementById("drop-overlay");
  var error = document.getElementById("upload-error");
  if (!form || !input) return;
  var maxBytes = parseInt(form.dataset.maxBytes, 10);

  function submit(files) {
    if (!files || !files.length) return;
    if (files[0].size > maxBytes) {
      error.textContent = files[0].name + " is larger than the server's upload limit of " +
        Math.round(maxBytes / 1048576) + " MB";
      error.hidden = false;
      return;
    }
    if (input.files !== files) input.files = files;
    form.submit();
  }
  input.addEventListener("change", function () { submit(input.files); });

  var depth = 0;
  function hasFiles(e) { return e.dataTransfer && Array.prototype.indexOf.call(e.dataTransfer.types, "Files") >= 0; }
  document.addEventListener("dragenter", function (e) { if (hasFiles(e)) { depth++; overlay.hidden = false; } });
  document.addEventListener("dragleave", function () { if (--depth <= 0) { depth = 0; overlay.hidden = true; } });
  document.addEventListener("dragover", function (e) { if (hasFiles(e)) e.preventDefault(); });
  document.addEventListener("drop", function (e) {
    if (!hasFiles(e)) return;
    e.preventDefault();
    depth = 0; overlay.hidden = true;
    submit(e.dataTransfer.files);
  });
})();
