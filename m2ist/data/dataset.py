"""A ``torch.utils.data.Dataset`` over :class:`RECSample` lists that checks the data once, when it is built."""

from __future__ import annotations

import math
import operator
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from PIL import Image
from torch.utils.data import Dataset

from m2ist.config import check_flags
from m2ist.data.images import (
    ORIENTATION_NAMES,
    WHITE,
    DeferredImage,
    RGBColor,
    exif_orientation,
    image_name,
    image_size,
    load_image,
)
from m2ist.data.loaders import box_values, has_visible_text
from m2ist.data.sample import RECSample
from m2ist.ops.boxes import looks_normalised

__all__ = ["RECDataWarning", "RECDataset", "ValidationReport", "check_annotated_size", "check_pixel_box",
           "percentages_warning"]

Box = tuple[float, float, float, float]
Transform = Callable[[Image.Image, str, Box], Any]
_IMAGE_ERRORS = (OSError, ValueError, TypeError)


class RECDataWarning(UserWarning):
    """Problems found in REC data (clipped boxes, dropped or skipped samples); filter it like any warning."""


@dataclass
class ValidationReport:
    """What :class:`RECDataset` found while checking its samples.

    Attributes:
        num_input: samples given.
        num_kept: samples in the dataset.
        num_clipped: kept samples whose box reached outside the image and was clipped to it.
        num_invalid_boxes: dropped: zero/negative width or height (after clipping), non-finite coordinates, or not
            four numbers.
        num_empty_expressions: dropped: an expression with no visible character (empty, whitespace, control or
            zero-width characters only: a tokenizer turns it into nothing).
        num_unreadable_images: skipped (``skip_invalid=True``): the image could not be found or read.
        unreadable_files: how many distinct image files those were.
        examples: a few offending samples per category, as readable strings.
    """

    num_input: int = 0
    num_kept: int = 0
    num_clipped: int = 0
    num_invalid_boxes: int = 0
    num_empty_expressions: int = 0
    num_unreadable_images: int = 0
    unreadable_files: int = 0
    examples: dict[str, list[str]] = field(default_factory=dict)


def _describe(index: int, sample: RECSample) -> str:
    image = sample.image if isinstance(sample.image, str | Path | DeferredImage) else type(sample.image).__name__
    source = sample.metadata.get("source") if isinstance(sample.metadata, dict) else None
    read_at = f", read at {source}" if isinstance(source, str) else ""  # the file loaders' file:line
    return (f"#{index} (image_id={sample.image_id!r}, image={image}, expression={sample.expression!r}, "
            f"box={sample.box}{read_at})")


def _with_context(err: BaseException, context: str) -> BaseException:
    """The same kind of exception with ``context`` (sample index, image id) in front of its message."""
    try:
        return type(err)(f"{context}: {err}")
    except Exception:
        return RuntimeError(f"{context}: {err}")


def _clip(box: Box, width: float, height: float) -> Box:
    x0, y0, x1, y1 = box
    return (min(max(x0, 0.0), width), min(max(y0, 0.0), height), min(max(x1, 0.0), width), min(max(y1, 0.0), height))


_SWAPPING_ORIENTATIONS = frozenset({5, 6, 7, 8})


def _orientation(image: Any) -> int:
    """The EXIF orientation of a sample's image (1 when it has none or cannot be read): for an error's hint only."""
    try:
        if isinstance(image, DeferredImage):
            image = image.open()
        if isinstance(image, str | Path):
            with Image.open(image) as opened:
                return exif_orientation(opened)
        return exif_orientation(image) if isinstance(image, Image.Image) else 1
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
        return 1


def check_annotated_size(sample: RECSample, size: tuple[int, int], *, where: str, exif_transpose: bool = False) -> None:
    """Refuse a sample whose image is not the size its annotation file states (``sample.annotated_size``): its
    box is in the annotated image's pixels, so on a resized copy (or another file) it marks the wrong place."""
    stated = getattr(sample, "annotated_size", None)
    if stated is None or tuple(stated) == tuple(size):
        return
    width, height = (int(value) for value in stated)
    if (height, width) == tuple(size):
        orientation = 1 if exif_transpose else _orientation(sample.image)
        if exif_transpose:
            hint = (" The image is rotated by its EXIF orientation: the annotation's size is the stored pixel grid, so "
                    "use exif_transpose=False.")
        elif orientation in _SWAPPING_ORIENTATIONS:  # annotated upright, as a photo viewer or labelling tool shows it
            hint = (f" The image carries an EXIF orientation tag ({orientation}: shown {ORIENTATION_NAMES[orientation]})"
                    " and the annotation states the size of the upright picture, so its boxes are in that picture: "
                    "read the images upright with RECDataset(..., exif_transpose=True) (and evaluate that dataset).")
        else:
            hint = " The file may have been rotated after annotation."
    else:
        hint = (" Were the images resized (a downscaled copy of the dataset)? Use the original images, or scale the "
                "boxes and the annotated sizes to the new images.")
    metadata = sample.metadata if isinstance(sample.metadata, dict) else {}
    source = metadata.get("source") or "the annotation"
    raise ValueError(
        f"{where}: {source} states a {width}x{height} image, but {image_name(sample.image)} is "
        f"{size[0]}x{size[1]}; its box {tuple(sample.box)} is in the annotated image's pixels and would mark the "
        f"wrong place.{hint}"
    )


