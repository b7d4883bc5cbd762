"""stoker.media: loading and validating images, the local-path sandbox, the private-address refusal, placeholders."""

from __future__ import annotations

import base64
import http.server
import io
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from PIL import Image

from stoker.config import settings_from_dict
from stoker.errors import MediaError
from stoker.media import (
    check_address,
    decode_data_url,
    fetch_url,
    fit_pixels,
    load_image,
    resolve_local_path,
)
from stoker.chat.media import place_placeholders


def png_bytes(size: tuple[int, int] = (40, 30), color: tuple[int, ...] = (200, 10, 10), mode: str = "RGB") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, color).save(buf, format="PNG")
    return buf.getvalue()


def data_url(data: bytes, mediatype: str = "image/png") -> str:
    return f"data:{mediatype};base64," + base64.b64encode(data).decode()


def settings(**values):
    return settings_from_dict(values)


def message(exc: pytest.ExceptionInfo[MediaError]) -> str:
    return exc.value.message


# --- decoding -------------------------------------------------------------------------------------------------------
def test_data_url_image_decodes_to_rgb_pixels():
    image = load_image(data_url(png_bytes()), settings())
    assert image.mode == "RGB"
    assert image.size == (40, 30)
    assert image.getpixel((5, 5)) == (200, 10, 10)


def test_pil_image_and_hub_bytes_are_accepted():
    assert load_image(Image.new("L", (33, 33), 7), settings()).getpixel((0, 0)) == (7, 7, 7)
    assert load_image({"bytes": png_bytes(), "path": "x.png"}, settings()).size == (40, 30)


def test_transparency_is_flattened_onto_white():
    image = load_image(data_url(png_bytes(mode="RGBA", color=(0, 0, 0, 0))), settings())
    assert image.getpixel((0, 0)) == (255, 255, 255)


def test_images_are_scaled_into_the_pixel_bounds_keeping_aspect():
    big = Image.new("RGB", (1000, 500))
    assert fit_pixels(big, 32 * 32, 768 * 768).size == (1000, 500)
    assert fit_pixels(big, 32 * 32, 20_000).size == (200, 100)
    assert fit_pixels(Image.new("RGB", (8, 4)), 32 * 32, 768 * 768).size == (46, 23)
    scaled = load_image(data_url(png_bytes((400, 200))), settings(image_max_pixels=5000))
    assert scaled.size == (100, 50)


def test_bad_data_urls_have_exact_errors():
    with pytest.raises(MediaError) as exc:
        load_image("data:image/png;base64", settings())
    assert message(exc) == "invalid data: URL: expected data:image/<type>;base64,<data>."
    with pytest.raises(MediaError) as exc:
        load_image("data:image/png;base64,@@@@", settings())
    assert message(exc) == "invalid data: URL: the base64 data does not decode."
    with pytest.raises(MediaError) as exc:
        load_image("data:image/png,rawbytes", settings())
    assert message(exc) == "invalid data: URL: images must be base64 encoded (data:image/<type>;base64,<data>)."
    with pytest.raises(MediaError) as exc:
        load_image(data_url(b"hello", "text/plain"), settings())
    assert message(exc) == "the data: URL has media type 'text/plain'; an image needs image/<type>."
    assert decode_data_url("data:image/png;base64,aGVsbG8") == b"hello"  # missing padding is tolerated


def test_not_an_image():
    with pytest.raises(MediaError) as exc:
        load_image(data_url(b"this is plain text, not a picture"), settings())
    assert message(exc) == "the data: URL image is not an image in a supported format (PNG, JPEG, GIF, WEBP or BMP)."
    assert exc.value.http_status == 400


def test_unsupported_format_is_named():
    buf = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buf, format="TIFF")
    with pytest.raises(MediaError) as exc:
        load_image(data_url(buf.getvalue(), "image/tiff"), settings())
    assert message(exc) == "the data: URL image is in TIFF format, which is not supported: send PNG, JPEG, GIF, WEBP or BMP."


