"""`m2ist app`: a local web page to try a grounding adapter: an image, one expression per line, one box per line.

```bash
pip install "m2ist[app]"
m2ist app                                    # the adapter `make demo` saved, with its procedural scenes as examples
m2ist app --adapter out/refcoco --port 7861  # any adapter folder or Hub repo id; repeat --adapter to compare
```

The page is a [Gradio](https://www.gradio.app) app; gradio is imported only when a page is built. The model-facing
part, :func:`predict_page`, takes a list of ``(name, model)`` pairs and is plain Python (no gradio): every adapter
gets the same image and expressions and draws its own picture. Bad input (no image, no expression, an unreadable,
corrupt or huge image, too many expressions) comes back as a message on the page, never as a stack trace, and the
server keeps serving. Gradio's usage analytics are off unless ``GRADIO_ANALYTICS_ENABLED`` says otherwise, the
page uses system fonts (no font download) and no share link is ever created.
"""

from __future__ import annotations

import argparse
import errno
import html
import logging
import os
import re
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from PIL import Image

if TYPE_CHECKING:
    from torch import nn

__all__ = [
    "MAX_FILE_SIZE",
    "MAX_PHRASES",
    "MAX_PIXELS",
    "MAX_TEXT_CHARS",
    "AppInputError",
    "PagePrediction",
    "add_arguments",
    "build_app",
    "default_adapter",
    "demo_examples",
    "exif_orientation",
    "load_models",
    "parse_phrases",
    "predict_page",
    "read_image",
    "run",
    "serve",
]

logger = logging.getLogger("m2ist.app")

#: Most expressions one request may hold.
MAX_PHRASES = 16
#: Longest expression, in characters (the processor truncates to the model's query length anyway).
MAX_PHRASE_CHARS = 300
#: Longest text one request may hold, in characters (blank lines and spaces included), checked before it is split:
#: a hostile request of megabytes kept the one-at-a-time server busy for seconds per request.
MAX_TEXT_CHARS = 20_000
#: Largest image, in pixels (width × height), checked from the header before decoding.
MAX_PIXELS = 40_000_000
#: Largest upload the server accepts (gradio's ``max_file_size``).
MAX_FILE_SIZE = "20mb"
#: Uploads and drawn pictures the page keeps in gradio's cache are deleted once this old (seconds), and all of them
#: when the server stops; without it every request's upload and pictures stayed on disk for good.
CACHE_SECONDS = 3600
#: Longest side of the picture shown on the page (boxes are computed on the original image).
DISPLAY_MAX_SIDE = 1024
#: Small images are enlarged to this side for display, so that the labels stay readable.
DISPLAY_MIN_SIDE = 512
TITLE = "m2ist: referring expression comprehension"
_FONT_STACK = ["ui-sans-serif", "system-ui", "-apple-system", "Segoe UI", "Roboto", "Helvetica", "Arial", "sans-serif"]
_MONO_STACK = ["ui-monospace", "SFMono-Regular", "Menlo", "Consolas", "monospace"]


class AppInputError(ValueError):
    """Input the page cannot use; its message is shown to the user as is."""


@dataclass
class PagePrediction:
    """What one submission produces: a picture per adapter, a Markdown table of boxes and a status line."""

    images: list[Image.Image | None]
    table: str = ""
    message: str = ""
    boxes: dict[str, list[list[float]]] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        """True when every adapter produced boxes."""
        return len(self.boxes) == len(self.images) and all(image is not None for image in self.images)


# ---------------------------------------------------------------------------------------------- input checks
def parse_phrases(text: str | None, *, max_phrases: int = MAX_PHRASES) -> list[str]:
    """The expressions of ``text``, one per non-blank line, stripped; :class:`AppInputError` when there is none.

    A line that shows nothing (only whitespace, control or zero-width characters, e.g. a pasted U+200B) counts
    as blank: the processor refuses such a phrase, which failed the whole request for every adapter.
    """
    from m2ist.data.loaders import has_visible_text

    text = "" if text is None else str(text)
    if len(text) > MAX_TEXT_CHARS:
        raise AppInputError(f"The text is {len(text)} characters long; keep it under {MAX_TEXT_CHARS} (at most "
                            f"{max_phrases} expressions of up to {MAX_PHRASE_CHARS} characters, one per line).")
    phrases = [" ".join(line.split()) for line in text.splitlines()]
    phrases = [phrase for phrase in phrases if has_visible_text(phrase)]
    if not phrases:
        raise AppInputError("Type at least one expression (one per line), e.g. “the red circle”.")
    if len(phrases) > max_phrases:
        raise AppInputError(f"{len(phrases)} expressions: at most {max_phrases} per request, one per line.")
    long = [phrase for phrase in phrases if len(phrase) > MAX_PHRASE_CHARS]
    if long:
        raise AppInputError(f"An expression is {len(long[0])} characters long; keep each under {MAX_PHRASE_CHARS}.")
    return phrases