def check_pixel_box(box: Sequence[float], size: tuple[int, int], *, where: str) -> None:
    """Refuse a box that lies within ``[0, 1]`` in an image larger than a few pixels: fractions of the image size
    (normalised numbers) read as pixels, a box of one pixel at the top-left corner. ``evaluate()`` refuses the same
    ground truth; training on it would teach the model that corner without a word."""
    width, height = size
    if looks_normalised(box, width, height):
        raise ValueError(
            f"{where}: the box {tuple(box)} lies within [0, 1] in a {width}x{height} image: it looks normalised "
            "(fractions of the image size), but RECDataset boxes are pixels. Load the data with normalized=True "
            "(--normalized on the command line), or convert the boxes to pixels."
        )


#: Boxes whose numbers all lie within ``[0, 100]`` in images all at least this many pixels each way (and at least
#: :data:`_PERCENT_MIN_COUNT` of them) look like percentages of the image size read as pixels.
_PERCENT_IMAGE_SIDE = 300
_PERCENT_MIN_COUNT = 5


def percentages_warning(count: int, largest: float, smallest_side: float) -> str | None:
    """The warning for ``count`` pixel boxes whose largest number is ``largest`` in images whose smallest side is
    ``smallest_side`` when they look like percentages of the image size (Label Studio exports ``x, y, width,
    height`` so): all within ``[0, 100]``, so all in the top-left corner of images of 300 pixels or more; else
    ``None``. Each box alone may be a small object there, so only a whole set is judged."""
    if count < _PERCENT_MIN_COUNT or largest > 100.0 or smallest_side < _PERCENT_IMAGE_SIDE:
        return None
    return (f"All {count} boxes lie within [0, 100] (up to {largest:g}) while every image is at least "
            f"{smallest_side:g} pixels each way: they look like percentages of the image size (as Label Studio "
            "exports them) read as pixels, all in the top-left corner. Divide the numbers by 100 and load with "
            "normalized=True (--normalized), or check the box format.")


def _image_key(image: Any) -> Any:
    return str(image) if isinstance(image, str | Path) else id(image)