def test_truncated_images_are_refused():
    buf = io.BytesIO()
    Image.effect_noise((64, 64), 60).convert("RGB").save(buf, format="JPEG")
    data = buf.getvalue()
    with pytest.raises(MediaError) as exc:
        load_image(data_url(data[: len(data) // 2]), settings())
    assert message(exc) == "the data: URL image cannot be decoded: it is truncated."
    png = png_bytes((64, 64))
    with pytest.raises(MediaError) as exc:
        load_image(data_url(png[: len(png) - 30]), settings())
    assert message(exc).startswith("the data: URL image cannot be decoded: ")


def png_header(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width`` x ``height`` (the pixel data is a stub): PIL reads the size without
    decoding anything."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64))


def test_huge_pixel_counts_are_refused_before_decoding():
    with pytest.raises(MediaError) as exc:
        load_image(data_url(png_header(9000, 9000)), settings())
    assert message(exc) == (
        "the data: URL image is 9000x9000 pixels, more than the 64,000,000 that are decoded: scale it down."
    )
    with pytest.raises(MediaError) as exc:
        load_image(data_url(png_header(20000, 20000)), settings())
    assert message(exc) == "the data: URL image has too many pixels to decode safely: scale it down."


def test_too_many_bytes():
    with pytest.raises(MediaError) as exc:
        load_image(data_url(png_bytes()), settings(image_max_bytes=50))
    size = len(png_bytes())
    assert message(exc) == f"the data: URL image is {size:,} bytes, over the image_max_bytes limit of 50 bytes."


def test_unknown_scheme_and_wrong_types():
    with pytest.raises(MediaError) as exc:
        load_image("ftp://example.com/a.png", settings())
    assert message(exc) == "unsupported image URL scheme 'ftp': send a data: URL, an http(s) URL or a file path."
    with pytest.raises(MediaError) as exc:
        load_image(42, settings())
    assert message(exc) == "an image must be a data: URL, an http(s) URL or a file path, not int '42'."


# --- local paths ----------------------------------------------------------------------------------------------------
@pytest.fixture()
def media_tree(tmp_path: Path) -> Path:
    media = tmp_path / "media"
    (media / "sub").mkdir(parents=True)
    (media / "sub" / "a.png").write_bytes(png_bytes())
    (tmp_path / "secret.png").write_bytes(png_bytes(color=(0, 255, 0)))
    (media / "link.png").symlink_to(tmp_path / "secret.png")
    return media


def test_paths_need_a_media_dir(media_tree: Path):
    path = str(media_tree / "sub" / "a.png")
    with pytest.raises(MediaError) as exc:
        load_image(path, settings())
    assert message(exc) == (
        f"local image paths are not allowed here ({path!r}): send the image as a data: URL or an http(s) URL, or "
        "set media_dir to a folder whose images may be read."
    )


def test_paths_inside_media_dir_load(media_tree: Path):
    s = settings(media_dir=str(media_tree))
    assert load_image("sub/a.png", s).size == (40, 30)
    assert load_image(str(media_tree / "sub" / "a.png"), s).size == (40, 30)
    assert load_image("file://" + str(media_tree / "sub" / "a.png"), s).size == (40, 30)


def test_dot_dot_and_symlinks_cannot_leave_media_dir(media_tree: Path):
    s = settings(media_dir=str(media_tree))
    for path in ("../secret.png", "sub/../../secret.png", str(media_tree.parent / "secret.png"), "link.png"):
        with pytest.raises(MediaError) as exc:
            load_image(path, s)
        assert message(exc) == f"image file {path!r} is outside the allowed media folder ({media_tree.resolve()})."
    with pytest.raises(MediaError) as exc:
        load_image("sub/missing.png", s)
    assert message(exc) == f"image file 'sub/missing.png' not found in the media folder ({media_tree.resolve()})."


def test_dataset_roots_and_local_callers(media_tree: Path):
    s = settings(dataset_dir=str(media_tree / "sub"))
    with pytest.raises(MediaError):
        load_image("a.png", s)
    from stoker.media import media_roots

    assert load_image("a.png", s, roots=media_roots(s, dataset=True)).size == (40, 30)
    # The terminal's user is local: any path is fine.
    assert load_image(str(media_tree.parent / "secret.png"), s, local_ok=True).getpixel((0, 0)) == (0, 255, 0)
    with pytest.raises(MediaError) as exc:
        resolve_local_path("/nonexistent/x.png", s, local_ok=True)
    assert message(exc) == "image file '/nonexistent/x.png' not found."


# --- URLs -----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("ip", "public"),
    [("127.0.0.1", False), ("10.1.2.3", False), ("192.168.0.10", False), ("169.254.169.254", False),
     ("::1", False), ("fe80::1", False), ("::ffff:127.0.0.1", False), ("100.64.0.1", False), ("8.8.8.8", True),
     ("2606:4700:4700::1111", True)],
)
def test_private_addresses_are_refused_unless_allowed(ip: str, public: bool):
    if public:
        check_address(ip, settings())
        return
    with pytest.raises(MediaError) as exc:
        check_address(ip, settings())
    assert message(exc) == (
        f"the image URL points to {ip}, a private or loopback address; set allow_private_urls: true to allow it."
    )
    check_address(ip, settings(allow_private_urls=True))


@pytest.mark.parametrize("ip", ["0.0.0.0", "224.0.0.1", "240.0.0.1", "::"])
def test_unroutable_addresses_are_always_refused(ip: str):
    with pytest.raises(MediaError) as exc:
        check_address(ip, settings(allow_private_urls=True))
    assert message(exc) == f"the image URL points to {ip}, which is not a public address."


def test_loopback_url_is_refused_before_any_request():
    with pytest.raises(MediaError) as exc:
        load_image("http://127.0.0.1:9/cat.png", settings())
    assert message(exc) == (
        "the image URL points to 127.0.0.1, a private or loopback address; set allow_private_urls: true to allow it."
    )
    with pytest.raises(MediaError) as exc:
        load_image("http://localhost:9/cat.png", settings())
    assert "a private or loopback address; set allow_private_urls: true to allow it." in message(exc)
    with pytest.raises(MediaError) as exc:
        load_image("http://host.invalid/cat.png", settings())
    assert message(exc) == "cannot resolve the image URL host 'host.invalid'."


class _Handler(http.server.BaseHTTPRequestHandler):
    image = png_bytes((20, 20), (1, 2, 3))

    def do_GET(self) -> None:  # noqa: N802 - the stdlib's name
        routes = {
            "/cat.png": (200, {"Content-Type": "image/png"}, self.image),
            "/to-cat": (302, {"Location": "/cat.png"}, b""),
            "/to-zero": (302, {"Location": f"http://0.0.0.0:{self.server.server_port}/cat.png"}, b""),
            "/loop": (302, {"Location": "/loop"}, b""),
            "/big.png": (200, {"Content-Length": str(10**9)}, b""),
        }
        if self.path == "/slow.png":
            threading.Event().wait(1.0)
        if self.path in ("/trickle.png", "/trickle-headers.png", "/flood.png"):
            self._send_slowly()
            return
        status, headers, body = routes.get(self.path, (404, {}, b"no"))
        self.send_response(status)
        for k, v in headers.items():
            self.send_header(k, v)
        if "Content-Length" not in headers:
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.path != "/big.png":
            self.wfile.write(body)

    def _send_slowly(self) -> None:
        """A server that never ends: the body (or the headers) a byte every 50 ms, or a body without a length that
        goes on past image_max_bytes. Each stops once the client hangs up."""
        try:
            if self.path == "/trickle-headers.png":
                self.wfile.write(b"HTTP/1.1 200 OK\r\n")
                for _ in range(400):
                    self.wfile.write(b"X")
                    self.wfile.flush()
                    threading.Event().wait(0.05)
                return
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.end_headers()
            for _ in range(400 if self.path == "/trickle.png" else 2000):
                self.wfile.write(b"x" if self.path == "/trickle.png" else b"x" * 65536)
                self.wfile.flush()
                if self.path == "/trickle.png":
                    threading.Event().wait(0.05)
        except OSError:
            pass

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture()
def image_server() -> Iterator[str]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()
    server.server_close()
    thread.join()


def test_fetching_from_an_allowed_server(image_server: str):
    s = settings(allow_private_urls=True)
    assert load_image(image_server + "/cat.png", s).getpixel((0, 0)) == (1, 2, 3)
    assert load_image(image_server + "/to-cat", s).size == (32, 32)  # 20x20 scaled up to image_min_pixels
    with pytest.raises(MediaError) as exc:
        load_image(image_server + "/missing.png", s)
    assert message(exc) == "fetching the image URL failed: HTTP 404."
    with pytest.raises(MediaError) as exc:
        load_image(image_server + "/loop", s)
    assert message(exc) == "the image URL redirects more than 3 times."
    with pytest.raises(MediaError) as exc:
        load_image(image_server + "/big.png", s)
    assert message(exc) == (
        f"the image at {image_server}/big.png is 1,000,000,000 bytes, over the image_max_bytes limit of 20,971,520 bytes."
    )
    with pytest.raises(MediaError) as exc:
        fetch_url(image_server + "/slow.png", s, timeout=0.3)
    assert message(exc) == TIMED_OUT.format(0.3)
    with pytest.raises(MediaError) as exc:
        load_image(image_server + "/flood.png", s)  # no Content-Length: the cap holds while reading
    assert message(exc) == (
        f"the image at {image_server}/flood.png is over the image_max_bytes limit of 20,971,520 bytes."
    )


TIMED_OUT = ("fetching the image URL took longer than {:g} s (image_fetch_timeout): the server is slow or unreachable; "
             "send the image as a data: URL instead.")


@pytest.mark.parametrize("path", ["/trickle.png", "/trickle-headers.png"])
def test_the_fetch_timeout_is_one_deadline_however_the_bytes_trickle(image_server: str, path: str):
    started = time.monotonic()
    with pytest.raises(MediaError) as exc:
        load_image(image_server + path, settings(allow_private_urls=True, image_fetch_timeout=0.6))
    took = time.monotonic() - started
    assert message(exc) == TIMED_OUT.format(0.6)
    assert 0.55 < took < 1.5, took


def test_redirects_are_checked_like_the_first_url(image_server: str):
    with pytest.raises(MediaError) as exc:
        load_image(image_server + "/to-zero", settings(allow_private_urls=True))
    assert message(exc) == "the image URL points to 0.0.0.0, which is not a public address."


# --- placeholders ---------------------------------------------------------------------------------------------------
def test_placeholders_are_placed_or_checked():
    messages = [{"role": "system", "content": "s"}, {"role": "user", "content": "What is it?"}]
    assert place_placeholders(messages, 2)[1]["content"] == "<image><image>What is it?"
    assert messages[1]["content"] == "What is it?"  # the caller's messages are not changed
    given = [{"role": "user", "content": "A <image> and <image>?"}]
    assert place_placeholders(given, 2) == given
    with pytest.raises(MediaError) as exc:
        place_placeholders(given, 1)
    assert message(exc) == (
        "the messages hold 2 <image> placeholders but 1 image was given: put one <image> where each image goes, or "
        "none to put all images at the start of the first user message."
    )
