// Small helpers every part of the page uses: find an element, set a status
// line, show or clear the one error box (role="alert").

export const $ = (id) => document.getElementById(id);

export function say(id, text) {
  $(id).textContent = text;
}

export function showError(message) {
  const box = $("error");
  box.textContent = message;
  box.hidden = false;
}

export function clearError() {
  $("error").hidden = true;
  $("error").textContent = "";
}
