"""Who may use the HTTP side: the address allow-list, the token and the
login cookie, the Origin and Host checks, CORS, HTTPS. Every refusal is a
JSON error and leaves the engine untouched."""

import shutil
import ssl
import subprocess
from pathlib import Path

import pytest
from yarl import URL

from tests.fakes import FakeBackend
from tests.http_helpers import error_of, serve_http, session

SPEAK = {"text": "Hello there."}


async def test_an_address_outside_the_allow_list_is_refused() -> None:
    backend = FakeBackend()
    async with serve_http(backend, http_allow=("127.0.0.1/32",)) as server:
        async with session(local_addr=("127.0.0.2", 0)) as outsider:
            for method, path in [
                ("GET", "/"),
                ("GET", "/health"),
                ("POST", "/api/speak.wav"),
                ("POST", "/v1/audio/speech"),
            ]:
                async with outsider.request(
                    method, f"{server.url}{path}", json=SPEAK
                ) as resp:
                    assert resp.status == 403, path
                    assert error_of(await resp.json())["code"] == "address_not_allowed"
        async with session(local_addr=("127.0.0.1", 0)) as insider:
            async with insider.post(f"{server.url}/api/speak.wav", json=SPEAK) as resp:
                assert resp.status == 200
                await resp.read()
    assert backend.asked == ["Hello there."]  # the insider's only


async def test_by_default_only_this_machine_may() -> None:
    async with serve_http(FakeBackend()) as server:
        async with session(local_addr=("127.0.0.2", 0)) as other_loopback:
            async with other_loopback.get(f"{server.url}/health") as resp:
                assert resp.status == 200  # 127.0.0.0/8 is this machine


async def test_the_token_guards_the_api_but_not_the_page() -> None:
    backend = FakeBackend()
    async with serve_http(
        backend, http_token="s3cret-token"
    ) as server, session() as client:
        async with client.get(f"{server.url}/") as resp:
            assert resp.status == 200  # the page, with its login form
        async with client.get(f"{server.url}/health") as resp:
            assert resp.status == 200
        for headers in (
            {},
            {"Authorization": "Bearer wrong"},
            {"Authorization": "Basic s3cret-token"},
        ):
            for method, path in [
                ("GET", "/api/status"),
                ("GET", "/api/voices"),
                ("POST", "/api/speak.wav"),
                ("POST", "/v1/audio/speech"),
                ("POST", "/api/stop"),
                ("POST", "/api/model/unload"),
                ("POST", "/api/model/load"),
                ("POST", "/api/voices"),
                ("DELETE", "/api/voices/default"),
                ("GET", "/v1/models"),
            ]:
                async with client.request(
                    method, f"{server.url}{path}", json=SPEAK, headers=headers
                ) as resp:
                    assert resp.status == 401, (path, headers)
                    assert resp.headers["WWW-Authenticate"] == "Bearer"
                    assert error_of(await resp.json())["code"] == "invalid_token"
        assert backend.asked == [] and backend.closes == 0
        good = {"Authorization": "Bearer s3cret-token"}
        async with client.get(f"{server.url}/api/status", headers=good) as resp:
            assert (await resp.json())["token_required"] is True
        async with client.post(
            f"{server.url}/api/speak.wav", json=SPEAK, headers=good
        ) as resp:
            assert resp.status == 200
            await resp.read()
    assert backend.asked == ["Hello there."]


async def test_login_sets_an_httponly_session_cookie() -> None:
    async with serve_http(
        FakeBackend(), http_token="s3cret-token"
    ) as server, session() as client:
        async with client.post(
            f"{server.url}/api/login", json={"token": "nope"}
        ) as resp:
            assert resp.status == 401
        async with client.get(f"{server.url}/api/status") as resp:
            assert resp.status == 401
        async with client.post(
            f"{server.url}/api/login", json={"token": "s3cret-token"}
        ) as resp:
            assert resp.status == 200
            cookie = resp.headers["Set-Cookie"]
        assert "HttpOnly" in cookie and "SameSite=Strict" in cookie
        assert "s3cret-token" not in cookie  # a keyed hash stands for it
        async with client.get(f"{server.url}/api/status") as resp:
            assert resp.status == 200  # the cookie is enough
        async with client.post(f"{server.url}/api/logout") as resp:
            assert resp.status == 204
        async with client.get(f"{server.url}/api/status") as resp:
            assert resp.status == 401


async def test_login_without_a_token_says_so() -> None:
    async with serve_http(FakeBackend()) as server, session() as client:
        async with client.post(f"{server.url}/api/login", json={"token": "x"}) as resp:
            assert await resp.json() == {"token_required": False}


@pytest.mark.parametrize(
    "headers",
    [
        {"Origin": "http://evil.example"},
        {"Origin": "null"},
        {"Referer": "http://evil.example/page.html"},
        {"Origin": "http://127.0.0.1:1"},  # another port: another origin
    ],
)
async def test_cross_site_posts_are_refused(headers) -> None:  # type: ignore[no-untyped-def]
    backend = FakeBackend()
    async with serve_http(backend) as server, session() as client:
        for path in (
            "/api/speak",
            "/api/speak.wav",
            "/v1/audio/speech",
            "/api/stop",
            "/api/model/unload",
            "/api/voices",
        ):
            async with client.post(
                f"{server.url}{path}", json=SPEAK, headers=headers
            ) as resp:
                assert resp.status == 403, path
                assert error_of(await resp.json())["code"] == "cross_site"
        async with client.delete(
            f"{server.url}/api/voices/default", headers=headers
        ) as resp:
            assert resp.status == 403
        assert backend.asked == [] and backend.closes == 0  # nothing spoken or unloaded