def read_image(image: Any, *, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """An RGB image from a path, PIL image or array; :class:`AppInputError` when missing, unreadable or too large.

    The size of a file is read from its header before its pixels are decoded, so a decompression bomb is refused
    without being decoded (the stored size: the EXIF orientation, which changes no pixel count, is read only for an
    image within the limit, as a PNG's is read by decoding it).
    """
    from m2ist.data.images import ImageLoadError, image_size, load_image

    if image is None or (isinstance(image, str) and not image.strip()):
        raise AppInputError("Upload, paste or drop an image first (or pick an example below).")
    if isinstance(image, _Unreadable) and image.missing:
        raise AppInputError(f"The image is no longer on the server (uploads are deleted after {CACHE_SECONDS // 60} "
                            "minutes): upload it again.")
    if isinstance(image, _Unreadable):
        raise AppInputError(f"Cannot read this file as an image ({image.reason}). Try a PNG, JPEG or WebP file.")
    try:
        width, height = image_size(image)  # exif_transpose=True would decode a PNG whole to read its orientation
        if width < 1 or height < 1:
            raise AppInputError("The image is empty (0 pixels).")
        if width * height > max_pixels:
            raise AppInputError(f"The image is {width}×{height} pixels ({width * height / 1e6:.0f} megapixels); "
                                f"the limit is {max_pixels / 1e6:.0f} megapixels. Resize it and try again.")
        return load_image(image, exif_transpose=True)
    except AppInputError:
        raise
    except (ImageLoadError, OSError, ValueError, TypeError, Image.DecompressionBombError) as err:
        if isinstance(err, Image.DecompressionBombError) or isinstance(err.__cause__, Image.DecompressionBombError):
            raise AppInputError(f"The image is too large to decode safely; the limit is {max_pixels / 1e6:.0f} "
                                "megapixels. Resize it and try again.") from err
        raise AppInputError(f"Cannot read this file as an image ({_short(err)}). Try a PNG, JPEG or WebP file.") from err


def exif_orientation(image: Any) -> int:
    """The EXIF orientation tag of a file or PIL image (1, upright, when absent, unreadable or for arrays); read
    from the header only. :func:`read_image` applies it, as photo viewers and browsers do."""
    from m2ist.data.images import exif_orientation as orientation_of

    try:
        if isinstance(image, Image.Image):
            return orientation_of(image)
        if isinstance(image, str | Path):
            with Image.open(image) as opened:
                return orientation_of(opened)
    except (OSError, ValueError, TypeError, SyntaxError):
        pass
    return 1


def _short(err: BaseException, limit: int = 200) -> str:
    """One line naming the error, without paths of the server's temporary files."""
    text = re.sub(r"(/[^\s'\"]+)+/", "", str(err)).strip() or type(err).__name__
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


# ---------------------------------------------------------------------------------------------- prediction
def _display_copy(image: Image.Image) -> tuple[Image.Image, tuple[float, float]]:
    """The image resized for the page (large ones shrunk, small ones enlarged) and the ``(x, y)`` scales applied.

    The scales are per axis, each the displayed side over the original one: sizes are rounded to whole pixels, so one
    factor for both axes would put a box on the image's far edge a fraction of a pixel outside the displayed copy.
    """
    side = max(image.size)
    scale = 1.0
    if side > DISPLAY_MAX_SIDE:
        scale = DISPLAY_MAX_SIDE / side
    elif side < DISPLAY_MIN_SIDE:
        scale = DISPLAY_MIN_SIDE / side
    if scale == 1.0:
        return image, (1.0, 1.0)
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    resample = Image.Resampling.LANCZOS if scale < 1 else Image.Resampling.NEAREST
    return image.resize(size, resample), (size[0] / image.width, size[1] / image.height)


def _display_boxes(boxes: list[list[float]], scales: tuple[float, float], size: tuple[int, int]) -> list[list[float]]:
    """``xyxy`` boxes of the original image in pixels of its displayed copy of ``size``, clipped to it."""
    (scale_x, scale_y), (width, height) = scales, size
    return [[min(max(x0 * scale_x, 0.0), width), min(max(y0 * scale_y, 0.0), height),
             min(max(x1 * scale_x, 0.0), width), min(max(y1 * scale_y, 0.0), height)] for x0, y0, x1, y1 in boxes]


def _escape(text: str) -> str:
    """``text`` safe inside a Markdown table cell."""
    text = html.escape(text, quote=False)
    return re.sub(r"([\\`*_{}\[\]()#+!|~])", r"\\\1", text)


def _format_table(rows: list[tuple[str, str, list[float]]], several: bool) -> str:
    header = ("| adapter | " if several else "| ") + "expression | x0 | y0 | x1 | y1 |"
    rule = "|---|" + ("---|" if several else "") + "---:|---:|---:|---:|"
    lines = [header, rule]
    for name, phrase, box in rows:
        cells = ([_escape(name)] if several else []) + [_escape(phrase)] + [f"{value:.0f}" for value in box]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _check_models(models: Sequence[tuple[str, nn.Module]], where: str) -> list[tuple[str, nn.Module]]:
    """``models`` as a list of ``(name, model)`` pairs with distinct names; ``ValueError`` otherwise (results are keyed
    by name: a second model of one name would replace the first's boxes and times, under two identical pictures)."""
    models = list(models)
    bad = [pair for pair in models if not (isinstance(pair, tuple | list) and len(pair) == 2 and isinstance(pair[0], str))]
    if bad:
        raise TypeError(f"{where} takes (name, model) pairs, as load_models returns them; got {bad[0]!r:.80}.")
    names = [name for name, _ in models]
    if len(set(names)) != len(names):
        repeated = sorted({name for name in names if names.count(name) > 1})
        raise ValueError(f"{where}: two models share the name {repeated[0]!r} ({names}); results are keyed by name, so "
                         "give each model its own (e.g. load_models(['a=out/a', 'b=out/b'])).")
    return models


def _cut_phrases(model: Any, phrases: list[str]) -> list[tuple[int, int, int]]:
    """``(index, tokens, limit)`` of each phrase with more tokens than ``model``'s processor reads
    (``max_query_len``, special tokens included): its last words are cut off before the model sees it. Empty when
    that cannot be told (a processor without ``phrase_lengths``); never raises. The processor counts them, so a
    phrase is measured as the model reads it (text spelling ``[SEP]`` read as words, not as that token)."""
    processor = getattr(model, "processor", None)
    count, limit = getattr(processor, "phrase_lengths", None), getattr(processor, "max_query_len", None)
    if not callable(count) or not isinstance(limit, int):
        return []
    try:
        lengths = count(phrases)
    except Exception:  # a note, not a reason to fail the request
        logger.debug("could not count the tokens of the expressions", exc_info=True)
        return []
    return [(index, length, limit) for index, length in enumerate(lengths) if length > limit]


def predict_page(models: Sequence[tuple[str, nn.Module]], image: Any, text: str | None) -> PagePrediction:
    """Predict one box per expression with every ``(name, model)``; never raises for bad input.

    Args:
        models: the adapters to run, each with a processor attached (``model.processor``, as
            :meth:`~m2ist.model.SideTunedModel.from_pretrained` attaches it).
        image: a path, PIL image or array (``None`` when nothing was uploaded).
        text: expressions, one per line; blank lines are skipped.

    Returns:
        A :class:`PagePrediction`: one drawn picture per model (``None`` where that model failed), a Markdown
        table of the boxes in ``xyxy`` pixels of the image **as displayed** (its EXIF orientation applied, as on the
        page; :func:`~m2ist.inference.predict_boxes` and ``m2ist predict`` read the stored pixels and ignore it),
        and a status line with each model's time (or the message that explains what is wrong with the input). When
        the image carries an EXIF rotation or flip, the status line says so.

    Two models of one name are refused (``ValueError``): the results are keyed by name.
    """
    from m2ist.inference import draw_boxes, predict_boxes

    models = _check_models(models, "predict_page")
    empty = [None] * len(models)
    try:
        phrases = parse_phrases(text)
        picture = read_image(image)
    except AppInputError as err:
        return PagePrediction(images=empty, message=f"⚠️ {err}")
    shown, scales = _display_copy(picture)
    result = PagePrediction(images=list(empty))
    rows: list[tuple[str, str, list[float]]] = []
    notes = []
    for index, (name, model) in enumerate(models):
        try:
            started = time.perf_counter()
            boxes = predict_boxes(model, picture, phrases)
            seconds = time.perf_counter() - started
            box_list = boxes.tolist()
            drawn = draw_boxes(shown, _display_boxes(box_list, scales, shown.size), texts=phrases,
                               font_size=max(14, round(min(shown.size) / 30)))
        except Exception as err:  # a model failure is reported on the page; the server keeps serving
            logger.exception("prediction failed for adapter %s", name)
            notes.append(f"⚠️ {_escape(name)}: the prediction failed ({_escape(_short(err))}).")
            continue
        result.boxes[name] = box_list
        result.seconds[name] = seconds
        result.images[index] = drawn
        rows += [(name, phrase, box) for phrase, box in zip(phrases, box_list)]
        count = f"{len(phrases)} expression{'s' if len(phrases) > 1 else ''}"
        notes.append(f"**{_escape(name)}**: {count} in {1000 * seconds:.0f} ms "
                     f"({1000 * seconds / len(phrases):.0f} ms each) on a {picture.width}×{picture.height} image.")
        cut = _cut_phrases(model, phrases)
        if cut:  # the processor only logs this, once per process: the page would show a box for words never read
            which = ", ".join(f"{index + 1} ({length} tokens)" for index, length, _ in cut)
            notes.append(f"ℹ️ {_escape(name)} reads the first {cut[0][2]} tokens of an expression (special tokens "
                         f"included): the last words of expression{'s' if len(cut) > 1 else ''} {which} were not "
                         "read, and the box is for what is left. Shorten them.")
    orientation = exif_orientation(image)
    if orientation != 1 and rows:
        notes.append(f"ℹ️ This image carries an EXIF orientation (tag {orientation}): it was turned upright as photo "
                     f"viewers do, and the boxes are pixels of the upright {picture.width}×{picture.height} picture "
                     "shown here. `m2ist predict` and `predict_boxes` read the stored pixels (EXIF ignored), so "
                     "their boxes for this file are in the stored frame.")
    result.table = _format_table(rows, several=len(models) > 1) if rows else ""
    result.message = "  \n".join(notes)
    return result


# ---------------------------------------------------------------------------------------------- models and examples
def default_adapter() -> Path:
    """Where ``make demo`` (``m2ist demo``) saves its adapter: ``<its default output dir>/adapter``."""
    import inspect

    from m2ist.evidence import demo

    output_dir = inspect.signature(demo.run).parameters["output_dir"].default
    return Path(output_dir) / "adapter"


def _parse_adapter(spec: str) -> tuple[str, str]:
    """``NAME=PATH_OR_REPO`` or ``PATH_OR_REPO`` (named after its last path part)."""
    name, sep, target = spec.partition("=")
    if sep and name and target and not Path(spec).exists():
        return name, target
    return (Path(spec.rstrip("/")).name or spec), spec


def load_models(adapters: Sequence[str] | None = None, **from_pretrained: Any) -> list[tuple[str, nn.Module]]:
    """Load each adapter (folder or Hub repo id, optionally ``NAME=...``) with its towers and processor.

    With no adapter, the one ``make demo`` saved (:func:`default_adapter`); a missing demo adapter raises a
    :class:`FileNotFoundError` that says to run ``make demo`` first or to pass ``--adapter``.
    """
    from m2ist.model import SideTunedModel

    if not adapters:
        folder = default_adapter()
        if not (folder / "m2ist_config.json").exists():
            raise FileNotFoundError(
                f"No adapter at {folder}: run `make demo` first (it trains one and saves it there), or pass "
                "--adapter PATH_OR_REPO_ID.")
        adapters = [f"demo={folder}"]
    specs = [_parse_adapter(spec) for spec in adapters]
    names = [name for name, _ in specs]
    if len(set(names)) != len(names):  # before loading anything
        raise ValueError(f"Two adapters share a name ({names}); name them with --adapter NAME=PATH.")
    for name, target in specs:  # a later adapter that is neither a folder nor a repo id fails before the first loads
        _check_target(name, target)
    models = []
    for name, target in specs:
        try:
            model = SideTunedModel.from_pretrained(target, **from_pretrained)
        except (ValueError, OSError) as err:  # say which adapter: not every loading error names its folder
            raise _naming_adapter(err, name, target) from err
        if getattr(model, "processor", None) is None:
            raise ValueError(f"The adapter {target} has no processor (m2ist_processor.json): save it with "
                             "`model.processor = processor` set, as `m2ist train` and `make demo` do.")
        model.eval()
        models.append((name, model))
    return models


def _check_target(name: str, target: str) -> None:
    """``FileNotFoundError`` when ``target`` is neither a folder nor a valid Hub repo id (a mistyped or missing
    path), checked for every adapter before any loads: loading the ones before it can take minutes."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if Path(target).expanduser().is_dir():
        return
    try:
        validate_repo_id(target)
    except HFValidationError:
        raise FileNotFoundError(f"adapter {name!r} ({target}) cannot be loaded: no such folder, and it is not a Hub "
                                "repo id (OWNER/NAME) either; check the path.") from None


def _naming_adapter(err: ValueError | OSError, name: str, target: str) -> ValueError | OSError:
    """``err`` (same type where it can be rebuilt from a message) with the adapter it came from in front."""
    message = f"adapter {name!r} ({target}) cannot be loaded: {err}"
    try:
        named = type(err)(message)
        if str(named) == message:
            return named
    except Exception:  # an exception class that takes other arguments (json.JSONDecodeError, ...)
        pass
    return ValueError(message) if isinstance(err, ValueError) else OSError(message)


def demo_examples(count: int = 4, seed: int = 2024, folder: str | Path | None = None) -> list[tuple[str, str]]:
    """``count`` fresh procedural scenes of the demo's look (as PNG files) with their expressions, one per line."""
    import dataclasses

    from m2ist.evidence.demo_towers import VisionPretrainRecipe
    from m2ist.evidence.synthetic import generate_split

    recipe = VisionPretrainRecipe()
    scenes = dataclasses.replace(recipe.scene_config(), heldout_pairs=None, seed=seed)
    folder = Path(folder or tempfile.mkdtemp(prefix="m2ist-app-examples-"))
    folder.mkdir(parents=True, exist_ok=True)
    samples = generate_split("examples", count, seed, scenes, expressions_per_image=3,
                             expression_types=("attribute", "relation", "extreme"), heldout="ignore")
    by_image: dict[int, tuple[Image.Image, list[str]]] = {}
    for sample in samples:
        by_image.setdefault(id(sample.image), (sample.image, []))[1].append(sample.expression)
    examples = []
    for index, (image, phrases) in enumerate(by_image.values()):
        path = folder / f"scene_{index}.png"
        image.save(path)
        examples.append((str(path), "\n".join(phrases)))
    return examples


# ---------------------------------------------------------------------------------------------- the page
def _gradio():
    """Import gradio with its analytics off (unless the environment says otherwise)."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    try:
        import gradio as gr
    except ImportError as err:
        raise ImportError('The page needs gradio: pip install "m2ist[app]"') from err
    return gr


@dataclass
class _Unreadable:
    """An upload gradio could not open; carries the reason to :func:`read_image`."""

    reason: str
    #: the upload is gone from gradio's cache (deleted after :data:`CACHE_SECONDS`): the page asks for it again
    missing: bool = False


def _image_input(gr: Any, **kwargs: Any):
    """A ``gr.Image`` whose unreadable uploads reach :func:`predict_page` as a message instead of an error modal.

    The instance's ``preprocess`` is wrapped (a subclass would make gradio write a ``.pyi`` stub next to this file).
    """
    component = gr.Image(**kwargs)
    original = component.preprocess

    def preprocess(payload: Any) -> Any:
        try:
            return original(payload)
        except FileNotFoundError as err:
            return _Unreadable(_short(err), missing=True)
        except Exception as err:
            return _Unreadable(_short(err))

    component.preprocess = preprocess
    return component


def build_app(models: Sequence[tuple[str, nn.Module]], examples: Sequence[tuple[str, str]] | None = None, *,
              title: str = TITLE):
    """The page as a ``gradio.Blocks``: an image, expressions, one picture per adapter, a box table and timings.

    Args:
        models: ``(name, model)`` pairs (see :func:`load_models`); their pictures are shown side by side.
        examples: ``(image path, expressions)`` pairs offered under the inputs (e.g. :func:`demo_examples`).
        title: the heading and the browser tab's title.
    """
    gr = _gradio()
    models = _check_models(models, "build_app")
    if not models:
        raise ValueError("build_app needs at least one (name, model) pair.")
    names = ", ".join(f"`{name}`" for name, _ in models)

    def submit(image: Any, text: str | None):
        try:
            result = predict_page(models, image, text)
        except Exception as err:  # the last guard: a message, never a stack trace on the page
            logger.exception("the page's prediction failed")
            result = PagePrediction(images=[None] * len(models), message=f"⚠️ Something went wrong: {_short(err)}")
        return (*result.images, result.table, result.message)

    with gr.Blocks(title=title, analytics_enabled=False, delete_cache=(min(600, CACHE_SECONDS), CACHE_SECONDS)) as app:
        gr.Markdown(f"## {html.escape(title)}\nUpload or paste an image, type one expression per line (“the red "
                    f"circle”, “the square left of the star”), press **Find**. Adapter{'s' if len(models) > 1 else ''}: "
                    f"{names}.")
        with gr.Row():
            with gr.Column(scale=1):
                image = _image_input(gr, label="Image (upload, paste or drop)", type="filepath", image_mode=None,
                                     sources=["upload", "clipboard"], elem_id="m2ist-image", height=360)
                text = gr.Textbox(label="Expressions, one per line", lines=4, max_lines=MAX_PHRASES,
                                  placeholder="the red circle\nthe square left of the star", elem_id="m2ist-text")
                with gr.Row():
                    button = gr.Button("Find", variant="primary", elem_id="m2ist-find")
                    clear = gr.ClearButton(value="Clear")
            with gr.Column(scale=max(1, len(models))):
                with gr.Row():
                    pictures = [gr.Image(label=name, type="pil", format="png", interactive=False, height=360,
                                         elem_id=f"m2ist-result-{index}") for index, (name, _) in enumerate(models)]
                status = gr.Markdown(elem_id="m2ist-status")
                table = gr.Markdown(elem_id="m2ist-boxes")
        if examples:
            gr.Examples(examples=[[path, phrases] for path, phrases in examples], inputs=[image, text],
                        label="Examples (procedural scenes)" if examples else None)
        clear.add([image, text, *pictures, table, status])
        button.click(submit, inputs=[image, text], outputs=[*pictures, table, status], concurrency_limit=1,
                     api_name="predict")
    return app


def serve(models: Sequence[tuple[str, nn.Module]], *, host: str | None = "127.0.0.1", port: int | None = None,
          examples: Sequence[tuple[str, str]] | None = None, block: bool = True, quiet: bool = False, app: Any = None,
          **launch: Any):
    """Build the page (or take ``app`` from :func:`build_app`) and serve it.

    ``block=False`` returns the running app at once; stop it with ``app.close()``. ``host``/``port`` ``None`` use
    gradio's defaults (``GRADIO_SERVER_NAME``/``GRADIO_SERVER_PORT``, as on a Hugging Face Space). Never creates a
    share link; uploads over :data:`MAX_FILE_SIZE` are refused, and uploads and drawn pictures leave gradio's cache
    after :data:`CACHE_SECONDS` and when the server stops.
    """
    _refuse_ipv6(host if host is not None else os.environ.get("GRADIO_SERVER_NAME"),
                 "host" if host is not None else "GRADIO_SERVER_NAME")
    gr = _gradio()
    app = app or build_app(models, examples)
    theme = gr.themes.Default(font=_FONT_STACK, font_mono=_MONO_STACK)
    app.launch(server_name=host, server_port=port, share=False, inbrowser=False, prevent_thread_lock=not block,
               max_file_size=MAX_FILE_SIZE, show_error=False, quiet=quiet, ssr_mode=False, theme=theme,
               footer_links=[], **launch)
    return app


# ---------------------------------------------------------------------------------------------- command line
def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The options of ``m2ist app``."""
    parser.add_argument("--adapter", action="append", metavar="[NAME=]PATH_OR_REPO_ID",
                        help="adapter folder or Hub repo id (repeat to compare adapters side by side; default: the "
                             "one `make demo` saved)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1, this machine "
                        "only; 0.0.0.0 opens it to the network)")
    parser.add_argument("--port", type=_port, default=None, help="port (default: 7860, or the next free one)")
    parser.add_argument("--examples", choices=("auto", "shapes", "none"), default="auto",
                        help="example images: the demo's procedural scenes ('shapes'), none, or 'auto': scenes when "
                             "no --adapter is given")
    parser.add_argument("--local-files-only", action="store_true", help="load adapters and towers from the cache only")
    return parser


def _port(text: str) -> int:
    """An argparse ``type``: a TCP port, 1 to 65535 (checked before any adapter is loaded)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid port {text!r}: give a number from 1 to 65535") from None
    if not 1 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"port {value} is out of range: give a number from 1 to 65535")
    return value


def _refuse_ipv6(host: str | None, what: str) -> None:
    """``ValueError`` for an IPv6 address: gradio writes ``http://{host}:{port}`` unbracketed and fails (a traceback,
    its server thread left running) once the server is up, i.e. after every adapter has loaded."""
    if host and ":" in host:
        raise ValueError(f"{what} {host!r} is an IPv6 address, which the page's server (gradio) cannot listen on; "
                         "give an IPv4 address such as 127.0.0.1 (this machine only) or 0.0.0.0 (the network), or a "
                         "host name.")


def check_address(host: str, port: int | None) -> None:
    """Raise ``ValueError`` unless the page can listen on ``host`` (and ``port``, when given): checked before any
    adapter loads, so a typo in ``--host`` or a port in use is not found only after minutes of loading."""
    import socket

    _refuse_ipv6(host, "--host")
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port or 0, type=socket.SOCK_STREAM)[0]
    except (socket.gaierror, UnicodeError) as err:
        raise ValueError(f"--host {host!r} is not an address or host name this machine can resolve ({err}); give "
                         "an address such as 127.0.0.1 (this machine only) or 0.0.0.0 (the network).") from None
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server does: TIME_WAIT is no conflict
        try:
            probe.bind(address)
        except OSError as err:
            if port and err.errno == errno.EADDRINUSE:
                raise ValueError(f"port {port} on {host} is in use by another program: give another --port, or "
                                 "leave it out to take the next free one.") from None
            raise ValueError(f"cannot listen on --host {host!r} ({err.strerror or err}): give an address of this "
                             "machine, such as 127.0.0.1 (this machine only) or 0.0.0.0 (the network).") from None


def run(args: argparse.Namespace) -> int:
    """Run ``m2ist app`` with parsed ``args``; returns the exit status. An adapter that cannot be loaded raises
    (``FileNotFoundError``, ``ValueError``, ``OSError``): ``m2ist app`` reports it in one line, with exit status 2."""
    check_address(args.host, args.port)
    models = load_models(args.adapter, local_files_only=args.local_files_only)
    use_scenes = args.examples == "shapes" or (args.examples == "auto" and not args.adapter)
    with tempfile.TemporaryDirectory(prefix="m2ist-app-examples-") as folder:  # each start left its scenes in /tmp
        examples = demo_examples(folder=folder) if use_scenes else None
        serve(models, host=args.host, port=args.port, examples=examples)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m m2ist.app``: the same as ``m2ist app``."""
    parser = add_arguments(argparse.ArgumentParser(prog="m2ist app", description=__doc__.split("\n")[0]))
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = parser.parse_args(argv)
    try:
        return run(args)
    except (ValueError, OSError) as err:  # the same line and status as `m2ist app`
        print(f"m2ist app: error: {' '.join(str(err).split()) or type(err).__name__}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
