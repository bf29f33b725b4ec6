// The voice list (GET /api/voices, the same list Home Assistant gets), grouped
// by language when the voices speak several; a voice's sample; Delete voice.

import { api } from "./api.js";
import { $, clearError, say, showError } from "./ui.js";

let voices = [];
export let canUpload = false;

const languageName = (() => {
  try {
    const names = new Intl.DisplayNames([navigator.language, "en"], { type: "language" });
    return (code) => {
      try {
        return `${names.of(code)} (${code})`;
      } catch (_) {
        return code;
      }
    };
  } catch (_) {
    return (code) => code;
  }
})();

function voiceOption(voice, language) {
  const option = document.createElement("option");
  option.value = voice.name;
  let label = voice.name;
  if (voice.builtin) label += " (built-in)";
  if (voice.description) label += ` – ${voice.description}`;
  option.textContent = label;
  if (language) option.dataset.language = language;
  return option;
}

function byLanguage() {
  const groups = new Map();
  for (const voice of voices) {
    const languages = voice.languages && voice.languages.length ? voice.languages : [""];
    for (const code of languages) {
      if (!groups.has(code)) groups.set(code, []);
      groups.get(code).push(voice);
    }
  }
  return [...groups.entries()]
    .map(([code, members]) => ({ code, label: code ? languageName(code) : "Other", members }))
    .sort((a, b) => a.label.localeCompare(b.label));
}

// An optgroup per language when the voices speak several (a voice with
// several languages is offered in each); keeps the choice when it can.
function renderVoices(wanted) {
  const select = $("voice");
  const previous = wanted || select.value || localStorage.getItem("voice");
  const languages = new Set(voices.flatMap((voice) => voice.languages || []));
  select.replaceChildren();
  if (languages.size > 1) {
    for (const { code, label, members } of byLanguage()) {
      const group = document.createElement("optgroup");
      group.label = label;
      for (const voice of members) group.append(voiceOption(voice, code || null));
      select.append(group);
    }
  } else {
    for (const voice of voices) select.append(voiceOption(voice, null));
  }
  const options = [...select.options];
  const match =
    options.find((option) => option.value === previous) ||
    options.find((option) => previous && option.value.startsWith(`${previous}@`));
  if (match) match.selected = true;
  updateVoiceButtons();
}

// Reads the list again; `wanted` is chosen if it is there (a new voice).
export async function loadVoices(wanted) {
  try {
    const result = await api("/api/voices");
    voices = result.voices || [];
    canUpload = Boolean(result.can_upload);
    renderVoices(wanted);
    $("upload-fields").disabled = !canUpload;
    if (!canUpload)
      say("voices-status", "Adding voices needs a voices folder the server can write to (--voices-dir).");
  } catch (error) {
    if (error.status !== 401) showError(`The voice list could not be read: ${error.message}`);
  }
}

// {name, language} of the chosen option (language: its optgroup's), or null.
export function selectedVoice() {
  const option = $("voice").selectedOptions[0];
  if (!option) return null;
  return { name: option.value, language: option.dataset.language || null };
}

function currentVoice() {
  const selected = selectedVoice();
  return selected ? voices.find((voice) => voice.name === selected.name) : null;
}

export function updateVoiceButtons() {
  const voice = currentVoice();
  $("sample-button").disabled = !(voice && voice.clip);
  $("delete-button").disabled = !(voice && !voice.builtin && canUpload);
  let info = "";
  if (voice) {
    info = `${voice.name}: ${voice.builtin ? "the model's built-in voice" : "cloned from a clip"}.`;
    if (voice.languages && voice.languages.length) info += ` Languages: ${voice.languages.join(", ")}.`;
    localStorage.setItem("voice", voice.name);
  }
  say("voice-info", info);
}

export async function playSample() {
  const voice = currentVoice();
  if (!voice) return;
  clearError();
  try {
    const path = `/api/voices/${encodeURIComponent(voice.name)}/clip`;
    const response = await api(path, { raw: true });
    const audio = $("sample-player");
    if (audio.src) URL.revokeObjectURL(audio.src);
    audio.src = URL.createObjectURL(await response.blob());
    audio.hidden = false;
    await audio.play();
  } catch (error) {
    showError(`The sample could not be played: ${error.message}`);
  }
}

export async function deleteVoice() {
  const voice = currentVoice();
  if (!voice) return;
  const ok = confirm(
    `Delete the voice "${voice.name}"? Its clip is removed from the server's voices folder.`
  );
  if (!ok) return;
  clearError();
  try {
    await api(`/api/voices/${encodeURIComponent(voice.name)}`, { method: "DELETE" });
    say("voices-status", `Deleted the voice ${voice.name}.`);
    localStorage.removeItem("voice");
    await loadVoices();
  } catch (error) {
    showError(`The voice could not be deleted: ${error.message}`);
  }
}
