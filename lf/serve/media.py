"""Images, videos and audio clips a user attaches to a conversation, decoded safely: OpenAI content parts (`lf api`:
image_url, video_url, input_audio), `/image` lines (`lf chat`). What a stranger may make the server read or decode
is bounded here:

- `data:image/...;base64,` URLs are decoded; malformed base64 or bytes that are no image are refused (400).
- `file://` URLs are read only under a media root the operator names (`API_MEDIA_ROOT`; unset, the default: none
  are read), after symlinks and `..` are followed, and only regular files (a FIFO would hang the reader, a device
  never ends). Nothing is said about a path outside the root, not even whether it exists.
- `http(s)://` URLs are refused: the server has no network and must not fetch for strangers (SSRF).
- A request's images together may hold `max_bytes` encoded bytes (413 above) and `max_pixels` decoded pixels: a
  header's size is read before its pixels, so an image that would decode to gigabytes (a decompression bomb) is
  refused having cost a few bytes.
- Only PNG, JPEG, WebP, GIF and BMP are opened: Pillow's other formats include ones it decodes through outside
  programs (EPS runs Ghostscript) or with a history of decoder faults.
- Videos (`video_url`: a `data:video/...;base64,` URL or a `file://` one, under the same rules) and audio clips
  (`input_audio`: {"data": base64, "format": "wav" | "mp3"}) count toward the same `max_bytes`; their bytes are
  written to a request's temporary folder, where the model's plugin reads their headers and decodes them (its
  sampling bounds a video's frames: video_maxlen, video_max_pixels).
- Only known containers are opened, recognised by their first bytes before FFmpeg or libsndfile sees them (both
  would guess a format from the content, and FFmpeg's guesses include playlists that read other files or URLs):
  videos MP4/MOV, Matroska/WebM or AVI whose first video stream is one of VIDEO_CODECS, read from the header, with
  frames of at most `max_pixels` (one frame is decoded whole before it is resized); audio WAV, FLAC, Ogg or MP3 of
  at most MAX_AUDIO_SECONDS (a clip is decoded whole).

`conversation_content(parts)` turns a message's parts into its text, with the placeholder (LLaMA-Factory's:
IMAGE, <video>, <audio>) where each part was, and the parts as (column, value) in order; `Images(limits).load(url)`
decodes one image URL and `Images(limits).save(column, value, folder)` writes one video or clip, counting it toward
the request's limits, and `.upload(path, name)` one image uploaded to `lf webui`/`lf webchat`, `.upload_file(column,
path, name)` one video or clip (the same checks; `write(folder, files)` puts those on disk for the engine);
`open_image(path)` opens a local file for `lf chat`, whose user reads with their own rights.
"""

from __future__ import annotations

import base64
import binascii
import io
import os
import stat
import urllib.parse
import urllib.request
from dataclasses import dataclass

from PIL import Image, UnidentifiedImageError

from lf.data.conversation import PLACEHOLDERS
from lf.data.registry import IMAGES
from lf.errors import RequestError

IMAGE = PLACEHOLDERS[IMAGES]  # where an image stands in a message's text (LLaMA-Factory's placeholder)
PARTS = {"image_url": IMAGES, "video_url": "videos", "input_audio": "audios"}  # OpenAI part type -> media column
AUDIO_FORMATS = ("wav", "mp3")  # OpenAI's input_audio formats
FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP")
EXTENSIONS = tuple(ext for ext, kind in Image.registered_extensions().items() if kind in FORMATS)  # for pickers
MAX_BYTES = 16 * 2**20  # a request's images together, encoded: a few phone photos
MAX_PIXELS = 2**24  # a request's images together, decoded (4096 x 4096; 48 MiB as RGB): the queue holds them too
# (first bytes, what follows at offset 8 or None) -> the container; an MP4/MOV file's "ftyp" box starts at offset 4
VIDEO_CONTAINERS = {(b"\x1a\x45\xdf\xa3", None): "matroska", (b"RIFF", b"AVI "): "avi"}
AUDIO_CONTAINERS = {(b"RIFF", b"WAVE"): "wav", (b"fLaC", None): "flac", (b"OggS", None): "ogg", (b"ID3", None): "mp3"}
VIDEO_CODECS = ("h264", "hevc", "vp8", "vp9", "av1", "mpeg4")  # FFmpeg's names
MAX_AUDIO_SECONDS = 600  # a clip is decoded whole, at the model's rate (Qwen2-Audio then keeps its first 30 s)
# a message's file in the web chat, by its name's extension (uploads are checked by their bytes too)
UPLOADS = {**{ext: IMAGES for ext in EXTENSIONS},
           **{ext: "videos" for ext in (".mp4", ".m4v", ".mov", ".mkv", ".webm", ".avi")},
           **{ext: "audios" for ext in (".wav", ".flac", ".ogg", ".mp3")}}


