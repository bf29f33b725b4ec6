"""The web page in a real headless Chromium, against the real server (fake
backends): it loads with nothing from the network, plays a reply while it is
still being made, stops at once, and manages voices and the model."""

import asyncio
import base64
import contextlib
import io
import logging
import time
import wave
from dataclasses import dataclass
from pathlib import Path
from typing import Any, AsyncIterator, Iterator, List

import numpy as np
import pytest
import pytest_asyncio
from wyoming.info import Describe, Info
from wyoming.tts import Synthesize

from tests.browser import FAKE_MICROPHONE, Page, launch, open_page, screenshot
from tests.fakes import (
    FakeBackend,
    FakeClipBackend,
    FakeMultilingualBackend,
    fake_bytes,
    write_clip,
)
from tests.wyoming_client import connect, free_port
from wyoming_chatterbox.server import run_server
from wyoming_chatterbox.settings import ModelSettings, Settings
from wyoming_chatterbox.speech import GroupStats, Piece, SpeechJob, SynthesisCancelled

# Twelve sentences: several groups, so a reply takes a while on a slow fake.
LONG_TEXT = " ".join(f"This is sentence number {n} of the reply." for n in range(12))
BUTTONS = [
    "Speak",
    "Stop",
    "Stop all",
    "Upload voice",
    "Delete voice",
    "Unload model",
    "Load model",
]


# One browser for the module's tests (a launch takes seconds), with a fake
# microphone that the page may use without asking; each page has a context of
# its own.
pytestmark = pytest.mark.asyncio(loop_scope="module")


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def browser() -> AsyncIterator[Any]:
    async with launch(FAKE_MICROPHONE) as browser:
        yield browser


@dataclass
class WebServer:
    url: str
    wyoming_port: int
    backend: Any
    voices: Path


@pytest.fixture
def web(tmp_path: Path):  # type: ignore[no-untyped-def]
    """web(backend=None, **settings): the real server, its HTTP side on, in
    this process on 127.0.0.1; stopped as SIGTERM would stop it."""

    @contextlib.asynccontextmanager
    async def factory(backend: Any = None, **values: Any) -> AsyncIterator[WebServer]:
        voices = tmp_path / "voices"
        voices.mkdir(exist_ok=True)
        backend = backend or FakeBackend()
        wyoming_port, http_port = free_port(), free_port()
        settings = Settings.of(
            uri=f"tcp://127.0.0.1:{wyoming_port}",
            http_port=http_port,
            default_voice="default",
            loudness=None,
            clean_text=False,
            voices_dir=voices,
            shutdown_grace=0.5,
            **values,
        )
        ready, stop = asyncio.Event(), asyncio.Event()

        async def on_ready() -> None:
            ready.set()

        server = asyncio.create_task(
            run_server(backend, settings, on_ready=on_ready, stop_signal=stop.wait)
        )
        started = asyncio.create_task(ready.wait())
        await asyncio.wait([server, started], return_when=asyncio.FIRST_COMPLETED)
        if server.done():
            started.cancel()
            server.result()  # raises what stopped it
        try:
            url = f"http://127.0.0.1:{http_port}/"
            yield WebServer(url, wyoming_port, backend, voices)
        finally:
            stop.set()
            await asyncio.wait_for(server, 10)

    return factory


def clip_backend(tmp_path: Path, cls: Any = FakeClipBackend) -> Any:
    return cls(
        ModelSettings(
            data_dir=tmp_path / "data", device="cpu", voices_dir=tmp_path / "voices"
        )
    )


def tone(samples: int) -> np.ndarray:
    """A voiced tone with syllable-rate loudness changes: what plays looks like
    speech on the page's meter (and in the screenshot)."""
    t = np.arange(samples) / 24000
    envelope = 0.5 + 0.5 * np.sin(2 * np.pi * 3 * t) ** 2
    return (0.3 * np.sin(2 * np.pi * 160 * t) * envelope).astype(np.float32)


