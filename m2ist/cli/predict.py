"""``m2ist predict``: one box per phrase with a saved adapter, printed as JSON (optionally drawn)."""

from __future__ import annotations

import argparse
import json
import math
import os
from pathlib import Path
from typing import Any

from m2ist.data.images import ORIENTATION_NAMES, DeferredImage

from .errors import CLIError, refuse_dash
from .flags import (
    HelpFormatter,
    add_adapter_flags,
    add_config_flags,
    add_evaluation_flags,
    add_tower_flags,
    examples,
    user_path,
    wrap,
)
from .loading import default_device, info, load_adapter, logger
from .report import refuse_non_json_name
from .settings import settings_help

#: The line ``m2ist --help`` shows for this command.
HELP = "predict boxes for images and phrases, printed as JSON"


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``predict`` and its flags to the ``m2ist`` subcommands."""
    predict = subparsers.add_parser(
        "predict", formatter_class=HelpFormatter, help=HELP,
        description=wrap("Predict one box per phrase (xyxy pixels of the stored image; EXIF orientation is not "
                          "applied unless --exif-transpose is given) with a saved adapter; "
                          "prints a JSON list of {image, text, box_xyxy}. One image with several phrases, several "
                          "images with one phrase, or one phrase per image.") + "\n\n" + settings_help("predict"),
        epilog=examples("predict"))
    add_config_flags(predict, "predict")
    add_adapter_flags(predict)
    group = predict.add_argument_group("inputs and outputs")
    # action="extend": a repeated flag adds to the list (argparse's default keeps the last one and drops the others)
    group.add_argument("--image", nargs="+", action="extend", required=True, metavar="PATH", type=user_path,
                       help="image file(s) or http(s) URL(s), downloaded once; several after one flag or the flag "
                       "repeated")
    group.add_argument("--text", nargs="+", action="extend", required=True, metavar="PHRASE",
                       help="referring phrase(s); several after one flag or the flag repeated; - reads them from "
                       "stdin, one per line (--text - < phrases.txt)")
    group.add_argument("--draw", metavar="OUT.png", type=user_path,
                       help="also draw the boxes (one file per image: OUT-<n>.png; no "
                       "extension adds .png); replaces only an earlier drawing of this command")
    group.add_argument("--output", metavar="FILE", type=user_path,
                       help="also write the JSON to FILE (a .json name or none; never "
                       "an input image)")
    group.add_argument("--exif-transpose", action="store_true",
                       help="turn each image upright by its EXIF orientation tag, as photo viewers and the web app "
                       "do (a phone photo is often stored sideways): the model reads the picture you see, and boxes "
                       "and drawings are pixels of the upright image (default: the stored pixels, as dataset boxes)")
    add_evaluation_flags(predict, "predict")
    add_tower_flags(predict, " (default: the one recorded in the adapter)")
    return predict


def _draw_paths(draw: str, images: list[str]) -> dict[str, Path]:
    """The drawing of each distinct image: ``OUT`` for one image, ``OUT-<n>`` for several. No extension gives
    ``.png`` (one rule for one or many images); an extension Pillow cannot write is refused."""
    from PIL import Image

    Image.init()
    target = Path(draw)
    suffix = target.suffix.lower()
    if not suffix:
        target = target.with_name(target.name + ".png")
    elif Image.registered_extensions().get(suffix) not in Image.SAVE:
        raise CLIError(f"--draw {draw}: Pillow cannot write {suffix!r} images; end the name with .png or .jpg.")
    distinct = list(dict.fromkeys(images))
    if len(distinct) == 1:
        return {distinct[0]: target}
    return {image: target.with_name(f"{target.stem}-{number}{target.suffix}") for number, image in enumerate(distinct)}


def _image_format(path: Path) -> str:
    """The Pillow format of ``path``'s extension (the temporary file it is written through has none)."""
    from PIL import Image

    return Image.registered_extensions()[path.suffix.lower()]


def _same_file(first: Path, second: Path) -> bool:
    """Whether two paths name one file (same resolved path, or a link / hard link to it)."""
    if first.resolve() == second.resolve():
        return True
    try:
        return first.exists() and second.exists() and first.samefile(second)
    except OSError:
        return False