class MediaError(RequestError):
    """An attached image that cannot be used; `status` is the HTTP status the API answers it with."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class Limits:
    """What one request's images may cost (the API's variables set them). `root`: the folder file: URLs may name
    (None: file: URLs refused)."""
    root: str | None = None
    max_bytes: int = MAX_BYTES
    max_pixels: int = MAX_PIXELS


def conversation_content(parts: list[dict], where: str) -> tuple[str, list[tuple[str, object]]]:
    """A message's OpenAI content parts as (its text with a placeholder where each media part was, the parts as
    (column, value) in order: an image's or video's URL, an audio part's {"data", "format"}); `where` names the
    message in refusals. Parts are dicts as OpenAI sends them."""
    text, media = [], []
    for i, part in enumerate(parts):
        kind = part.get("type")
        if kind == "text":
            text.append(part["text"])
        elif kind in PARTS:
            column = PARTS[kind]
            text.append(PLACEHOLDERS[column])
            media.append((column, part[kind] if kind == "input_audio" else part[kind]["url"]))
        else:
            raise MediaError(f"{where}.content[{i}] has type {kind!r}: the parts taken are text, "
                             f"{', '.join(PARTS)}")
    return "".join(text), media


class Images:
    """A request's media, decoded (images) or saved (videos, audio) one by one against the request's limits, which
    count all of them."""

    def __init__(self, limits: Limits):
        self.limits, self.bytes, self.pixels, self.count = limits, 0, 0, 0
        self.counts = {}  # column -> items seen, to name them

    def load(self, url: str) -> Image.Image:
        """The image `url` names (a data: or file: URL), decoded to RGB; MediaError saying why not."""
        self.count += 1
        return self._decode(self._url_bytes(url, "image", f"image {self.count}"), f"image {self.count}")

    def save(self, column: str, value, folder: str) -> str:
        """The video (a data: or file: URL) or audio clip ({"data": base64, "format"}) written into `folder`: its
        path there; MediaError saying why not."""
        self.counts[column] = self.counts.get(column, 0) + 1
        kind = column[:-1]
        what = f"{kind} {self.counts[column]}"
        if column == "audios":
            if not isinstance(value, dict) or value.get("format") not in AUDIO_FORMATS \
                    or not isinstance(value.get("data"), str):
                raise MediaError(f"{what}: input_audio must be {{\"data\": base64, \"format\": "
                                 f"{' | '.join(map(repr, AUDIO_FORMATS))}}}")
            payload = "".join(value["data"].split())
            self._spend(len(payload) // 4 * 3, what)
            data = _base64_decoded(payload, what)
        else:
            data = self._url_bytes(value, kind, what)
        return _written(folder, column, self.counts[column], self._checked(column, data, what))

    def upload_file(self, column: str, path: str, name: str) -> bytes:
        """The bytes of a video or audio clip uploaded to the server (the file its web framework stored at `path`;
        `name`, the user's name for it), counted and checked as `save` does."""
        self.counts[column] = self.counts.get(column, 0) + 1
        what = f"{column[:-1]} {self.counts[column]} ({name})"
        return self._checked(column, self._read(path, what, name), what)

    def _checked(self, column: str, data: bytes, what: str) -> bytes:
        """`data` if it is a container lf opens holding what the limits allow (the module's docstring), read from
        its header; MediaError saying why not."""
        if column == "videos":
            _check_video(data, what, self.limits.max_pixels)
        else:
            _check_audio(data, what)
        return data

    def _url_bytes(self, url: str, kind: str, what: str) -> bytes:
        """The bytes of a data:<kind>/...;base64, or file: URL."""
        scheme = url.partition(":")[0].lower()
        if scheme == "data":
            payload = _base64_payload(url, what, kind)
            self._spend(len(payload) // 4 * 3, what)  # the decoded size, known before decoding
            return _base64_decoded(payload, what)
        if scheme == "file":
            return self._file_bytes(url, what)
        if scheme in ("http", "https"):
            raise MediaError(f"{what} is an {scheme} URL: this server fetches nothing from the network; send the "
                             f"{kind} itself as a data:{kind}/...;base64, URL")
        raise MediaError(f"{what} is not a data: or file: URL ({_short(url)!r}): send a data:{kind}/...;base64, URL")

    def _spend(self, size: int, what: str) -> None:
        self.bytes += size
        if self.bytes > self.limits.max_bytes:
            raise MediaError(f"{what} brings the request's media over {self.limits.max_bytes} bytes, the server's "
                             f"limit for them together (API_MAX_IMAGE_BYTES): send smaller or fewer files", 413)

    def _file_bytes(self, url: str, what: str) -> bytes:
        """The bytes of a file: URL's file, if it lies under the media root."""
        if self.limits.root is None:
            raise MediaError(f"{what} is a file: URL, but this server reads no local files (API_MEDIA_ROOT is not "
                             f"set): send the {what.split()[0]} as a data:{what.split()[0]}/...;base64, URL")
        try:
            parts = urllib.parse.urlsplit(url)
        except ValueError:  # a malformed host part
            parts = None
        if not parts or parts.netloc not in ("", "localhost") or parts.query or parts.fragment:
            raise MediaError(f"{what}: {_short(url)!r} is not a local file URL: write it file:///absolute/path")
        path = urllib.request.url2pathname(parts.path)
        root = os.path.realpath(self.limits.root)
        real = os.path.realpath(path) if os.path.isabs(path) and "\0" not in path else None
        if real is None or os.path.commonpath([root, real]) != root:  # symlinks and .. followed: where bytes are
            raise MediaError(f"{what}: {_short(url)!r} is not in the server's media folder (API_MEDIA_ROOT; "
                             f"symlinks and .. followed): name a file in it, or send a data: URL")
        return self._read(real, what, _short(url))

    def upload(self, path: str, name: str) -> Image.Image:
        """An image uploaded to the server (the file its web framework stored at `path`; `name`, the user's name for
        it, says which in refusals), counted and decoded as `load` does."""
        self.count += 1
        what = f"image {self.count} ({name})"
        return self._decode(self._read(path, what, name), what)

    def _read(self, path: str, what: str, shown: str) -> bytes:
        """The bytes of the regular file at `path`, its size spent before they are read."""
        try:  # O_NOFOLLOW: no symlink swapped in since; O_NONBLOCK: opening a FIFO would wait for a writer
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        except OSError as exc:
            raise MediaError(f"{what}: cannot read {shown!r} ({exc.strerror}): check the path") from None
        try:
            size = os.fstat(fd)
            if not stat.S_ISREG(size.st_mode):
                raise MediaError(f"{what}: {shown!r} is not a regular file: name a media file")
            self._spend(size.st_size, what)
            with os.fdopen(fd, "rb", closefd=False) as file:
                return file.read(size.st_size)
        finally:
            os.close(fd)

    def _decode(self, data: bytes, what: str) -> Image.Image:
        image = _opened(io.BytesIO(data), what)
        width, height = image.size  # from the header: no pixel is decoded yet
        self.pixels += width * height
        if self.pixels > self.limits.max_pixels:
            raise MediaError(f"{what} is {width}x{height} pixels, which brings the request's images over "
                             f"{self.limits.max_pixels} pixels, the server's limit for them together "
                             f"(API_MAX_IMAGE_PIXELS): send smaller images", 413)
        return _loaded(image, what)


def marks(counts: dict[str, int]) -> str:
    """The placeholders of a message's media ({column: how many}), put before its text as LLaMA-Factory's chat puts
    media a message does not place itself."""
    return "".join(PLACEHOLDERS[column] * count for column, count in counts.items())


def write(folder: str, files: dict[str, list[bytes]]) -> dict[str, list[str]]:
    """Checked videos and clips ({column: their bytes}) written into `folder`: {column: their paths}."""
    return {column: [_written(folder, column, i, data) for i, data in enumerate(items, 1)]
            for column, items in files.items()}


def _written(folder: str, column: str, index: int, data: bytes) -> str:
    path = os.path.join(folder, f"{column}-{index}.{column[:-1]}")
    with open(path, "wb") as file:
        file.write(data)
    return path


def _container(data: bytes, known: dict) -> str | None:
    """The container of `known` that `data` starts as, by its first bytes, or None."""
    return next((name for (head, tag), name in known.items()
                 if data.startswith(head) and (tag is None or data[8:12] == tag)), None)


def _check_video(data: bytes, what: str, max_pixels: int) -> None:
    container = "mov" if data[4:8] == b"ftyp" else _container(data, VIDEO_CONTAINERS)
    if container is None:
        raise MediaError(f"{what} is not a video lf opens (MP4/MOV, Matroska/WebM or AVI): send one of those")
    import av

    try:
        with av.open(io.BytesIO(data), format=container) as opened:  # the header only: nothing is decoded
            stream = opened.streams.video[0] if opened.streams.video else None
            codec = stream and stream.codec_context.name
            width, height = (stream.codec_context.width, stream.codec_context.height) if stream else (0, 0)
    except (av.FFmpegError, ValueError):
        raise MediaError(f"{what} is damaged or not the video its first bytes say: send it again or another") from None
    if codec not in VIDEO_CODECS:
        raise MediaError(f"{what} holds {f'{codec} video' if codec else 'no video stream'}: lf decodes "
                         f"{', '.join(VIDEO_CODECS)} video: re-encode it (e.g. H.264 in MP4)")
    if width * height > max_pixels:
        raise MediaError(f"{what} has frames of {width}x{height} pixels, more than {max_pixels}, the server's limit "
                         f"for a decoded picture (API_MAX_IMAGE_PIXELS): send a smaller video", 413)


def _check_audio(data: bytes, what: str) -> None:
    # an MP3 without an ID3 tag starts with a frame: 11 sync bits, then layer III's bits
    frame = len(data) > 1 and data[0] == 0xFF and data[1] & 0xE6 == 0xE2
    container = "mp3" if frame else _container(data, AUDIO_CONTAINERS)
    if container is None:
        raise MediaError(f"{what} is not an audio clip lf opens (WAV, FLAC, Ogg or MP3): send one of those")
    import soundfile

    try:
        info = soundfile.info(io.BytesIO(data))  # the header only
    except (soundfile.SoundFileError, RuntimeError, ValueError):
        raise MediaError(f"{what} is damaged or not the audio its first bytes say: send it again or another") from None
    if info.duration > MAX_AUDIO_SECONDS:
        raise MediaError(f"{what} lasts {info.duration:.0f} s, more than {MAX_AUDIO_SECONDS} s, the server's limit "
                         f"for a clip: send a shorter one", 413)


def open_image(path: str, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """A local image file for `lf chat` (the user's own files, read with their rights), checked as the API's are."""
    what = repr(path)
    try:
        file = open(path, "rb")
    except OSError as exc:
        raise MediaError(f"cannot read {what}: {exc.strerror}") from None
    with file:  # read as far as the header, then decoded only if its size is sane
        image = _opened(file, what)
        width, height = image.size
        if width * height > max_pixels:
            raise MediaError(f"{what} is {width}x{height} pixels, more than {max_pixels}: resize it first")
        return _loaded(image, what)


def _base64_payload(url: str, what: str, kind: str = "image") -> str:
    """The base64 text of a data:<kind>/...;base64, URL."""
    head, comma, payload = url.partition(",")
    if not (comma and head.lower().startswith(f"data:{kind}/") and head.lower().endswith(";base64")):
        raise MediaError(f"{what} is a data: URL, but not data:{kind}/<format>;base64,<data> ({_short(head)!r})")
    return "".join(payload.split())  # line breaks are allowed in base64 text


def _base64_decoded(payload: str, what: str) -> bytes:
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise MediaError(f"{what}: its data: URL is not valid base64 ({exc}): encode the {what.split()[0]}'s bytes "
                         f"with standard base64") from None


def _opened(file, what: str) -> Image.Image:
    """The image in the binary `file` with its header read, its pixels not decoded yet."""
    try:
        return Image.open(file, formats=FORMATS)
    except Image.DecompressionBombError:  # Pillow's own ceiling, above any limit of ours
        raise MediaError(f"{what} declares more than {2 * Image.MAX_IMAGE_PIXELS} pixels: send a smaller image",
                         413) from None
    except (UnidentifiedImageError, OSError, ValueError):
        raise MediaError(f"{what} is not an image lf reads ({', '.join(FORMATS)}): send one of those") from None


def _loaded(image: Image.Image, what: str) -> Image.Image:
    """The image's pixels decoded, as RGB; a truncated or corrupt image refused."""
    try:
        image.load()
        return image.convert("RGB")
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise MediaError(f"{what} is damaged and cannot be decoded ({exc}): send it again or another") from None


def _short(text: str, most: int = 200) -> str:
    """A client's text quoted back in an error, cut short (a data: URL may be megabytes)."""
    return text if len(text) <= most else text[:most] + "..."