class LongPiecesBackend(FakeBackend):
    """FakeBackend whose groups each sound for two seconds: a piece is still
    playing when a test presses Stop."""

    def speak(self, job: SpeechJob) -> Iterator[Piece]:
        for piece in super().speak(job):
            yield Piece(audio=tone(2 * 24000), tokens=piece.tokens)


class SlowClipBackend(FakeClipBackend):
    """The voices folder's voices, each group made after `delay` seconds."""

    delay = 0.5

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.finished: List[str] = []

    def _speak(self, job: SpeechJob, conds: Any, stats: GroupStats) -> Iterator[Piece]:
        deadline = time.monotonic() + self.delay
        while time.monotonic() < deadline:
            if job.budget.should_stop():
                raise SynthesisCancelled()
            time.sleep(0.005)
        for piece in super()._speak(job, conds, stats):
            yield Piece(audio=tone(len(piece.audio)), tokens=piece.tokens)
        self.finished.append(job.text)


def clip_seconds(path: Path) -> float:
    with wave.open(str(path)) as clip:
        return clip.getnframes() / clip.getframerate()


async def voice_names(page: Page) -> List[str]:
    return list(
        await page.page.evaluate(
            "() => [...document.querySelectorAll('#voice option')].map(o => o.value)"
        )
    )


async def describe_voices(port: int) -> List[str]:
    async with connect(port) as client:
        await client.send(Describe().event())
        event = await client.read()
        assert event is not None and Info.is_type(event.type)
        return [voice.name for voice in Info.from_event(event).tts[0].voices]