def is_predictions_file(path: Path) -> bool:
    """Whether ``path`` holds an earlier ``m2ist predict --output``: a JSON list of ``{image, text, box_xyxy}``."""
    from m2ist.evaluation import json_file_is

    return json_file_is(path, lambda value: isinstance(value, list) and all(
        isinstance(record, dict) and "box_xyxy" in record for record in value))


#: The EXIF ``Software`` (tag 0x0131) of the pictures ``--draw`` writes: only those may be replaced by a new drawing.
DRAWN_BY = "m2ist predict --draw"
_EXIF_SOFTWARE = 0x0131


def _drawing_exif() -> Any:
    """The EXIF block that marks a ``--draw`` picture (formats without EXIF, e.g. BMP or GIF, go unmarked)."""
    from PIL import Image

    exif = Image.Exif()
    exif[_EXIF_SOFTWARE] = DRAWN_BY
    return exif


def is_predict_drawing(path: Path) -> bool:
    """Whether ``path`` is a picture an earlier ``m2ist predict --draw`` wrote (its EXIF ``Software`` says so)."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            return image.getexif().get(_EXIF_SOFTWARE) == DRAWN_BY
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
        return False


def _check_outputs(outputs: list[tuple[str, Path]], images: list[str]) -> None:
    """Refuse, before predicting, an output that is a folder or cannot be created, that would overwrite an input
    image or a file that is not an earlier output of its flag (``--draw out.png`` with several images writes
    ``out-0.png``, ``out-1.png``..., names that may be the user's other pictures), or that two outputs share."""
    from m2ist.evaluation import check_output_file

    for flag, path in outputs:
        for image in images:
            if _same_file(path, Path(image)):
                raise CLIError(f"{flag} {path} is the input image {image}: writing it would destroy the image. "
                               "Choose another output file.")
        try:
            check_output_file(path, replaces=is_predictions_file if flag == "--output" else is_predict_drawing)
        except FileExistsError as err:
            what = "a data file, weights?" if flag == "--output" else "one of your pictures?"
            raise CLIError(f"{flag} {path} already exists and is not an earlier `m2ist predict {flag}` ({what}): it "
                           "would be overwritten. Choose another file, or delete it first if it may go."
                           if path.is_file() else f"{flag} {path}: {err}") from None
    for index, (flag, path) in enumerate(outputs):
        for other_flag, other in outputs[index + 1 :]:
            if _same_file(path, other):
                raise CLIError(f"{flag} and {other_flag} both write {path}; give them different files.")


def _is_url(image: str) -> bool:
    """Whether ``--image`` names an ``http(s)`` URL (downloaded) rather than a file."""
    return image.startswith(("http://", "https://"))


class _InputImage(DeferredImage):
    """One ``--image`` (a file, or the bytes of a URL downloaded once), read when prediction or drawing needs it:
    with ``--exif-transpose`` turned upright; the first read warns about what the picture shown by a viewer and the
    pixels the model reads may not share (an EXIF orientation left unapplied, the other frames of an animation)."""

    __slots__ = ("exif_transpose", "name", "source", "warned")

    def __init__(self, name: str, source: Path | bytes, exif_transpose: bool) -> None:
        self.name, self.source, self.exif_transpose, self.warned = name, source, exif_transpose, False

    def describe(self) -> str:
        """The ``--image`` as given."""
        return self.name

    def open(self) -> Any:
        """The image as the model reads it (an RGB PIL image); the first call warns (:meth:`_warn`)."""
        import io

        from PIL import Image

        from m2ist.data.images import exif_orientation, load_image

        with Image.open(self.source if isinstance(self.source, Path) else io.BytesIO(self.source)) as opened:
            if not self.warned:
                self.warned = True
                self._warn(opened, exif_orientation(opened))
            return load_image(opened, exif_transpose=self.exif_transpose)

    def _warn(self, opened: Any, orientation: int) -> None:
        """Say how the pixels read differ from the picture a viewer shows."""
        if orientation != 1 and not self.exif_transpose:
            logger.warning("--image %s carries an EXIF orientation tag (%d: shown %s): the model reads the pixels as "
                           "stored, not as a photo viewer shows them, so the box (and a word such as 'left') is in "
                           "the stored frame. Pass --exif-transpose to predict on the upright picture.",
                           self.name, orientation, ORIENTATION_NAMES[orientation])
        elif orientation != 1:
            info(f"{self.name}: turned upright by its EXIF orientation ({ORIENTATION_NAMES[orientation]}).")
        if getattr(opened, "is_animated", False) and opened.format != "MPO":  # MPO: a photo with a preview frame
            logger.warning("--image %s holds %d frames (an animation, or pages): only the first is read. Save the "
                           "frame you mean as an image file and pass that.", self.name, getattr(opened, "n_frames", 2))


def _input_image(image: str, exif_transpose: bool) -> Any:
    """``--image`` as :func:`m2ist.inference.predict_boxes` takes it: a URL is downloaded now (an offline machine
    fails here, before the adapter is loaded) and its header read; a file is checked (its header read) and decoded
    only when it is used. Both as a :class:`m2ist.data.images.DeferredImage`."""
    import io

    from PIL import Image

    from m2ist.data.images import ImageLoadError, image_size
    from m2ist.processing import download_image

    if _is_url(image):
        data = download_image(image)
        try:
            image_size(Image.open(io.BytesIO(data)))
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
            raise ImageLoadError(f"--image {image}: the download is not an image PIL can read ({err}).") from err
        source: Path | bytes = data
    else:
        _check_image_path(image)
        image_size(image)  # a missing or unreadable file fails now
        source = Path(image)
    return _InputImage(image, source, exif_transpose)


def _check_image_path(image: str) -> None:
    """Refuse, naming what to give instead, an ``--image`` that names a folder or a pattern the shell left as it
    was (no file matched it, or it was quoted), or ``-`` (images are not read from stdin)."""
    if image.strip() == "-":
        raise CLIError("--image -: images are not read from stdin; give image files or http(s) URLs (phrases are: "
                       "--text -).")
    path = Path(image)
    if path.is_dir():
        raise CLIError(f"--image {image} is a folder: give image files (a shell pattern such as {path / '*.jpg'} "
                       "expands to them).")
    if not path.exists() and any(char in path.name for char in "*?["):
        raise CLIError(f"--image {image}: no file matches this pattern (the shell passes a pattern that matches "
                       "nothing, or a quoted one, as it is): check the folder and the extension, and leave the "
                       "pattern unquoted.")


def _names_a_file(text: str) -> bool:
    """Whether a phrase is the name of an existing file (a phrase too long for a file name is not)."""
    try:
        return Path(text).is_file()
    except (OSError, ValueError):
        return False


def _read_phrases(texts: list[str]) -> list[str]:
    """``--text`` with each ``-`` replaced by the phrases on stdin, one per non-blank line (stdin is read once)."""
    import sys

    if "-" not in texts:
        return [_as_typed(text) for text in texts]
    if texts.count("-") > 1:
        raise CLIError("--text - is given more than once: stdin can be read once; give - a single time.")
    if sys.stdin is None or sys.stdin.isatty():
        raise CLIError("--text - reads the phrases from stdin, one per line, but stdin is a terminal: pipe or redirect "
                       "them (--text - < phrases.txt).")
    # a byte-order mark (a file saved by Notepad) is no part of the first phrase
    read = [" ".join(line.split()) for line in _stdin_text(sys.stdin).removeprefix("\ufeff").splitlines()]
    read = [line for line in read if line]
    if not read:
        raise CLIError("--text - read no phrase from stdin (it was empty or blank): give one phrase per line.")
    at = texts.index("-")
    return [_as_typed(text) for text in texts[:at]] + read + [_as_typed(text) for text in texts[at + 1 :]]


def _stdin_text(stdin: Any) -> str:
    """All of ``stdin``: its bytes read as UTF-8 when they are (a UTF-8 file piped on Windows, whose pipes decode
    cp1252, or under ``LC_ALL=C``, which decodes ASCII), else in the stream's own encoding (a legacy file)."""
    buffer = getattr(stdin, "buffer", None)
    if buffer is None:  # a text stream without bytes beneath (io.StringIO)
        return stdin.read()
    data = buffer.read()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return data.decode(getattr(stdin, "encoding", None) or "utf-8", "surrogateescape")


def _as_typed(text: str) -> str:
    """A command-line phrase as typed: the UTF-8 bytes of an argument that the locale's encoding could not decode
    (ASCII under ``LC_ALL=C``: "café" arrives as ``'caf\\udcc3\\udca9'``) read as UTF-8."""
    if not any("\udc80" <= character <= "\udcff" for character in text):
        return text
    try:
        return os.fsencode(text).decode("utf-8")
    except UnicodeError:
        return text  # not UTF-8 either: refused by run(), which shows the bytes


def run(settings: dict[str, dict[str, Any]], args: argparse.Namespace) -> int:
    """Predict one box per phrase and print them as JSON (optionally draw them)."""
    from m2ist.data.loaders import has_visible_text
    from m2ist.inference import draw_boxes, predict_boxes
    from m2ist.save_and_load import atomic_write

    images, texts = list(args.image), _read_phrases(list(args.text))
    if args.output:
        refuse_dash("--output", args.output, "the JSON is printed on stdout already: drop --output.")
    if args.draw:
        refuse_dash("--draw", args.draw, "give an image file name, e.g. --draw boxes.png.")
    for number, text in enumerate(texts, start=1):
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            raise CLIError(f"--text phrase {number} ({text.encode('utf-8', 'surrogateescape')!r}) is not valid UTF-8: "
                           "pass the phrase as UTF-8 text.") from None
        if not has_visible_text(text):  # checked before the adapter is loaded, numbered as typed
            raise CLIError(f"--text phrase {number} ({text!r}) is empty or shows nothing (only whitespace, control or "
                           "zero-width characters): give each phrase some words.")
        if _names_a_file(text):  # `--text phrases.txt`: the name is the phrase, the file is never read
            logger.warning("--text %r is the name of a file, but phrases are taken as typed: the box is for the words "
                           "%r. To read phrases from a file, one per line: --text - < %s", text, text, text)
    if len(images) > 1 and len(texts) > 1 and len(images) != len(texts):
        raise CLIError(f"Got {len(images)} images and {len(texts)} phrases: give one phrase per image, one image "
                       "with several phrases, or several images with one phrase.")
    # a URL is downloaded once, now, and a file's header read (an offline machine, a missing or unreadable file
    # fail here, before the model is loaded); the pixels are decoded when they are used
    sources = {image: _input_image(image, args.exif_transpose) for image in dict.fromkeys(images)}
    drawings = _draw_paths(args.draw, [str(image) for image in images]) if args.draw else {}
    outputs = ([("--output", Path(args.output))] if args.output else []) + [("--draw", path) for path in drawings.values()]
    _check_outputs(outputs, [image for image in images if not _is_url(image)])
    if args.output:
        refuse_non_json_name("--output", args.output, draw_hint=True)
    model, processor = load_adapter(settings)
    evaluation = settings["evaluation"]
    boxes = predict_boxes(model, [sources[image] for image in images], texts, processor=processor,
                          batch_size=int(evaluation.get("batch_size", 16)), device=default_device(evaluation))
    pairs = list(zip(images * len(texts) if len(images) == 1 else images,
                     texts * len(images) if len(texts) == 1 else texts))
    for (image, text), box in zip(pairs, boxes.tolist()):  # the JSON must hold numbers only, whatever predicted them
        if not all(math.isfinite(v) for v in box):
            raise CLIError(f"The adapter predicted a non-finite box {box} for {image} / {text!r}: its weights are "
                           "damaged or its training diverged. Retrain it (or load an earlier checkpoint).")
    records = [{"image": str(image), "text": text, "box_xyxy": [round(v, 2) for v in box]}
               for (image, text), box in zip(pairs, boxes.tolist())]
    output = json.dumps(records, indent=2, allow_nan=False)
    print(output)
    if args.output:  # replaced in one step: a failure never leaves it half-written
        atomic_write(Path(args.output), lambda tmp: Path(tmp).write_text(output + "\n", encoding="utf-8"))
    for image, path in drawings.items():
        indices = [index for index, (source, _) in enumerate(pairs) if str(source) == image]
        drawn = draw_boxes(sources[image], boxes[indices], texts=[pairs[i][1] for i in indices])
        atomic_write(path, lambda tmp, drawn=drawn, path=path: drawn.save(tmp, format=_image_format(path),
                                                                          exif=_drawing_exif()))
        info(f"Drew {len(indices)} box(es) on {image} -> {path}")
    return 0