class RECDataset(Dataset):
    """REC samples ready for a ``DataLoader``: one item per expression.

    Building it checks every sample cheaply (for file images only the header is read, for the size):

    * a box reaching outside its image is clipped to it (one :class:`RECDataWarning` with the count);
    * a box with zero/negative width or height after clipping, with non-finite numbers or that is not four
      numbers (text such as ``"1234"`` included), and an expression with no visible character (empty, whitespace,
      NUL, zero-width characters) are dropped (one warning with counts and a few examples);
    * a box within ``[0, 1]`` in an image of more than 4 pixels each way raises (normalised numbers read as pixels:
      load with ``normalized=True``), when the dataset is built or, for images not read then, when the item is taken;
    * a sample whose image file is not the size its annotation states (``RECSample.annotated_size``, set by the
      loaders from COCO/``instances.json``/record ``width`` and ``height``) raises, naming both sizes: its box is
      in the annotated image's pixels (a resized copy of the images would shift every box);
    * an image that is missing or unreadable raises an error naming the file and the sample index; with
      ``skip_invalid=True`` such samples are skipped instead and counted in one warning at the end.

    The findings are kept in :attr:`report`; :attr:`source_indices` maps each item back to ``samples``.

    Args:
        samples: the :class:`RECSample` list a loader returned.
        transform: ``transform(image, expression, box) -> dict`` applied in ``__getitem__``.
        skip_invalid: skip (and count) samples whose image cannot be read instead of raising. Each image is then
            decoded in full while building (a truncated file is caught here, not in the middle of training).
        validate_images: read each image's size while building (needed for clipping and for catching missing
            files early). With ``False`` only expressions and boxes are checked; boxes are still clipped to the
            decoded image in ``__getitem__``. Images kept as :class:`~m2ist.data.images.DeferredImage` (rows of a
            Hugging Face table) are never read while building, whatever this says: reading a size there means
            reading the whole encoded image, gigabytes for RefCOCO-size tables; they are checked when taken
            (except with ``skip_invalid``, which decodes every image once to find the unreadable ones).
        exif_transpose: apply EXIF orientation (see :func:`m2ist.data.images.load_image`; off for dataset boxes
            that refer to the stored pixel grid, like COCO's).
        background: colour transparent pixels are composited on.
        max_examples: how many examples each warning lists.
    """

    def __init__(
        self,
        samples: Sequence[RECSample],
        transform: Transform | None = None,
        skip_invalid: bool = False,
        *,
        validate_images: bool = True,
        exif_transpose: bool = False,
        background: RGBColor = WHITE,
        max_examples: int = 3,
    ) -> None:
        check_flags("RECDataset", skip_invalid=skip_invalid, validate_images=validate_images,
                    exif_transpose=exif_transpose)
        self.transform = transform
        self.skip_invalid = skip_invalid
        self.exif_transpose = exif_transpose
        self.background = background
        self.samples: list[RECSample] = []
        self.source_indices: list[int] = []
        self.report = ValidationReport(num_input=len(samples))
        self._validate(samples, validate_images=validate_images, max_examples=max_examples)

    def _validate(self, samples: Sequence[RECSample], *, validate_images: bool, max_examples: int) -> None:
        report = self.report
        examples: dict[str, list[str]] = {"clipped": [], "invalid_box": [], "empty_expression": [], "unreadable": []}

        def note(kind: str, text: str) -> None:
            if len(examples[kind]) < max_examples:
                examples[kind].append(text)

        sizes: dict[Any, tuple[int, int] | BaseException] = {}
        sized, largest, smallest_side = 0, 0.0, math.inf  # the boxes of images read: percentages?
        inverted = 0  # boxes with x1 < x0 or y1 < y0 (dropped): x, y, w, h read as x0, y0, x1, y1?
        for index, sample in enumerate(samples):
            if not isinstance(sample, RECSample):
                raise TypeError(f"samples[{index}] is a {type(sample).__name__}; RECDataset takes RECSample objects.")
            expression = sample.expression
            if expression is None or (isinstance(expression, str) and not has_visible_text(expression)):
                report.num_empty_expressions += 1
                note("empty_expression", _describe(index, sample))
                continue
            if not isinstance(expression, str):
                raise TypeError(f"samples[{index}].expression is a {type(expression).__name__}; it must be a str.")
            try:
                box = box_values(sample.box)
            except ValueError:
                box = ()
            if len(box) != 4 or not all(math.isfinite(value) for value in box):
                report.num_invalid_boxes += 1
                note("invalid_box", _describe(index, sample))
                continue
            # a table row is read when used, unless skip_invalid asks to find (and skip) the unreadable ones now
            if validate_images and (self.skip_invalid or not isinstance(sample.image, DeferredImage)):
                key = _image_key(sample.image)
                size = sizes.get(key)
                if size is None:
                    try:
                        if self.skip_invalid:  # decode in full: a truncated file must be skipped now, not stop training
                            size = load_image(sample.image, exif_transpose=self.exif_transpose).size
                        else:
                            size = image_size(sample.image, exif_transpose=self.exif_transpose)
                    except _IMAGE_ERRORS as err:
                        if not self.skip_invalid:
                            context = f"Sample {index} (image_id={sample.image_id!r})"
                            raise _with_context(err, context) from err
                        size = err
                        report.unreadable_files += 1
                    sizes[key] = size
                if isinstance(size, BaseException):
                    report.num_unreadable_images += 1
                    note("unreadable", f"#{index}: {size}")
                    continue
                check_annotated_size(sample, size, where=f"Sample {index} (image_id={sample.image_id!r})",
                                     exif_transpose=self.exif_transpose)
                check_pixel_box(box, size, where=f"Sample {index} (image_id={sample.image_id!r})")
                sized, largest, smallest_side = sized + 1, max(largest, *box), min(smallest_side, *size)
                clipped = _clip(box, *size)
                if clipped != box:
                    report.num_clipped += 1
                    note("clipped", f"{_describe(index, sample)} in a {size[0]}x{size[1]} image -> {clipped}")
                    box = clipped
            if box[2] <= box[0] or box[3] <= box[1]:
                report.num_invalid_boxes += 1
                inverted += box[2] < box[0] or box[3] < box[1]
                note("invalid_box", _describe(index, sample))
                continue
            self.samples.append(sample if isinstance(sample.box, tuple) and box == sample.box else replace(sample, box=box))
            self.source_indices.append(index)
        report.num_kept = len(self.samples)
        report.examples = {kind: found for kind, found in examples.items() if found}
        self._warn(examples, inverted)
        percentages = percentages_warning(sized, largest, smallest_side)
        if percentages:
            warnings.warn(percentages, RECDataWarning, stacklevel=3)
        if not self.samples:
            raise ValueError(
                f"No valid samples among {report.num_input}: {report.num_empty_expressions} empty expressions, "
                f"{report.num_invalid_boxes} invalid boxes, {report.num_unreadable_images} unreadable images."
            )

    def _warn(self, examples: dict[str, list[str]], inverted: int = 0) -> None:
        report = self.report
        if report.num_clipped:
            many = report.num_clipped * 4 >= report.num_input  # a few boxes a pixel past the edge are common
            hint = (". So many boxes reaching outside their image suggest a wrong box format: an xyxy box read as "
                    "xywh reaches past the image by its x0, y0; check box_format (--box-format)" if many else "")
            warnings.warn(
                f"Clipped {report.num_clipped} of {report.num_input} boxes to their image, e.g. "
                + "; ".join(examples["clipped"]) + hint,
                RECDataWarning,
                stacklevel=3,
            )
        dropped = report.num_invalid_boxes + report.num_empty_expressions
        if dropped:
            parts = []
            if report.num_invalid_boxes:
                parts.append(
                    f"{report.num_invalid_boxes} with a degenerate or invalid box (e.g. "
                    + "; ".join(examples["invalid_box"])
                    + ")"
                )
            if report.num_empty_expressions:
                parts.append(
                    f"{report.num_empty_expressions} with an empty expression (e.g. "
                    + "; ".join(examples["empty_expression"])
                    + ")"
                )
            hint = (". So many boxes with x1 < x0 or y1 < y0 suggest a wrong box format: an xywh box read as xyxy "
                    "ends before it starts wherever its width is less than its x0 (and the boxes kept are wrong too); "
                    "check box_format (--box-format)" if inverted > 1 and inverted * 4 >= report.num_input else "")
            warnings.warn(f"Dropped {dropped} of {report.num_input} samples: " + "; ".join(parts) + hint, RECDataWarning,
                          stacklevel=3)
        if report.num_unreadable_images:
            warnings.warn(
                f"Skipped {report.num_unreadable_images} of {report.num_input} samples whose image could not be read "
                f"({report.unreadable_files} files), e.g. " + "; ".join(examples["unreadable"]),
                RECDataWarning,
                stacklevel=3,
            )

    def __len__(self) -> int:
        """Number of kept samples (one per expression)."""
        return len(self.samples)

    def __getitem__(self, index: int) -> Any:
        """``{"image", "expression", "box", "image_id", "index", "metadata"}``, or the transform's output.

        ``image`` is an RGB PIL image, ``box`` the ``(x0, y0, x1, y1)`` pixel box (clipped to the image) and
        ``index`` the position in this dataset (``metadata`` is a copy of the sample's).

        Raises ``ValueError`` naming the sample when its box lies outside the decoded image (nothing is left after
        clipping): boxes of images not read while building (see ``validate_images``) are checked here.
        """
        try:
            index = operator.index(index)
        except TypeError:
            raise TypeError(f"RECDataset indices must be integers, got {type(index).__name__} {index!r}.") from None
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for a dataset of {len(self)} samples")
        index = index % len(self)
        sample = self.samples[index]
        try:
            image = load_image(sample.image, exif_transpose=self.exif_transpose, background=self.background)
        except _IMAGE_ERRORS as err:
            context = f"Sample {index} (source index {self.source_indices[index]}, image_id={sample.image_id!r})"
            raise _with_context(err, context) from err
        check_annotated_size(sample, image.size, exif_transpose=self.exif_transpose, where=(
            f"Sample {index} (source index {self.source_indices[index]}, image_id={sample.image_id!r})"))
        check_pixel_box(box_values(sample.box), image.size, where=(
            f"Sample {index} (source index {self.source_indices[index]}, image_id={sample.image_id!r})"))
        box = _clip(box_values(sample.box), *image.size)
        if box[2] <= box[0] or box[3] <= box[1]:
            raise ValueError(
                f"Sample {index} (source index {self.source_indices[index]}, image_id={sample.image_id!r}): the box "
                f"{tuple(sample.box)} lies outside its {image.size[0]}x{image.size[1]} image (nothing is left after "
                "clipping). Fix or remove the sample; RECDataset(..., skip_invalid=True) reads every image when it "
                "is built and drops such samples."
            )
        if self.transform is not None:
            return self.transform(image, sample.expression, box)
        return {
            "image": image,
            "expression": sample.expression,
            "box": box,
            "image_id": sample.image_id,
            "index": index,
            "metadata": dict(sample.metadata),
        }

    def __repr__(self) -> str:
        """A one-line summary with the validation counts."""
        report = self.report
        return (
            f"RECDataset({len(self)} samples; dropped {report.num_invalid_boxes} invalid boxes, "
            f"{report.num_empty_expressions} empty expressions, skipped {report.num_unreadable_images} unreadable; "
            f"clipped {report.num_clipped})"
        )