async def until(condition: Any, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("timed out")
        await asyncio.sleep(0.02)


def cancelled_lines(caplog: pytest.LogCaptureFixture) -> List[str]:
    return [
        r.getMessage() for r in caplog.records if "Reply cancelled" in r.getMessage()
    ]


async def test_page_loads_with_nothing_from_the_network(
    web, browser, tmp_path: Path
) -> None:
    async with web() as server, open_page(browser, server.url) as page:
        await page.wait("document.querySelectorAll('#voice option').length > 0")
        await page.wait("document.getElementById('status-device').textContent !== '–'")
        ui = page.page
        await ui.get_by_role("textbox", name="Text", exact=True).wait_for()
        await ui.get_by_role("combobox", name="Voice", exact=True).wait_for()
        for name in BUTTONS:
            assert await ui.get_by_role("button", name=name, exact=True).count() == 1
        assert await voice_names(page) == ["default"]
        assert "loaded" in str(await ui.locator("#status-models").text_content())
        await screenshot(page, "page-idle.png")
    origin = server.url.rstrip("/")
    assert page.requests, "the page made no requests at all"
    assert all(url.startswith(origin + "/") for url in page.requests), page.requests
    assert any(url.endswith("/static/app.js") for url in page.requests)
    assert page.errors == []


async def test_speak_plays_before_the_reply_is_generated(
    web, browser, tmp_path: Path
) -> None:
    (tmp_path / "voices").mkdir()
    write_clip(tmp_path / "voices" / "alice.wav")
    write_clip(tmp_path / "voices" / "bob.wav")
    backend = clip_backend(tmp_path, SlowClipBackend)
    async with web(backend) as server, open_page(browser, server.url) as page:
        await page.wait("document.querySelectorAll('#voice option').length === 3")
        await page.page.select_option("#voice", "alice")
        text = page.page.get_by_role("textbox", name="Text", exact=True)
        await text.fill(LONG_TEXT)
        await text.press("Control+Enter")  # the keyboard way to Speak
        await page.wait("window.__voxState.piecesStarted >= 1")
        generated_at_first_audio = len(backend.finished)
        playing = await page.page.evaluate("() => window.__vox.level()")
        await screenshot(page, "page.png")
        await page.wait("window.__voxState.phase === 'done'", timeout=30)
        state = await page.state()
        progress = await page.page.locator("#groups-text").text_content()
        first_audio = await page.page.locator("#first-audio-text").text_content()
    groups = len(backend.finished)
    # The page says how far the reply got and how soon it was heard.
    assert progress == f"Groups {state['groups']} / {state['groups']}"
    assert first_audio is not None and first_audio.startswith("First audio: ")
    shown = float(first_audio.split(": ")[1].rstrip(" s"))
    assert shown == pytest.approx(state["firstAudioMs"] / 1000, abs=0.006)
    assert groups >= 3
    # The first piece played while the server still had groups to make, and the
    # page knew it: the reply's end had not arrived.
    assert generated_at_first_audio < groups
    assert state["doneBeforeFirstAudio"] is False
    assert state["groupsDoneAtFirstAudio"] < state["groups"] == state["done"]["groups"]
    assert playing > 0, "nothing reached the audio graph"
    # Every sample the server made was scheduled, in the voice asked for.
    assert round(state["audioSeconds"] * 24000) == fake_bytes(LONG_TEXT) // 2
    spoken = [conds["voice"] for text, conds, _ in backend.spoken if text in LONG_TEXT]
    assert set(spoken) == {"alice"}
    assert state["done"]["outcome"] in ("done", "completed")
    assert state["error"] is None and page.errors == []


async def test_pieces_are_scheduled_back_to_back(web, browser, tmp_path: Path) -> None:
    # A fast fake: pieces arrive sooner than they play, so each must start
    # exactly where the previous one ends.
    async with web() as server, open_page(browser, server.url) as page:
        await page.wait("document.querySelectorAll('#voice option').length > 0")
        await page.page.get_by_role("textbox", name="Text").fill(LONG_TEXT)
        await page.page.get_by_role("button", name="Speak", exact=True).click()
        await page.wait("window.__voxState.done !== null", timeout=20)
        state = await page.state()
        await page.page.get_by_role("button", name="Stop", exact=True).click()
    schedule = state["schedule"]
    assert len(schedule) >= 3
    for (_, end), (start, _) in zip(schedule, schedule[1:]):
        assert start == pytest.approx(end, abs=1e-6)
    assert state["underruns"] == 0
    assert round(state["audioSeconds"] * 24000) == fake_bytes(LONG_TEXT) // 2


async def test_stop_ends_playback_and_cancels_the_reply(
    web, browser, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="wyoming_chatterbox")
    backend = LongPiecesBackend(delay=0.7)
    async with web(backend) as server, open_page(browser, server.url) as page:
        await page.wait("document.querySelectorAll('#voice option').length > 0")
        await page.page.get_by_role("textbox", name="Text").fill(LONG_TEXT)
        await page.page.get_by_role("button", name="Speak", exact=True).click()
        await page.wait("window.__voxState.piecesStarted >= 1")
        await page.wait("window.__vox.level() > 0.05")  # sound is playing
        stop = page.page.get_by_role("button", name="Stop", exact=True)
        assert await stop.is_enabled()
        await stop.click()
        state = await page.state()
        await asyncio.sleep(0.2)  # longer than the meter's window (2048 samples)
        level = await page.page.evaluate("() => window.__vox.level()")
        await until(lambda: cancelled_lines(caplog), timeout=5)
        after = await page.state()
        status = await page.page.locator("#speak-status").text_content()
    assert state["phase"] == "stopped" and state["sourcesActive"] == 0
    assert level == 0
    # Nothing more was played or received once stopped.
    assert after["piecesReceived"] == state["piecesReceived"]
    assert status == "Stopped."
    assert len(cancelled_lines(caplog)) == 1
    assert len(backend.finished) < len(backend.asked) or backend.cancelled


async def test_stop_all_cancels_every_reply_on_the_server(
    web, browser, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="wyoming_chatterbox")
    backend = FakeBackend(delay=0.7)
    async with web(backend) as server, open_page(browser, server.url) as page:
        async with connect(server.wyoming_port) as client:
            # Another front end's reply (Home Assistant's, say).
            await client.send(Synthesize(text=LONG_TEXT).event())
            await until(lambda: backend.asked, timeout=5)
            await page.wait("document.querySelectorAll('#voice option').length > 0")
            await page.page.get_by_role("button", name="Stop all", exact=True).click()
            await page.wait(
                "document.getElementById('speak-status').textContent.includes('cancelled')"
            )
            status = await page.page.locator("#speak-status").text_content()
            await until(lambda: cancelled_lines(caplog), timeout=5)
    assert "cancelled 1 reply" in str(status)
    assert len(cancelled_lines(caplog)) == 1


async def test_uploaded_voice_appears_in_the_list_and_in_describe_then_is_deleted(
    web, browser, tmp_path: Path
) -> None:
    clip = write_clip(tmp_path / "Alice Smith.wav")
    async with web(clip_backend(tmp_path)) as server, open_page(
        browser, server.url
    ) as page:
        await page.wait("document.querySelectorAll('#voice option').length > 0")
        await page.page.evaluate("() => { window.__sameDocument = true; }")
        assert "alice_smith" not in await describe_voices(server.wyoming_port)
        await page.page.get_by_label("Clip").set_input_files(str(clip))
        await page.page.get_by_role("button", name="Upload voice").click()
        await page.wait(
            "[...document.querySelectorAll('#voice option')].some(o => o.value === 'alice_smith')"
        )
        # Chosen in the list at once, with no reload.
        assert await page.page.input_value("#voice") == "alice_smith"
        assert await page.page.evaluate("() => window.__sameDocument") is True
        assert (server.voices / "alice_smith.wav").is_file()
        assert "alice_smith" in await describe_voices(server.wyoming_port)
        # Its sample plays: the clip that was uploaded, in the page's player.
        await page.page.get_by_role("button", name="Play sample").click()
        await page.wait(
            "(p => !p.hidden && p.currentTime > 0)(document.getElementById('sample-player'))"
        )
        seconds = await page.page.evaluate(
            "() => document.getElementById('sample-player').duration"
        )
        assert seconds == pytest.approx(clip_seconds(clip), abs=0.05)

        dialogs: List[str] = []

        async def answer(dialog: Any) -> None:
            dialogs.append(dialog.message)
            await (dialog.accept() if len(dialogs) > 1 else dialog.dismiss())

        page.page.on("dialog", answer)
        delete = page.page.get_by_role("button", name="Delete voice", exact=True)
        await delete.click()  # dismissed: nothing happens
        await asyncio.sleep(0.3)
        assert (server.voices / "alice_smith.wav").is_file()
        await delete.click()  # accepted
        await page.wait(
            "![...document.querySelectorAll('#voice option')].some(o => o.value === 'alice_smith')"
        )
        assert "alice_smith" not in await describe_voices(server.wyoming_port)
    assert len(dialogs) == 2 and "alice_smith" in dialogs[0]
    assert not (server.voices / "alice_smith.wav").exists()
    assert list(server.voices.iterdir()) == []


async def test_a_bad_upload_shows_the_servers_reason_and_writes_nothing(
    web, browser, tmp_path: Path
) -> None:
    short = write_clip(tmp_path / "short.wav", seconds=2.0)
    async with web(clip_backend(tmp_path)) as server, open_page(
        browser, server.url
    ) as page:
        await page.wait("document.querySelectorAll('#voice option').length > 0")
        upload = page.page.get_by_role("button", name="Upload voice")
        await upload.click()  # nothing chosen
        alert = page.page.get_by_role("alert")
        await alert.wait_for()
        assert "Choose a clip" in str(await alert.text_content())
        await page.page.get_by_label("Clip").set_input_files(str(short))
        await upload.click()
        await page.wait(
            "document.getElementById('error').textContent.includes('could not be added:')"
        )
        message = str(await alert.text_content())
    assert "5" in message or "short" in message.lower(), message
    assert list(server.voices.iterdir()) == []


async def test_a_recording_from_the_microphone_becomes_a_voice(
    web, browser, tmp_path: Path
) -> None:
    async with web(clip_backend(tmp_path)) as server, open_page(
        browser, server.url
    ) as page:
        await page.wait("document.querySelectorAll('#voice option').length > 0")
        await page.page.get_by_role("button", name="Record clip").click()
        await page.page.get_by_role("button", name="Stop recording").wait_for()
        await asyncio.sleep(6.0)  # a voice needs more than 5 s
        await page.page.get_by_role("button", name="Stop recording").click()
        await page.wait(
            "document.getElementById('record-status').textContent.startsWith('Recorded')"
        )
        await page.page.get_by_label("Voice name").fill("From the Mic")
        await page.page.get_by_role("button", name="Upload voice").click()
        await page.wait(
            "[...document.querySelectorAll('#voice option')].some(o => o.value === 'from_the_mic')"
        )
    saved = server.voices / "from_the_mic.wav"
    with wave.open(str(saved)) as clip:
        assert clip.getsampwidth() == 2 and clip.getnchannels() == 1
        assert clip.getnframes() / clip.getframerate() > 5.0


async def test_without_a_microphone_the_page_says_why(
    web, browser, tmp_path: Path
) -> None:
    # As on a plain-HTTP LAN address, where browsers give pages no microphone.
    hide = "Object.defineProperty(navigator, 'mediaDevices', {value: undefined});"
    async with web() as server, open_page(
        browser, server.url, init_script=hide
    ) as page:
        record = page.page.get_by_role("button", name="Record clip")
        assert await record.is_disabled()
        status = str(await page.page.locator("#record-status").text_content())
    assert "HTTPS or on localhost" in status


async def test_voices_are_grouped_by_language(web, browser, tmp_path: Path) -> None:
    (tmp_path / "voices").mkdir()
    write_clip(tmp_path / "voices" / "alice.wav")
    backend = clip_backend(tmp_path, FakeMultilingualBackend)
    async with web(backend) as server, open_page(browser, server.url) as page:
        await page.wait("document.querySelectorAll('#voice optgroup').length > 0")
        groups = await page.page.evaluate(
            """() => [...document.querySelectorAll('#voice optgroup')].map(g =>
                 [g.label, [...g.querySelectorAll('option')].map(o => o.dataset.language)])"""
        )
        speak_bodies: List[Any] = []
        page.page.on(
            "request",
            lambda r: (
                speak_bodies.append(r.post_data_json)
                if r.url.endswith("/api/speak")
                else None
            ),
        )
        german = next(label for label, _ in groups if label.endswith("(de)"))
        option = page.page.locator(f'#voice optgroup[label="{german}"] option').first
        value = await option.get_attribute("value")
        await page.page.select_option("#voice", value=value)
        await page.page.get_by_role("textbox", name="Text").fill("Guten Tag.")
        await page.page.get_by_role("button", name="Speak", exact=True).click()
        await page.wait("window.__voxState.done !== null")
    labels = [label for label, _ in groups]
    assert labels == sorted(labels) and len(labels) == 3
    for label, languages in groups:
        assert set(languages) == {label[-3:-1]}
    assert speak_bodies[0]["language"] == "de"
    assert backend.spoken[-1][2] == "de"


async def test_model_buttons_unload_and_load_and_wait_for_replies(
    web, browser, tmp_path: Path
) -> None:
    backend = FakeBackend(delay=0.7)
    async with web(backend) as server, open_page(browser, server.url) as page:
        ui = page.page
        unload = ui.get_by_role("button", name="Unload model", exact=True)
        load = ui.get_by_role("button", name="Load model", exact=True)
        await page.wait("!document.getElementById('unload-button').disabled")
        assert await load.is_disabled()
        await unload.click()
        await page.wait(
            "document.getElementById('model-status').textContent.includes('unloaded')"
        )
        assert not backend.loaded
        assert "unloaded" in str(await ui.locator("#status-models").text_content())
        await page.wait("!document.getElementById('load-button').disabled")
        assert await unload.is_disabled()
        await load.click()
        await page.wait(
            "document.getElementById('model-status').textContent.includes('is loaded')"
        )
        assert backend.loaded
        # While a reply runs, neither button can be pressed.
        await ui.get_by_role("textbox", name="Text").fill(LONG_TEXT)
        await ui.get_by_role("button", name="Speak", exact=True).click()
        await page.wait("document.getElementById('status-replies').textContent === '1'")
        assert await unload.is_disabled() and await load.is_disabled()
        await ui.keyboard.press("Escape")  # stops
        await page.wait("window.__voxState.phase === 'stopped'")


async def test_a_token_protected_server_asks_for_the_token(
    web, browser, tmp_path: Path
) -> None:
    async with web(http_token="open sesame") as server, open_page(
        browser, server.url
    ) as page:
        ui = page.page
        token = ui.get_by_label("Token")
        await token.wait_for()
        assert await voice_names(page) == []
        await token.fill("wrong")
        await ui.get_by_role("button", name="Log in").click()
        await ui.get_by_role("alert").wait_for()
        assert await voice_names(page) == []
        await token.fill("open sesame")
        await ui.get_by_role("button", name="Log in").click()
        await page.wait("document.querySelectorAll('#voice option').length > 0")
        assert await ui.locator("#login").is_hidden()


async def test_errors_from_the_api_are_shown_in_words(
    web, browser, tmp_path: Path
) -> None:
    async with web(max_text_chars=40) as server, open_page(browser, server.url) as page:
        ui = page.page
        await page.wait("document.querySelectorAll('#voice option').length > 0")
        text = ui.get_by_role("textbox", name="Text")
        await text.fill("   ")
        await ui.get_by_role("button", name="Speak", exact=True).click()
        alert = ui.get_by_role("alert")
        assert "Type some text" in str(await alert.text_content())
        await text.fill(LONG_TEXT)
        await ui.get_by_role("button", name="Speak", exact=True).click()
        await page.wait("window.__voxState.phase === 'error'")
        message = str(await alert.text_content())
    assert "40" in message, message  # the server's own words name its limit


async def test_the_page_reads_events_and_writes_wav_like_the_specs(
    web, browser, tmp_path: Path
) -> None:
    async with web() as server, open_page(browser, server.url) as page:
        events = await page.page.evaluate(
            """() => {
              const p = new window.__vox.EventStreamParser();
              const chunks = [': comment\\r\\n', 'event: au', 'dio\\r', '\\ndata: {"a"',
                ':1}\\r\\n\\r\\n', 'data: one\\ndata: two\\n\\n', 'event: x\\n\\n',
                'data:no-space\\n\\n'];
              return chunks.flatMap(c => p.push(c));
            }"""
        )
        samples = [0.0, 0.5, -0.5, 1.0, -1.0, 2.0]
        wav_b64 = await page.page.evaluate(
            """async (samples) => {
              const blob = window.__vox.encodeWav(Float32Array.from(samples), 24000);
              const bytes = new Uint8Array(await blob.arrayBuffer());
              return btoa(String.fromCharCode(...bytes));
            }""",
            samples,
        )
        pcm = np.array([0, 1000, -1000, 32767, -32768], "<i2").tobytes()
        decoded = await page.page.evaluate(
            "(b64) => Array.from(window.__vox.decodePcm(b64, 1)[0])",
            base64.b64encode(pcm).decode(),
        )
    assert events == [
        {"event": "audio", "data": '{"a":1}'},
        {"event": "message", "data": "one\ntwo"},
        {"event": "message", "data": "no-space"},
    ]
    with wave.open(io.BytesIO(base64.b64decode(wav_b64))) as wav:
        assert (wav.getnchannels(), wav.getsampwidth(), wav.getframerate()) == (
            1,
            2,
            24000,
        )
        frames = np.frombuffer(wav.readframes(wav.getnframes()), "<i2")
    assert frames.tolist() == [0, 16383, -16384, 32767, -32768, 32767]
    assert decoded == pytest.approx([0, 1000 / 32768, -1000 / 32768, 32767 / 32768, -1])