async def test_the_pages_own_origin_may_post() -> None:
    backend = FakeBackend()
    async with serve_http(backend) as server, session() as client:
        for headers in ({"Origin": server.url}, {"Referer": f"{server.url}/"}, {}):
            async with client.post(
                f"{server.url}/api/speak.wav", json=SPEAK, headers=headers
            ) as resp:
                assert resp.status == 200
                await resp.read()
    assert len(backend.asked) == 3


async def test_a_foreign_host_name_is_refused_without_a_token() -> None:
    """DNS rebinding: evil.example made to point at this server is the page's
    'own origin' to the browser; the Host header gives it away."""
    async with serve_http(FakeBackend()) as server, session() as client:
        rebound = {
            "Host": f"evil.example:{server.http_port}",
            "Origin": f"http://evil.example:{server.http_port}",
        }
        async with client.post(
            f"{server.url}/api/speak.wav", json=SPEAK, headers=rebound
        ) as resp:
            assert resp.status == 403
            assert error_of(await resp.json())["code"] == "host_not_allowed"
        async with client.get(
            f"{server.url}/api/status",
            headers={"Host": f"localhost:{server.http_port}"},
        ) as resp:
            assert resp.status == 200
    async with serve_http(
        FakeBackend(), http_token="t0ken"
    ) as server, session() as client:
        headers = {
            "Host": f"tts.home.example:{server.http_port}",
            "Authorization": "Bearer t0ken",
        }
        async with client.get(f"{server.url}/api/status", headers=headers) as resp:
            assert resp.status == 200  # with a token, any name


async def test_cors_only_for_the_named_origin() -> None:
    origin = "http://192.168.1.5:3000"
    backend = FakeBackend()
    async with serve_http(backend, http_cors=origin) as server, session() as client:
        preflight = {
            "Origin": origin,
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "content-type",
        }
        async with client.options(
            f"{server.url}/v1/audio/speech", headers=preflight
        ) as resp:
            assert resp.status == 204
            assert resp.headers["Access-Control-Allow-Origin"] == origin
            assert "POST" in resp.headers["Access-Control-Allow-Methods"]
        async with client.post(
            f"{server.url}/v1/audio/speech",
            json={"input": "Hi.", "response_format": "pcm"},
            headers={"Origin": origin},
        ) as resp:
            assert resp.status == 200
            assert resp.headers["Access-Control-Allow-Origin"] == origin
            await resp.read()
        other = {**preflight, "Origin": "http://evil.example"}
        async with client.options(
            f"{server.url}/v1/audio/speech", headers=other
        ) as resp:
            assert resp.status == 403
            assert "Access-Control-Allow-Origin" not in resp.headers
    async with serve_http(FakeBackend()) as server, session() as client:
        async with client.get(
            f"{server.url}/v1/models", headers={"Origin": origin}
        ) as resp:
            assert (
                "Access-Control-Allow-Origin" not in resp.headers
            )  # no CORS by default
            assert resp.headers["X-Frame-Options"] == "DENY"


def _self_signed(folder: Path) -> tuple:
    cert, key = folder / "cert.pem", folder / "key.pem"
    openssl = shutil.which("openssl")
    if openssl is not None:
        subprocess.run(
            [
                openssl,
                "req",
                "-x509",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-days",
                "1",
                "-subj",
                "/CN=127.0.0.1",
                "-addext",
                "subjectAltName=IP:127.0.0.1",
                "-keyout",
                str(key),
                "-out",
                str(cert),
            ],
            check=True,
            capture_output=True,
        )
        return cert, key
    pytest.importorskip(
        "cryptography", reason="neither openssl nor cryptography is here"
    )
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    private = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.timezone.utc)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(private.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .sign(private, hashes.SHA256())
    )
    cert.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key.write_bytes(
        private.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert, key


async def test_https_with_a_certificate(tmp_path: Path) -> None:
    cert, key = _self_signed(tmp_path)
    trust = ssl.create_default_context(cafile=str(cert))
    async with serve_http(
        FakeBackend(), scheme="https", http_cert=cert, http_key=key
    ) as server:
        async with session(ssl=trust) as client:
            async with client.get(f"{server.url}/health") as resp:
                assert resp.status == 200
            async with client.post(
                f"{server.url}/api/speak.wav",
                json=SPEAK,
                headers={"Origin": server.url},
            ) as resp:
                assert resp.status == 200
                assert len(await resp.read()) > 44
        async with session() as plain:
            with pytest.raises(Exception):
                async with plain.get(
                    f"http://127.0.0.1:{server.http_port}/health"
                ) as resp:
                    await resp.read()


async def test_the_page_and_only_its_own_files() -> None:
    async with serve_http(FakeBackend()) as server, session() as client:
        async with client.get(f"{server.url}/") as resp:
            assert resp.status == 200 and resp.content_type == "text/html"
            assert "/static/" in await resp.text()
        async with client.get(f"{server.url}/static/style.css") as resp:
            assert resp.status == 200
        for path in (
            "/static/../../setup.cfg",
            "/static/..%2F..%2Fsetup.cfg",
            "/static/%2e%2e/%2e%2e/setup.cfg",
            "/static/../web/app.py",
            "/static/",
        ):
            # As written: not normalised by the client first.
            url = URL(f"{server.url}{path}", encoded=True)
            async with client.get(url) as resp:
                assert resp.status in (403, 404), path
                assert "install_requires" not in await resp.text()
